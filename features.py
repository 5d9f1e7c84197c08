"""The frozen encoder's features, computed once per split and cached as fp16 HDF5.

While the encoder is frozen its output for an image never changes, so running ResNet-101 again every
epoch (five times per image in the tutorial, once per caption) is pure waste. The cache is keyed on the
encoder's weights and the image file, and rebuilt automatically when either changes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from config import ENCODER_CHANNELS
from datasets import split_file
from models import Encoder
from utils import SatError, atomic_path


def encoder_fingerprint(encoder: Encoder) -> str:
    """A hash of the encoder's name, grid size and every weight."""
    digest = hashlib.sha256(f"{encoder.name}:{encoder.pool.output_size}".encode())  # the stride changes the keys
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(h5_path: Path) -> str:
    """What the images are, not where they are: moving or copying the data folder keeps its caches valid.

    create_input_files.py stores a SHA-256 of every image it writes; for an older file without it, a hash of the
    shape, the ids, the file names and 64 evenly spaced images stands in (cheap next to hashing 20 GB of COCO).
    """
    with h5py.File(h5_path, "r") as h5:
        if "content_sha256" in h5.attrs:
            return str(h5.attrs["content_sha256"])
        images = h5["images"]
        digest = hashlib.sha256(repr(images.shape).encode())
        digest.update(np.asarray(h5["image_ids"]).tobytes())
        digest.update(repr(list(h5["filenames"][()])).encode())
        for i in np.unique(np.linspace(0, len(images) - 1, num=min(64, len(images))).astype(int)):
            digest.update(images[int(i)].tobytes())
        return "sampled:" + digest.hexdigest()


def feature_file(data_folder: str | Path, data_name: str, split: str, encoder: Encoder) -> Path:
    size = encoder.pool.output_size[0]
    stage = "" if encoder.stride == 32 else f"_stride{encoder.stride}"  # the last map keeps its older name
    return Path(data_folder) / f"{split.upper()}_FEATURES_{data_name}_{encoder.name}{stage}_{size}x{size}.hdf5"


def cached_features(encoder: Encoder, data_folder: str | Path, data_name: str, split: str,
                    device: torch.device, batch_size: int = 32) -> Path:
    """Path of the split's feature file, (re)built first unless it matches this encoder and these images."""
    images_path = split_file(data_folder, split, "IMAGES", data_name)
    path = feature_file(data_folder, data_name, split, encoder)
    key = {"encoder": encoder_fingerprint(encoder), "images": images_fingerprint(images_path)}
    size = encoder.pool.output_size[0]
    if _up_to_date(path, key, images_path, (size * size, ENCODER_CHANNELS[encoder.name][encoder.stride])):
        return path
    encoder.eval()
    with h5py.File(images_path, "r") as src, atomic_path(path) as tmp, h5py.File(tmp, "w") as dst:
        images = src["images"]
        n = len(images)
        out = None
        for first in tqdm(range(0, n, batch_size), desc=f"caching {split.lower()} features", unit="batch"):
            batch = torch.from_numpy(images[first:first + batch_size]).to(device)
            with torch.no_grad():
                feats = encoder(batch).half().cpu().numpy()  # (b, P, C)
            if not np.isfinite(feats).all():
                raise SatError(f"{images_path}: the {encoder.name} features of images {first}-{first + len(feats) - 1} "
                               "do not fit in fp16 (untrained encoder weights?); train without --cache-features")
            if out is None:
                out = dst.create_dataset("features", (n, *feats.shape[1:]), dtype="float16",
                                         chunks=(1, *feats.shape[1:]))
            out[first:first + len(feats)] = feats
        dst.attrs.update(key)
    return path


def _up_to_date(path: Path, key: dict[str, str], images_path: Path, item_shape: tuple[int, int]) -> bool:
    """Whether `path` holds this encoder's fp16 features (N, P, C) of these N images; a damaged or foreign file does
    not (it is rebuilt)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5, h5py.File(images_path, "r") as src:
            features = h5.get("features")
            return all(str(h5.attrs.get(k)) == v for k, v in key.items()) and isinstance(features, h5py.Dataset) \
                and features.dtype == np.float16 and features.shape == (len(src["images"]), *item_shape)
    except OSError:
        return False
