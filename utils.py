"""Small pieces every script shares: errors for users, atomic files, devices, checkpoint I/O."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import traceback
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")


class SatError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's main; user errors become one line on stderr and exit 2 (`--debug` shows the traceback)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (SatError, FileNotFoundError, PermissionError, IsADirectoryError, OSError) as e:
        if "--debug" in args:
            traceback.print_exc()
        message = str(e) if isinstance(e, SatError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2, like every other user error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint that holds pickled Python objects (the old tutorial's format); "
                             "loading one can run any code, so only for files you trust (default: off)")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors (default: off)")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, else delete it.

    A reader therefore sees either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should look like any other file
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SatError(f"{path}: not valid JSON ({e})") from None


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SatError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write atomically: a crash or a full disk mid-write leaves the previous checkpoint intact.

    Raises OSError when the file cannot be written (torch.save reports those as RuntimeError).
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as e:
            raise OSError(f"write failed ({str(e).splitlines()[0]}); is the disk full?") from e


def export_safetensors(checkpoint: dict, path: str | os.PathLike) -> None:
    """Weights as safetensors, with the model config, word map and image size as JSON metadata: a file
    anyone can load without trusting it, and that eval.py and caption.py read like a checkpoint."""
    from safetensors.torch import save_file
    tensors = {f"{part}.{name}": t.contiguous() for part in ("encoder", "decoder")
               for name, t in checkpoint[part].items()}
    metadata = {"format": "sat", "model_config": json.dumps(checkpoint["model_config"]),
                "word_map": json.dumps(checkpoint["word_map"]), "image_size": str(checkpoint.get("image_size", 256))}
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
    return {"model_config": json.loads(metadata["model_config"]), "word_map": json.loads(metadata["word_map"]),
            "image_size": int(metadata["image_size"]), **split}


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint (or an exported .safetensors file) without executing code from it (weights_only=True)
    unless `trust` is set."""
    path = Path(path)
    if not path.is_file():
        raise SatError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    # torch.save writes a zip archive since PyTorch 1.6, and a bare pickle stream (first byte 0x80) before.
    if not zipfile.is_zipfile(path) and not _starts_with(path, b"\x80"):
        raise SatError(f"{path}: not a PyTorch checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError:
        raise SatError(f"{path}: refused: this checkpoint holds pickled Python objects (the old tutorial's "
                       "format), and loading it could run arbitrary code. Only if you trust its source, "
                       "pass --trust-checkpoint") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise SatError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise SatError(f"{path}: not a sat checkpoint (no model_config inside)")
    return checkpoint


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
