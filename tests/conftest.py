"""Shared fixtures: a small shapes dataset and a small model trained on it, each built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import shapes  # noqa: E402
import sources  # noqa: E402
import train  # noqa: E402
from config import ModelConfig  # noqa: E402
from utils import read_json  # noqa: E402

# A vocabulary and a decoder config for unit tests on random features (resnet18's 512 channels).
V = 30
WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, V)}}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=V, encoder="resnet18", encoded_size=3, embed_dim=16, attention_dim=12, decoder_dim=20,
                dropout=0.0)
    return ModelConfig(**{**base, **kw})


def random_captions(B: int, K: int, L: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid encoded captions: <start> words <end> <pad>..., lengths counting <start> and <end>."""
    lengths = torch.randint(3, L + 1, (B, K), generator=generator)
    captions = torch.zeros(B, K, L, dtype=torch.long)
    for b in range(B):
        for k in range(K):
            n = int(lengths[b, k])
            captions[b, k, 0] = 1
            captions[b, k, 1:n - 1] = torch.randint(4, V, (n - 2,), generator=generator)
            captions[b, k, n - 1] = 2
    return captions, lengths


# A model small enough to train in seconds on 2 CPU cores, on real (offline) ImageNet features.
TINY_MODEL = ["--encoder", "tf_efficientnet_lite0", "--encoded-size", "4", "--embed-dim", "128",
              "--attention-dim", "128", "--decoder-dim", "128"]


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(data folder, data name) of 240/40/40 shapes images at 128 px."""
    out = tmp_path_factory.mktemp("shapes")
    karpathy, sidecar = shapes.generate(out / "raw", 240, 40, 40, side=128, seed=0)
    name = datasets.create_input_files(sources.read_karpathy(karpathy, out / "raw"), "shapes", out,
                                       image_size=128, boxes=read_json(sidecar), source=str(karpathy))
    return out, name


def train_args(data: tuple[Path, str], checkpoint_dir: Path, *extra: str) -> list[str]:
    folder, name = data
    return ["--data-folder", str(folder), "--data-name", name, "--checkpoint-dir", str(checkpoint_dir),
            "--device", "cpu", *TINY_MODEL, *extra]


@pytest.fixture(scope="session")
def trained_checkpoint(shapes_data: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint_best.pt of a tiny model trained for 6 epochs on cached features. It also logs to TensorBoard,
    which test_board reads (the logging draws no random numbers: the model is the one it would be without)."""
    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    train.main(train_args(shapes_data, out, "--cache-features", "--epochs", "6", "--batch-size", "8",
                          "--decoder-lr", "3e-3", "--dropout", "0.1", "--tensorboard"))
    return out / "checkpoint_best.pt"
