"""TensorBoard logs of a training run (train.py --tensorboard), beside metrics.jsonl and curves.png.

Each phase logs to its own run, CHECKPOINT_DIR/tensorboard/{xe, xe_finetune, scst}, so that TensorBoard draws a
phase's curves, whose steps start again at 0, as a curve of their own. Every optimizer step logs the batch's loss
and top-5 accuracy (SCST: the sampled captions' CIDEr-D); every validation its scores, the learning rates and a
few fixed validation images with their caption and attention strip. Only rank 0 of a torchrun job writes.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import Caption
from plots import attention_strip
from utils import SatError

# metrics.jsonl's names -> TensorBoard's tags; validation scores val_X go to val/X
TRAIN_TAGS = {"train_loss": "train/loss", "train_top5": "train/top5_accuracy", "train_cider": "train/cider_reward"}
RATE_TAGS = {"lr": "lr/decoder", "encoder_lr": "lr/encoder"}
IMAGES = 3  # validation images shown at every validation: the split's first, so the same ones each time


def run_name(scst: bool, fine_tune_encoder: bool) -> str:
    return ("scst" if scst else "xe") + ("_finetune" if fine_tune_encoder and not scst else "")


class Board:
    """A SummaryWriter for one phase of one run, opened at the first step this process logs with purge_step at
    that step: a run resumed from a checkpoint hides what the interrupted run had logged after it, so that its
    curves continue instead of forking."""

    def __init__(self, folder: Path):
        if importlib.util.find_spec("tensorboard") is None:
            raise SatError("--tensorboard needs the tensorboard package (pip install tensorboard)")
        self.folder = folder
        self._writer = None

    def writer(self, step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only with --tensorboard
            self._writer = SummaryWriter(str(self.folder), purge_step=step, flush_secs=30)
        return self._writer

    def train(self, averages: dict[str, float], step: int) -> None:
        """One optimizer step's batch averages (Trainer.running_averages' names)."""
        for name, value in averages.items():
            self.writer(step).add_scalar(TRAIN_TAGS[name], value, step)

    def validation(self, record: dict, step: int) -> None:
        """A metrics.jsonl record's validation scores and learning rates (its epoch averages of the training loss
        are the per-step curves, smoothed)."""
        for name, value in record.items():
            if name.startswith("val_"):
                self.writer(step).add_scalar(f"val/{name.removeprefix('val_')}", value, step)
            elif name in RATE_TAGS:
                self.writer(step).add_scalar(RATE_TAGS[name], value, step)

    def captions(self, images: list[torch.Tensor], sentences: list[str], captions: list[Caption], step: int) -> None:
        """Each image (uint8 (3, S, S)) with its caption: an attention strip where the decoder attends, else the
        image; and the caption as text."""
        for n, (pixels, sentence, caption) in enumerate(zip(images, sentences, captions)):
            picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
            words = sentence.split()
            if caption.alphas.size(1) and words:
                picture = attention_strip(picture, words, caption.alphas, caption.sentinel)
            self.writer(step).add_image(f"val_images/{n}", np.asarray(picture), step, dataformats="HWC")
            self.writer(step).add_text(f"val_captions/{n}", sentence or "(empty)", step)
        self.writer(step).flush()  # a validation's results reach the disk now, not within flush_secs

    def close(self) -> None:
        """Write what is buffered; a later step opens a new event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
