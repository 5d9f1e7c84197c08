"""Training-time data augmentation (train.py --augment) on batches of uint8 images, where the batch lives (the
GPU when training on one).

Each image of a batch gets its own random resized crop (80-100% of the area, aspect 3/4 to 4/3, back to the
training size), colour jitter (brightness, contrast and saturation by up to 20%; no hue shift, which would make
colour words false) and, with probability 1/2, a horizontal flip. A flip mirrors the captions too: "left" and
"right" swap, word id for word id, so that "a red circle to the left of a blue star" stays true. The random draws
come from torch's global generator, whose state every checkpoint saves, so --resume continues the same stream.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

import vocab

MIRRORED = ("left", "right")


def mirror_ids(word_map: dict[str, int], subwords: bool) -> tuple[int, int] | None:
    """The ids of "left" and "right" when the vocabulary has both as whole words (one piece each), else None."""
    ids = {vocab.whole_word(token, subwords): i for token, i in word_map.items()}
    if all(w in ids for w in MIRRORED):
        return ids[MIRRORED[0]], ids[MIRRORED[1]]
    return None


class Augment:
    """(images (B, 3, S, S) uint8, captions (B, K, L)) -> the same shapes, each image augmented on its own."""

    def __init__(self, word_map: dict[str, int], subwords: bool = False, flip: float = 0.5,
                 crop_scale: tuple[float, float] | None = (0.8, 1.0), jitter: float = 0.2):
        self.flip, self.crop_scale = flip, crop_scale
        self.jitter = v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter) if jitter else None
        self.mirror = mirror_ids(word_map, subwords)
        if self.mirror is None and flip > 0 and any(vocab.whole_word(t, subwords) in MIRRORED for t in word_map):
            # One of the two is there but cannot be swapped with the other: a flip would make captions false.
            print("note: --augment: the vocabulary lacks 'left' or 'right' as one token; no horizontal flips")
            self.flip = 0.0

    def __call__(self, images: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = images.shape[-1]
        crop = v2.RandomResizedCrop(side, scale=self.crop_scale, antialias=True) if self.crop_scale else None
        out, mirrored = [], []
        for image in images:
            if crop is not None:
                image = crop(image)
            if self.jitter is not None:
                image = self.jitter(image)
            flipped = bool(torch.rand(()) < self.flip)
            out.append(v2.functional.horizontal_flip(image) if flipped else image)
            mirrored.append(flipped)
        if any(mirrored) and self.mirror is not None:
            captions = self._mirror(captions, torch.tensor(mirrored, device=captions.device))
        return torch.stack(out), captions

    def _mirror(self, captions: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """'left' <-> 'right' in the captions of the flipped images: captions (B, K, L), flipped (B,)."""
        left, right = self.mirror
        rows = flipped.view(-1, 1, 1)
        swapped = torch.where(captions == left, right, torch.where(captions == right, left, captions))
        return torch.where(rows, swapped, captions)
