"""The paper's recipe end to end: stage 1, stage 2 (the encoder fine-tuned) and the resume of an interrupted stage 2;
the rules of resuming; checkpoints of the older format; and the GPU decisions, tested with the hardware passed in."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import train
from checkpoints import FORMAT, load_checkpoint, model_from_checkpoint, upgrade
from config import LEGACY_MODEL_OPTIONS, TrainConfig
from conftest import WORD_MAP, random_captions, tiny_config, train_args
from devices import amp_dtype_for, cuda_state_to_restore, restore_scaler
from models import CaptionModel
from utils import SatError

STAGE_1 = ["--cache-features", "--batch-size", "48", "--decoder-lr", "3e-3"]  # 240 images: 5 steps per epoch


def build(data, out: Path, *flags: str):
    return train.build_trainer(train.parse_args(train_args(data, out, *flags)))


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def state(trainer) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("encoder", "decoder")
            for k, v in getattr(trainer.model, part).state_dict().items()}


@pytest.fixture(scope="module")
def stage_1(shapes_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    build(shapes_data, out, *STAGE_1, "--epochs", "2").run()
    return out / "checkpoint_best.pt"


def test_stage_2_starts_a_new_phase_and_an_interrupted_stage_2_resumes_exactly(shapes_data, stage_1,
                                                                              tmp_path) -> None:
    """--fine-tune-encoder from a frozen-encoder checkpoint: its weights, a new optimizer with an encoder group, a
    fresh schedule and progress, the starting model validated as the score to beat; then trained, stopped mid-epoch
    and resumed, it ends with the weights of an uninterrupted stage 2."""
    stage_2 = ["--fine-tune-encoder", "--resume", str(stage_1), "--epochs", "1", "--save-every", "2"]
    straight = build(shapes_data, tmp_path / "straight", *stage_2)
    assert straight.tc.fine_tune_encoder and straight.tc.batch_size == 48  # the run's settings carry over
    assert [g["lr"] for g in straight.optimizer.param_groups] == [4e-4, 1e-4]  # the phase's defaults
    assert not straight.optimizer.state and straight.progress.epoch == 0 and straight.progress.step == 0
    assert straight.phase_from == str(stage_1)  # scored by run(), once it holds the folder
    for name, tensor in load_checkpoint(stage_1)["encoder"].items():
        assert torch.equal(straight.model.encoder.state_dict()[name], tensor)
    before = state(straight)
    straight.run()
    after = state(straight)
    start, trained = records(tmp_path / "straight")
    assert start["epoch"] == -1 and start["phase_from"] == str(stage_1) and start["step"] == 0
    assert trained["epoch"] == 0 and straight.progress.best_score == max(start["val_bleu4"], trained["val_bleu4"])
    assert torch.equal(after["encoder.backbone.0.weight"], before["encoder.backbone.0.weight"])  # stem stays frozen
    assert not torch.equal(after["encoder.backbone.6.0.conv_dw.weight"], before["encoder.backbone.6.0.conv_dw.weight"])

    stopped = build(shapes_data, tmp_path / "stopped", *stage_2)
    step = stopped.train_step

    def stop_after_step_3(*args):
        ok = step(*args)
        if stopped.progress.step == 3:
            stopped.stop_signal = 15
        return ok

    stopped.train_step = stop_after_step_3
    stopped.run()
    last = tmp_path / "stopped" / "checkpoint_last.pt"
    assert load_checkpoint(last)["progress"]["step"] == 3
    resumed = build(shapes_data, tmp_path / "stopped", "--resume", str(last))  # no other flag: the run's own
    assert resumed.tc.fine_tune_encoder and len(resumed.optimizer.param_groups) == 2
    resumed.run()
    for name, tensor in state(resumed).items():
        assert torch.equal(tensor, after[name]), name


def test_an_exact_resume_keeps_the_runs_settings_and_refuses_to_change_fixed_ones(shapes_data, stage_1,
                                                                                 tmp_path) -> None:
    last = stage_1.parent / "checkpoint_last.pt"
    for flags, named in ((["--batch-size", "16"], "--batch-size 48"), (["--seed", "3"], "--seed 0"),
                         (["--decoder-lr", "1e-3"], "--decoder-lr 0.003"), (["--alpha-c", "2"], "--alpha-c 1.0")):
        with pytest.raises(SatError, match=named):
            build(shapes_data, tmp_path, "--resume", str(last), *flags)
    with pytest.raises(SatError, match="the model comes from the checkpoint, whose --embed-dim 128"):
        build(shapes_data, tmp_path, "--resume", str(last), "--embed-dim", "64")
    resumed = build(shapes_data, tmp_path, "--resume", str(last), "--epochs", "3", "--patience", "7",
                    "--batch-size", "48")  # the same value of a fixed setting is fine
    assert (resumed.tc.epochs, resumed.tc.patience, resumed.tc.batch_size) == (3, 7, 48)
    assert resumed.tc.checkpoint_dir == str(tmp_path) and resumed.progress.epoch == 2


def test_a_format_1_checkpoint_loads_as_the_model_it_was(tmp_path) -> None:
    """Checkpoints written before the deep output layer and the summed penalty: the model is rebuilt with the
    tutorial's linear output layer and computes what it computed; alpha_c becomes the same penalty's weight."""
    torch.manual_seed(0)
    cfg = tiny_config(output_layer="linear", hard_expectation=0.0)
    model = CaptionModel(cfg)
    old_config = {k: v for k, v in asdict(cfg).items() if k not in LEGACY_MODEL_OPTIONS}
    old = {"model_config": old_config, "word_map": WORD_MAP, "encoder": model.encoder.state_dict(),
           "decoder": model.decoder.state_dict()}
    torch.save(old, tmp_path / "old.pt")
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint["format"] == FORMAT and checkpoint["model_config"]["output_layer"] == "linear"
    trained = upgrade({**old, "train_config": {**asdict(TrainConfig()), "alpha_c": 1.0}})
    assert trained["train_config"]["alpha_c"] == pytest.approx(1 / 9)  # a mean over 3x3 pixels, as a sum
    rebuilt, _ = model_from_checkpoint(checkpoint)
    captions, lengths = random_captions(2, 2, 7, torch.Generator().manual_seed(1))
    features = torch.randn(2, 9, 512)
    for a, b in zip(rebuilt.decoder.eval()(features, captions, lengths), model.decoder.eval()(features, captions,
                                                                                              lengths)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                              ((9, 0), torch.bfloat16)])
def test_amp_uses_bf16_only_where_the_gpu_computes_it_natively(capability, dtype) -> None:
    """V100 (7.0) and T4 (7.5) report bf16 as supported, emulated and slow: they get fp16 with loss scaling."""
    assert amp_dtype_for("cuda", capability) is dtype
    assert amp_dtype_for("cpu", cpu_bf16=True) is torch.bfloat16
    with pytest.raises(SatError, match="no native bf16"):
        amp_dtype_for("cpu", cpu_bf16=False)


def test_loss_scaler_state_moves_between_fp16_and_the_others() -> None:
    """A run saved without a scaler (bf16 or fp32) resumed in fp16 starts a fresh scale, instead of failing on
    'The source state dict is empty'; a saved scale is taken in fp16 and ignored elsewhere."""
    fp16 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    restore_scaler(fp16, {})
    assert fp16.get_scale() == 2.0 ** 16
    saved = torch.amp.GradScaler("cpu", init_scale=128.0).state_dict()
    restore_scaler(fp16, saved)
    assert fp16.get_scale() == 128.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    restore_scaler(off, saved)
    assert not off.is_enabled()


def test_cuda_random_state_of_any_number_of_gpus_restores_on_any_other() -> None:
    """Checkpoints of older runs hold one state per visible GPU: a run of 8 GPUs continued on 1 takes GPU 0's
    state, not an IndexError; the current format holds the training GPU's state alone."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(cuda_state_to_restore(states, 0), states[0])
    assert torch.equal(cuda_state_to_restore(states, 5), states[5])
    assert torch.equal(cuda_state_to_restore(states[:2], 3), states[0])
    assert torch.equal(cuda_state_to_restore(states[3], 7), states[3])
