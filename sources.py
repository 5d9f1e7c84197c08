"""The captions a dataset starts from, read and checked once: Karpathy's split JSON (COCO, Flickr8k/30k, the shapes
data) and a CSV of `image,caption` rows. Every field's type is checked as it is read, so that a malformed file is
refused with one line naming the file, the entry and the problem, never half-read into wrong captions (a `tokens`
string split into one-letter words) or a traceback later."""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils import SatError, brief, read_json

SPLIT_NAMES = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}  # restval joins training
MAX_IMAGE_ID = 2 ** 63 - 1  # stored as int64
CSV_FIELD_LIMIT = 1 << 20  # bytes; csv's own default (128 KiB) raises a bare _csv.Error


@dataclass
class Record:
    """One image of a dataset before preprocessing."""
    path: Path
    captions: list[list[str]]  # tokenised, lower case
    image_id: int
    split: str  # TRAIN, VAL or TEST
    references: list[list[str]] | None = None  # every original caption, when `captions` was filtered


def read_karpathy(json_path: str | os.PathLike, image_folder: str | os.PathLike) -> list[Record]:
    """Records from Karpathy's split JSON: {"images": [{"filename", "split", "sentences": [{"tokens": [...]}, ...],
    optional "filepath" and "cocoid" or "imgid"}, ...]}."""
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SatError(f"{json_path}: no 'images' list (expected Karpathy's dataset_*.json format)")
    records = []
    ids: dict[int, int] = {}
    for i, image in enumerate(data["images"]):
        where = f"{json_path}: image #{i}"
        if not isinstance(image, dict):
            raise SatError(f"{where} is {_kind(image)}, not an object")
        filename = _text(image, "filename", where)
        where = f"{where} ({filename})"
        split = _text(image, "split", where)
        if split not in SPLIT_NAMES:
            raise SatError(f"{where} has unknown split '{split}' (use {', '.join(SPLIT_NAMES)})")
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise SatError(f"{where}: 'sentences' is {_kind(sentences)}, not a list" if "sentences" in image
                           else f"{where} has no 'sentences' field")
        captions = [_tokens(sentence, f"{where}, sentence #{j}") for j, sentence in enumerate(sentences)]
        image_id = _image_id(image, i, where)
        if image_id in ids:
            raise SatError(f"{where} has the id {image_id} of image #{ids[image_id]}")
        ids[image_id] = i
        folder = _text(image, "filepath", where, required=False)
        records.append(Record(Path(image_folder) / folder / filename, captions, image_id, SPLIT_NAMES[split]))
    return records


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _text(entry: dict, key: str, where: str, required: bool = True) -> str:
    if key not in entry:
        if required:
            raise SatError(f"{where} has no '{key}' field")
        return ""
    value = entry[key]
    if not isinstance(value, str):
        raise SatError(f"{where}: '{key}' is {_kind(value)}, not a string")
    if required and not value.strip():
        raise SatError(f"{where}: '{key}' is empty")
    return value


def _tokens(sentence: Any, where: str) -> list[str]:
    """A sentence's words, lower-cased. `tokens` must be a list of words: a string is refused rather than read as
    a list of one-letter words."""
    if not isinstance(sentence, dict):
        raise SatError(f"{where} is {_kind(sentence)}, not an object with 'tokens'")
    if "tokens" not in sentence:
        raise SatError(f"{where} has no 'tokens' field")
    tokens = sentence["tokens"]
    if not isinstance(tokens, list):
        raise SatError(f"{where}: 'tokens' is {_kind(tokens)}, not a list of words")
    for token in tokens:
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise SatError(f"{where}: the token {brief(token)} is not a word (a non-empty string without spaces)")
    return [t.lower() for t in tokens]


def _image_id(image: dict, index: int, where: str) -> int:
    key = "cocoid" if "cocoid" in image else "imgid" if "imgid" in image else None
    if key is None:
        return index
    value = image[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_IMAGE_ID:
        raise SatError(f"{where}: '{key}' is {brief(value)}, not a whole number from 0 to 2^63 - 1")
    return value


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers, the way Karpathy's JSON tokens look."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def read_csv_folder(csv_path: str | os.PathLike, image_folder: str | os.PathLike,
                    val_fraction: float, test_fraction: float, seed: int) -> list[Record]:
    """Records from a CSV of `image,caption` rows (several rows per image; other columns are ignored) and a split
    drawn with `seed`. A UTF-8 byte-order mark (as Excel writes) is skipped."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SatError(f"{csv_path}: file not found")
    captions = _csv_captions(csv_path)
    names = sorted(captions)
    order = np.random.default_rng(seed).permutation(len(names))
    n_test, n_val = round(len(names) * test_fraction), round(len(names) * val_fraction)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[names[index]] = "TEST" if rank < n_test else "VAL" if rank < n_test + n_val else "TRAIN"
    return [Record(Path(image_folder) / name, [c for c in captions[name] if c], i, split_of[name])
            for i, name in enumerate(names)]


def _csv_captions(csv_path: Path) -> dict[str, list[list[str]]]:
    """Image name -> its tokenised captions, in file order."""
    captions: dict[str, list[list[str]]] = {}
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise SatError(f"{csv_path}: needs a header with the columns 'image' and 'caption' (found "
                               f"{', '.join(map(repr, reader.fieldnames or [])) or 'none'})")
            for row in reader:
                where = f"{csv_path}: line {reader.line_num}"
                if None in row:
                    raise SatError(f"{where} has more fields than the header (a caption with an unquoted comma? "
                                   "quote it)")
                image = row["image"]
                if not image or not image.strip():
                    raise SatError(f"{where} has no image name")
                if row["caption"] is None:
                    raise SatError(f"{where} has no caption field")
                captions.setdefault(image, []).append(tokenize(row["caption"]))
    except UnicodeDecodeError as e:
        raise SatError(f"{csv_path}: not a UTF-8 text CSV ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        # line_num counts the lines read before the one that failed
        raise SatError(f"{csv_path}: line {reader.line_num + 1}: not a readable CSV row ({e}; fields are limited to "
                       f"{CSV_FIELD_LIMIT} bytes)") from None
    finally:
        csv.field_size_limit(previous_limit)
    return captions
