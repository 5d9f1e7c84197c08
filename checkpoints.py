"""Checkpoint I/O: atomic writes, loading without running code, safetensors exports, upgrading older formats, checking
a loaded checkpoint before anything uses it, and rebuilding the model from a checkpoint alone.

A checkpoint is a dict of plain data and tensors (torch.save's zip format): the encoder and decoder state_dicts,
the ModelConfig and TrainConfig as dicts, the word map (and, for BPE sub-words, the tokenizer as a JSON string),
the training image size and, for a training checkpoint, the optimizer (learning rates included), loss-scaler and
RNG states, the position in the run (Progress) and the embedding rows that --embeddings initialised. `format` is
its version: 2 since the doubly stochastic penalty became the paper's sum over pixels and the deep output layer the
default; 3 since every checkpoint carries `content_sha256`, a hash of all the rest.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from config import LEGACY_MODEL_OPTIONS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ModelConfig, TrainConfig, from_dict
import blip
from models import CaptionModel
from utils import SatError, atomic_path, brief, finite_float, non_negative_int, validate_word_map

FORMAT = 3
MODEL_PARTS = ("format", "model_config", "word_map", "image_size", "encoder", "decoder")
TRAINING_PARTS = ("train_config", "optimizer", "scaler", "rng", "progress")
OPTIONAL_MODEL_PARTS = ("tokenizer",)  # a BPE vocabulary's tokenizer, JSON text
OPTIONAL_TRAINING_PARTS = ("pretrained_rows",)  # the embedding rows --embeddings initialised (--freeze-embeddings)
MAX_TOKENIZER_CHARS = 64 * 2 ** 20


@dataclass
class Progress:
    """Where training stands; saved in checkpoints so that --resume continues exactly here."""
    epoch: int = field(default=0, metadata={"parse": non_negative_int})
    batches_done: int = field(default=0, metadata={"parse": non_negative_int})  # in the current epoch
    step: int = field(default=0, metadata={"parse": non_negative_int})  # optimizer steps over the whole run
    best_score: float = field(default=-1.0, metadata={"parse": finite_float})
    epochs_since_improvement: int = field(default=0, metadata={"parse": non_negative_int})
    loss_sum: float = field(default=0.0, metadata={"parse": finite_float})  # this epoch's sums, for the averages
    top5_sum: float = field(default=0.0, metadata={"parse": finite_float})
    tokens: int = field(default=0, metadata={"parse": non_negative_int})
    reward_sum: float = field(default=0.0, metadata={"parse": finite_float})  # SCST: CIDEr-D of the samples
    samples: int = field(default=0, metadata={"parse": non_negative_int})


# ------------------------------------------------------------------------------------------------------ writing

def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write atomically, with the content hash: a crash or a full disk mid-write leaves the previous checkpoint
    intact, and a file damaged later is refused when loaded.

    Raises OSError when the file cannot be written (torch.save reports those as RuntimeError).
    """
    content = {**_to_cpu(checkpoint), "format": FORMAT}  # hashed as it is written, whatever device trained
    content["content_sha256"] = content_hash(content)
    with atomic_path(path) as tmp:
        try:
            torch.save(content, tmp)
        except RuntimeError as e:
            raise OSError(f"write failed ({str(e).splitlines()[0]}); is the disk full?") from e


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def export_safetensors(checkpoint: dict, path: str | os.PathLike) -> None:
    """Weights as safetensors, with the model config, word map, image size and content hash as JSON metadata: a
    file anyone can load without trusting it, and that eval.py and caption.py read like a checkpoint."""
    from safetensors.torch import save_file
    model = {"format": FORMAT, **{k: checkpoint[k] for k in (*MODEL_PARTS, *OPTIONAL_MODEL_PARTS)
                                  if k != "format" and k in checkpoint}}
    # Cloned: tied weights (BLIP's output layer is its word embeddings) share memory, which safetensors refuses.
    tensors = {f"{part}.{name}": t.contiguous().clone() for part in ("encoder", "decoder")
               for name, t in model[part].items()}
    metadata = {"format": "sat", "version": str(FORMAT), "model_config": json.dumps(model["model_config"]),
                "word_map": json.dumps(model["word_map"]), "image_size": str(model["image_size"]),
                **({"tokenizer": model["tokenizer"]} if "tokenizer" in model else {}),
                "content_sha256": content_hash(model)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# --------------------------------------------------------------------------------------------------- the hash

def content_hash(content: dict) -> str:
    """SHA-256 of a checkpoint's whole content but the hash itself: every tensor's dtype, shape and bytes, and
    every other value (configs, word map, progress, optimizer settings), in a canonical order.

    It catches damage (a bit flip, bytes overwritten, a copy cut short that still unzips), not a forger, who can
    recompute it: that is what loading without pickle and validate() are for. Tensors are hashed on every core
    (hashlib releases the GIL), so a 500 MB checkpoint costs about a second of one core, split over the others.
    """
    digest, tensors = hashlib.sha256(), []
    try:
        _feed(digest, {k: v for k, v in content.items() if k != "content_sha256"}, tensors)
    except RecursionError:
        raise SatError("nested too deeply to be a checkpoint") from None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for tensor_digest in pool.map(_tensor_digest, tensors):
            digest.update(tensor_digest)
    return digest.hexdigest()


def _feed(digest: Any, value: Any, tensors: list[torch.Tensor]) -> None:
    """The structure and the small values go into `digest` directly; tensors are only listed, hashed later."""
    if isinstance(value, torch.Tensor):
        digest.update(b"T")
        tensors.append(value)
    elif isinstance(value, dict):
        digest.update(b"d%d:" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, _text(k))):
            _feed(digest, key, tensors)
            _feed(digest, value[key], tensors)
    elif isinstance(value, (list, tuple)):
        digest.update(b"%s%d:" % (b"l" if isinstance(value, list) else b"t", len(value)))
        for item in value:
            _feed(digest, item, tensors)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}:{_text(value)};".encode("utf-8", "surrogatepass"))
    else:
        raise SatError(f"holds a {type(value).__name__}, which a sat checkpoint never does")


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return value.hex() if isinstance(value, float) else hex(value)  # exact, and hex() has no 4300-digit limit


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy when on CPU
    return digest.digest()


# ------------------------------------------------------------------------------------------------------ reading

def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint (or an exported .safetensors file) without executing code from it (weights_only=True)
    unless `trust` is set, verify its content hash, and check it (validate) before anything uses it."""
    path = Path(path)
    if not path.is_file():
        raise SatError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        checkpoint = _load_safetensors(path)
    else:
        checkpoint = _load_torch(path, trust)
    _check_tensor_memory(checkpoint, path)
    _check_format(checkpoint, path)
    checkpoint = upgrade(checkpoint)
    validate(checkpoint, str(path))
    return checkpoint


def _load_torch(path: Path, trust: bool) -> dict:
    # torch.save writes a zip archive since PyTorch 1.6, and a bare pickle stream (first byte 0x80) before.
    if zipfile.is_zipfile(path):
        _check_archive(path)
    elif not _starts_with(path, b"\x80"):
        raise SatError(f"{path}: not a PyTorch checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise SatError(f"{path}: refused: this checkpoint holds pickled Python objects (the old tutorial's "
                           "format), and unpickling them could run arbitrary code. A tutorial checkpoint converts "
                           "once with convert_tutorial.py --trust-checkpoint (README: Coming from the tutorial)") \
                from None
        from tutorial import load_trusted  # here, not at the top: tutorial.py builds on this module
        checkpoint = load_trusted(path)
    except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile file makes the reader raise
        raise SatError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise SatError(f"{path}: not a sat checkpoint (no model_config inside)")
    return checkpoint


def _check_archive(path: Path) -> None:
    """torch.save stores its records uncompressed: a compressed one, or records adding up to more than the file,
    would make loading allocate what the file does not hold (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise SatError(f"{path}: not a readable checkpoint (a damaged zip archive: {_first_line(e)})") from None
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or \
            sum(r.file_size for r in records) > path.stat().st_size:
        raise SatError(f"{path}: refused: its zip records are compressed, which torch.save never does "
                       "(a zip bomb?)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SatError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if metadata.get("format") != "sat":
        raise SatError(f"{path}: a safetensors file without sat's metadata (model_config, word_map)")
    strays = sorted(n for n in tensors if n.split(".", 1)[0] not in ("encoder", "decoder") or "." not in n)
    if strays:
        raise SatError(f"{path}: tensor {brief(strays[0])} belongs to neither the encoder nor the decoder")
    checkpoint = {"format": _metadata(metadata, "version", path, int),
                  "model_config": _metadata(metadata, "model_config", path, json.loads),
                  "word_map": _metadata(metadata, "word_map", path, json.loads),
                  "image_size": _metadata(metadata, "image_size", path, int),
                  **{part: {n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith(part + ".")}
                     for part in ("encoder", "decoder")}}
    for key in ("tokenizer", "content_sha256"):
        if key in metadata:
            checkpoint[key] = metadata[key]
    return checkpoint


def _metadata(metadata: dict[str, str], key: str, path: Path, parse: Any) -> Any:
    if key not in metadata:
        raise SatError(f"{path}: its sat metadata lacks '{key}'")
    try:
        return parse(metadata[key])
    except RecursionError:
        raise SatError(f"{path}: its metadata '{key}' is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError included
        raise SatError(f"{path}: its metadata '{key}' is not valid ({_first_line(e)})") from None


def _check_tensor_memory(checkpoint: dict, path: Path) -> None:
    """Every tensor a plain CPU one, and all of them together no larger than the data they stand on: a view that
    repeats a few bytes (stride 0), or many tensors on one storage, would make the model built from the checkpoint
    (or hashing it) take far more memory than the file holds."""
    storages, logical, physical = set(), 0, 0
    try:
        tensors = list(_tensors(checkpoint))
    except RecursionError:
        raise SatError(f"{path}: nested too deeply to be a checkpoint") from None
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided or tensor.is_quantized:
            raise SatError(f"{path}: holds a {tensor.layout} tensor on {tensor.device}, not a plain one")
        logical += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in storages:
            storages.add(storage.data_ptr())
            physical += storage.nbytes()
    if logical > physical:
        raise SatError(f"{path}: its tensors stand for {logical} bytes but hold {physical}: views repeating the "
                       "same data, which torch.save of a model never writes")


def _tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _check_format(checkpoint: dict, path: Path) -> None:
    """A known format; from format 3 on, content that still hashes to what was written."""
    version = checkpoint.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT:
        raise SatError(f"{path}: unknown checkpoint format {brief(version)} (this sat reads 1 to {FORMAT}; written "
                       "by a newer sat?)")
    if version < 3:
        return  # written before checkpoints carried a hash
    saved = checkpoint.get("content_sha256")
    if not isinstance(saved, str):
        raise SatError(f"{path}: a format-{version} checkpoint without its content hash: damaged or edited")
    try:
        actual = content_hash(checkpoint)
    except SatError as e:
        raise SatError(f"{path}: {e}") from None
    if actual != saved:
        raise SatError(f"{path}: damaged: its content no longer matches the hash written with it (a corrupted "
                       "copy or disk?); use another copy")


def upgrade(checkpoint: dict) -> dict:
    """A checkpoint of an older format, read as the current one computing the same model and loss.

    Format 1 (no `format` key): its model predates the options in LEGACY_MODEL_OPTIONS (it has the tutorial's
    linear output layer), its alpha_c weighed a mean over the P pixels where it now weighs their sum, and it may
    hold the learning-rate scheduler that training no longer uses. Formats 1 and 2 may lack the image size, which
    was then always 256. Malformed parts are left as they are, for validate() to name.
    """
    version = checkpoint.get("format", 1)
    if version >= FORMAT:
        return checkpoint
    upgraded = {**checkpoint, "format": FORMAT}
    upgraded.setdefault("image_size", 256)
    if version == 1:
        upgraded.pop("scheduler", None)
        if isinstance(checkpoint["model_config"], dict):
            upgraded["model_config"] = {**LEGACY_MODEL_OPTIONS, **checkpoint["model_config"]}
        train_config = checkpoint.get("train_config")
        size = upgraded["model_config"].get("encoded_size", 14) if isinstance(upgraded["model_config"], dict) \
            else 14
        if isinstance(train_config, dict) and isinstance(train_config.get("alpha_c"), (int, float)) and \
                isinstance(size, int) and size > 0:
            upgraded["train_config"] = {**train_config, "alpha_c": train_config["alpha_c"] / size ** 2}
    return upgraded


# --------------------------------------------------------------------------------------------------- validating

def validate(checkpoint: dict, source: str) -> None:
    """Check a loaded checkpoint against the schema that the config dataclasses and the model define, before any
    of it is used: its parts, both configs field by field, the word map, the image size, every weight's name, shape
    and dtype against the model its config builds (on the meta device: no memory for a hostile config's sizes), that
    every weight is finite, and for a training checkpoint the optimizer, loss-scaler, RNG and Progress states.
    One SatError naming the checkpoint and the problem otherwise."""
    unknown = sorted(set(map(str, checkpoint)) - {*MODEL_PARTS, *TRAINING_PARTS, *OPTIONAL_MODEL_PARTS,
                                                  *OPTIONAL_TRAINING_PARTS, "content_sha256"})
    if unknown:
        raise SatError(f"{source}: unknown checkpoint entries {', '.join(unknown)} (written by a newer sat?)")
    missing = [k for k in MODEL_PARTS if k not in checkpoint]
    if missing:
        raise SatError(f"{source}: the checkpoint lacks its {', '.join(missing)}")
    word_map = validate_word_map(checkpoint["word_map"], source)
    if blip.is_blip(checkpoint["model_config"]):
        cfg, model = None, blip.meta_model(checkpoint["model_config"], source)
    else:
        cfg = from_dict(ModelConfig, checkpoint["model_config"], source, legacy=LEGACY_MODEL_OPTIONS)
        if len(word_map) != cfg.vocab_size:
            raise SatError(f"{source}: its word map has {len(word_map)} words but its model {cfg.vocab_size}")
        model = _meta_model(tuple(sorted(cfg.to_dict().items())))
    tokenizer = checkpoint.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or len(tokenizer) > MAX_TOKENIZER_CHARS):
        raise SatError(f"{source}: its tokenizer is {brief(tokenizer)}, not the JSON text of one")
    size = checkpoint["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise SatError(f"{source}: image_size is {brief(size)}, not a whole number from {MIN_IMAGE_SIZE} to "
                       f"{MAX_IMAGE_SIZE}")
    for part in ("encoder", "decoder"):
        _check_weights(checkpoint[part], getattr(model, part).state_dict(), f"{source}: {part}")
    present = [k for k in TRAINING_PARTS if k in checkpoint]
    if not present:
        return  # weights only (an export)
    if len(present) < len(TRAINING_PARTS):
        raise SatError(f"{source}: a training checkpoint without its "
                       f"{', '.join(k for k in TRAINING_PARTS if k not in checkpoint)}")
    tc = from_dict(TrainConfig, checkpoint["train_config"], source)
    from_dict(Progress, checkpoint["progress"], source)
    rows = checkpoint.get("pretrained_rows")
    if rows is not None:
        _check_tensor(rows, None, False, f"{source}: pretrained_rows")
        if cfg is None:
            raise SatError(f"{source}: a BLIP checkpoint with GloVe rows (pretrained_rows), which BLIP never has")
        if rows.dtype != torch.int64 or rows.dim() != 1 or (len(rows) and not 0 <= int(rows.min()) <= int(rows.max())
                                                           < cfg.vocab_size):
            raise SatError(f"{source}: pretrained_rows is not a list of word indices below {cfg.vocab_size}")
    _check_optimizer(checkpoint["optimizer"], model, tc, f"{source}: optimizer")
    _check_scaler(checkpoint["scaler"], f"{source}: scaler")
    _check_rng(checkpoint["rng"], f"{source}: rng")


@functools.lru_cache(maxsize=4)
def _meta_model(config: tuple[tuple[str, Any], ...]) -> CaptionModel:
    """The model a config builds, on the meta device: its parameters' names, shapes and dtypes without their memory
    (a hostile config's sizes allocate nothing). Cached: building it costs a tenth of a second."""
    with torch.device("meta"):
        return CaptionModel(ModelConfig(**dict(config)))


def _check_weights(state: Any, expected: dict[str, torch.Tensor], where: str) -> None:
    if not isinstance(state, dict):
        raise SatError(f"{where} weights are a {type(state).__name__}, not a state_dict")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(map(str, state)) - set(expected))
    if missing or extra:
        raise SatError(f"{where} weights do not match its config: missing {', '.join(missing[:3]) or 'none'}, "
                       f"unexpected {', '.join(extra[:3]) or 'none'}")
    for name, want in expected.items():
        _check_tensor(state[name], tuple(want.shape), want.dtype.is_floating_point, f"{where} {name}")


def _check_tensor(value: Any, shape: tuple[int, ...] | None, floating: bool, where: str) -> None:
    """A CPU tensor of this shape (any shape when None), floating point or not, with finite values."""
    if not isinstance(value, torch.Tensor):
        raise SatError(f"{where} is a {type(value).__name__}, not a tensor")
    if value.device.type != "cpu" or value.layout != torch.strided or value.is_quantized or value.is_complex():
        raise SatError(f"{where} is a {value.dtype} {value.layout} tensor on {value.device}, not a plain one")
    if shape is not None and tuple(value.shape) != shape:
        raise SatError(f"{where} has shape {tuple(value.shape)}, but its config makes it {shape}")
    if value.dtype.is_floating_point != floating:
        raise SatError(f"{where} is {value.dtype}, not a {'floating-point' if floating else 'integer'} tensor")
    if floating and not bool(torch.isfinite(value).all()):
        raise SatError(f"{where} holds NaN or infinite values (a run that diverged?)")


def _check_optimizer(state: Any, model: CaptionModel, tc: TrainConfig, where: str) -> None:
    """The Adam state train.py wrote for this model and phase: the same groups of the same parameters, the settings
    this code gives Adam (a hostile `maximize` would train by gradient ascent), learning rates that only decayed
    from the configured ones, and moments shaped like their parameters."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list) or \
            not isinstance(state.get("state"), dict):
        raise SatError(f"{where}: not an optimizer state (param_groups and state)")
    model.encoder.fine_tune(tc.fine_tune_encoder)
    groups = [{"params": list(model.decoder.parameters()), "lr": tc.decoder_lr}]
    if tc.fine_tune_encoder:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": tc.encoder_lr})
    fresh = torch.optim.Adam(groups).state_dict()["param_groups"]
    saved = state["param_groups"]
    if len(saved) != len(fresh) or not all(isinstance(g, dict) for g in saved):
        raise SatError(f"{where}: {len(saved)} parameter group(s), but this phase trains {len(fresh)}")
    for i, (group, want) in enumerate(zip(saved, fresh)):
        if not _same(group.get("params"), want["params"]):
            raise SatError(f"{where}: group {i} does not hold the {len(want['params'])} parameters of this model")
        lr = group.get("lr")
        if not isinstance(lr, float) or not 0 < lr <= want["lr"]:
            raise SatError(f"{where}: group {i} has learning rate {brief(lr)}; it can only have decayed from "
                           f"{want['lr']}")
        for key, value in want.items():
            if key not in ("params", "lr") and key in group and not _same(group[key], value):
                raise SatError(f"{where}: group {i} has {key} = {brief(group[key])}, which train.py never sets")
    shapes = {i: tuple(p.shape) for g, w in zip(groups, fresh) for i, p in zip(w["params"], g["params"])}
    moments = {"step", "exp_avg", "exp_avg_sq"}
    for index, entry in state["state"].items():
        if type(index) is not int or index not in shapes or not isinstance(entry, dict) or \
                set(map(str, entry)) != moments:
            raise SatError(f"{where}: its state of parameter {brief(index)} is not an Adam state of this model")
        step = entry["step"]
        if isinstance(step, torch.Tensor):
            _check_tensor(step, (), True, f"{where} step of parameter {index}")
            step = float(step)
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 <= step < math.inf:
            raise SatError(f"{where}: step of parameter {index} is {brief(step)}")
        for name in ("exp_avg", "exp_avg_sq"):
            _check_tensor(entry[name], shapes[index], True, f"{where} {name} of parameter {index}")


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types, without ever comparing a (hostile) tensor."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _check_scaler(state: Any, where: str) -> None:
    """Empty (bf16 or fp32 training), or the fp16 loss scaler's numbers."""
    if state == {}:
        return
    keys = {"scale": (0, math.inf), "growth_factor": (1, math.inf), "backoff_factor": (0, 1),
            "growth_interval": (0, math.inf), "_growth_tracker": (-1, math.inf)}
    if not isinstance(state, dict) or set(map(str, state)) != set(keys):
        raise SatError(f"{where}: not a loss-scaler state ({', '.join(keys)})")
    for key, (low, high) in keys.items():
        value = state[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value < high:
            raise SatError(f"{where}: {key} is {brief(value)}")


def _check_rng(state: Any, where: str) -> None:
    """The CPU generator's state, and the training GPU's (older checkpoints: a list, one per GPU)."""
    if not isinstance(state, dict) or "torch" not in state or not set(map(str, state)) <= {"torch", "cuda"}:
        raise SatError(f"{where}: not a random-number state ('torch' and optionally 'cuda')")
    states = [("torch", state["torch"], tuple(torch.get_rng_state().shape))]
    cuda = state.get("cuda")
    if cuda is not None:
        if isinstance(cuda, list) and not cuda:
            raise SatError(f"{where}: its CUDA state is an empty list")
        states += [("cuda", s, None) for s in (cuda if isinstance(cuda, list) else [cuda])]
    for name, value, shape in states:
        _check_tensor(value, shape, False, f"{where} {name}")
        if value.dtype != torch.uint8 or value.dim() != 1:
            raise SatError(f"{where} {name} is a {value.dtype} tensor of shape {tuple(value.shape)}, not bytes")


# --------------------------------------------------------------------------------------------------- the model

def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint") -> tuple[CaptionModel, dict[str, int]]:
    """Rebuild the model from a checkpoint's own config and weights (checked by load_checkpoint); no other file is
    needed. A BLIP checkpoint gives a blip.BlipCaptioner, which stands where a CaptionModel does."""
    if blip.is_blip(checkpoint.get("model_config")):
        model = blip.BlipCaptioner(blip.check_spec(checkpoint["model_config"], source), checkpoint["word_map"])
    else:
        model = CaptionModel(from_dict(ModelConfig, checkpoint.get("model_config"), source,
                                       legacy=LEGACY_MODEL_OPTIONS))
    try:
        model.encoder.load_state_dict(checkpoint["encoder"])
        model.decoder.load_state_dict(checkpoint["decoder"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise SatError(f"{source}: its weights do not match its config ({_first_line(e)})") from None
    return model, checkpoint["word_map"]
