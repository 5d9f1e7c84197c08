"""Ensembles: several trained captioners decoding together through the one beam search.

At every step each member scores the next word from its own state, and the ensemble's scores are the mean of the
members' log-probabilities (beam_search's log_softmax then renormalises them: the normalised geometric mean of the
members' distributions). One search runs for all members at once: `Ensemble` is a Decoder whose memory and state
are the members' own, keyed "i.name", so that beam search reorders and drops them as it does any decoder's.

Members share the word map and the image size; their encoders and decoders may differ. `EnsembleEncoder` runs
each distinct encoder once (members with identical encoder weights, as frozen-encoder models trained from the same
ImageNet weights have, share one run), and `Ensemble.memory` hands each member its own encoder's features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import blip
from checkpoints import load_checkpoint, model_from_checkpoint
from config import ENCODER_CHANNELS
from models import Caption, CaptionModel, Decoder, Encoder, Memory, State
from utils import SatError


def same_encoder(a: Encoder, b: Encoder) -> bool:
    """Whether two encoders compute the same features: same network, stage, grid and weights."""
    if a.name != b.name or a.stride != b.stride or a.pool.output_size != b.pool.output_size:
        return False
    theirs = b.state_dict()
    return all(torch.equal(t, theirs[name]) for name, t in a.state_dict().items())


class EnsembleEncoder(nn.Module):
    """The members' distinct encoders. With one, its output is the features (B, P, C) themselves (so a feature
    cache of that encoder serves the ensemble); with several, each one's (B, P_i, C_i) is flattened and they are
    concatenated into (B, 1, sum of P_i * C_i), one tensor for beam search to carry, split again by
    `Ensemble.features`."""

    def __init__(self, encoders: list[Encoder]):
        super().__init__()
        distinct: list[Encoder] = []
        self.index: list[int] = []  # member -> its encoder among `distinct`
        for encoder in encoders:
            match = next((j for j, d in enumerate(distinct) if same_encoder(d, encoder)), None)
            if match is None:
                distinct.append(encoder)
                match = len(distinct) - 1
            self.index.append(match)
        self.encoders = nn.ModuleList(distinct)
        self.shapes = [(e.pool.output_size[0] * e.pool.output_size[1], ENCODER_CHANNELS[e.name][e.stride])
                       for e in distinct]

    @property
    def shared(self) -> Encoder | None:
        """The one encoder of every member, or None when they differ."""
        return self.encoders[0] if len(self.encoders) == 1 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = [encoder(images) for encoder in self.encoders]  # (B, P_i, C_i) each
        if len(outputs) == 1:
            return outputs[0]
        return torch.cat([out.flatten(1) for out in outputs], dim=1).unsqueeze(1)  # (B, 1, sum P_i C_i)


class Ensemble(Decoder):
    """Several decoders driven as one through the step API; log-probabilities averaged at every step.

    Its alpha is the mean of the attending members' pixel weights (adaptive attention's renormalised to sum to 1,
    its sentinel left out), on the first attending member's grid (a member on another grid is resampled to it);
    width 0 when no member attends.
    """

    sentinel = False

    def __init__(self, decoders: list[Decoder], encoder_index: list[int], shapes: list[tuple[int, int]],
                 grids: list[int]):
        super().__init__()
        self.members = nn.ModuleList(decoders)
        self.encoder_index, self.shapes, self.grids = encoder_index, shapes, grids  # grids: each member's S
        attending = [g for d, g in zip(decoders, grids) if d.attends]
        self.attends = bool(attending)
        self.grid = attending[0] if attending else 0

    def alpha_size(self, num_pixels: int) -> int:
        return self.grid * self.grid  # its own grid, whatever the packed features' shape says

    def features(self, encoder_out: torch.Tensor) -> list[torch.Tensor]:
        """EnsembleEncoder's output -> each distinct encoder's features (B, P_i, C_i)."""
        if len(self.shapes) == 1:
            return [encoder_out]
        parts = encoder_out.flatten(1).split([P * C for P, C in self.shapes], dim=1)
        return [part.view(len(encoder_out), P, C) for part, (P, C) in zip(parts, self.shapes)]

    @staticmethod
    def _own(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        prefix = f"{i}."
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def memory(self, encoder_out: torch.Tensor) -> Memory:
        features = self.features(encoder_out)
        return {f"{i}.{k}": v for i, member in enumerate(self.members)
                for k, v in member.memory(features[self.encoder_index[i]]).items()}

    def init_state(self, memory: Memory, rows_per_image: int) -> State:
        return {f"{i}.{k}": v for i, member in enumerate(self.members)
                for k, v in member.init_state(self._own(memory, i), rows_per_image).items()}

    def step(self, words: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        """words (B*K,) -> the members' mean log-probabilities (B*K, V), alpha (B*K, S*S), the next state."""
        log_probs, maps, next_state = [], [], {}
        for i, member in enumerate(self.members):
            logits, alpha, own = member.step(words, self._own(state, i), self._own(memory, i))
            log_probs.append(torch.log_softmax(logits.float(), dim=1))
            if member.attends:
                maps.append(self._pixel_weights(alpha.float(), member, self.grids[i]))
            next_state.update({f"{i}.{k}": v for k, v in own.items()})
        alpha = torch.stack(maps).mean(dim=0) if maps else torch.empty(len(words), 0, device=words.device)
        return torch.stack(log_probs).mean(dim=0), alpha, next_state

    def _pixel_weights(self, alpha: torch.Tensor, member: Decoder, grid: int) -> torch.Tensor:
        """A member's alpha (rows, alpha_size) -> weights over the ensemble's grid (rows, S*S) that sum to 1 (or to 0
        where the member looked at no pixel)."""
        pixels = alpha[:, :grid * grid]
        if member.sentinel or grid != self.grid:
            if grid != self.grid:
                pixels = F.adaptive_avg_pool2d(pixels.view(-1, 1, grid, grid), self.grid).flatten(1)
            pixels = pixels / pixels.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return pixels

    def forward(self, *args, **kwargs):  # type: ignore[override]
        raise NotImplementedError("an ensemble only decodes (beam search); train its members one by one")


class EnsembleModel(nn.Module):
    """Trained CaptionModels decoding as one: `.encoder` and `.decoder` stand where a CaptionModel's do."""

    def __init__(self, models: list[CaptionModel]):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.encoder = EnsembleEncoder([m.encoder for m in models])
        self.decoder = Ensemble([m.decoder for m in models], self.encoder.index, self.encoder.shapes,
                                [m.config.encoded_size for m in models])
        self.name = "ensemble of " + ", ".join(m.config.decoder for m in models)

    @property
    def config(self):
        """The first member's config: what the members share (the vocabulary) is read from it."""
        return self.members[0].config

    def sentences(self, captions: list[Caption], word_map: dict[str, int]) -> list[str]:
        return self.members[0].sentences(captions, word_map)


def load_models(paths: list[str], trust: bool = False) -> tuple[nn.Module, dict[str, int] | None, int]:
    """A CaptionModel for one checkpoint, an EnsembleModel for several: (model, word map, image size). A BLIP
    model (a train.py checkpoint of one, or a folder in the Hugging Face layout, whose word map is None) decodes
    alone.

    The members must share a word map (the same words at the same ids) and a training image size."""
    if len(paths) == 1 and blip.is_pretrained_folder(paths[0]):
        model = blip.from_pretrained(paths[0])
        return model, None, model.config.image_size
    models, word_map, size = [], None, None
    for path in paths:
        if blip.is_pretrained_folder(path):
            raise SatError(f"{path}: a BLIP model cannot join an ensemble (its tokens are not the attention "
                           "models' words); evaluate it alone")
        checkpoint = load_checkpoint(path, trust=trust)
        if blip.is_blip(checkpoint["model_config"]) and len(paths) > 1:
            raise SatError(f"{path}: a BLIP model cannot join an ensemble (its tokens are not the attention "
                           "models' words); evaluate it alone")
        model, own_map = model_from_checkpoint(checkpoint, path)
        own_size = int(checkpoint.get("image_size", 256))
        if word_map is not None and own_map != word_map:
            raise SatError(f"{path}: its word map ({len(own_map)} words) differs from that of {paths[0]} "
                           f"({len(word_map)} words): ensemble members must share one vocabulary")
        if size is not None and own_size != size:
            raise SatError(f"{path}: trained on {own_size} px images, {paths[0]} on {size} px: ensemble members "
                           "must share the image size")
        models.append(model)
        word_map, size = own_map, own_size
    assert word_map is not None and size is not None
    return (models[0] if len(models) == 1 else EnsembleModel(models)), word_map, size


def feature_encoder(model: nn.Module) -> Encoder:
    """The encoder whose feature cache a model (or ensemble) decodes from."""
    if isinstance(model.encoder, blip.BlipEncoder):
        raise SatError("--cache-features caches the CNN encoders' features; a BLIP model reads its images: drop "
                       "--cache-features")
    if not isinstance(model, EnsembleModel):
        return model.encoder
    if model.encoder.shared is None:
        raise SatError(f"--cache-features: the ensemble's members have {len(model.encoder.encoders)} different "
                       "encoders (each reads its own features); drop --cache-features")
    return model.encoder.shared
