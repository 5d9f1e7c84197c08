"""train.py --augment: crops, colour jitter and flips that mirror the captions' left and right."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import metrics
import shapes
import train
from augment import Augment, mirror_ids
from conftest import train_args
from utils import SatError

WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4, "left": 5, "right": 6, "of": 7, "red": 8}


def test_a_flip_mirrors_the_image_and_swaps_left_and_right_only() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    captions = torch.tensor([[[1, 4, 5, 7, 6, 2, 0]], [[1, 8, 6, 5, 5, 2, 0]]])
    flipped, mirrored = Augment(WORD_MAP, flip=1.0, crop_scale=None, jitter=0.0)(images, captions)
    assert torch.equal(flipped, images.flip(-1))
    assert mirrored.tolist() == [[[1, 4, 6, 7, 5, 2, 0]], [[1, 8, 5, 6, 6, 2, 0]]]
    same, kept = Augment(WORD_MAP, flip=0.0, crop_scale=None, jitter=0.0)(images, captions)
    assert torch.equal(same, images) and torch.equal(kept, captions)


def test_bpe_vocabularies_swap_whole_word_pieces() -> None:
    pieces = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "left</w>": 4, "right</w>": 5, "le": 6}
    assert mirror_ids(pieces, subwords=True) == (4, 5)
    assert mirror_ids({"<pad>": 0, "left": 1}, subwords=False) is None


def test_the_mirrored_caption_is_true_of_the_mirrored_image() -> None:
    """A shapes image whose caption says "to the left of": flipped, its objects mirrored (cx -> side - cx), the
    augmented caption's relation is true and the original's false, by the caption-correctness scorer."""
    rng = np.random.default_rng(0)
    while True:
        _, objects, captions = shapes.make_example(rng, side=64)
        caption = next((c for c in captions if "to the left of" in c), None)
        if caption is not None:
            break
    words = caption.split()
    word_map = {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>", *sorted(set(words) | {"right"})])}
    ids = torch.tensor([[[word_map[w] for w in words]]])
    _, mirrored = Augment(word_map, flip=1.0, crop_scale=None, jitter=0.0)(torch.zeros(1, 3, 64, 64,
                                                                                      dtype=torch.uint8), ids)
    rev = {i: w for w, i in word_map.items()}
    flipped_caption = " ".join(rev[int(i)] for i in mirrored[0, 0])
    assert "to the right of" in flipped_caption
    mirror = [{**o.sidecar(64), "box": [1 - o.box(64)[2], o.box(64)[1], 1 - o.box(64)[0], o.box(64)[3]]}
              for o in objects]
    assert metrics.caption_correctness([flipped_caption], [mirror])["relation_accuracy"] == 100.0
    assert metrics.caption_correctness([caption], [mirror])["relation_accuracy"] == 0.0


def test_random_augmentation_keeps_size_and_type_and_flips_about_half() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    captions = torch.full((64, 1, 3), 5)  # "left" everywhere: a swap shows which images were flipped
    out, mirrored = Augment(WORD_MAP)(images, captions)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    flips = int((mirrored[:, 0, 0] == 6).sum())
    assert 20 <= flips <= 44, flips  # Binomial(64, 1/2): 32 +- 3 sigma


def test_augment_trains_from_images_and_refuses_the_feature_cache(shapes_data, tmp_path) -> None:
    with pytest.raises(SatError, match="--augment.*--cache-features"):
        train.build_trainer(train.parse_args(train_args(shapes_data, tmp_path / "cached", "--augment",
                                                        "--cache-features")))
    trainer = train.build_trainer(train.parse_args(train_args(shapes_data, tmp_path, "--augment")))
    seen = []
    augment = trainer.augment
    trainer.augment = lambda images, captions: seen.append(images.clone()) or augment(images, captions)
    trainer.model.train()
    inputs, captions, lengths, _ = next(iter(trainer.loader))
    assert inputs.dtype == torch.uint8 and inputs.shape[1:] == (3, 128, 128)  # images, not cached features
    assert trainer.train_step(inputs, captions, lengths) and trainer.progress.step == 1
    assert len(seen) == 1 and torch.equal(seen[0], inputs)
