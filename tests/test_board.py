"""train.py --tensorboard: the event files, read back with TensorBoard's own reader."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from board import Board
from checkpoints import load_checkpoint, model_from_checkpoint
from conftest import train_args
from datasets import ImageCaptionsDataset
from gallery import STRIP_PANEL
from inference import caption_split, texts

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import plugin_event_accumulator  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402



def events(folder: Path) -> EventAccumulator:
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def texts_logged(folder: Path, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a text summary, through the reader TensorBoard's server uses (the other one does not hide
    a restarted run's text)."""
    reader = plugin_event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    reader.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in reader.Tensors(f"{tag}/text_summary")]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_losses_scores_and_captioned_attention(shapes_data, trained_checkpoint) -> None:
    """The tiny model's 6 epochs of 30 steps (conftest trains it with --tensorboard): every step's batch loss, the
    scores metrics.jsonl has, and the first validation images under the captions the model gives them."""
    run, log = trained_checkpoint.parent, trained_checkpoint.parent / "tensorboard" / "xe"
    reader, epochs = events(log), records(run)
    losses = reader.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 181)) and all(math.isfinite(e.value) for e in losses)
    for epoch, record in enumerate(epochs):  # an epoch's loss (a mean over its tokens) lies among its batches'
        batches = [e.value for e in losses[30 * epoch:30 * (epoch + 1)]]
        assert min(batches) <= record["train_loss"] <= max(batches)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    top5 = reader.Scalars("train/top5_accuracy")
    assert [e.step for e in top5] == list(range(1, 181)) and all(0 <= e.value <= 100 for e in top5)
    for tag, name in (("val/bleu4", "val_bleu4"), ("val/cider", "val_cider"), ("lr/decoder", "lr")):
        assert [(e.step, e.value) for e in reader.Scalars(tag)] == \
            [(r["step"], pytest.approx(r[name])) for r in epochs]

    model, word_map = model_from_checkpoint(load_checkpoint(run / "checkpoint_last.pt"))  # the last validated
    val = ImageCaptionsDataset(*shapes_data, "val")
    expected = texts(caption_split(model, val, word_map, [1], 50, 8, torch.device("cpu"), progress=False,
                                   indices=range(3))[1], word_map)
    for n in range(3):
        images, captions = reader.Images(f"val_images/{n}"), texts_logged(log, f"val_captions/{n}")
        assert [e.step for e in images] == [step for step, _ in captions] == [r["step"] for r in epochs]
        assert captions[-1][1] == expected[n]
        strip = Image.open(io.BytesIO(images[-1].encoded_image_string))
        assert strip.width // STRIP_PANEL == len(expected[n].split())  # one panel per word


def test_a_resumed_run_continues_its_curves_instead_of_forking(shapes_data, trained_checkpoint, tmp_path) -> None:
    """As if the tiny model's run had logged three more steps after its last checkpoint and crashed: resumed from
    that checkpoint for a 7th epoch, TensorBoard shows every step once, the resumed run's."""
    shutil.copytree(trained_checkpoint.parent, tmp_path, dirs_exist_ok=True)
    log = tmp_path / "tensorboard" / "xe"
    crashed = Board(log)
    for step in (181, 182, 183):
        crashed.train({"train_loss": 99.0, "train_top5": 99.0}, step)
    crashed.close()
    train.main(train_args(shapes_data, tmp_path, "--resume", str(tmp_path / "checkpoint_last.pt"), "--epochs", "7"))
    reader = events(log)
    losses = reader.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 211)) and all(e.value != 99.0 for e in losses)
    assert [e.step for e in reader.Scalars("val/cider")] == [r["step"] for r in records(tmp_path)] == \
        list(range(30, 211, 30))
