"""train.py: real-decoding validation, checkpoints, exact resume, the feature cache."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch

import metrics
import train
from conftest import train_args
from datasets import ImageCaptionsDataset
from inference import caption_split, texts
from features import cached_features, feature_file
from trainer import EpochBatches, Trainer, loss_terms
from checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from config import ModelConfig
from models import CaptionModel
from utils import SatError, read_json

FAST = ["--cache-features", "--batch-size", "16", "--decoder-lr", "3e-3"]


def trainer_for(data, out: Path, *extra: str) -> Trainer:
    return train.build_trainer(train.parse_args(train_args(data, out, *FAST, *extra)))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.decoder.state_dict().items()}


def test_training_beats_an_untrained_model_on_real_decoding(shapes_data, trained_checkpoint) -> None:
    records = [json.loads(line) for line in (trained_checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all({"epoch", "step", "train_loss", "val_bleu4", "lr"} <= set(r) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    best = max(r["val_bleu4"] for r in records)
    assert (trained_checkpoint.parent / "curves.png").stat().st_size > 1000

    checkpoint = load_checkpoint(trained_checkpoint)
    untrained = CaptionModel(ModelConfig(**checkpoint["model_config"]), encoder_weights="default")
    val = ImageCaptionsDataset(*shapes_data, "val")
    captions = caption_split(untrained, val, checkpoint["word_map"], [1], 50, 64, torch.device("cpu"))[1]
    untrained_bleu4 = metrics.bleu(val.references, texts(captions, checkpoint["word_map"]))["bleu4"]
    assert untrained_bleu4 < 5 and best > 30, (untrained_bleu4, best)


def test_checkpoint_holds_state_dicts_config_and_word_map(shapes_data, trained_checkpoint) -> None:
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    assert {"format", "model_config", "train_config", "word_map", "encoder", "decoder", "optimizer", "scaler", "rng",
            "progress", "image_size"} <= set(checkpoint)
    assert checkpoint["model_config"]["decoder_dim"] == 128
    assert checkpoint["word_map"] == read_json(Path(shapes_data[0]) / f"WORDMAP_{shapes_data[1]}.json")
    model, _ = model_from_checkpoint(checkpoint)
    assert torch.equal(model.decoder.fc.weight, checkpoint["decoder"]["fc.weight"])


def test_interrupted_and_resumed_run_ends_with_identical_weights(shapes_data, tmp_path) -> None:
    """Stopped by a signal mid-epoch, or crashed and resumed from the last periodic save: same weights."""
    epochs = ["--epochs", "2", "--save-every", "5"]
    reference = trainer_for(shapes_data, tmp_path / "straight", *epochs)
    reference.run()
    expected = weights(reference)

    stopped = trainer_for(shapes_data, tmp_path / "stopped", *epochs)
    step = stopped.train_step

    def stop_at_step_19(*args):  # 15 batches per epoch: this is inside the second epoch
        ok = step(*args)
        if stopped.progress.step == 19:
            stopped.stop_signal = 15
        return ok

    stopped.train_step = stop_at_step_19
    stopped.run()
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint_last.pt")["progress"]["step"] == 19
    resumed = trainer_for(shapes_data, tmp_path / "stopped", *epochs, "--resume",
                          str(tmp_path / "stopped" / "checkpoint_last.pt"))
    resumed.run()
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name

    crashed = trainer_for(shapes_data, tmp_path / "crashed", *epochs)
    step2 = crashed.train_step

    def crash_at_step_8(*args):
        if crashed.progress.step == 8:
            raise RuntimeError("simulated crash")
        return step2(*args)

    crashed.train_step = crash_at_step_8
    with pytest.raises(RuntimeError):
        crashed.run()
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint_last.pt")["progress"]["step"] == 5
    resumed = trainer_for(shapes_data, tmp_path / "crashed", *epochs, "--resume",
                          str(tmp_path / "crashed" / "checkpoint_last.pt"))
    resumed.run()
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name


def test_resume_refuses_a_checkpoint_of_other_data(shapes_data, trained_checkpoint, tmp_path) -> None:
    checkpoint = load_checkpoint(trained_checkpoint)
    checkpoint["word_map"] = {**checkpoint["word_map"], "zebra": len(checkpoint["word_map"])}
    checkpoint["model_config"]["vocab_size"] += 1
    for name in ("embedding.weight", "fc.weight", "fc.bias"):  # a model of that vocabulary, as train.py saves it
        grown = checkpoint["decoder"][name]
        checkpoint["decoder"][name] = torch.cat([grown, grown[-1:]])
    checkpoint["optimizer"]["state"].clear()
    save_checkpoint(tmp_path / "other.pt", checkpoint)
    with pytest.raises(SatError, match="word map"):
        train.build_trainer(train.parse_args(train_args(shapes_data, tmp_path, "--resume", str(tmp_path / "other.pt"))))


def test_cached_features_give_the_loss_of_the_live_encoder(shapes_data, tmp_path) -> None:
    trainer = trainer_for(shapes_data, tmp_path)
    encoder = trainer.model.encoder.eval()
    path = feature_file(shapes_data[0], shapes_data[1], "train", encoder)
    with h5py.File(path, "r") as h5:
        assert h5["features"].dtype == "float16" and h5["features"].shape == (240, 16, 1280)
    live = ImageCaptionsDataset(*shapes_data, "train")
    batch = [live[i] for i in range(6)]
    images = torch.stack([b[0] for b in batch])
    captions, lengths = torch.stack([b[1] for b in batch]), torch.stack([b[2] for b in batch])
    cached = torch.stack([trainer.train_set[i][0] for i in range(6)]).float()
    decoder = trainer.model.decoder.eval()
    with torch.no_grad():
        live_loss = loss_terms(*decoder(encoder(images), captions, lengths), lengths)[0]
        cached_loss = loss_terms(*decoder(cached, captions, lengths), lengths)[0]
    assert float(cached_loss) == pytest.approx(float(live_loss), rel=2e-3)
    # reused while nothing changed; rebuilt when the encoder's weights change
    mtime = path.stat().st_mtime_ns
    assert cached_features(encoder, shapes_data[0], shapes_data[1], "train", torch.device("cpu")) == path
    assert path.stat().st_mtime_ns == mtime
    with torch.no_grad():
        encoder.backbone[0].weight.mul_(1.01)
    cached_features(encoder, shapes_data[0], shapes_data[1], "train", torch.device("cpu"))
    assert path.stat().st_mtime_ns != mtime


def test_image_level_batches_show_every_caption_once_per_epoch() -> None:
    sampler = EpochBatches(n=37, batch_size=8, seed=3, epoch=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert list(EpochBatches(37, 8, 3, 2, skip=2)) == batches[2:]
    assert list(EpochBatches(37, 8, 3, 3)) != batches
