"""The data pipeline on real files: Karpathy JSON / CSV / shapes -> HDF5 + JSON, bad inputs, and reading back.

Every script run is a separate process running the real create_input_files.py as __main__, with its own argv,
exit status and stderr. The module fixture `runs` prepares them all and starts them in the background; each
test waits only for the run it checks. Two of them run in fresh interpreters; the others fork from one helper
interpreter that has already imported torch & co (see RUNNER), which saves ~2.5 s of CPU per run.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import datasets  # noqa: E402
import shapes  # noqa: E402
import sources  # noqa: E402
from datasets import CaptionDataset, ImageCaptionsDataset  # noqa: E402
from sources import Record  # noqa: E402
from utils import SatError  # noqa: E402

SCRIPT = ROOT / "create_input_files.py"
SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
SPLITS = ("TRAIN", "VAL", "TEST")
KINDS = ("IMAGES", "CAPTIONS", "CAPLENS", "REFS")


# ------------------------------------------------------------------------------------------------------ helpers

def photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image, as a uint8 array (H, W) or (H, W, 3)."""
    with Image.open(SKIMAGE_DATA / name) as image:
        return np.asarray(image.convert("L" if image.mode in ("L", "I;16") else "RGB"))


def resized(array: np.ndarray, size: int) -> np.ndarray:
    """Reference: the photo resized with Pillow, as (3, S, S) uint8."""
    image = Image.fromarray(array).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def tiny_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[...] = colour
    array[: size[1] // 2, : size[0] // 2] = 255 - np.array(colour, np.uint8)  # not flat, so resizing matters
    Image.fromarray(array).save(path)
    return path


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A valid 1-bit grayscale PNG of side x side pixels whose file is only ~50 KB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def expected_outputs(name: str, boxes: bool = False) -> set[str]:
    files = {f"{s}_{k}_{name}.{'hdf5' if k == 'IMAGES' else 'json'}" for s in SPLITS for k in KINDS}
    return files | {f"WORDMAP_{name}.json"} | ({f"BOXES_{name}.json"} if boxes else set())


def read_split(folder: Path, name: str, split: str) -> dict:
    with h5py.File(folder / f"{split}_IMAGES_{name}.hdf5", "r") as h5:
        out = {"images": h5["images"][()], "dtype": h5["images"].dtype, "attrs": dict(h5.attrs),
               "image_ids": h5["image_ids"][()].tolist(),
               "filenames": [f.decode() if isinstance(f, bytes) else f for f in h5["filenames"][()]]}
    for kind in ("CAPTIONS", "CAPLENS", "REFS"):
        out[kind.lower()] = json.loads((folder / f"{split}_{kind}_{name}.json").read_text())
    return out


def decode(row: list[int], length: int, word_map: dict[str, int]) -> list[str]:
    """Check the layout <start> w... <end> <pad>... and return the words."""
    rev = {i: w for w, i in word_map.items()}
    assert row[0] == word_map["<start>"]
    assert row[length - 1] == word_map["<end>"]
    assert all(i == word_map["<pad>"] for i in row[length:])
    words = [rev[i] for i in row[1:length - 1]]
    assert not {"<start>", "<end>", "<pad>"} & set(words)
    return words


def progress_free(stderr: str) -> list[str]:
    """stderr lines without tqdm's progress-bar updates (tqdm writes them to stderr)."""
    bar = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
    return [s for s in re.split(r"[\r\n]", stderr) if s.strip() and not bar.search(s)]


def karpathy_json(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"dataset": "test", "images": entries}))
    return path


def entry(filename: str, split: str, captions: list[str], imgid: int, filepath: str = "") -> dict:
    return {"filepath": filepath, "filename": filename, "split": split, "imgid": imgid,
            "sentences": [{"tokens": c.split(), "raw": c} for c in captions]}


# ------------------------------------------------------------------------------ the mixed-mode Karpathy dataset

# filename, filepath, split, captions; image modes are made in `make_photo_set`
PHOTO_SET = [
    ("cat.jpg", "train2014", "train", ["A cat sits on a mat", "a cat looks up", "an orange cat", "the cat rests",
                                       "a small cat with stripes"]),
    ("coffee_rgba.png", "train2014", "train", ["a cup of coffee", "coffee on a table"]),
    ("camera_l.png", "train2014", "restval", ["a man with a camera"]),
    ("astro_cmyk.jpg", "train2014", "restval", ["an astronaut in a suit", "a woman in a space suit",
                                                "astronaut with a flag"]),
    ("rocket_p.png", "val2014", "val", ["a rocket on a launch pad", "a rocket before launch", "a tall rocket",
                                        "zebra rocket"]),
    ("const16.png", "val2014", "val", ["a gray square", "a flat gray image", "nothing but gray"]),
    ("camera16.png", "val2014", "test", ["a man with a camera", "a photographer in a field"]),
    ("coffee.png", "val2014", "test", ["a cup of coffee", "coffee in a cup", "a red cup", "a drink", "hot coffee"]),
]
SPLIT_OF = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}
COCOID = 424242  # coffee.png carries a cocoid, which wins over imgid


@dataclass
class PhotoSet:
    folder: Path
    json: Path


def make_photo_set(root: Path) -> PhotoSet:
    folder = root / "images"
    (folder / "train2014").mkdir(parents=True)
    (folder / "val2014").mkdir(parents=True)
    chelsea, coffee, astronaut = photo("chelsea.png"), photo("coffee.png"), photo("astronaut.png")
    camera, rocket = photo("camera.png"), photo("rocket.jpg")
    Image.fromarray(chelsea).save(folder / "train2014/cat.jpg", quality=92)
    rgba = np.dstack([coffee, np.full(coffee.shape[:2], 255, np.uint8)])
    half = coffee.shape[1] // 2
    rgba[:, :half] = 0  # left half fully transparent, and its hidden colour black
    Image.fromarray(rgba, "RGBA").save(folder / "train2014/coffee_rgba.png")
    Image.fromarray(camera).save(folder / "train2014/camera_l.png")
    Image.fromarray(astronaut).convert("CMYK").save(folder / "train2014/astro_cmyk.jpg", quality=92)
    palette = Image.fromarray(rocket).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    palette.save(folder / "val2014/rocket_p.png")
    Image.fromarray(np.full((48, 40), 32768, np.uint16)).save(folder / "val2014/const16.png")
    Image.fromarray(camera.astype(np.uint16) * 257).save(folder / "val2014/camera16.png")
    Image.fromarray(coffee).save(folder / "val2014/coffee.png")
    for name, mode in [("train2014/cat.jpg", "RGB"), ("train2014/coffee_rgba.png", "RGBA"),
                       ("train2014/camera_l.png", "L"), ("train2014/astro_cmyk.jpg", "CMYK"),
                       ("val2014/rocket_p.png", "P"), ("val2014/const16.png", "I;16"),
                       ("val2014/camera16.png", "I;16")]:
        with Image.open(folder / name) as check:
            assert check.mode == mode, (name, check.mode)  # the inputs really are of the intended modes
    entries = []
    for i, (filename, filepath, split, captions) in enumerate(PHOTO_SET):
        e = entry(filename, split, captions, imgid=100 + i, filepath=filepath)
        if filename == "coffee.png":
            e["cocoid"] = COCOID
        entries.append(e)
    return PhotoSet(folder, karpathy_json(root / "dataset_coco.json", entries))


def photo_captions(filename: str) -> list[list[str]]:
    return [c.lower().split() for f, _, _, cs in PHOTO_SET if f == filename for c in cs]


# ---------------------------------------------------------------------------------- small sets for bad inputs

def small_set(root: Path, test_image: str = "t.png", extra_test: list[str] = (), splits=("train", "val", "test"),
              make_test: bool = True) -> tuple[Path, Path]:
    """Tiny Karpathy dataset: a.png (train), b.jpg (train), v.png (val) and `test_image` (test)."""
    folder = root / "img"
    tiny_image(folder / "a.png", (200, 30, 30))
    tiny_image(folder / "b.jpg", (30, 200, 30), (26, 22))
    tiny_image(folder / "v.png", (30, 30, 200))
    if make_test:
        tiny_image(folder / test_image, (90, 90, 20))
    names = [("a.png", "train"), ("b.jpg", "train"), ("v.png", "val"), (test_image, "test")]
    names += [(n, "test") for n in extra_test]
    entries = [entry(n, s, ["a small square", "a square in a corner"], imgid=i)
               for i, (n, s) in enumerate(names) if s in splits]
    return karpathy_json(root / "data.json", entries), folder


def coco_args(json_path: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "coco", "--karpathy-json", str(json_path), "--image-folder", str(folder),
            "--output-folder", str(out), "--image-size", "32", "--min-word-freq", "1",
            "--captions-per-image", "2", "--workers", "0", *extra]


# ------------------------------------------------------------------------------------- all the script runs

@dataclass
class Run:
    args: list[str]
    out: Path
    offending: str = ""  # the file name the error message must name
    info: dict = field(default_factory=dict)
    fresh: bool = False  # run in a fresh interpreter rather than forked from the runner (see ScriptRunner)
    future: Future | None = None

    def result(self) -> subprocess.CompletedProcess:
        return self.future.result()


def run_fresh(args: list[str]) -> subprocess.CompletedProcess:
    """`python create_input_files.py ARGS` in a new interpreter."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


# Importing torch costs ~2.5 s of CPU per interpreter, and this file makes ~20 script runs. So most runs fork
# from one helper interpreter that has imported the third-party libraries only; each forked process then runs
# the real create_input_files.py as __main__ (importing the project's modules afresh), with its own argv,
# stdout/stderr files and exit status, exactly as `python create_input_files.py ARGS` would.
# test_forked_runs_match_a_fresh_interpreter checks that both ways give the same result.
RUNNER = r"""
import json, os, runpy, sys, traceback
import h5py, numpy, torch, tqdm, PIL.Image, PIL.ImageDraw, PIL.ImageOps  # third-party only
script = sys.argv[1]
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            os.chdir(request["cwd"])
            sys.argv = [script, *request["args"]]
            sys.path[0] = os.path.dirname(script)
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class ScriptRunner:
    """Runs create_input_files.py in processes forked from one helper interpreter, one run at a time."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.process = subprocess.Popen([sys.executable, "-c", RUNNER, str(SCRIPT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess:
        self.count += 1
        stdout, stderr = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = {"args": args, "cwd": str(ROOT), "stdout": str(stdout), "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply, "the script runner died"
        return subprocess.CompletedProcess([sys.executable, str(SCRIPT), *args], json.loads(reply),
                                           stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


BAD_INPUTS = ["missing_image", "corrupt_image", "corrupt_image_fresh", "corrupt_image_workers", "truncated_jpeg",
              "zero_byte", "text_as_png", "json_missing_field", "invalid_json", "no_captions", "empty_split",
              "bomb_max_pixels", "bomb_default_limit"]


def prepare_runs(root: Path, photos: PhotoSet) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    runs["roundtrip"] = Run(["--dataset", "coco", "--karpathy-json", str(photos.json), "--image-folder",
                             str(photos.folder), "--output-folder", str(root / "roundtrip"), "--image-size", "64",
                             "--min-word-freq", "1", "--captions-per-image", "3", "--workers", "0"],
                            root / "roundtrip", fresh=True)
    runs["shapes"] = Run(["--dataset", "shapes", "--shapes-train", "6", "--shapes-val", "2", "--shapes-test", "2",
                          "--image-size", "64", "--min-word-freq", "1", "--output-folder", str(root / "shapes")],
                         root / "shapes")

    # --dataset folder: a CSV with several rows per image, run twice with the same seed
    csv_root = root / "csv"
    (csv_root / "photos").mkdir(parents=True)
    chelsea = photo("chelsea.png")
    names = []
    for i in range(10):
        name = f"img_{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(chelsea[10 * i: 10 * i + 40, 12 * i: 12 * i + 50]).save(csv_root / "photos" / name)
        names.append(name)
    rows = []
    for i, name in enumerate(names):
        rows += [(name, f"A Cat's face, number {i}!"), (name, f"part {i} of a cat")]
        if i % 3 == 0:
            rows += [(name, "a CAT"), (name, "")]  # an empty caption is dropped
    with open(csv_root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    for run in ("folder_a", "folder_b"):
        runs[run] = Run(["--dataset", "folder", "--captions-csv", str(csv_root / "captions.csv"), "--image-folder",
                         str(csv_root / "photos"), "--output-folder", str(root / run), "--image-size", "32",
                         "--min-word-freq", "1", "--captions-per-image", "2", "--val-fraction", "0.2",
                         "--test-fraction", "0.2", "--seed", "3", "--workers", "0"],
                        root / run, info={"names": names, "rows": rows})

    # bad inputs: each in its own folder; the bad image sits in the test split, so train and val are written first
    def bad(name: str, offending: str, *extra: str, test_image: str = "t.png", **kw) -> tuple[Path, Path]:
        base = root / name
        json_path, folder = small_set(base, test_image=test_image, **kw)
        runs[name] = Run(coco_args(json_path, folder, base / "out", *extra), base / "out", offending)
        return json_path, folder

    _, folder = bad("missing_image", "gone.jpg", test_image="gone.jpg", make_test=False)
    corrupt = random.Random(0).randbytes(3000)
    _, folder = bad("corrupt_image", "corrupt.jpg", test_image="corrupt.jpg", make_test=False)
    (folder / "corrupt.jpg").write_bytes(corrupt)
    # the same run, in a fresh interpreter
    json_path, folder = small_set(root / "corrupt_image_fresh", test_image="corrupt.jpg", make_test=False)
    (folder / "corrupt.jpg").write_bytes(corrupt)
    runs["corrupt_image_fresh"] = Run(coco_args(json_path, folder, root / "corrupt_image_fresh" / "out"),
                                      root / "corrupt_image_fresh" / "out", "corrupt.jpg", fresh=True)
    _, folder = bad("corrupt_image_workers", "corrupt.jpg", "--workers", "2", test_image="corrupt.jpg",
                    make_test=False)
    (folder / "corrupt.jpg").write_bytes(corrupt)
    _, folder = bad("truncated_jpeg", "half.jpg", test_image="half.jpg", make_test=False)
    Image.fromarray(chelsea).save(folder / "whole.jpg", quality=90)
    whole = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "half.jpg").write_bytes(whole[: len(whole) // 2])
    _, folder = bad("zero_byte", "empty.jpg", test_image="empty.jpg", make_test=False)
    (folder / "empty.jpg").write_bytes(b"")
    _, folder = bad("text_as_png", "notes.png", test_image="notes.png", make_test=False)
    (folder / "notes.png").write_text("this is not a picture\n" * 20)
    json_path, _ = bad("json_missing_field", "data.json")
    data = json.loads(json_path.read_text())
    del data["images"][2]["sentences"]
    json_path.write_text(json.dumps(data))
    json_path, _ = bad("invalid_json", "data.json")
    json_path.write_text(json_path.read_text()[:-7])
    json_path, _ = bad("no_captions", "v.png")
    data = json.loads(json_path.read_text())
    data["images"][2]["sentences"] = []
    json_path.write_text(json.dumps(data))
    bad("empty_split", "data.json", splits=("train", "test"))
    _, folder = bad("bomb_max_pixels", "big.png", "--max-image-pixels", "1000", test_image="big.png",
                    make_test=False)
    tiny_image(folder / "big.png", (10, 10, 10), (64, 64))  # 4096 px; the others are at most 26 x 22 = 572 px
    _, folder = bad("bomb_default_limit", "bomb.png", test_image="bomb.png", make_test=False)
    bomb_png(folder / "bomb.png")

    # --skip-bad-images: the same corrupt image, next to a good one in the test split
    _, folder = bad("skip_bad", "corrupt.jpg", "--skip-bad-images", test_image="corrupt.jpg", make_test=False,
                    extra_test=["t2.png"])
    (folder / "corrupt.jpg").write_bytes(corrupt)
    tiny_image(folder / "t2.png", (120, 40, 160))

    # re-running over existing outputs: made here in-process, then the script with and without --overwrite
    for name, extra in [("rerun_refused", ()), ("rerun_overwrite", ("--overwrite", "--image-size", "16"))]:
        base = root / name
        json_path, folder = small_set(base)
        datasets.create_input_files(sources.read_karpathy(json_path, folder), "coco", base / "out",
                                    captions_per_image=2, min_word_freq=1, image_size=32, source=str(json_path))
        runs[name] = Run(coco_args(json_path, folder, base / "out", *extra), base / "out",
                         info={"before": file_bytes(base / "out")})
    return runs


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory: pytest.TempPathFactory) -> PhotoSet:
    return make_photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, photo_set: PhotoSet) -> dict[str, Run]:
    """Every script run of this file, started in the background; a test waits for the run(s) it checks."""
    prepared = prepare_runs(tmp_path_factory.mktemp("runs"), photo_set)
    runner = ScriptRunner(tmp_path_factory.mktemp("runner"))
    forked, fresh = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    for run in prepared.values():  # FIFO: the order above is roughly the order the tests need them
        run.future = fresh.submit(run_fresh, run.args) if run.fresh else forked.submit(runner, run.args)
    yield prepared
    for pool in (forked, fresh):
        pool.shutdown(wait=True, cancel_futures=True)
    runner.close()


def succeeded(run: Run) -> subprocess.CompletedProcess:
    result = run.result()
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


ROUNDTRIP_NAME = "coco_3_cap_per_img_1_min_word_freq"


# ===================================================================== 1. Karpathy round trip through the script

def test_roundtrip_writes_exactly_the_expected_files(runs: dict[str, Run]) -> None:
    result = succeeded(runs["roundtrip"])
    assert f"--data-name {ROUNDTRIP_NAME}" in result.stdout
    assert set(all_files(runs["roundtrip"].out)) == expected_outputs(ROUNDTRIP_NAME)  # no SKIPPED, no *.tmp


def test_roundtrip_hdf5_layout_and_split_membership(runs: dict[str, Run]) -> None:
    succeeded(runs["roundtrip"])
    out = runs["roundtrip"].out
    for split in SPLITS:
        data = read_split(out, ROUNDTRIP_NAME, split)
        expected = [(f, i) for i, (f, _, s, _) in enumerate(PHOTO_SET) if SPLIT_OF[s] == split]
        assert data["filenames"] == [f for f, _ in expected]  # restval images are in TRAIN, in file order
        assert data["image_ids"] == [COCOID if f == "coffee.png" else 100 + i for f, i in expected]
        assert data["images"].shape == (len(expected), 3, 64, 64)
        assert data["dtype"] == np.uint8
        assert data["attrs"]["captions_per_image"] == 3
        assert data["attrs"]["image_size"] == 64
        assert len(data["captions"]) == len(data["caplens"]) == 3 * len(expected)
        assert len(data["refs"]) == len(expected)
    assert len(read_split(out, ROUNDTRIP_NAME, "TRAIN")["filenames"]) == 4  # 2 train + 2 restval


def test_roundtrip_pixels_of_every_image_mode(runs: dict[str, Run]) -> None:
    succeeded(runs["roundtrip"])
    images = {}
    for split in SPLITS:
        data = read_split(runs["roundtrip"].out, ROUNDTRIP_NAME, split)
        images.update(zip(data["filenames"], data["images"]))
    chelsea, coffee, astronaut = photo("chelsea.png"), photo("coffee.png"), photo("astronaut.png")
    camera, rocket = photo("camera.png"), photo("rocket.jpg")

    assert mean_abs_diff(images["cat.jpg"], resized(chelsea, 64)) < 6  # RGB JPEG
    assert mean_abs_diff(images["coffee.png"], resized(coffee, 64)) < 3  # RGB PNG
    assert mean_abs_diff(images["astro_cmyk.jpg"], resized(astronaut, 64)) < 12  # CMYK JPEG, not inverted
    assert mean_abs_diff(images["rocket_p.png"], resized(rocket, 64)) < 12  # palette PNG
    gray = images["camera_l.png"]  # L: three equal channels
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert mean_abs_diff(gray, resized(camera, 64)) < 3
    # RGBA: transparent pixels (hidden colour black) are composited on white; the opaque half is the photo
    rgba = images["coffee_rgba.png"]
    assert (rgba[:, :, :28] >= 250).all()
    assert mean_abs_diff(rgba[:, :, 36:], resized(coffee, 64)[:, :, 36:]) < 3
    # 16 bit: rescaled from 0..65535, not clipped to white
    flat = images["const16.png"]
    assert flat.min() >= 126 and flat.max() <= 129, (flat.min(), flat.max())
    deep = images["camera16.png"].astype(int)  # camera * 257 in 16 bits looks like the 8-bit camera
    assert (deep[0] == deep[1]).all() and (deep[1] == deep[2]).all()
    assert np.abs(deep - gray.astype(int)).max() <= 1


def test_roundtrip_word_map_counts_training_words_only(runs: dict[str, Run]) -> None:
    succeeded(runs["roundtrip"])
    word_map = json.loads((runs["roundtrip"].out / f"WORDMAP_{ROUNDTRIP_NAME}.json").read_text())
    assert word_map["<pad>"] == 0
    assert {"<start>", "<end>", "<unk>"} <= set(word_map)
    assert sorted(word_map.values()) == list(range(len(word_map)))
    train_counts = Counter(w for f, _, s, _ in PHOTO_SET if SPLIT_OF[s] == "TRAIN"
                           for c in photo_captions(f) for w in c)
    assert set(word_map) - {"<pad>", "<start>", "<end>", "<unk>"} == set(train_counts)
    assert "zebra" not in word_map and "launch" not in word_map and "photographer" not in word_map  # val/test only
    assert "a" in word_map and "A" not in word_map  # tokens are lower-cased
    for w1 in train_counts:  # more frequent words get smaller indices
        for w2 in train_counts:
            if train_counts[w1] > train_counts[w2]:
                assert word_map[w1] < word_map[w2], (w1, w2)


def test_roundtrip_encoded_captions(runs: dict[str, Run]) -> None:
    succeeded(runs["roundtrip"])
    out = runs["roundtrip"].out
    word_map = json.loads((out / f"WORDMAP_{ROUNDTRIP_NAME}.json").read_text())
    for split in SPLITS:
        data = read_split(out, ROUNDTRIP_NAME, split)
        for k, filename in enumerate(data["filenames"]):
            originals = photo_captions(filename)
            with_unk = [[w if w in word_map else "<unk>" for w in c] for c in originals]
            chosen = []
            for j in range(3):
                row, length = data["captions"][3 * k + j], data["caplens"][3 * k + j]
                assert len(row) == 50 + 2  # padded to max_len + 2 (default --max-len 50)
                words = decode(row, length, word_map)
                assert words in with_unk
                assert length == len(words) + 2
                chosen.append(with_unk.index(words))
            if len(originals) >= 3:
                assert len(set(chosen)) == 3, (filename, chosen)  # a sample without repeats
            else:
                assert set(chosen) == set(range(len(originals))), (filename, chosen)  # all of them, repeated
    val = read_split(out, ROUNDTRIP_NAME, "VAL")
    k = val["filenames"].index("rocket_p.png")
    decoded = [decode(val["captions"][3 * k + j], val["caplens"][3 * k + j], word_map) for j in range(3)]
    assert any("<unk>" in d for d in decoded)  # 'launch', 'pad', 'before', 'tall', 'zebra' are val-only words


def test_roundtrip_refs_hold_every_original_caption(runs: dict[str, Run]) -> None:
    succeeded(runs["roundtrip"])
    for split in SPLITS:
        data = read_split(runs["roundtrip"].out, ROUNDTRIP_NAME, split)
        assert data["refs"] == [[" ".join(c) for c in photo_captions(f)] for f in data["filenames"]]
    assert read_split(runs["roundtrip"].out, ROUNDTRIP_NAME, "TRAIN")["refs"][0][0] == "a cat sits on a mat"


# ========================================================== 3. determinism (in-process runs vs the script's run)

def test_same_seed_gives_byte_identical_files(runs: dict[str, Run], photo_set: PhotoSet, tmp_path: Path) -> None:
    succeeded(runs["roundtrip"])
    reference = file_bytes(runs["roundtrip"].out)
    records = sources.read_karpathy(photo_set.json, photo_set.folder)
    for folder, workers in [("again", 0), ("pool", 2)]:  # the fork pool decodes to the same bytes
        name = datasets.create_input_files(records, "coco", tmp_path / folder, captions_per_image=3,
                                           min_word_freq=1, image_size=64, seed=0, workers=workers,
                                           source=str(photo_set.json))
        assert name == ROUNDTRIP_NAME
        again = file_bytes(tmp_path / folder)
        assert again.keys() == reference.keys()
        for key in reference:
            assert again[key] == reference[key], f"{key} differs ({folder})"
    # another seed samples other captions but stores the same images
    datasets.create_input_files(records, "coco", tmp_path / "seed1", captions_per_image=3, min_word_freq=1,
                                image_size=64, seed=1, source=str(photo_set.json))
    other = file_bytes(tmp_path / "seed1")
    assert other[f"TRAIN_CAPTIONS_{ROUNDTRIP_NAME}.json"] != reference[f"TRAIN_CAPTIONS_{ROUNDTRIP_NAME}.json"]
    assert other[f"TRAIN_REFS_{ROUNDTRIP_NAME}.json"] == reference[f"TRAIN_REFS_{ROUNDTRIP_NAME}.json"]
    assert np.array_equal(read_split(tmp_path / "seed1", ROUNDTRIP_NAME, "TRAIN")["images"],
                          read_split(runs["roundtrip"].out, ROUNDTRIP_NAME, "TRAIN")["images"])


def test_shapes_generate_same_seed_byte_identical(tmp_path: Path) -> None:
    a = shapes.generate(tmp_path / "a", 3, 1, 1, side=64, seed=7)
    shapes.generate(tmp_path / "b", 3, 1, 1, side=64, seed=7)
    assert [p.name for p in a] == ["dataset_shapes.json", "shapes_boxes.json"]
    files_a, files_b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert len([k for k in files_a if k.endswith(".jpg")]) == 5
    assert files_a == files_b
    shapes.generate(tmp_path / "c", 3, 1, 1, side=64, seed=8)
    assert file_bytes(tmp_path / "c")["dataset_shapes.json"] != files_a["dataset_shapes.json"]


# ===================================================================== 2. min_word_freq, <unk> and max_len

@pytest.fixture
def tiny_images(tmp_path: Path) -> list[Path]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    return [tiny_image(tmp_path / "img" / f"i{k}.png", c) for k, c in enumerate(colours)]


def test_min_word_freq_and_unk(tiny_images: list[Path], tmp_path: Path) -> None:
    records = [
        Record(tiny_images[0], [["a", "dog", "runs"], ["a", "dog", "and", "a", "cat"]], 0, "TRAIN"),
        Record(tiny_images[1], [["a", "dog", "runs", "bird"]], 1, "TRAIN"),
        Record(tiny_images[2], [["bird", "bird", "bird", "cat"], ["zebra", "dog"]], 2, "VAL"),
        Record(tiny_images[3], [["a", "dog", "runs"]], 3, "TEST"),
    ]
    # training counts: a 4, dog 3, runs 2, and 1, cat 1, bird 1 (bird's 3 uses in val do not count)
    name = datasets.create_input_files(records, "tiny", tmp_path / "out2", captions_per_image=2, min_word_freq=2,
                                       max_len=6, image_size=16)
    assert name == "tiny_2_cap_per_img_2_min_word_freq"
    word_map = json.loads((tmp_path / "out2" / f"WORDMAP_{name}.json").read_text())
    assert set(word_map) == {"<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs"}
    assert word_map["<pad>"] == 0
    assert word_map["a"] < word_map["dog"] < word_map["runs"]
    val = read_split(tmp_path / "out2", name, "VAL")
    rows = [decode(r, n, word_map) for r, n in zip(val["captions"], val["caplens"])]
    assert sorted(rows) == sorted([["<unk>"] * 4, ["<unk>", "dog"]])
    assert all(len(r) == 6 + 2 for r in val["captions"])
    train = read_split(tmp_path / "out2", name, "TRAIN")
    rows = [decode(r, n, word_map) for r, n in zip(train["captions"], train["caplens"])]
    assert sorted(rows[:2]) == [["a", "dog", "<unk>", "a", "<unk>"], ["a", "dog", "runs"]]
    assert rows[2:] == [["a", "dog", "runs", "<unk>"]] * 2  # one caption, repeated

    name1 = datasets.create_input_files(records, "tiny", tmp_path / "out1", captions_per_image=2, min_word_freq=1,
                                        max_len=6, image_size=16)
    word_map1 = json.loads((tmp_path / "out1" / f"WORDMAP_{name1}.json").read_text())
    assert set(word_map1) - set(word_map) == {"and", "cat", "bird"}  # 'zebra' is only in val: never a word
    assert word_map1["a"] == word_map["a"] == 4  # the four special tokens come first, the most frequent word next


def test_exactly_captions_per_image_sampled_or_repeated(tiny_images: list[Path], tmp_path: Path) -> None:
    counts = {0: 1, 1: 2, 2: 3, 3: 7}  # image -> number of distinct captions; 4 are kept per image
    records = [Record(tiny_images[k], [[f"w{k}", f"c{j}"] for j in range(n)], k, "TRAIN") for k, n in counts.items()]
    records += [Record(tiny_images[4], [["w4"]], 4, "VAL"), Record(tiny_images[4], [["w4"]], 5, "TEST")]
    kept = {}
    for seed in (0, 1):
        name = datasets.create_input_files(records, "cpi", tmp_path / f"s{seed}", captions_per_image=4,
                                           min_word_freq=1, max_len=5, image_size=16, seed=seed)
        word_map = json.loads((tmp_path / f"s{seed}" / f"WORDMAP_{name}.json").read_text())
        train = read_split(tmp_path / f"s{seed}", name, "TRAIN")
        assert len(train["captions"]) == 4 * len(counts)
        for k, n in counts.items():
            chosen = [tuple(decode(r, m, word_map)) for r, m in zip(train["captions"][4 * k: 4 * k + 4],
                                                                    train["caplens"][4 * k: 4 * k + 4])]
            originals = {(f"w{k}", f"c{j}") for j in range(n)}
            assert set(chosen) <= originals
            if n >= 4:
                assert len(set(chosen)) == 4  # a sample, no repeats
            else:
                assert set(chosen) == originals  # every caption, some repeated
            kept[seed, k] = chosen
    assert kept[0, 3] != kept[1, 3]  # the sample depends on the seed


def test_max_len_drops_long_captions(tiny_images: list[Path], tmp_path: Path) -> None:
    records = [
        Record(tiny_images[0], [["one", "two", "three", "four"], ["one", "two"]], 0, "TRAIN"),
        Record(tiny_images[1], [["x", "y", "z"], []], 1, "TRAIN"),
        Record(tiny_images[2], [["one", "two", "x", "y"], ["x"]], 2, "VAL"),
        Record(tiny_images[3], [["y", "z"], ["one", "x", "y", "z", "two"]], 3, "TEST"),
    ]
    name = datasets.create_input_files(records, "ml", tmp_path / "out", captions_per_image=2, min_word_freq=1,
                                       max_len=3, image_size=16)
    word_map = json.loads((tmp_path / "out" / f"WORDMAP_{name}.json").read_text())
    for split, expected in [("TRAIN", [["one", "two"]] * 2 + [["x", "y", "z"]] * 2), ("VAL", [["x"]] * 2),
                            ("TEST", [["y", "z"]] * 2)]:
        data = read_split(tmp_path / "out", name, split)
        assert all(len(r) == 3 + 2 for r in data["captions"])
        assert [decode(r, n, word_map) for r, n in zip(data["captions"], data["caplens"])] == expected
        assert max(data["caplens"]) <= 3 + 2

    # an image left with no caption short enough is bad input, unless bad input is skipped
    records.append(Record(tiny_images[4], [["far", "too", "long", "a", "caption"]], 4, "TRAIN"))
    with pytest.raises(SatError, match=re.escape(str(tiny_images[4]))):
        datasets.create_input_files(records, "ml", tmp_path / "out3", captions_per_image=2, min_word_freq=1,
                                    max_len=3, image_size=16)
    assert all_files(tmp_path / "out3") == []
    name = datasets.create_input_files(records, "ml", tmp_path / "out4", captions_per_image=2, min_word_freq=1,
                                       max_len=3, image_size=16, skip_bad_images=True)
    assert read_split(tmp_path / "out4", name, "TRAIN")["filenames"] == ["i0.png", "i1.png"]


# ============================================================================ images: load_image on its own

def test_load_image_modes_and_guards(tmp_path: Path) -> None:
    # EXIF orientation is applied: a 40x20 image tagged "rotate 90 CW" comes out 20 wide, 40 high
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    rotated = np.asarray(datasets.load_image(tmp_path / "rot.jpg", None))
    assert rotated.shape == (40, 20, 3)
    assert rotated[5, 10, 0] > 200 and rotated[5, 10, 2] < 60  # red on top
    assert rotated[35, 10, 2] > 200 and rotated[35, 10, 0] < 60  # blue below
    # palette image with a transparent index: transparent pixels become white
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    rgb = np.asarray(datasets.load_image(tmp_path / "pt.png", None))
    assert (rgb[:, :4] == 255).all() and (rgb[:, 4:] == (10, 200, 10)).all()
    # Pillow's own warning zone (between 1x and 2x its limit) is refused, not just warned about
    bomb_png(tmp_path / "mid.png", side=10_000)  # 100 M pixels > 89.5 M
    with pytest.raises(datasets.BadImage, match="decompression bomb"):
        datasets.load_image(tmp_path / "mid.png", 32)
    with pytest.raises(datasets.BadImage, match="refused"):  # 40 x 20 = 800 pixels, over a limit of 100
        datasets.load_image(tmp_path / "rot.jpg", 32, max_pixels=100)


def test_max_image_pixels_can_also_raise_the_limit(tmp_path: Path) -> None:
    """--max-image-pixels is *the* limit: 'images with more pixels are refused', so fewer pixels are accepted."""
    bomb_png(tmp_path / "large.png", side=9_500)  # 90.25 M pixels: over Pillow's default, under the limit given
    image = datasets.load_image(tmp_path / "large.png", 16, max_pixels=200_000_000)
    assert image.size == (16, 16) and image.mode == "RGB"
    assert np.asarray(image).max() == 0  # the all-zero 1-bit image, decoded


# =================================================================================== 4. the shapes generator

def test_shapes_dataset_through_the_script(runs: dict[str, Run]) -> None:
    succeeded(runs["shapes"])
    out = runs["shapes"].out
    name = "shapes_5_cap_per_img_1_min_word_freq"
    assert expected_outputs(name, boxes=True) <= set(all_files(out))
    raw = json.loads((out / "shapes_raw" / "dataset_shapes.json").read_text())
    sidecar = json.loads((out / "shapes_raw" / "shapes_boxes.json").read_text())
    assert json.loads((out / f"BOXES_{name}.json").read_text()) == sidecar
    word_map = json.loads((out / f"WORDMAP_{name}.json").read_text())
    assert [i["split"] for i in raw["images"]] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert set(sidecar) == {i["filename"] for i in raw["images"]}
    colours, kinds = set(shapes.COLOURS), set(shapes.SHAPES)
    for image in raw["images"]:
        objects = sidecar[image["filename"]]
        captions = [" ".join(s["tokens"]) for s in image["sentences"]]
        assert len(captions) == 5 and len(set(captions)) == 5
        assert 1 <= len(objects) <= 3
        pixels = np.asarray(Image.open(out / "shapes_raw" / image["filepath"] / image["filename"]).convert("RGB"))
        side = pixels.shape[0]
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert obj["words"] == [obj["colour"], obj["shape"]]
            centre = pixels[int((y0 + y1) / 2 * side), int((x0 + x1) / 2 * side)].astype(int)
            assert np.abs(centre - shapes.COLOURS[obj["colour"]]).max() < 45, (image["filename"], obj, centre)
            if image["split"] == "train":
                assert obj["colour"] in word_map and obj["shape"] in word_map
        said = {w for c in captions for w in c.split()}
        assert said & colours <= {o["colour"] for o in objects}
        assert said & kinds <= {o["shape"] for o in objects}
        assert {o["colour"] for o in objects} <= said and {o["shape"] for o in objects} <= said
        if "three" in said:
            assert len(objects) == 3
    train = read_split(out, name, "TRAIN")
    assert train["images"].shape == (6, 3, 64, 64)
    assert train["refs"] == [[" ".join(s["tokens"]) for s in i["sentences"]] for i in raw["images"][:6]]


# ============================================================================= 6. --dataset folder with a CSV

def test_folder_dataset_split_is_reproducible_and_complete(runs: dict[str, Run]) -> None:
    run_a, run_b = runs["folder_a"], runs["folder_b"]
    succeeded(run_a)
    succeeded(run_b)
    name = "folder_2_cap_per_img_1_min_word_freq"
    assert file_bytes(run_a.out) == file_bytes(run_b.out)
    names = run_a.info["names"]
    assignment = {}
    for split in SPLITS:
        data = read_split(run_a.out, name, split)
        for filename, image_id, refs in zip(data["filenames"], data["image_ids"], data["refs"]):
            assert filename not in assignment  # in exactly one split
            assignment[filename] = split
            assert image_id == names.index(filename)
            i = names.index(filename)
            expected = [f"a cat's face number {i}", f"part {i} of a cat"] + (["a cat"] if i % 3 == 0 else [])
            assert refs == expected  # tokenised, lower-cased, punctuation and the empty caption gone
    assert set(assignment) == set(names)
    assert Counter(assignment.values()) == {"TRAIN": 6, "VAL": 2, "TEST": 2}
    # the split comes from the seed
    csv_path = Path(run_a.args[run_a.args.index("--captions-csv") + 1])
    folder = run_a.args[run_a.args.index("--image-folder") + 1]
    again = {r.path.name: r.split for r in sources.read_csv_folder(csv_path, folder, 0.2, 0.2, seed=3)}
    assert again == assignment
    others = [{r.path.name: r.split for r in sources.read_csv_folder(csv_path, folder, 0.2, 0.2, seed=s)}
              for s in (4, 5, 6)]
    assert any(o != assignment for o in others)


# ================================================================================ 5. bad inputs, via the script

@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_cleanly(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    result = run.result()
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = progress_free(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and run.offending in lines[0], lines[0]
    assert all_files(run.out) == []  # no HDF5, no JSON, no leftover .tmp
    if case.startswith("bomb"):
        assert "bomb" in lines[0]
    if case == "bomb_default_limit":
        assert re.search(r"20000 ?x ?20000|400000000|400,000,000", lines[0])  # judged by the header's size
    if case == "json_missing_field":
        assert "sentences" in lines[0]
    if case == "empty_split":
        assert "val" in lines[0]


def test_forked_runs_match_a_fresh_interpreter(runs: dict[str, Run]) -> None:
    forked, fresh = runs["corrupt_image"], runs["corrupt_image_fresh"]
    a, b = forked.result(), fresh.result()
    assert a.returncode == b.returncode == 2
    root_a, root_b = str(forked.out.parent), str(fresh.out.parent)
    assert progress_free(a.stderr.replace(root_a, "ROOT")) == progress_free(b.stderr.replace(root_b, "ROOT"))
    assert a.stdout.replace(root_a, "ROOT") == b.stdout.replace(root_b, "ROOT")


def test_skip_bad_images_keeps_the_rest(runs: dict[str, Run]) -> None:
    run = runs["skip_bad"]
    succeeded(run)
    name = "coco_2_cap_per_img_1_min_word_freq"
    assert set(all_files(run.out)) == expected_outputs(name) | {f"SKIPPED_{name}.json"}
    skipped = json.loads((run.out / f"SKIPPED_{name}.json").read_text())
    assert len(skipped) == 1
    assert Path(skipped[0]["file"]).name == "corrupt.jpg"
    assert skipped[0]["problem"]
    test = read_split(run.out, name, "TEST")
    assert test["filenames"] == ["t2.png"]
    assert test["images"].shape == (1, 3, 32, 32)
    assert len(test["captions"]) == 2 and len(test["refs"]) == 1
    assert read_split(run.out, name, "TRAIN")["filenames"] == ["a.png", "b.jpg"]


def test_rerun_without_overwrite_changes_nothing(runs: dict[str, Run]) -> None:
    run = runs["rerun_refused"]
    result = run.result()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = progress_free(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0], lines
    assert "_coco_2_cap_per_img_1_min_word_freq." in lines[0]
    assert file_bytes(run.out) == run.info["before"]


def test_rerun_with_overwrite_replaces_the_outputs(runs: dict[str, Run]) -> None:
    run = runs["rerun_overwrite"]
    succeeded(run)
    name = "coco_2_cap_per_img_1_min_word_freq"
    assert set(all_files(run.out)) == set(run.info["before"])
    assert read_split(run.out, name, "TRAIN")["images"].shape == (2, 3, 16, 16)  # was 32 x 32


# ================================================================================ 7. reading the files back

@pytest.fixture(scope="module")
def roundtrip(runs: dict[str, Run]) -> Path:
    succeeded(runs["roundtrip"])
    return runs["roundtrip"].out


def test_caption_dataset_items(roundtrip: Path) -> None:
    train = CaptionDataset(roundtrip, ROUNDTRIP_NAME, "train")
    stored = read_split(roundtrip, ROUNDTRIP_NAME, "TRAIN")
    assert len(train) == 4 * 3
    for i in range(len(train)):
        item = train[i]
        assert len(item) == 3
        image, caption, length = item
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        assert torch.equal(image, torch.from_numpy(stored["images"][i // 3]))
        assert caption.tolist() == stored["captions"][i] and caption.shape == (52,)
        assert length.tolist() == [stored["caplens"][i]]
    for split in ("val", "TEST"):
        ds = CaptionDataset(roundtrip, ROUNDTRIP_NAME, split)
        stored = read_split(roundtrip, ROUNDTRIP_NAME, split.upper())
        assert len(ds) == 2 * 3
        for i in range(len(ds)):
            item = ds[i]
            assert len(item) == 4
            image, caption, length, all_captions = item
            assert torch.equal(image, torch.from_numpy(stored["images"][i // 3]))
            assert all_captions.shape == (3, 52)
            first = i // 3 * 3
            assert all_captions.tolist() == stored["captions"][first:first + 3]
            assert caption.tolist() in all_captions.tolist()
            assert length.item() == stored["caplens"][i]
    scaled = CaptionDataset(roundtrip, ROUNDTRIP_NAME, "train", transform=lambda x: x.float() / 255)
    assert scaled[0][0].dtype == torch.float32
    assert torch.allclose(scaled[0][0], train[0][0].float() / 255)


def test_image_captions_dataset_items(roundtrip: Path) -> None:
    for split in SPLITS:
        ds = ImageCaptionsDataset(roundtrip, ROUNDTRIP_NAME, split.lower())
        stored = read_split(roundtrip, ROUNDTRIP_NAME, split)
        assert len(ds) == len(stored["filenames"])
        assert ds.references == stored["refs"]
        for i in range(len(ds)):
            image, captions, lengths, index = ds[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
            assert torch.equal(image, torch.from_numpy(stored["images"][i]))
            assert captions.shape == (3, 52) and captions.tolist() == stored["captions"][3 * i: 3 * i + 3]
            assert lengths.shape == (3,) and lengths.tolist() == stored["caplens"][3 * i: 3 * i + 3]
            assert index == i


def test_datasets_refuse_missing_or_inconsistent_files(roundtrip: Path, tmp_path: Path) -> None:
    with pytest.raises(SatError, match="unknown split"):
        CaptionDataset(roundtrip, ROUNDTRIP_NAME, "dev")
    with pytest.raises(SatError, match=re.escape("TRAIN_IMAGES_nope.hdf5")):
        ImageCaptionsDataset(roundtrip, "nope", "train")
    shutil.copytree(roundtrip, tmp_path / "copy")
    captions = tmp_path / "copy" / f"VAL_CAPTIONS_{ROUNDTRIP_NAME}.json"
    captions.write_text(json.dumps(json.loads(captions.read_text())[:-1]))
    with pytest.raises(SatError, match="2 images but 5 captions"):
        ImageCaptionsDataset(tmp_path / "copy", ROUNDTRIP_NAME, "val")


def items(loader: DataLoader) -> list:
    return [item for item in loader]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_dataloader_workers_match_single_process(roundtrip: Path) -> None:
    for ds in (CaptionDataset(roundtrip, ROUNDTRIP_NAME, "val"),
               ImageCaptionsDataset(roundtrip, ROUNDTRIP_NAME, "train")):
        single = [ds[i] for i in range(len(ds))]  # opens the HDF5 file in this process before the workers fork
        forked = items(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(forked) == len(single)
        assert all(same(x, y) for x, y in zip(forked, single))
        batched = next(iter(DataLoader(ds, batch_size=len(ds), num_workers=2)))
        assert torch.equal(batched[0], torch.stack([s[0] for s in single]))
    ds = ImageCaptionsDataset(roundtrip, ROUNDTRIP_NAME, "train")
    single = [ds[i] for i in range(len(ds))]
    spawned = items(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"))
    assert len(spawned) == len(single)
    assert all(same(x, y) for x, y in zip(spawned, single))
