"""Interrupted training, full disks, non-finite losses, untrusted checkpoints and bad input, through the real
scripts in subprocesses."""
from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from PIL import Image

import metrics
from conftest import train_args
from config import ModelConfig
from models import DecoderWithAttention, Encoder
from checkpoints import export_safetensors, load_checkpoint
from utils import SatError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--cache-features", "--batch-size", "16", "--epochs", "2", "--save-every", "4"]  # 15 steps per epoch


def script(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one message line: stderr less tqdm's progress bars."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "\r" not in ln and "%|" not in ln]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def decoder_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["decoder"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(shapes_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = script("train.py", *train_args(shapes_data, out, *FAST))
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "checkpoint_last.pt"


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(shapes_data, uninterrupted, tmp_path) -> None:
    args = ["train.py", *train_args(shapes_data, tmp_path, *FAST)]
    last = tmp_path / "checkpoint_last.pt"
    rng = random.Random(0)
    steps_seen = []
    for attempt in range(3):  # killed during a step, a validation or a save: wherever the random delay lands
        resume = ["--resume", str(last)] if last.exists() else []
        process = start(*args, *resume)
        wait_for(last, process) if not resume else time.sleep(1.5)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.communicate()
        checkpoint = torch.load(last, weights_only=True)  # never half-written
        step = checkpoint["progress"]["step"]
        assert step % 4 == 0 or step % 15 == 0, f"saved at step {step}: neither a --save-every step nor an epoch end"
        steps_seen.append(step)
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")} <= {"checkpoint_best.pt",
                                                                                      "checkpoint_last.pt"}
    result = script(*args, "--resume", str(last))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = decoder_weights(uninterrupted)
    for name, tensor in decoder_weights(last).items():
        assert torch.equal(tensor, expected[name]), name
    assert steps_seen == sorted(steps_seen)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_and_exit_cleanly(shapes_data, uninterrupted, tmp_path, signum) -> None:
    args = ["train.py", *train_args(shapes_data, tmp_path, *FAST)]
    process = start(*args)
    wait_for(tmp_path / "checkpoint_last.pt", process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and f"--resume {tmp_path / 'checkpoint_last.pt'}" in stdout
    result = script(*args, "--resume", str(tmp_path / "checkpoint_last.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = decoder_weights(uninterrupted)
    for name, tensor in decoder_weights(tmp_path / "checkpoint_last.pt").items():
        assert torch.equal(tensor, expected[name]), name


def test_full_disk_while_saving_keeps_the_previous_checkpoint(shapes_data, uninterrupted, tmp_path) -> None:
    previous = tmp_path / "checkpoint_last.pt"
    previous.write_bytes(uninterrupted.read_bytes())
    before = previous.read_bytes()
    limit = len(before) // 4  # a checkpoint cannot be written; CPython ignores SIGXFSZ, so writes fail with EFBIG

    result = script("train.py", *train_args(shapes_data, tmp_path, *FAST), "--epochs", "3", "--resume", str(previous),
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 2
    line = error_line(result)
    assert str(previous) in line and "previous one is intact" in line
    assert previous.read_bytes() == before
    assert not list(tmp_path.glob(".checkpoint_*.tmp"))


def test_non_finite_losses_are_skipped_then_training_stops(shapes_data, tmp_path) -> None:
    """A learning rate of 1e30 throws the weights to about 1e30 in one step: every later loss is inf or nan."""
    result = script("train.py", *train_args(shapes_data, tmp_path, *FAST), "--decoder-lr", "1e30",
                    "--max-bad-steps", "3")
    assert result.returncode == 2
    assert result.stdout.count("non-finite loss") == 3
    line = error_line(result)
    assert "3 consecutive steps had a non-finite loss" in line and "no checkpoint was written yet" in line
    assert not (tmp_path / "checkpoint_last.pt").exists()


def test_non_finite_stop_names_the_checkpoint_it_resumed_from_and_stale_temp_files_go(shapes_data, uninterrupted,
                                                                                       tmp_path) -> None:
    """The data folder, moved elsewhere (its feature caches stay valid: they are keyed on the images' content), with
    its training features overwritten by inf: every step is non-finite, across more than one epoch."""
    stale = [tmp_path / ".checkpoint_last.pt.abc123.tmp", tmp_path / ".curves.png.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    data = tmp_path / "moved"
    shutil.copytree(shapes_data[0], data, ignore=shutil.ignore_patterns("raw"))
    for cache in data.glob("TRAIN_FEATURES_*.hdf5"):
        with h5py.File(cache, "r+") as h5:
            h5["features"][...] = float("inf")
    result = script("train.py", *train_args((data, shapes_data[1]), tmp_path, *FAST), "--epochs", "30",
                    "--resume", str(uninterrupted), "--max-bad-steps", "20")  # more steps than an epoch has
    assert result.returncode == 2
    assert result.stdout.count("non-finite loss") == 20 and "caching" not in result.stderr
    # 15 steps per epoch: the epoch's end saved the (unchanged) weights, and the stop names that file
    named = Path(error_line(result).split("the last good checkpoint is ")[1])
    assert named in (uninterrupted, tmp_path / "checkpoint_last.pt")
    for name, tensor in load_checkpoint(uninterrupted)["decoder"].items():
        assert torch.equal(load_checkpoint(named)["decoder"][name], tensor), name
    assert not any(path.exists() for path in stale)


def wait_for_child(parent: int, name: str, timeout: float = 60) -> int:
    """The process id of `parent`'s child called `name`, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                comm, fields = stat.read_text().rsplit(")", 1)
            except OSError:  # a process that has just ended
                continue
            if comm.split("(", 1)[1] == name and int(fields.split()[1]) == parent:
                return int(stat.parent.name)
        time.sleep(0.01)
    raise AssertionError(f"no {name} child of process {parent} within {timeout} s")


TOKENIZE_UNDER_CTRL_C = """
import signal, sys
sys.path.insert(0, ".")
import metrics
signal.signal(signal.SIGINT, lambda *_: None)  # as train.py does: note the request, finish the step
captions = {i: [f"a red circle ({i}) is left of a blue square, isn't it?"] * 5 for i in range(4000)}
print("tokenizing", flush=True)
print(len(metrics.ptb_tokenize(captions)), flush=True)
"""


@pytest.mark.skipif(not metrics.java_available(), reason="the PTB tokenizer needs Java")
def test_ctrl_c_to_the_process_group_does_not_kill_the_java_tokenizer() -> None:
    """A terminal's Ctrl-C goes to the whole foreground process group; validation must survive it."""
    child = subprocess.Popen([sys.executable, "-c", TOKENIZE_UNDER_CTRL_C], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout.readline().strip() == "tokenizing"
    wait_for_child(child.pid, "java")
    os.killpg(child.pid, signal.SIGINT)  # while the tokenizer runs
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert out.strip() == "4000"


@pytest.fixture(scope="module")
def tutorial_checkpoint(tmp_path_factory) -> Path:
    """The old tutorial's format: whole pickled modules."""
    path = tmp_path_factory.mktemp("old") / "BEST_checkpoint.pth.tar"
    cfg = ModelConfig(vocab_size=20, encoder="resnet18", embed_dim=8, attention_dim=8, decoder_dim=8)
    torch.save({"epoch": 3, "bleu-4": 0.2, "encoder": Encoder("resnet18"), "decoder": DecoderWithAttention(cfg)}, path)
    return path


@pytest.mark.parametrize("command", ["eval", "caption", "train"])
def test_pickled_tutorial_checkpoints_are_refused(shapes_data, tutorial_checkpoint, tmp_path, command) -> None:
    folder, name = shapes_data
    photo = folder / "raw" / "images" / "shapes_000300.jpg"
    args = {"eval": ["eval.py", "--checkpoint", str(tutorial_checkpoint), "--data-folder", str(folder),
                     "--data-name", name, "--out", str(tmp_path / "out")],
            "caption": ["caption.py", "--img", str(photo), "--checkpoint", str(tutorial_checkpoint), "--out",
                        str(tmp_path / "out")],
            "train": ["train.py", *train_args(shapes_data, tmp_path / "out"), "--resume", str(tutorial_checkpoint)]}
    result = script(*args[command])
    assert result.returncode == 2
    line = error_line(result)
    assert "arbitrary code" in line and "convert_tutorial.py --trust-checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_pre_1_6_pickled_checkpoints_are_refused_too(tmp_path) -> None:
    """PyTorch before 1.6 wrote a bare pickle stream, not a zip archive."""
    path = tmp_path / "BEST_checkpoint.pth.tar"
    torch.save({"epoch": 3, "encoder": Encoder("resnet18")}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(SatError, match="arbitrary code.*--trust-checkpoint"):
        load_checkpoint(path)


def test_safetensors_export_loads_in_eval_and_caption(shapes_data, trained_checkpoint, tmp_path) -> None:
    folder, name = shapes_data
    exported = tmp_path / "model.safetensors"
    result = script("train.py", "--resume", str(trained_checkpoint), "--export", str(exported))
    assert result.returncode == 0, result.stderr
    photo = str(folder / "raw" / "images" / "shapes_000301.jpg")
    captions = [script("caption.py", "--img", photo, "--checkpoint", str(c), "--no-plot").stdout
                for c in (trained_checkpoint, exported)]
    assert captions[0] == captions[1] and captions[0].strip()
    for checkpoint, out in ((trained_checkpoint, "pt"), (exported, "st")):
        result = script("eval.py", "--checkpoint", str(checkpoint), "--data-folder", str(folder), "--data-name",
                        name, "--beam-sizes", "2", "--metrics", "bleu", "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
    pt, st = (tmp_path / d / "captions_beam2.json" for d in ("pt", "st"))
    assert pt.read_text() == st.read_text()


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> tuple[Path, str]:
    """A dataset with another vocabulary: shapes with every word kept."""
    out = tmp_path_factory.mktemp("other")
    result = script("create_input_files.py", "--output-folder", str(out), "--shapes-train", "12", "--shapes-val", "3",
                    "--shapes-test", "3", "--image-size", "32", "--min-word-freq", "1", "--workers", "0")
    assert result.returncode == 0, result.stderr
    return out, "shapes_5_cap_per_img_1_min_word_freq"


def bad_inputs(shapes_data, trained_checkpoint, other_data, tmp_path) -> dict[str, tuple[list[str], str]]:
    folder, name = shapes_data
    ckpt, out = str(trained_checkpoint), str(tmp_path / "out")
    corrupt, empty, not_ckpt = tmp_path / "broken.jpg", tmp_path / "empty", tmp_path / "photo.pt"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty.mkdir()
    not_ckpt.write_bytes((folder / "raw" / "images" / "shapes_000300.jpg").read_bytes())
    latin1, exported = tmp_path / "captions.csv", tmp_path / "model.safetensors"
    latin1.write_bytes("image,caption\na.jpg,un caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    export_safetensors(load_checkpoint(trained_checkpoint), exported)
    huge = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(huge)  # 144 M pixels: over Pillow's decompression-bomb limit
    data = ["--data-folder", str(folder), "--data-name", name]
    return {
        "caption missing image": (["caption.py", "--img", str(tmp_path / "nope.jpg"), "--checkpoint", ckpt,
                                   "--out", out], "no such file or folder"),
        "caption corrupt image": (["caption.py", "--img", str(corrupt), "--checkpoint", ckpt, "--out", out],
                                  "broken.jpg"),
        "caption huge image": (["caption.py", "--img", str(huge), "--checkpoint", ckpt, "--out", out], "huge.png"),
        "caption empty folder": (["caption.py", "--img", str(empty), "--checkpoint", ckpt, "--out", out],
                                 "no images in this folder"),
        "caption beam 0": (["caption.py", "--img", str(corrupt), "--checkpoint", ckpt, "--beam-size", "0"],
                           "must lie between 1 and"),
        "caption max-len 0": (["caption.py", "--img", str(corrupt), "--checkpoint", ckpt, "--max-len", "0"],
                              "must lie between 1 and"),
        "caption not a checkpoint": (["caption.py", "--img", str(corrupt), "--checkpoint", str(not_ckpt)],
                                     "not a PyTorch checkpoint"),
        "eval missing checkpoint": (["eval.py", "--checkpoint", str(tmp_path / "no.pt"), *data, "--out", out],
                                    "checkpoint not found"),
        "eval other dataset": (["eval.py", "--checkpoint", ckpt, "--data-folder", str(other_data[0]), "--data-name",
                                other_data[1], "--out", out], "trained on other data"),
        "eval negative beam": (["eval.py", "--checkpoint", ckpt, *data, "--beam-sizes", "-3"],
                               "must lie between 1 and"),
        "eval unknown metric": (["eval.py", "--checkpoint", ckpt, *data, "--metrics", "bleu,wer", "--out", out],
                                "unknown metric(s) wer"),
        "eval wrong data name": (["eval.py", "--checkpoint", ckpt, "--data-folder", str(folder), "--data-name", "coco",
                                  "--out", out], "WORDMAP_coco.json"),
        "train missing data": (["train.py", "--data-folder", str(tmp_path / "nowhere"), "--checkpoint-dir", out],
                               "file not found"),
        "train negative workers": (["train.py", *data, "--checkpoint-dir", out, "--workers", "-1"],
                                   "must lie between 0 and"),
        "train dropout over 1": (["train.py", *data, "--checkpoint-dir", out, "--dropout", "1.5"], "[0, 1)"),
        "train negative lr": (["train.py", *data, "--checkpoint-dir", out, "--decoder-lr", "-1"], "must be above 0"),
        "train resume from export": (["train.py", *data, "--checkpoint-dir", out, "--resume", str(exported)],
                                     "no training state"),
        "eval negative workers": (["eval.py", "--checkpoint", ckpt, *data, "--workers", "-1"],
                                  "must lie between 0 and"),
        "eval compare not an eval folder": (["eval.py", "--checkpoint", ckpt, *data, "--compare", str(empty),
                                             "--out", out], "per_image.json: not found"),
        "create_input_files latin-1 csv": (["create_input_files.py", "--dataset", "folder", "--captions-csv",
                                            str(latin1), "--image-folder", str(empty), "--output-folder", out],
                                           "not a UTF-8 text CSV"),
        "create_input_files no json": (["create_input_files.py", "--dataset", "coco", "--output-folder", out],
                                       "needs --karpathy-json and --image-folder"),
        "create_input_files missing json": (["create_input_files.py", "--dataset", "coco", "--karpathy-json",
                                             str(tmp_path / "none.json"), "--image-folder", str(empty),
                                             "--output-folder", out], "none.json"),
    }


CASES = ["caption missing image", "caption corrupt image", "caption huge image", "caption empty folder",
         "caption beam 0", "caption max-len 0", "caption not a checkpoint", "eval missing checkpoint",
         "eval other dataset", "eval negative beam", "eval unknown metric", "eval wrong data name",
         "train missing data", "train negative workers", "train dropout over 1", "train negative lr",
         "train resume from export", "eval negative workers", "eval compare not an eval folder",
         "create_input_files latin-1 csv",
         "create_input_files no json", "create_input_files missing json"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(shapes_data, trained_checkpoint, other_data, tmp_path,
                                                             case) -> None:
    args, expected = bad_inputs(shapes_data, trained_checkpoint, other_data, tmp_path)[case]
    result = script(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result)
    assert line.startswith("error:") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(trained_checkpoint, tmp_path) -> None:
    result = script("caption.py", "--img", str(tmp_path / "nope.jpg"), "--checkpoint", str(trained_checkpoint),
                    "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr and "no such file or folder" in result.stderr

