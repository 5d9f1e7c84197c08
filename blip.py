"""BLIP (Li et al. 2022), the second model family: Hugging Face `transformers`' BlipForConditionalGeneration behind
the encoder/decoder interface of the attention models, so that one training loop (trainer.py), one beam search
(models.beam_search), one set of metrics (eval.py) and one captions CSV (caption.py) serve both.

- BlipEncoder: BLIP's vision transformer. uint8 images (B, 3, H, W) -> patch embeddings (B, 1 + N, C), [CLS] first.
- BlipDecoder: BLIP's text decoder (a BERT with causal self-attention and cross-attention to the patches). It speaks
  BLIP's own sub-word tokens: training captions, stored as the data's word ids, are spelled in those tokens (each word
  of the word map tokenized once), and its teacher-forcing losses are summed back onto the data's words, so that
  train loss and top-5 accuracy mean what they mean for the attention models (per word, <end> included).
  Decoding goes through the same beam search; the step API re-reads the whole prefix at every step (no key/value
  cache: captions are short, and the cache's API changes between transformers releases).
- BLIP has no spatial soft attention over a grid: `attends` is False, so caption.py writes no attention plot and
  eval.py --grounding scores its captions' truth but no attention grounding.

A checkpoint of a BLIP model is a sat checkpoint like any other (trainer.py, checkpoints.py); its model_config is
BlipSpec.to_dict(): the transformers BlipConfig as a dict, the tokenizer as JSON text and the image normalisation.
`transformers` is imported only here, and only when a BLIP model is built.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import Caption, Decoder, Memory, State
from utils import SatError, brief

FAMILY = "blip"
HUB_MODEL = "Salesforce/blip-image-captioning-base"
MAX_TOKENIZER_CHARS = 64 * 2 ** 20
# A hostile config must not make the meta-device model build for hours: sizes beyond these are refused.
LIMITS = {"num_hidden_layers": 64, "hidden_size": 8192, "intermediate_size": 65536, "num_attention_heads": 256,
          "vocab_size": 1_000_000, "max_position_embeddings": 65536, "encoder_hidden_size": 8192,
          "image_size": 1024, "patch_size": 1024}
# From-scratch sizes for init_blip.py: "tiny" for tests, "small" for the CPU comparison with the shapes demo, "base"
# is BLIP-base's architecture (ViT-B/16 at 384 px, a 12-layer BERT-base decoder).
SIZES = {"tiny": dict(hidden=32, layers=2, heads=2, ffn=64, patch=16),
         "small": dict(hidden=128, layers=3, heads=4, ffn=256, patch=16),
         "base": dict(hidden=768, layers=12, heads=12, ffn=3072, patch=16)}
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")  # BLIP's, with [DEC] its decoder's <bos>


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SatError("BLIP needs the transformers package: pip install -r requirements.txt") from None
    transformers.logging.set_verbosity_error()  # its notes on unused weights etc. are not the user's problem
    transformers.utils.logging.disable_progress_bar()
    return transformers


@dataclass
class BlipSpec:
    """Everything needed to rebuild a BLIP model without its folder: a checkpoint's model_config."""
    hf_config: dict  # transformers.BlipConfig.to_dict()
    tokenizer: str  # the tokenizers JSON of its (BERT WordPiece) tokenizer
    image_mean: list[float]
    image_std: list[float]

    vocab = FAMILY  # what texts are made of: BLIP's own sub-words, which it decodes itself
    decoder = FAMILY

    def to_dict(self) -> dict:
        return {"family": FAMILY, **asdict(self)}

    @property
    def image_size(self) -> int:
        return int(self.hf_config["vision_config"]["image_size"])


def is_blip(model_config: Any) -> bool:
    return isinstance(model_config, dict) and model_config.get("family") == FAMILY


def special_ids(text_config: dict) -> tuple[int, int, int]:
    """(<start>, <end>, <pad>) in BLIP's tokens: its decoder starts from bos ([DEC]) and, as its generate() does,
    ends a caption at [SEP]."""
    return int(text_config["bos_token_id"]), int(text_config["sep_token_id"]), int(text_config["pad_token_id"])


class BlipEncoder(nn.Module):
    """BLIP's vision transformer, fed the project's uint8 images: resized (bicubic, as BlipImageProcessor does) to
    its image size, then normalised with its processor's mean and std."""

    name = "blip-vit"

    def __init__(self, vision_model: nn.Module, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.vision, self.image_size = vision_model, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.fine_tune(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, 3, H, W) -> encoder_out (B, 1 + N, C)."""
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.image_size).clamp(0, 255)
        x = (x - self.mean) / self.std
        return self.vision(pixel_values=x.to(self.mean.dtype)).last_hidden_state

    def fine_tune(self, enabled: bool = True) -> None:
        """All of the vision transformer, or none of it (then it stays in eval mode)."""
        self.frozen = not enabled
        for p in self.vision.parameters():
            p.requires_grad = enabled

    def train(self, mode: bool = True) -> "BlipEncoder":
        super().train(mode)
        if self.frozen:
            self.vision.eval()
        return self


class BlipDecoder(Decoder):
    """BLIP's text decoder under the step API and teacher-forcing interface of models.Decoder."""

    attends = False  # cross-attention over patches, but no weights over a grid that sum to one per word

    def __init__(self, text_decoder: nn.Module, tokenizer: Any, specials: tuple[int, int, int],
                 word_map: dict[str, int] | None = None):
        super().__init__()
        self.text, self.tokenizer = text_decoder, tokenizer
        self.start, self.end, self.pad = specials
        self.pieces: list[list[int]] | None = None  # data word id -> BLIP token ids, for teacher forcing
        if word_map is not None:
            self.pieces = self.spell_vocabulary(word_map)
        # Parameter names that are another's tensor (the output layer is the word embeddings, tied as in BLIP):
        # left out of state_dict, so that a checkpoint stores each tensor once and never two views of one storage.
        first: dict[int, str] = {}
        self.tied: dict[str, str] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in first:
                self.tied[name] = first[id(p)]
            else:
                first[id(p)] = name

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name in self.tied:
            state.pop(prefix + name, None)
        return state

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        state = dict(state_dict)
        for name, original in self.tied.items():
            if original in state:
                state.setdefault(name, state[original])
        return super().load_state_dict(state, strict, assign)

    def spell_vocabulary(self, word_map: dict[str, int]) -> list[list[int]]:
        """Each word of the data's word map in BLIP's tokens (<unk> as its [UNK]; the other specials as none)."""
        unk = self.tokenizer.token_to_id("[UNK]")
        pieces: list[list[int]] = [[] for _ in range(max(word_map.values()) + 1)]
        for word, i in word_map.items():
            if word == "<unk>":
                pieces[i] = [unk]
            elif word not in ("<pad>", "<start>", "<end>"):
                pieces[i] = self.tokenizer.encode(word, add_special_tokens=False).ids or [unk]
        return pieces

    def special_tokens(self, word_map: dict[str, int]) -> tuple[int, int, int]:
        return self.start, self.end, self.pad

    def memory(self, encoder_out: torch.Tensor) -> Memory:
        return {"image": encoder_out}

    def init_state(self, memory: Memory, rows_per_image: int) -> State:
        rows = memory["image"].size(0) * rows_per_image
        return {"prefix": torch.empty(rows, 0, dtype=torch.long, device=memory["image"].device)}

    def step(self, words: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, State]:
        prefix = torch.cat([state["prefix"], words.unsqueeze(1)], dim=1)  # (B*K, t + 1)
        # Beam search keeps each image's K rows together, image-major: row r belongs to image r // K.
        image = memory["image"].repeat_interleave(prefix.size(0) // memory["image"].size(0), dim=0)
        logits = self.text(input_ids=prefix, encoder_hidden_states=image, use_cache=False).logits[:, -1]
        return logits, logits.new_zeros(len(words), 0), {"prefix": prefix}

    def forward(self, encoder_out: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing as models.Decoder.forward: encoder_out (B, P, C), captions (B, K, L) in the data's word
        ids, lengths (B, K) -> nll (B*K, T) of each word (the sum over its BLIP tokens), whether all its tokens were
        in the top 5, and alphas (B*K, T, 0); T = max(lengths) - 1 and 0 past each caption's end.

        Right padding needs no attention mask: causal self-attention never lets a real token see the pads."""
        ids, word_of = self.spell(captions, lengths)  # (N, L'), (N, L' - 1)
        image = encoder_out.repeat_interleave(captions.size(1), dim=0)  # (N, P, C)
        logits = self.text(input_ids=ids, encoder_hidden_states=image, use_cache=False).logits[:, :-1]
        targets = ids[:, 1:]  # (N, L' - 1)
        real = word_of >= 0
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none") * real
        token_top5 = (logits.detach().topk(5, dim=2).indices == targets.unsqueeze(2)).any(dim=2) | ~real
        N, T = ids.size(0), int(lengths.max()) - 1
        where = word_of.clamp(min=0)
        nll = token_nll.new_zeros(N, T).scatter_add(1, where, token_nll)
        top5 = torch.ones(N, T, dtype=torch.long, device=ids.device).scatter_reduce(1, where, token_top5.long(),
                                                                                    "amin")
        in_caption = torch.arange(T, device=ids.device) < (lengths.flatten() - 1).unsqueeze(1)
        return nll, top5.bool() & in_caption, logits.new_zeros(N, T, 0)

    def spell(self, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The data's captions in BLIP's tokens: [DEC] pieces... [SEP] per row (N, L'), right-padded; and for each
        target token (position 1 on) the index of the data's word it spells, <end> for [SEP], -1 for padding."""
        if self.pieces is None:
            raise SatError("this BLIP model has no word map to read training captions with (a pretrained folder, "
                           "not a train.py checkpoint)")
        rows, owners = [], []
        for caption, n in zip(captions.flatten(0, 1).tolist(), lengths.flatten().tolist()):
            tokens, owner = [self.start], []
            for j, word in enumerate(caption[1:n - 1]):
                tokens += self.pieces[word]
                owner += [j] * len(self.pieces[word])
            rows.append(tokens + [self.end])
            owners.append(owner + [n - 2])  # [SEP] is the data's <end>, the caption's last target
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], device=captions.device)
        word_of = torch.tensor([o + [-1] * (width - 1 - len(o)) for o in owners], device=captions.device)
        return ids, word_of


class BlipCaptioner(nn.Module):
    """A BLIP model where a models.CaptionModel stands: `.encoder`, `.decoder`, `.config` (a BlipSpec), `.name`."""

    name = FAMILY

    def __init__(self, spec: BlipSpec, word_map: dict[str, int] | None = None, hf_model: nn.Module | None = None):
        super().__init__()
        transformers = _transformers()
        from tokenizers import Tokenizer
        self.config = spec
        if hf_model is None:
            hf_model = transformers.BlipForConditionalGeneration(transformers.BlipConfig.from_dict(spec.hf_config))
        self.encoder = BlipEncoder(hf_model.vision_model, spec.image_size, spec.image_mean, spec.image_std)
        self.decoder = BlipDecoder(hf_model.text_decoder, Tokenizer.from_str(spec.tokenizer),
                                   special_ids(spec.hf_config["text_config"]), word_map)

    def sentences(self, captions: list[Caption], word_map: dict[str, int] | None = None) -> list[str]:
        """The captions as text, decoded by BLIP's own tokenizer (WordPiece pieces joined into words)."""
        return [self.decoder.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in captions]

    def hf_model(self) -> nn.Module:
        """This model as a transformers BlipForConditionalGeneration sharing its weights (for save_pretrained)."""
        transformers = _transformers()
        with torch.device("meta"):
            model = transformers.BlipForConditionalGeneration(transformers.BlipConfig.from_dict(self.config.hf_config))
        model.vision_model, model.text_decoder = self.encoder.vision, self.decoder.text
        return model


# ------------------------------------------------------------------------------------------- pretrained folders

def from_pretrained(name_or_path: str, word_map: dict[str, int] | None = None) -> BlipCaptioner:
    """A BLIP model from a folder in the Hugging Face layout (save_pretrained, or a Hub download) or a Hub name
    (from the local Hugging Face cache, else downloaded when the Hub answers). Weights only from safetensors (no
    pickle), and never code from the folder (no trust_remote_code)."""
    transformers = _transformers()
    local = Path(name_or_path).exists()
    if not local and not _reachable_hub_name(name_or_path):
        raise SatError(f"{name_or_path}: no such folder, and not a Hugging Face Hub model that can be fetched from "
                       f"here; download it once where there is a network (hf download {HUB_MODEL} --local-dir "
                       "blip-base) and pass --pretrained blip-base, or make a from-scratch model with init_blip.py")
    try:
        processor = transformers.BlipProcessor.from_pretrained(name_or_path)
        hf_model = transformers.BlipForConditionalGeneration.from_pretrained(name_or_path, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise SatError(f"{name_or_path}: not a BLIP model in the Hugging Face layout (safetensors weights and "
                       f"processor files): {str(e).splitlines()[0][:200]}") from None
    if getattr(hf_model.config, "model_type", None) != FAMILY:
        raise SatError(f"{name_or_path}: a '{hf_model.config.model_type}' model, not BLIP")
    image = processor.image_processor
    # Through JSON: plain lists and dicts only (no tuples), so that a safetensors export's JSON metadata hashes the
    # same as the checkpoint it came from.
    spec = BlipSpec(json.loads(hf_model.config.to_json_string()), processor.tokenizer.backend_tokenizer.to_str(),
                    [float(v) for v in image.image_mean], [float(v) for v in image.image_std])
    check_spec(spec.to_dict(), name_or_path)
    return BlipCaptioner(spec, word_map, hf_model)


def _reachable_hub_name(name: str) -> bool:
    """Whether `name` is a Hub model id (owner/name) that is in the local cache or whose Hub answers. Asked once,
    quickly: offline, transformers would retry for minutes before it gives up."""
    import re
    import socket
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        return False
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        return False
    return True


def is_pretrained_folder(path: str) -> bool:
    """A folder in the Hugging Face layout (config.json), rather than a checkpoint file."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def write_scratch_folder(folder: str | Path, word_map: dict[str, int], size: str = "small",
                         image_size: int = 224) -> Path:
    """A randomly initialised BLIP of one of SIZES, with a WordPiece tokenizer whose vocabulary is BLIP's special
    tokens and the data's words, saved as a Hugging Face folder (safetensors, processor files) that --pretrained
    reads. Written to a temp folder, then renamed: never half a model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from utils import atomic_folder
    transformers = _transformers()
    if size not in SIZES:
        raise SatError(f"unknown BLIP size '{size}' (choose from {', '.join(SIZES)})")
    s = SIZES[size]
    words = [w for w in sorted(word_map, key=word_map.get) if w not in ("<pad>", "<start>", "<end>", "<unk>")]
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    text = transformers.BlipTextConfig(
        vocab_size=len(vocab), hidden_size=s["hidden"], encoder_hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["ffn"], max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[DEC]"], eos_token_id=vocab["[SEP]"],
        sep_token_id=vocab["[SEP]"])
    vision = transformers.BlipVisionConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                           num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                                           image_size=image_size, patch_size=s["patch"])
    config = transformers.BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    model = transformers.BlipForConditionalGeneration(config)
    image = transformers.BlipImageProcessor()  # its defaults: CLIP's mean and std, as BLIP's own
    processor = _processor(tokenizer, image_size, image.image_mean, image.image_std)
    with atomic_folder(Path(folder)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(folder)


def _processor(tokenizer: Any, image_size: int, mean: list[float], std: list[float]) -> Any:
    """A BlipProcessor: BLIP's BERT special tokens around a WordPiece `tokenizers.Tokenizer`, square images."""
    transformers = _transformers()
    fast = transformers.BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                          pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                          bos_token="[DEC]")
    image = transformers.BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=mean,
                                            image_std=std)
    return transformers.BlipProcessor(image, fast)


def save_pretrained(model: BlipCaptioner, folder: str | Path) -> Path:
    """A trained BLIP as a Hugging Face folder (transformers and --pretrained read it), written atomically."""
    from tokenizers import Tokenizer
    from utils import atomic_folder
    spec = model.config
    processor = _processor(Tokenizer.from_str(spec.tokenizer), spec.image_size, spec.image_mean, spec.image_std)
    with atomic_folder(Path(folder)) as tmp:
        model.hf_model().save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(folder)


# -------------------------------------------------------------------------------------------------- checkpoints

def check_spec(values: Any, source: str) -> BlipSpec:
    """A checkpoint's BLIP model_config, checked before anything is built from it: one SatError otherwise."""
    if not is_blip(values) or set(values) != {"family", "hf_config", "tokenizer", "image_mean", "image_std"}:
        raise SatError(f"{source}: its BLIP model_config is not family, hf_config, tokenizer, image_mean, image_std")
    hf = values["hf_config"]
    if not isinstance(hf, dict) or hf.get("model_type") != FAMILY or not all(
            isinstance(hf.get(k), dict) for k in ("text_config", "vision_config")):
        raise SatError(f"{source}: its hf_config is not a BLIP config with a text_config and a vision_config")
    for part in ("text_config", "vision_config"):
        for key, limit in LIMITS.items():
            value = hf[part].get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or
                                      not 1 <= value <= limit):
                raise SatError(f"{source}: hf_config.{part}.{key} is {brief(value)}, not from 1 to {limit}")
    text = hf["text_config"]
    try:
        ids = special_ids(text)
    except (KeyError, TypeError, ValueError):
        raise SatError(f"{source}: hf_config.text_config lacks its bos, sep and pad token ids") from None
    if not all(0 <= i < text.get("vocab_size", 0) for i in ids):
        raise SatError(f"{source}: hf_config.text_config's special token ids {ids} are outside its vocabulary")
    tokenizer = values["tokenizer"]
    if not isinstance(tokenizer, str) or len(tokenizer) > MAX_TOKENIZER_CHARS:
        raise SatError(f"{source}: its BLIP tokenizer is {brief(tokenizer)}, not the JSON text of one")
    for name in ("image_mean", "image_std"):
        v = values[name]
        if not isinstance(v, list) or len(v) != 3 or not all(
                isinstance(x, float) and math.isfinite(x) and (name == "image_mean" or x > 0) for x in v):
            raise SatError(f"{source}: its {name} is {brief(v)}, not 3 finite numbers")
    return BlipSpec(hf, tokenizer, values["image_mean"], values["image_std"])


def meta_model(values: Any, source: str) -> BlipCaptioner:
    """The model a checkpoint's BLIP model_config builds, on the meta device (no memory for its sizes)."""
    spec = check_spec(values, source)
    from tokenizers import Tokenizer
    try:
        Tokenizer.from_str(spec.tokenizer)
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own exception types
        raise SatError(f"{source}: its BLIP tokenizer is not readable ({str(e).splitlines()[0][:200]})") from None
    try:
        with torch.device("meta"):
            return BlipCaptioner(spec)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise SatError(f"{source}: its hf_config does not build a BLIP model ({str(e).splitlines()[0][:200]})") \
            from None
