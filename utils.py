"""Small pieces every script shares: errors for users, argument types, atomic files and folders and their leftovers,
the lock of a folder one run writes, JSON, and the shape of a word map.

No torch here: scripts import this before parsing their arguments."""
from __future__ import annotations

import argparse
import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


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
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)


def brief(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: a hostile file's 1 MB string must not become the message."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of over 4300 digits; a structure nested too deeply
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def user_message(e: Exception) -> str:
    """One line: a SatError as it is; an OSError as 'file: reason' (h5py's carry no file name)."""
    if isinstance(e, SatError) or not isinstance(e, OSError):
        return " ".join(str(e).split())
    reason = " ".join(str(e.strerror or e).split())
    return f"{e.filename}: {reason}" if e.filename else reason


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2, like every other user error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint that holds pickled Python objects (the old tutorial's format), "
                             "unpickled through an allow-list: the tutorial's model classes, tensors and "
                             "containers, never a function that could run code; only for files you trust "
                             "(default: off)")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors (default: off)")


# ------------------------------------------------------------------------------ atomic files and their leftovers

# A temp file's name says which process writes it, so that the next run can tell a dead writer's leftover (removed)
# from a file another live run is still writing (kept): .NAME.RANDOM.PID@HOST.tmp beside the file NAME.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP_OWNER = re.compile(r"\.(\d+)@([A-Za-z0-9-]+)\.tmp$")
FOREIGN_TEMP_AGE_S = 24 * 3600  # another host's temp file untouched this long is a leftover: its writer is gone


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, else delete it.

    A reader therefore sees either the old file or the complete new one, never a half-written file. The temp files
    of earlier writers of `path` that were killed mid-write (SIGKILL, power loss) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}@{HOST}.tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should look like any other file
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old folder of that name is moved
    aside, then deleted), else it is deleted. A reader sees the old folder or the complete new one, never a
    half-written one (between the two renames, for a moment, none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.*.old")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a writer that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs should look like any other
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
def remove_stale_temp_files(folder: str | os.PathLike, name: str = "") -> list[Path]:
    """Delete the temp files that atomic_path's killed writers left in `folder` (only those of the file `name`, if
    given); a temp file whose writer still runs is kept. Returns what was deleted."""
    removed = []
    for tmp in Path(folder).glob(f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"):
        if not tmp.is_dir() and _writer_is_gone(tmp):  # atomic_folder's temp folders clean up after themselves
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _writer_is_gone(tmp: Path) -> bool:
    owner = _TEMP_OWNER.search(tmp.name)
    if owner is None:
        return True  # an older sat's temp name, without its writer's pid
    pid, host = int(owner.group(1)), owner.group(2)
    if host == HOST:
        return not process_is_alive(pid)
    try:
        return time.time() - tmp.stat().st_mtime > FOREIGN_TEMP_AGE_S
    except FileNotFoundError:
        return False


def process_is_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0, ...) would mean this process group, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# --------------------------------------------------------------------------------------------- one run per folder

class FolderLock:
    """An exclusive lock on a folder for one run: a second live run is refused, naming the first.

    The lock is the kernel's (a POSIX record lock on FOLDER/.lock, also honoured over NFS), so it ends with the
    process however the process ends: a lock file left by a killed run holds no lock and is taken over. The file
    names its holder (pid, host, start time) for the message; only where the filesystem has no locks does that
    content decide: a live pid on this host holds it, a dead pid or another host's entry is stale.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / self.NAME
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale holder's entry, when there was one
        self.created = False  # the folder, which release() then removes if it is still empty

    def acquire(self) -> None:
        """Take the lock or raise SatError naming its live holder."""
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = _read_holder(fd)
            try:
                locked = self._lock(fd, holder)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                self.created = False  # the holder's folder
                raise SatError(f"{self.folder}: another {self.what} is using this folder ({_describe(holder)}); "
                               "wait for it to end, or choose another folder")
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # its holder removed the file between our open and our lock: lock the new one
                os.close(fd)
        self.took_over = holder if holder and holder.get("pid") != os.getpid() else None
        entry = json.dumps({"pid": os.getpid(), "host": HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, entry.encode() + b"\n", 0)

    def try_acquire(self) -> str | None:
        """acquire(); the refusal's message instead of raising it (to send it to every rank of a torchrun job)."""
        try:
            self.acquire()
        except SatError as e:
            return str(e)
        return None

    def _lock(self, fd: int, holder: dict | None) -> bool:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        # No locks on this filesystem: the entry decides.
        return not (holder and holder.get("host") == HOST and holder.get("pid") != os.getpid()
                    and isinstance(holder.get("pid"), int) and process_is_alive(holder["pid"]))

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: a run waiting on the old file then retries)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:
                self.folder.rmdir()  # a run refused before it wrote anything leaves no empty folder either
            except OSError:
                pass  # not empty: the run's outputs

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        entry = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return entry if isinstance(entry, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "it is just starting"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


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
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark, as some editors write, is fine
    except RecursionError:
        raise SatError(f"{path}: not usable JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers of more than 4300 digits
        raise SatError(f"{path}: not valid JSON ({e})") from None


def validate_word_map(word_map: Any, source: str) -> dict[str, int]:
    """A word map as create_input_files.py writes it: word -> index, the indices exactly 0..V-1, the special
    tokens present and <pad> = 0 (padding is written as 0). Anything else would index out of range or decode to
    the wrong words later."""
    if not isinstance(word_map, dict):
        raise SatError(f"{source}: the word map is a {type(word_map).__name__}, not a dict of word -> index")
    for word, index in word_map.items():
        if not isinstance(word, str) or not isinstance(index, int) or isinstance(index, bool):
            raise SatError(f"{source}: the word map holds {brief(word)}: {brief(index)}, not a word and an integer "
                           "index")
        if not word or any(c.isspace() for c in word):  # captions are words joined by spaces, and split again
            raise SatError(f"{source}: the word map holds {brief(word)}, which is not one word")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing:
        raise SatError(f"{source}: the word map lacks {', '.join(missing)}")
    if word_map["<pad>"] != 0:
        raise SatError(f"{source}: the word map has <pad> = {word_map['<pad>']}, not 0")
    if sorted(word_map.values()) != list(range(len(word_map))):
        raise SatError(f"{source}: the word map's {len(word_map)} indices are not exactly 0 to {len(word_map) - 1}")
    return word_map


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    """Dropout-like: [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """Above 0 and finite: inf and nan are never a learning rate."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def unit_interval(text: str) -> float:
    """A probability: [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def decay_factor(text: str) -> float:
    """Strictly between 0 and 1: 0 would stop learning, 1 and more would never decay or would grow."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {value}")
    return value


def bounded_int(low: int, high: int):
    """A parser for whole numbers from low to high."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie between {low} and {high}, got {value}")
        return value
    parse.__name__ = f"int from {low} to {high}"
    return parse


def seed_value(text: str) -> int:
    return bounded_int(0, 2 ** 31 - 1)(text)


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether CUDA is there is checked when the device is used)."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is not a device: use auto, cpu, cuda or cuda:N")
