"""train.py under torchrun: 2 CPU processes (gloo) against 1 process, resuming across process counts, clean exits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import train_args
from utils import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 240 training images in batches of 239: each epoch has a full batch and a batch of one image, for which the second
# rank gets a stand-in. No dropout: each rank draws its own masks, so only a deterministic model can match exactly.
RUN = ["--cache-features", "--batch-size", "239", "--dropout", "0", "--epochs", "2"]
# softmax(scores + b) does not depend on b: this bias's true gradient is 0, its computed one round-off noise that
# Adam scales up to a step of about the learning rate, in a direction that depends on the order of the sums.
NO_GRADIENT = {"attention.full_att.bias"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def assert_same_training(path: Path, expected: Path) -> None:
    """Same progress, same weights and the same Adam moments (running means of the gradients), to float tolerance."""
    got, want = load_checkpoint(path), load_checkpoint(expected)
    assert got["progress"] == pytest.approx(want["progress"], rel=1e-6)
    for name, tensor in want["decoder"].items():
        if name not in NO_GRADIENT:
            torch.testing.assert_close(got["decoder"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for i, state in want["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"]["state"][i][moment], state[moment], rtol=1e-3, atol=1e-8)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(shapes_data, tmp_path_factory) -> Path:
    """checkpoint_last.pt of the run in one process (this one): 2 epochs, 4 steps."""
    out = tmp_path_factory.mktemp("one_process")
    train.build_trainer(train.parse_args(train_args(shapes_data, out, *RUN))).run()
    return out / "checkpoint_last.pt"


def test_two_processes_train_as_one_over_the_same_batches(shapes_data, one_process, tmp_path) -> None:
    result = torchrun(*train_args(shapes_data, tmp_path, *RUN))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(tmp_path / "checkpoint_last.pt", one_process)
    # rank 0 alone logs, validates on everyone's captions and prints
    got, want = records(tmp_path), records(one_process.parent)
    assert [r["step"] for r in got] == [2, 4]
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
        assert g["val_bleu1"] == pytest.approx(w["val_bleu1"])
    assert result.stdout.count("epoch 1: train loss") == 1 and "done: best validation" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".pt", ".png", ".jsonl"}) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "curves.png", "metrics.jsonl"]


def test_two_processes_resume_a_one_process_checkpoint_mid_epoch(shapes_data, one_process, tmp_path) -> None:
    stopped = train.build_trainer(train.parse_args(train_args(shapes_data, tmp_path, *RUN)))
    step = stopped.train_step

    def stop_after_step_3(*args):  # the first batch of the second epoch; the one-image batch is left
        ok = step(*args)
        if stopped.progress.step == 3:
            stopped.stop_signal = 15
        return ok

    stopped.train_step = stop_after_step_3
    stopped.run()
    last = tmp_path / "checkpoint_last.pt"
    assert load_checkpoint(last)["progress"]["batches_done"] == 1

    result = torchrun(*train_args(shapes_data, tmp_path, *RUN), "--resume", str(last))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "epoch 1, step 3" in result.stdout
    assert_same_training(last, one_process)


def test_repeated_launches_all_exit_cleanly(shapes_data, one_process, tmp_path) -> None:
    """gloo aborts at exit in about one run in five unless every rank leaves through a barrier and destroys the
    process group; each launch here trains one more epoch from the finished run."""
    for launch in range(3):
        out = tmp_path / str(launch)
        out.mkdir()
        shutil.copy(one_process, out / "checkpoint_last.pt")
        result = torchrun(*train_args(shapes_data, out, *RUN), "--epochs", "3", "--resume",
                          str(out / "checkpoint_last.pt"))
        assert result.returncode == 0, (launch, result.stderr[-3000:])
        assert load_checkpoint(out / "checkpoint_last.pt")["progress"]["step"] == 6
