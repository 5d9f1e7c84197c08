"""Datasets on disk: turning Karpathy splits, CSV folders and the shapes data into HDF5 + JSON, and reading them back.

Files written for a base name such as `coco_5_cap_per_img_5_min_word_freq` (the layout _SplitFiles checks when it
opens a split):
  {SPLIT}_IMAGES_{base}.hdf5   images uint8 (N, 3, S, S), image_ids int64 (N,), filenames (N,); attributes
                               captions_per_image, image_size (S), dataset, content_sha256
  {SPLIT}_CAPTIONS_{base}.json encoded captions, exactly captions_per_image per image, padded to max_len + 2
  {SPLIT}_CAPLENS_{base}.json  caption lengths counting <start> and <end>
  {SPLIT}_REFS_{base}.json     every original caption of each image (the references for BLEU and friends)
  WORDMAP_{base}.json          word -> index, <pad> = 0
  TOKENIZER_{base}.json        --vocab bpe only: the Hugging Face BPE tokenizer; WORDMAP is its vocabulary
  BOXES_{base}.json            shapes only: each object's box and the words that refer to it
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import warnings
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

import vocab
from config import DEFAULT_MAX_PIXELS, MAX_CAPTIONS_PER_IMAGE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from sources import Record
from utils import SPECIAL_TOKENS, SatError, atomic_path, brief, read_json, validate_word_map, write_json

SPLITS = ("TRAIN", "VAL", "TEST")


def base_name(dataset: str, captions_per_image: int, min_word_freq: int) -> str:
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


def split_file(data_folder: str | os.PathLike, split: str, kind: str, data_name: str) -> Path:
    ext = "hdf5" if kind == "IMAGES" else "json"
    return Path(data_folder) / f"{split.upper()}_{kind}_{data_name}.{ext}"


def word_map_file(data_folder: str | os.PathLike, data_name: str) -> Path:
    return Path(data_folder) / f"WORDMAP_{data_name}.json"


def read_word_map(path: str | os.PathLike) -> dict[str, int]:
    """A word map from a file (a data folder's WORDMAP, or the old tutorial's WORDMAP_*.json), checked as
    utils.validate_word_map checks one."""
    return validate_word_map(read_json(path), str(path))


def check_word_map(model_word_map: dict[str, int], data_folder: str | os.PathLike, data_name: str,
                   source: str) -> None:
    """A model can only be trained or scored on data with its own word map."""
    path = word_map_file(data_folder, data_name)
    data_word_map = read_word_map(word_map_file(data_folder, data_name))
    if data_word_map != model_word_map:
        raise SatError(f"{source}: its word map ({len(model_word_map)} words) differs from {path} "
                       f"({len(data_word_map)} words): the model was trained on other data")


# ------------------------------------------------------------------------------------------------------- images

class BadImage(Exception):
    pass


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode; 16-bit and float images are rescaled rather than clipped to white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are composited onto white: their hidden colour is often black or garbage.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check and convert one image to RGB (resized to size x size if size is given). Raises BadImage."""
    path = Path(path)
    if not path.is_file():
        raise BadImage("file not found")
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard must not refuse what the caller allows
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImage(f"refused: {width}x{height} pixels is over the limit of {max_pixels} "
                                   "(a decompression bomb guard)")
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb(image)
    except UnidentifiedImageError:
        raise BadImage("not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image ({e})") from None
    return rgb.resize((size, size), Image.Resampling.BICUBIC) if size else rgb


def _load_array(job: tuple[Path, int, int]) -> tuple[np.ndarray | None, str | None]:
    path, size, max_pixels = job
    try:
        return np.asarray(load_image(path, size, max_pixels)).transpose(2, 0, 1), None
    except BadImage as e:
        return None, str(e)


# ------------------------------------------------------------------------------------------- words and captions

def build_word_map(records: list[Record], min_word_freq: int) -> dict[str, int]:
    """Special tokens first (<pad> = 0), then training words seen at least min_word_freq times, most frequent first."""
    counts = Counter(w for r in records if r.split == "TRAIN" for c in r.captions for w in c)
    words = sorted((w for w, n in counts.items() if n >= min_word_freq), key=lambda w: (-counts[w], w))
    return {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + words)}


def encode_caption(tokens: list[str], word_map: dict[str, int], max_len: int) -> list[int]:
    ids = [word_map.get(w, word_map["<unk>"]) for w in tokens]
    return [word_map["<start>"]] + ids + [word_map["<end>"]] + [word_map["<pad>"]] * (max_len - len(ids))


def choose_captions(captions: list[list[str]], k: int, rng: random.Random) -> list[list[str]]:
    """Exactly k captions: a sample when there are more, repeats when there are fewer."""
    if len(captions) >= k:
        return rng.sample(captions, k)
    return captions + [rng.choice(captions) for _ in range(k - len(captions))]


# ------------------------------------------------------------------------------------------------ preprocessing

def create_input_files(records: list[Record], dataset: str, output_folder: str | os.PathLike,
                       captions_per_image: int = 5, min_word_freq: int = 5, max_len: int = 50,
                       image_size: int = 256, seed: int = 0, skip_bad_images: bool = False,
                       overwrite: bool = False, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                       boxes: dict | None = None, source: str = "", word_map: dict[str, int] | None = None,
                       bpe_merges: int | None = None) -> str:
    """Write the HDF5 + JSON files for every split and return the base name they share.

    `word_map` (e.g. the old tutorial's, so that a converted tutorial model scores on these files) replaces the
    vocabulary built from the training captions; words it lacks become <unk>. With `bpe_merges` instead, the
    vocabulary is BPE sub-words learnt from the training captions with that many merges (vocab.py; min_word_freq
    does not apply) and TOKENIZER_{name}.json is written too; captions are then padded to the longest caption of
    their split in pieces, and `max_len` still counts words.

    Nothing appears under the final names unless every file was written: all outputs go to temporary
    files that are renamed together at the end.
    """
    out = Path(output_folder)
    data_name = base_name(dataset, captions_per_image, min_word_freq) if bpe_merges is None else \
        f"{dataset}_{captions_per_image}_cap_per_img_{bpe_merges}_bpe_merges"
    skipped: list[dict] = []
    records = _with_usable_captions(records, max_len, skip_bad_images, source, skipped)
    _check_splits(records, source)
    outputs = [split_file(out, s, k, data_name) for s in SPLITS for k in ("IMAGES", "CAPTIONS", "CAPLENS", "REFS")]
    outputs += [word_map_file(out, data_name)] + ([out / f"BOXES_{data_name}.json"] if boxes is not None else [])
    outputs += [vocab.tokenizer_file(out, data_name)] if bpe_merges is not None else []
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise SatError(f"{existing[0]}: already exists (pass --overwrite to replace the outputs)")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = None
    if bpe_merges is not None:
        tokenizer = vocab.train_bpe([c for r in records if r.split == "TRAIN" for c in r.captions], bpe_merges)
        word_map = vocab.word_map_of(tokenizer)
        print(f"BPE: {vocab.merge_count(tokenizer.to_str())} merges, {len(word_map)} sub-words")
    word_map = word_map or build_word_map(records, min_word_freq)
    rng = random.Random(seed)
    with ExitStack() as stack:
        tmp = {p: stack.enter_context(atomic_path(p)) for p in outputs}
        for split in SPLITS:
            split_records = [r for r in records if r.split == split]
            kept = _write_images(split_records, tmp[split_file(out, split, "IMAGES", data_name)], split,
                                 image_size, captions_per_image, dataset, workers, max_pixels, skip_bad_images,
                                 skipped)
            if not kept:
                raise SatError(f"{source}: no usable image left in the {split.lower()} split")
            chosen = [c for r in kept for c in choose_captions(r.captions, captions_per_image, rng)]
            if tokenizer is not None:  # the pieces of each caption, padded to the split's longest
                chosen = [vocab.encode(tokenizer, c) for c in chosen]
            pad_to = max_len if tokenizer is None else max(len(c) for c in chosen)
            captions = [encode_caption(c, word_map, pad_to) for c in chosen]
            lengths = [len(c) + 2 for c in chosen]
            tmp[split_file(out, split, "CAPTIONS", data_name)].write_text(json.dumps(captions))
            tmp[split_file(out, split, "CAPLENS", data_name)].write_text(json.dumps(lengths))
            tmp[split_file(out, split, "REFS", data_name)].write_text(
                json.dumps([[" ".join(c) for c in r.references or r.captions] for r in kept]))
        tmp[word_map_file(out, data_name)].write_text(json.dumps(word_map))
        if tokenizer is not None:
            tmp[vocab.tokenizer_file(out, data_name)].write_text(tokenizer.to_str())
        if boxes is not None:
            tmp[out / f"BOXES_{data_name}.json"].write_text(json.dumps(boxes))
    report = out / f"SKIPPED_{data_name}.json"
    report.unlink(missing_ok=True)  # a report from an earlier run would describe other outputs
    if skipped:
        write_json(report, skipped)
        print(f"skipped {len(skipped)} bad image(s), listed in {report}")
    return data_name


def _with_usable_captions(records: list[Record], max_len: int, skip: bool, source: str,
                          skipped: list[dict]) -> list[Record]:
    """Drop captions longer than max_len words (they stay references); an image left without any is bad input."""
    kept = []
    for r in records:
        captions = [c for c in r.captions if 0 < len(c) <= max_len]
        if captions:
            kept.append(Record(r.path, captions, r.image_id, r.split, [c for c in r.captions if c]))
            continue
        problem = f"has no caption of 1 to {max_len} words (in {source})"
        if not skip:
            raise SatError(f"{r.path}: {problem}")
        skipped.append({"file": str(r.path), "problem": problem})
        print(f"skipping {r.path}: {problem}")
    return kept


def _check_splits(records: list[Record], source: str) -> None:
    present = {r.split for r in records}
    for split in SPLITS:
        if split not in present:
            raise SatError(f"{source}: the {split.lower()} split is empty")


def _write_images(records: list[Record], h5_path: Path, split: str, size: int, captions_per_image: int,
                  dataset: str, workers: int, max_pixels: int, skip: bool, skipped: list[dict]) -> list[Record]:
    """Decode, resize and store the split's images; returns the records that were kept."""
    jobs = [(r.path, size, max_pixels) for r in records]
    kept = []
    with h5py.File(h5_path, "w") as h5, ExitStack() as stack:
        h5.attrs["captions_per_image"] = captions_per_image
        h5.attrs["image_size"] = size
        h5.attrs["dataset"] = dataset
        images = h5.create_dataset("images", (len(records), 3, size, size), dtype="uint8",
                                   maxshape=(None, 3, size, size), chunks=(1, 3, size, size), track_times=False)
        if workers > 0:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers))
            results = pool.imap(_load_array, jobs, chunksize=8)
        else:
            results = map(_load_array, jobs)
        digest = hashlib.sha256()  # of every stored image: what a feature cache is keyed on (features.py)
        for record, (array, problem) in tqdm(zip(records, results), total=len(records),
                                             desc=f"{split.lower()} images", unit="img"):
            if problem is None:
                images[len(kept)] = array
                digest.update(array.tobytes())
                kept.append(record)
            elif skip:
                skipped.append({"file": str(record.path), "problem": problem})
                print(f"skipping {record.path}: {problem}")
            else:
                raise SatError(f"{record.path}: {problem}")
        images.resize(len(kept), axis=0)
        h5.attrs["content_sha256"] = digest.hexdigest()
        h5.create_dataset("image_ids", data=np.array([r.image_id for r in kept], dtype=np.int64),
                          track_times=False)
        h5.create_dataset("filenames", data=np.array([r.path.name.encode() for r in kept], dtype=object),
                          dtype=h5py.string_dtype(), track_times=False)
    return kept


# --------------------------------------------------------------------------------------------------- reading back

class _SplitFiles:
    """The files of one split, checked against the layout create_input_files writes when they are opened (names,
    dtypes, shapes, ids, captions against the word map, one list of references per image), so that a malformed
    folder is refused here with one line, not met as a traceback or as silent garbage mid-training. The HDF5 file
    is then opened lazily, so that every DataLoader worker opens its own."""

    def __init__(self, data_folder: str | os.PathLike, data_name: str, split: str):
        self.split = split.upper()
        if self.split not in SPLITS:
            raise SatError(f"unknown split '{split}' (use train, val or test)")
        paths = {kind: split_file(data_folder, self.split, kind, data_name)
                 for kind in ("IMAGES", "CAPTIONS", "CAPLENS", "REFS")}
        for path in paths.values():
            if not path.is_file():
                raise SatError(f"{path}: not found (run create_input_files.py, and check --data-folder "
                               "and --data-name)")
        self.h5_path = paths["IMAGES"]
        self.word_map = read_word_map(word_map_file(data_folder, data_name))
        with open_hdf5(self.h5_path) as h5:
            self.captions_per_image, self.image_size, self.num_images = _check_images(h5, self.h5_path)
            self.image_ids, self.filenames = _check_ids_and_names(h5, self.num_images, self.h5_path)
        rows = _int_array(read_json(paths["CAPTIONS"]), 2, paths["CAPTIONS"], "a list of equally long lists of "
                          "token ids")
        if len(rows) != self.num_images * self.captions_per_image:
            raise SatError(f"{self.h5_path}: {self.num_images} images but {len(rows)} captions "
                           f"(expected {self.captions_per_image} per image)")
        lengths = _int_array(read_json(paths["CAPLENS"]), 1, paths["CAPLENS"], "a list of caption lengths")
        if len(lengths) != len(rows):
            raise SatError(f"{paths['CAPLENS']}: {len(lengths)} caption lengths for the {len(rows)} captions of "
                           f"{paths['CAPTIONS'].name}")
        self.captions, self.lengths = _check_captions(rows, lengths, self.word_map, paths["CAPTIONS"],
                                                      paths["CAPLENS"])
        self.references = _check_references(read_json(paths["REFS"]), self.num_images, paths["REFS"])
        self._h5: h5py.File | None = None

    def image(self, i: int) -> torch.Tensor:
        if self._h5 is None:
            self._h5 = h5py.File(self.h5_path, "r")
        return torch.from_numpy(self._h5["images"][i])

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross into a spawned worker; each process reopens the file.
        return {**self.__dict__, "_h5": None}


def open_hdf5(path: Path) -> h5py.File:
    """h5py.File(path, "r"), its errors naming the file (h5py's own messages leave it out)."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise SatError(f"{path}: not a readable HDF5 file ({' '.join(str(e).split())})") from None


def _check_images(h5: h5py.File, path: Path) -> tuple[int, int, int]:
    """(captions per image, image size S, number of images N) of an images file holding uint8 (N, 3, S, S)."""
    cpi = _int_attribute(h5, "captions_per_image", 1, MAX_CAPTIONS_PER_IMAGE, path)
    size = _int_attribute(h5, "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, path)
    images = _dataset(h5, "images", path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, size, size) or not len(images):
        raise SatError(f"{path}: 'images' is {images.dtype} {images.shape}, not uint8 (N, 3, {size}, {size}) with "
                       "N at least 1 (channels first, as create_input_files.py writes)")
    return cpi, size, len(images)


def _int_attribute(h5: h5py.File, name: str, low: int, high: int, path: Path) -> int:
    value = h5.attrs.get(name)
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or not low <= value <= high:
        raise SatError(f"{path}: attribute '{name}' is {brief(value)}, not a whole number from {low} to {high}")
    return int(value)


def _dataset(h5: h5py.File, name: str, path: Path) -> h5py.Dataset:
    found = h5.get(name)
    if not isinstance(found, h5py.Dataset):
        raise SatError(f"{path}: no '{name}' dataset (not a file create_input_files.py wrote?)")
    return found


def _check_ids_and_names(h5: h5py.File, n: int, path: Path) -> tuple[list[int], list[str]]:
    """Image ids (distinct whole numbers from 0) and file names, one per image."""
    ids, names = _dataset(h5, "image_ids", path), _dataset(h5, "filenames", path)
    if ids.dtype.kind not in "iu" or ids.shape != (n,):
        raise SatError(f"{path}: 'image_ids' is {ids.dtype} {ids.shape}, not {n} whole numbers")
    if h5py.check_string_dtype(names.dtype) is None or names.shape != (n,):
        raise SatError(f"{path}: 'filenames' is {names.dtype} {names.shape}, not {n} strings")
    values = ids[()]
    if (values < 0).any() or len(np.unique(values)) != n:
        raise SatError(f"{path}: 'image_ids' are not distinct whole numbers from 0")
    return values.tolist(), [f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f) for f in names[()]]


def _check_captions(rows: np.ndarray, lens: np.ndarray, word_map: dict[str, int], captions_path: Path,
                    lengths_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded captions (M, L) and their lengths (M,): each row <start> w_1 .. w_n <end> <pad>..., with word ids
    inside the word map and n + 2 = its length, from 3 to L."""
    m, width = rows.shape
    bad = (rows < 0) | (rows >= len(word_map))
    if bad.any():
        i = int(bad.any(axis=1).argmax())
        raise SatError(f"{captions_path}: caption #{i} holds token ids outside the word map's 0 to "
                       f"{len(word_map) - 1}")
    if lens.min() < 3 or lens.max() > width:
        i = int(((lens < 3) | (lens > width)).argmax())
        raise SatError(f"{lengths_path}: caption #{i} has length {lens[i]}, not 3 to {width} (<start>, at least "
                       "one word, <end>)")
    start, end, pad = word_map["<start>"], word_map["<end>"], word_map["<pad>"]
    position, length = np.arange(width)[None, :], lens[:, None]
    words = (position >= 1) & (position < length - 1)
    well_formed = (rows[:, 0] == start) & (rows[np.arange(m), lens - 1] == end) \
        & np.where(position >= length, rows == pad, True).all(axis=1) \
        & ~(words & np.isin(rows, [start, end, pad])).any(axis=1)
    if not well_formed.all():
        i = int((~well_formed).argmax())
        raise SatError(f"{captions_path}: caption #{i} is not <start>, {lens[i] - 2} word(s), <end>, then <pad> "
                       f"(as its length {lens[i]} in {lengths_path.name} says)")
    return torch.from_numpy(rows), torch.from_numpy(lens)


def _int_array(value: Any, ndim: int, path: Path, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError, TypeError):  # ragged lists; integers beyond int64
        array = None
    if array is None or array.ndim != ndim or array.dtype.kind not in "iu" or array.dtype == np.uint64:
        raise SatError(f"{path}: not {what}")
    return array.astype(np.int64)


def _check_references(references: Any, n: int, path: Path) -> list[list[str]]:
    """One list of reference captions (strings, at least one) per image."""
    if not isinstance(references, list) or len(references) != n:
        length = len(references) if isinstance(references, list) else type(references).__name__
        raise SatError(f"{path}: needs one list of reference captions per image ({n}), has {length}")
    for i, refs in enumerate(references):
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise SatError(f"{path}: the references of image #{i} are not a non-empty list of strings")
    return references


class CaptionDataset(Dataset):
    """Caption-level items, as in the tutorial: item i is caption i and the image it describes.

    Returns (image, caption, length) for TRAIN and (image, caption, length, all_captions) for VAL/TEST.
    The image is a uint8 tensor (3, S, S) unless `transform` maps it (e.g. to a normalised float).
    """

    def __init__(self, data_folder: str | os.PathLike, data_name: str, split: str,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.files = _SplitFiles(data_folder, data_name, split)
        self.cpi = self.files.captions_per_image
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        image = self.files.image(i // self.cpi)
        if self.transform is not None:
            image = self.transform(image)
        caption, length = self.files.captions[i], self.files.lengths[i:i + 1]
        if self.files.split == "TRAIN":
            return image, caption, length
        first = (i // self.cpi) * self.cpi
        return image, caption, length, self.files.captions[first:first + self.cpi]


class ImageCaptionsDataset(Dataset):
    """Image-level items: each image once with all its captions, so the encoder runs once per image.

    Returns (image or cached features, captions (cpi, L), lengths (cpi,), index). With `features` set,
    the item's first element comes from that fp16 feature file (see features.py) instead of the images.
    """

    def __init__(self, data_folder: str | os.PathLike, data_name: str, split: str,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 features: str | os.PathLike | None = None):
        self.files = _SplitFiles(data_folder, data_name, split)
        self.cpi = self.files.captions_per_image
        self.transform = transform
        self.features: Path | None = None
        self._features_h5: h5py.File | None = None
        if features is not None:
            self.use_features(features)

    def use_features(self, path: str | os.PathLike) -> None:
        """Read the first element of each item from this feature file (features.cached_features) from now on."""
        self.features, self._features_h5 = Path(path), None

    @property
    def references(self) -> list[list[str]]:
        return self.files.references

    def __len__(self) -> int:
        return self.files.num_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        if self.features is not None:
            if self._features_h5 is None:
                self._features_h5 = h5py.File(self.features, "r")
            image = torch.from_numpy(self._features_h5["features"][i])
        else:
            image = self.files.image(i)
            if self.transform is not None:
                image = self.transform(image)
        span = slice(i * self.cpi, (i + 1) * self.cpi)
        return image, self.files.captions[span], self.files.lengths[span], i

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_features_h5": None}
