"""Datasets on disk: turning Karpathy splits, CSV folders and the shapes data into HDF5 + JSON, and reading them back.

Files written for a base name such as `coco_5_cap_per_img_5_min_word_freq`:
  {SPLIT}_IMAGES_{base}.hdf5   images uint8 (N, 3, S, S), image_ids (N,), filenames (N,)
  {SPLIT}_CAPTIONS_{base}.json encoded captions, exactly captions_per_image per image, padded to max_len + 2
  {SPLIT}_CAPLENS_{base}.json  caption lengths counting <start> and <end>
  {SPLIT}_REFS_{base}.json     every original caption of each image (the references for BLEU and friends)
  WORDMAP_{base}.json          word -> index, <pad> = 0
  TOKENIZER_{base}.json        --vocab bpe only: the Hugging Face BPE tokenizer; WORDMAP is its vocabulary
  BOXES_{base}.json            shapes only: each object's box and the words that refer to it
"""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import random
import re
import warnings
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

import vocab
from config import DEFAULT_MAX_PIXELS
from utils import SPECIAL_TOKENS, SatError, atomic_path, read_json, write_json

SPLITS = ("TRAIN", "VAL", "TEST")


@dataclass
class Record:
    """One image of a dataset before preprocessing."""
    path: Path
    captions: list[list[str]]  # tokenised, lower case
    image_id: int
    split: str  # TRAIN, VAL or TEST
    references: list[list[str]] | None = None  # every original caption, when `captions` was filtered


def base_name(dataset: str, captions_per_image: int, min_word_freq: int) -> str:
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


def split_file(data_folder: str | os.PathLike, split: str, kind: str, data_name: str) -> Path:
    ext = "hdf5" if kind == "IMAGES" else "json"
    return Path(data_folder) / f"{split.upper()}_{kind}_{data_name}.{ext}"


def word_map_file(data_folder: str | os.PathLike, data_name: str) -> Path:
    return Path(data_folder) / f"WORDMAP_{data_name}.json"


def read_word_map(path: str | os.PathLike) -> dict[str, int]:
    """A word map from a file (sat's or the old tutorial's WORDMAP_*.json), checked: every index from 0 to n-1
    exactly once, the special tokens present and <pad> = 0 (the padding value of captions and losses)."""
    word_map = read_json(path)
    if not isinstance(word_map, dict) or not all(isinstance(w, str) for w in word_map):
        raise SatError(f"{path}: not a word map (a JSON object of word -> index)")
    bad = [w for w, i in word_map.items() if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise SatError(f"{path}: the index of '{bad[0]}' is {word_map[bad[0]]!r}, not a whole number")
    if sorted(word_map.values()) != list(range(len(word_map))):
        raise SatError(f"{path}: its indices are not 0 to {len(word_map) - 1}, each used once")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing:
        raise SatError(f"{path}: no {', '.join(missing)} in this word map")
    if word_map["<pad>"] != 0:
        raise SatError(f"{path}: <pad> is {word_map['<pad>']}, and sat pads with 0")
    return word_map


def check_word_map(model_word_map: dict[str, int], data_folder: str | os.PathLike, data_name: str,
                   source: str) -> None:
    """A model can only be trained or scored on data with its own word map."""
    path = word_map_file(data_folder, data_name)
    data_word_map = read_json(path)
    if data_word_map != model_word_map:
        raise SatError(f"{source}: its word map ({len(model_word_map)} words) differs from {path} "
                       f"({len(data_word_map)} words): the model was trained on other data")


# ---------------------------------------------------------------------------------------------- reading sources

def read_karpathy(json_path: str | os.PathLike, image_folder: str | os.PathLike) -> list[Record]:
    """Records from Karpathy's split JSON; `restval` joins the training split."""
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SatError(f"{json_path}: no 'images' list (expected Karpathy's dataset_*.json format)")
    split_names = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}
    records = []
    for i, image in enumerate(data["images"]):
        for field in ("filename", "split", "sentences"):
            if field not in image:
                raise SatError(f"{json_path}: image #{i} has no '{field}' field")
        if image["split"] not in split_names:
            raise SatError(f"{json_path}: image #{i} ({image['filename']}) has unknown split '{image['split']}'")
        captions = []
        for sentence in image["sentences"]:
            if "tokens" not in sentence:
                raise SatError(f"{json_path}: a sentence of image #{i} ({image['filename']}) has no 'tokens' field")
            captions.append([t.lower() for t in sentence["tokens"]])
        path = Path(image_folder) / image.get("filepath", "") / image["filename"]
        image_id = image.get("cocoid", image.get("imgid", i))
        records.append(Record(path, captions, int(image_id), split_names[image["split"]]))
    return records


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers, the way Karpathy's JSON tokens look."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def read_csv_folder(csv_path: str | os.PathLike, image_folder: str | os.PathLike,
                    val_fraction: float, test_fraction: float, seed: int) -> list[Record]:
    """Records from a CSV of `image,caption` rows (several rows per image) and a split drawn with `seed`."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SatError(f"{csv_path}: file not found")
    captions: dict[str, list[list[str]]] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise SatError(f"{csv_path}: needs a header with the columns 'image' and 'caption'")
            for row in reader:
                captions.setdefault(row["image"], []).append(tokenize(row["caption"] or ""))
    except UnicodeDecodeError as e:
        raise SatError(f"{csv_path}: not a UTF-8 text CSV ({e.reason} at byte {e.start}); save it as UTF-8") from None
    names = sorted(captions)
    order = np.random.default_rng(seed).permutation(len(names))
    n_test, n_val = round(len(names) * test_fraction), round(len(names) * val_fraction)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[names[index]] = "TEST" if rank < n_test else "VAL" if rank < n_test + n_val else "TRAIN"
    return [Record(Path(image_folder) / name, [c for c in captions[name] if c], i, split_of[name])
            for i, name in enumerate(names)]


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
    """The files of one split, with the HDF5 file opened lazily so that every DataLoader worker opens its own."""

    def __init__(self, data_folder: str | os.PathLike, data_name: str, split: str):
        self.split = split.upper()
        if self.split not in SPLITS:
            raise SatError(f"unknown split '{split}' (use train, val or test)")
        self.h5_path = split_file(data_folder, self.split, "IMAGES", data_name)
        for path in (self.h5_path, split_file(data_folder, self.split, "CAPTIONS", data_name)):
            if not path.is_file():
                raise SatError(f"{path}: not found (run create_input_files.py, and check --data-folder "
                               "and --data-name)")
        with h5py.File(self.h5_path, "r") as h5:
            self.captions_per_image = int(h5.attrs["captions_per_image"])
            self.image_size = int(h5.attrs["image_size"])
            self.num_images = len(h5["images"])
            self.image_ids = h5["image_ids"][()].tolist()
            self.filenames = [f.decode() if isinstance(f, bytes) else f for f in h5["filenames"][()]]
        self.captions = torch.tensor(read_json(split_file(data_folder, self.split, "CAPTIONS", data_name)))
        self.lengths = torch.tensor(read_json(split_file(data_folder, self.split, "CAPLENS", data_name)))
        self.references: list[list[str]] = read_json(split_file(data_folder, self.split, "REFS", data_name))
        if len(self.captions) != self.num_images * self.captions_per_image:
            raise SatError(f"{self.h5_path}: {self.num_images} images but {len(self.captions)} captions "
                           f"(expected {self.captions_per_image} per image)")
        self._h5: h5py.File | None = None

    def image(self, i: int) -> torch.Tensor:
        if self._h5 is None:
            self._h5 = h5py.File(self.h5_path, "r")
        return torch.from_numpy(self._h5["images"][i])

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross into a spawned worker; each process reopens the file.
        return {**self.__dict__, "_h5": None}


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
        self.features = None if features is None else Path(features)
        self._features_h5: h5py.File | None = None

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
