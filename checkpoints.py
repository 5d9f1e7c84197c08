"""Checkpoint I/O: atomic writes, loading without running code, safetensors exports, upgrading older formats, and
rebuilding the model from a checkpoint alone.

A checkpoint is a dict of plain data and tensors (torch.save's zip format): the encoder and decoder state_dicts,
the ModelConfig and TrainConfig as dicts, the word map (and, for BPE sub-words, the tokenizer as a JSON string),
the training image size and, for a training checkpoint,
the optimizer (learning rates included), loss-scaler and RNG states and the position in the run. `format` is its
version: 2 since the doubly stochastic penalty became the paper's sum over pixels and the deep output layer the
default.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from config import LEGACY_MODEL_OPTIONS, ModelConfig, from_dict
from models import CaptionModel
from utils import SatError, atomic_path

FORMAT = 2


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write atomically: a crash or a full disk mid-write leaves the previous checkpoint intact.

    Raises OSError when the file cannot be written (torch.save reports those as RuntimeError).
    """
    with atomic_path(path) as tmp:
        try:
            torch.save({**checkpoint, "format": FORMAT}, tmp)
        except RuntimeError as e:
            raise OSError(f"write failed ({str(e).splitlines()[0]}); is the disk full?") from e


def export_safetensors(checkpoint: dict, path: str | os.PathLike) -> None:
    """Weights as safetensors, with the model config, word map and image size as JSON metadata: a file
    anyone can load without trusting it, and that eval.py and caption.py read like a checkpoint."""
    from safetensors.torch import save_file
    tensors = {f"{part}.{name}": t.contiguous() for part in ("encoder", "decoder")
               for name, t in checkpoint[part].items()}
    metadata = {"format": "sat", "version": str(FORMAT), "model_config": json.dumps(checkpoint["model_config"]),
                "word_map": json.dumps(checkpoint["word_map"]), "image_size": str(checkpoint.get("image_size", 256)),
                **({"tokenizer": checkpoint["tokenizer"]} if checkpoint.get("tokenizer") else {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SatError(f"{path}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != "sat":
        raise SatError(f"{path}: a safetensors file without sat's metadata (model_config, word_map)")
    split = {part: {n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith(part + ".")}
             for part in ("encoder", "decoder")}
    tokenizer = {"tokenizer": metadata["tokenizer"]} if "tokenizer" in metadata else {}
    return upgrade({"format": int(metadata.get("version", 1)), "model_config": json.loads(metadata["model_config"]),
                    "word_map": json.loads(metadata["word_map"]), "image_size": int(metadata["image_size"]), **split,
                    **tokenizer})


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint (or an exported .safetensors file) without executing code from it: weights_only=True,
    or with `trust` for a file of pickled objects, the allow-list of tutorial.py (still no code of the file's)."""
    path = Path(path)
    if not path.is_file():
        raise SatError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    # torch.save writes a zip archive since PyTorch 1.6, and a bare pickle stream (first byte 0x80) before.
    if not zipfile.is_zipfile(path) and not _starts_with(path, b"\x80"):
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
    except (RuntimeError, EOFError, ValueError) as e:
        raise SatError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise SatError(f"{path}: not a sat checkpoint (no model_config inside)")
    return upgrade(checkpoint)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix




def upgrade(checkpoint: dict) -> dict:
    """A checkpoint of an older format, read as the current one computing the same model and loss.

    Format 1 (no `format` key): its model predates the options in LEGACY_MODEL_OPTIONS (it has the tutorial's
    linear output layer), and its alpha_c weighed a mean over the P pixels where it now weighs their sum.
    """
    if checkpoint.get("format", 1) >= FORMAT:
        return checkpoint
    model_config = {**LEGACY_MODEL_OPTIONS, **checkpoint["model_config"]}
    upgraded = {**checkpoint, "format": FORMAT, "model_config": model_config}
    if isinstance(checkpoint.get("train_config"), dict) and "alpha_c" in checkpoint["train_config"]:
        pixels = model_config.get("encoded_size", 14) ** 2
        upgraded["train_config"] = {**checkpoint["train_config"],
                                    "alpha_c": checkpoint["train_config"]["alpha_c"] / pixels}
    return upgraded


def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint") -> tuple[CaptionModel, dict[str, int]]:
    """Rebuild the model from a checkpoint's own config and weights; no other file is needed."""
    cfg = from_dict(ModelConfig, checkpoint.get("model_config"), source, legacy=LEGACY_MODEL_OPTIONS)
    model = CaptionModel(cfg)
    try:
        model.encoder.load_state_dict(checkpoint["encoder"])
        model.decoder.load_state_dict(checkpoint["decoder"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise SatError(f"{source}: its weights do not match its config ({str(e).splitlines()[0]})") from None
    return model, checkpoint["word_map"]
