"""Captioning many images at once: a dataset split at several beam sizes, or a list of images, through the one
beam search; and token ids back to sentences."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import ImageCaptionsDataset
from devices import autocast_dtype
import vocab
from models import Caption, beam_search, caption_pieces, decode_tokens


def encode(encoder: torch.nn.Module, inputs: torch.Tensor, from_features: bool) -> torch.Tensor:
    """Encoder output (B, P, C) from images, or straight from cached fp16 features."""
    return inputs.float() if from_features else encoder(inputs)


@torch.no_grad()
def caption_split(model: torch.nn.Module, dataset: ImageCaptionsDataset, word_map: dict[str, int],
                  beam_sizes: list[int], max_len: int, batch_size: int, device: torch.device,
                  length_penalty: float = 0.0, workers: int = 0, progress: bool = True,
                  amp: bool = False, indices: range | None = None) -> dict[int, list[Caption]]:
    """Decode every image of the split (or those of `indices`, e.g. one rank's share) once per beam size; each
    batch is encoded once for all beam sizes. `model` is a CaptionModel or an ensemble.EnsembleModel (anything
    with an `.encoder` and a step-API `.decoder`)."""
    model.eval()
    dtype = autocast_dtype(device) if amp else torch.float32
    loader = DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    results: dict[int, list[Caption]] = {k: [] for k in beam_sizes}
    for inputs, *_ in tqdm(loader, desc="decoding", unit="batch", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            encoder_out = encode(model.encoder, inputs.to(device, non_blocking=True), dataset.features is not None)
            for k in beam_sizes:
                results[k].extend(beam_search(model.decoder, encoder_out, word_map, k, max_len, length_penalty))
    return results


@torch.no_grad()
def caption_images(model: torch.nn.Module, images: list[Image.Image], word_map: dict[str, int], beam_size: int,
                   max_len: int, device: torch.device, batch_size: int = 16) -> list[Caption]:
    """Beam-search captions for RGB images already resized to the training size."""
    model.eval()
    captions: list[Caption] = []
    for first in range(0, len(images), batch_size):
        batch = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
                             for im in images[first:first + batch_size]]).to(device)
        captions += beam_search(model.decoder, model.encoder(batch), word_map, beam_size, max_len)
    return captions


def texts(captions: list[Caption], word_map: dict[str, int], subwords: bool = False) -> list[str]:
    """The captions as sentences of words (BPE pieces joined when `subwords`)."""
    rev = {i: w for w, i in word_map.items()}
    return [decode_tokens(c.tokens, rev, subwords) for c in captions]


def word_attention(caption: Caption, word_map: dict[str, int],
                   subwords: bool = False) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """A caption's words with the attention (and sentinel weight) of each: the mean over its pieces for BPE
    sub-words, so that plots and grounding read one map per word."""
    rev = {i: w for w, i in word_map.items()}
    words = vocab.words(caption_pieces(caption.tokens, rev), subwords)
    if not subwords:
        return [w for w, _ in words], caption.alphas, caption.sentinel
    alphas = torch.stack([caption.alphas[positions].mean(dim=0) for _, positions in words]) if words else \
        caption.alphas[:0]
    sentinel = None if caption.sentinel is None else torch.stack(
        [caption.sentinel[positions].mean() for _, positions in words]) if words else caption.sentinel[:0]
    return [w for w, _ in words], alphas, sentinel
