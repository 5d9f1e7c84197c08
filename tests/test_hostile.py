"""What the fuzzer (test_fuzz.py) cannot judge by exit status alone: the content hash, checkpoints written before
it, one run per checkpoint folder, the temp files of killed writers, the readers' answers, and plot names."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import caption
import create_input_files
import shapes
import sources
import train
from checkpoints import MODEL_PARTS, load_checkpoint, save_checkpoint
from conftest import train_args
from datasets import open_hdf5
from utils import HOST, FolderLock, SatError, atomic_path, run_cli

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys: pytest.CaptureFixture, main, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------------------- the content hash

@pytest.fixture(scope="module")
def model_only(trained_checkpoint: Path) -> dict:
    checkpoint = load_checkpoint(trained_checkpoint)
    return {k: checkpoint[k] for k in MODEL_PARTS}


def largest_tensor_record(path: Path) -> tuple[int, int]:
    """(offset in the file, size) of the data of the largest tensor storage in a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))  # of the local header, before the data
    return record.header_offset + 30 + name_length + extra_length, record.file_size


def differing(a: dict, b: dict) -> list[str]:
    return [f"{part}.{name}" for part in ("encoder", "decoder") for name in a[part]
            if not torch.equal(a[part][name], b[part][name])]


def test_bytes_overwritten_inside_a_tensor_are_refused(model_only, tmp_path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, model_only)
    offset, size = largest_tensor_record(path)
    data = bytearray(path.read_bytes())
    data[offset + size // 2: offset + size // 2 + 4] = b"\x7f\x7f\x7f\x7f"  # one float becomes about 3.4e38
    path.write_bytes(bytes(data))
    assert len(differing(torch.load(path, weights_only=True), model_only)) == 1  # torch itself notices nothing
    with pytest.raises(SatError, match="damaged: its content no longer matches the hash"):
        load_checkpoint(path)


def test_the_hash_covers_what_is_not_a_tensor(model_only, tmp_path) -> None:
    """Two words swapped in the word map: still a valid word map, but not the one the model was trained with."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, model_only)
    content = torch.load(path, weights_only=True)
    words = content["word_map"]
    a, b = sorted(set(words) - {"<pad>", "<start>", "<end>", "<unk>"})[:2]
    words[a], words[b] = words[b], words[a]
    torch.save(content, path)  # the hash written with the original content stays
    with pytest.raises(SatError, match=f"{path}: damaged"):
        load_checkpoint(path)
    save_checkpoint(path, content)  # saved properly, the same content loads
    assert load_checkpoint(path)["word_map"][a] == model_only["word_map"][b]


def test_checkpoints_from_before_the_hash_still_load(model_only, trained_checkpoint, tmp_path) -> None:
    """Format 2 (every checkpoint sat wrote before the hash) loads unchanged."""
    old = torch.load(trained_checkpoint, weights_only=True)
    old.pop("content_sha256")
    old["format"] = 2
    torch.save(old, tmp_path / "format2.pt")
    loaded = load_checkpoint(tmp_path / "format2.pt")
    assert loaded["model_config"] == model_only["model_config"] and loaded["image_size"] == 128
    for name, tensor in model_only["decoder"].items():
        assert torch.equal(loaded["decoder"][name], tensor), name
    del old["image_size"]  # older still: the image size was always 256 then
    torch.save(old, tmp_path / "format2.pt")
    assert load_checkpoint(tmp_path / "format2.pt")["image_size"] == 256


def test_a_view_repeating_a_few_bytes_is_refused_before_it_is_hashed(model_only, tmp_path) -> None:
    """A stride-0 view stands for a whole weight matrix on 4 bytes of file: the model built from it, or hashing it,
    would take the matrix's memory for real."""
    content = {**model_only, "format": 3, "content_sha256": "0" * 64,
               "decoder": {**model_only["decoder"], "fc.weight": torch.zeros(1).expand(100_000, 100_000)}}
    torch.save(content, tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 30_000_000  # while the view stands for 40 GB
    with pytest.raises(SatError, match="views repeating the same data"):
        load_checkpoint(tmp_path / "bomb.pt")


# ------------------------------------------------------------------------------------------ one run per folder

HOLD_LOCK = """
import sys, time
sys.path.insert(0, ".")
from utils import FolderLock
FolderLock(sys.argv[1], "train.py run").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a train.py run does while it trains."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_live_lock_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path) -> None:
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(SatError, match=f"another eval run is using this folder \\(pid {holder.pid} on {HOST}, "
                                           "since "):
            FolderLock(tmp_path, "eval run").acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # left behind by the killed run
    with FolderLock(tmp_path, "eval run") as lock:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_train_py_refuses_a_folder_another_run_trains_into(shapes_data, tmp_path, capsys) -> None:
    """Refused without touching the folder; once the other run is killed, its lock is taken over and its
    leftovers dealt with."""
    args = train_args(shapes_data, tmp_path, "--cache-features", "--batch-size", "64", "--epochs", "1")
    holder = hold_lock(tmp_path)
    try:
        started = json.loads((tmp_path / ".lock").read_text())["started"]
        line = one_error_line(capsys, train.main, args)
        assert line == f"error: {tmp_path}: another train.py run is using this folder (pid {holder.pid} on {HOST}, " \
                       f"since {started}); wait for it to end, or choose another folder"
        assert os.listdir(tmp_path) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # What the killed run left besides its lock: a save it interrupted, a log line it was writing.
    (tmp_path / f".checkpoint_last.pt.abc.{holder.pid}@{HOST}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "step": 15, "val_bl')
    train.main(args)
    assert f"took over {tmp_path / '.lock'} from pid {holder.pid} on {HOST}, which no longer runs" in \
        capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_best.pt", "checkpoint_last.pt", "curves.png", "metrics.jsonl"]
    torn, record = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert torn == '{"epoch": 0, "step": 15, "val_bl' and json.loads(record)["epoch"] == 0


# ------------------------------------------------------------------------------------- temp files of killed runs

def test_a_writer_removes_the_temp_files_of_killed_writers_only(tmp_path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        stale = [tmp_path / f".out.json.abc.{dead.pid}@{HOST}.tmp", tmp_path / ".out.json.x1y2z3.tmp",
                 tmp_path / ".out.json.old.1@elsewhere.tmp"]
        kept = [tmp_path / f".out.json.def.{sleeper.pid}@{HOST}.tmp", tmp_path / ".out.json.new.1@elsewhere.tmp",
                tmp_path / f".other.json.ghi.{dead.pid}@{HOST}.tmp"]  # another file's: its writer's business
        for path in stale + kept:
            path.write_text("half a file")
        two_days_ago = time.time() - 2 * 86400
        os.utime(stale[2], (two_days_ago, two_days_ago))
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + ["out.json"])


def test_a_killed_create_input_files_leaves_nothing_after_the_next_run(tmp_path) -> None:
    out = tmp_path / "data"
    args = ["--output-folder", str(out), "--shapes-train", "120", "--shapes-val", "4", "--shapes-test", "4",
            "--image-size", "32", "--workers", "0"]
    first = subprocess.Popen([sys.executable, "create_input_files.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob(".*.tmp")):  # killed while it writes its outputs
        assert first.poll() is None and time.monotonic() < deadline, "no temp file ever appeared"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert list(out.glob(".*.tmp")) and not list(out.glob("WORDMAP_*"))
    create_input_files.main(args)
    name = "shapes_5_cap_per_img_5_min_word_freq"
    assert not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in out.glob(f"*_{name}.*")) == sorted(
        [f"{s}_{k}_{name}.{'hdf5' if k == 'IMAGES' else 'json'}" for s in ("TRAIN", "VAL", "TEST")
         for k in ("IMAGES", "CAPTIONS", "CAPLENS", "REFS")] + [f"WORDMAP_{name}.json", f"BOXES_{name}.json"])


# ------------------------------------------------------------------------------------------------ the readers

def test_a_csv_saved_by_excel_is_read(tmp_path) -> None:
    """A byte-order mark and CRLF line ends, as Excel writes "CSV UTF-8"; fields quoted where they hold commas."""
    path = tmp_path / "captions.csv"
    path.write_bytes("\ufeffimage,caption\r\na.jpg,\"A dog, running\"\r\nb.jpg,Two cats\r\na.jpg,a brown dog\r\n"
                     .encode("utf-8"))
    records = sources.read_csv_folder(path, tmp_path, 0.0, 0.0, seed=0)
    assert [(r.path.name, r.captions) for r in records] == [("a.jpg", [["a", "dog", "running"], ["a", "brown", "dog"]]),
                                                           ("b.jpg", [["two", "cats"]])]


def test_a_csv_field_over_the_limit_names_its_line(tmp_path) -> None:
    path = tmp_path / "captions.csv"
    path.write_text("image,caption\na.jpg,a dog\nb.jpg,\"" + "long " * 300_000 + "\"\n")
    with pytest.raises(SatError, match=f"{path}: line 3: not a readable CSV row"):
        sources.read_csv_folder(path, tmp_path, 0.1, 0.1, seed=0)


def test_tokens_given_as_a_string_are_refused_not_split_into_letters(tmp_path) -> None:
    karpathy, _ = shapes.generate(tmp_path, 2, 1, 1, side=32)
    doc = json.loads(karpathy.read_text())
    doc["images"][1]["sentences"][2]["tokens"] = "a red circle"
    karpathy.write_text(json.dumps(doc))
    name = doc["images"][1]["filename"]
    with pytest.raises(SatError, match=f"image #1 \\({name}\\), sentence #2: 'tokens' is a str, not a list of words"):
        sources.read_karpathy(karpathy, tmp_path)


def test_a_truncated_hdf5_file_is_named(shapes_data, tmp_path) -> None:
    folder, name = shapes_data
    path = tmp_path / f"TEST_IMAGES_{name}.hdf5"
    path.write_bytes((folder / path.name).read_bytes()[:5000])
    with pytest.raises(SatError, match=f"^{path}: not a readable HDF5 file"):
        open_hdf5(path)


# -------------------------------------------------------------------------------------------------- plot names

def test_plot_names_are_distinct() -> None:
    paths = [Path(n) for n in ("a.jpg", "a.png", "a.jpg.png", "b.jpg", "c.png", "c.PNG")]
    assert caption.plot_names(paths) == ["a.jpg_attention.png", "a.png_attention.png", "a.jpg_2_attention.png",
                                         "b_attention.png", "c.png_attention.png", "c.PNG_attention.png"]
