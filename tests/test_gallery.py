"""eval.py --gallery and --compare: the page of a tiny trained model, read back as a browser would read it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
import gallery
from datasets import ImageCaptionsDataset
from metrics import CaptionScores
from models import Caption
from utils import SatError

SHAPES = ("circle", "square", "triangle", "diamond", "star")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """index.html parsed: whether every element is closed in order, the files and anchors it references, and per
    image row what it shows: each model's caption, CIDEr-D and truth mark per beam size, and the difference."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.path, self.stack, self.errors = path, [], []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.rows: list[dict] = []
        self.strips: list[tuple[int, str]] = []  # (image id of the row above, src)
        self.tags: list[str] = []
        self._column = -1
        self.feed(path.read_text(encoding="utf-8"))
        self.close()
        assert not self.stack, f"unclosed elements {self.stack}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [a[k] for k in ("src", "href") if a.get(k)]
        if a.get("id"):
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids.add(a["id"])
        if tag == "tr" and a.get("class") == "image":
            self.rows.append({"image_id": int(a["data-image-id"]), "anchor": a["id"], "models": [{}, {}],
                              "delta": None})
            self._column = -1
        elif tag == "tr":
            self._column = -10  # not an image row
        if tag == "td":
            self._column += 1
        if tag == "img" and a.get("src", "").startswith("attention/"):
            self.strips.append((self.rows[-1]["image_id"], a["src"]))
        if tag not in VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:] or 'nothing'}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if not self.stack or not self.rows or self._column < 2:
            return
        tag, a = self.stack[-1]
        model = self.rows[-1]["models"][self._column - 2] if self._column in (2, 3) else None
        inside = [attrs for _, attrs in self.stack if attrs.get("class") == "caption"]
        if model is not None and inside:
            beam = int(inside[-1]["data-beam"])
            entry = model.setdefault(beam, {"caption": "", "truth": None})
            if tag == "div":
                entry["caption"] += data
            elif a.get("class") == "cider":
                entry["cider"] = float(data)
            elif a.get("class") in ("true", "false"):
                entry["truth"] = a["class"]
        if (a.get("class") or "").startswith("delta"):
            self.rows[-1]["delta"] = float(data)

    def caption(self, row: dict, beam: int, model: int = 0) -> str:
        return " ".join(row["models"][model][beam]["caption"].split())


def data_args(shapes_data, checkpoint: Path) -> list[str]:
    folder, name = shapes_data
    return ["--checkpoint", str(checkpoint), "--data-folder", str(folder), "--data-name", name, "--device", "cpu",
            "--metrics", "bleu,cider"]


@pytest.fixture(scope="module")
def runs(shapes_data, trained_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Three evaluations of the tiny model on the test split (40 images): with --gallery and --grounding; cut to
    4 words; and the full captions compared with the cut ones."""
    out = tmp_path_factory.mktemp("gallery")
    data = data_args(shapes_data, trained_checkpoint)
    evaluate.main([*data, "--beam-sizes", "1", "3", "--grounding", "--gallery", "--gallery-size", "8",
                   "--out", str(out / "full")])
    evaluate.main([*data, "--beam-sizes", "3", "--max-len", "4", "--out", str(out / "short")])
    evaluate.main([*data, "--beam-sizes", "3", "--compare", str(out / "short"), "--gallery-size", "4",
                   "--out", str(out / "compare")])
    return {name: out / name for name in ("full", "short", "compare")}


def captions_by_id(folder: Path, beam: int) -> dict[int, str]:
    return {c["image_id"]: c["caption"] for c in json.loads((folder / f"captions_beam{beam}.json").read_text())}


def check_links(page: Page) -> None:
    """Every file the page references exists beside it; every in-page anchor exists."""
    assert page.links
    for link in page.links:
        assert not re.match(r"[a-z]+:", link), link  # nothing fetched from elsewhere, no javascript: URLs
        if link.startswith("#"):
            assert link[1:] in page.ids, link
        else:
            assert (page.path.parent / link).is_file(), link


def test_gallery_has_one_row_per_image_worst_cider_first(shapes_data, runs) -> None:
    page = Page(runs["full"] / "gallery" / "index.html")
    check_links(page)
    assert "script" not in page.tags
    split_ids = json.loads((runs["full"] / "per_image.json").read_text())["image_ids"]
    assert sorted(r["image_id"] for r in page.rows) == sorted(split_ids) and len(page.rows) == 40
    for beam in (1, 3):
        written = captions_by_id(runs["full"], beam)
        assert all(page.caption(row, beam) == written[row["image_id"]] for row in page.rows)
    shown = [row["models"][0][3]["cider"] for row in page.rows]
    assert shown == sorted(shown) and shown[0] < shown[-1]  # worst first, by the score the page shows
    # the per-image CIDEr-D are the terms of the split's CIDEr-D (its mean), which scores.json reports
    corpus = json.loads((runs["full"] / "scores.json").read_text())["beam3"]["cider"]
    assert np.mean(shown) == pytest.approx(corpus, abs=0.05)
    # attention strips for the first 8 rows only, one 96-px panel per word of the beam-3 caption
    first = [row["image_id"] for row in page.rows[:8]]
    assert [image_id for image_id, _ in page.strips] == [i for i in first if captions_by_id(runs["full"], 3)[i]]
    for image_id, src in page.strips:
        strip = Image.open(page.path.parent / src)
        words = captions_by_id(runs["full"], 3)[image_id].split()
        assert strip.format == "JPEG" and strip.width // gallery.STRIP_PANEL == len(words)
    thumbs = list((page.path.parent / "thumbs").iterdir())
    assert len(thumbs) == 40 and all(Image.open(t).size == (128, 128) for t in thumbs)  # 128-px images stay


def test_gallery_marks_true_captions_against_the_images_objects(shapes_data, runs) -> None:
    """A caption marked true names only colour-shape pairs that its image has (read from the generator's boxes);
    as many rows are marked true as scores.json's share of correct captions says."""
    folder, name = shapes_data
    boxes = json.loads((folder / f"BOXES_{name}.json").read_text())
    files = ImageCaptionsDataset(folder, name, "test").files
    filenames = dict(zip(files.image_ids, files.filenames))
    page = Page(runs["full"] / "gallery" / "index.html")
    marked_true = [row for row in page.rows if row["models"][0][3]["truth"] == "true"]
    assert all(row["models"][0][3]["truth"] in ("true", "false") for row in page.rows)
    correct = json.loads((runs["full"] / "scores.json").read_text())["beam3"]["correct_captions"]
    assert len(marked_true) == pytest.approx(correct * 40 / 100) and marked_true
    for row in marked_true:
        words = page.caption(row, 3).split()
        named = {(colour, shape) for colour, shape in zip(words, words[1:]) if shape in SHAPES}
        present = {(o["colour"], o["shape"]) for o in boxes[filenames[row["image_id"]]]}
        assert named and named <= present, (page.caption(row, 3), present)


def test_comparison_lists_both_models_and_sorts_by_the_difference(runs) -> None:
    page = Page(runs["compare"] / "gallery" / "index.html")
    check_links(page)
    this, other = captions_by_id(runs["compare"], 3), captions_by_id(runs["short"], 3)
    assert len(page.rows) == 40
    for row in page.rows:
        assert page.caption(row, 3, model=0) == this[row["image_id"]]
        assert page.caption(row, 3, model=1) == other[row["image_id"]] and len(other[row["image_id"]].split()) <= 4
        mine, theirs = row["models"][0][3]["cider"], row["models"][1][3]["cider"]
        assert row["delta"] == pytest.approx(mine - theirs, abs=0.11)  # each shown to 0.1
    deltas = [row["delta"] for row in page.rows]
    assert deltas == sorted(deltas) and deltas[0] < 0 < deltas[-1]
    # strips for the 4 rows where the two differ most, and an anchor where this model starts to win
    with_strip = {image_id for image_id, _ in page.strips}
    assert len(with_strip) == 4
    assert min(abs(r["delta"]) for r in page.rows if r["image_id"] in with_strip) >= \
        max(abs(r["delta"]) for r in page.rows if r["image_id"] not in with_strip) - 0.1
    assert next(r for r in page.rows if r["delta"] > 0)["anchor"] == "wins"


def test_compare_refuses_a_folder_of_another_split_before_decoding(shapes_data, trained_checkpoint, runs,
                                                                    tmp_path) -> None:
    other = tmp_path / "other"
    shutil.copytree(runs["short"], other)
    per_image = json.loads((other / "per_image.json").read_text())
    per_image["image_ids"][0] += 10_000
    (other / "per_image.json").write_text(json.dumps(per_image))
    args = [*data_args(shapes_data, trained_checkpoint), "--beam-sizes", "3", "--out", str(tmp_path / "out")]
    with pytest.raises(SatError, match="39 in common"):
        evaluate.main([*args, "--compare", str(other)])
    per_image["image_ids"][0] -= 10_000
    per_image["beam3"]["cider"] = per_image["beam3"]["cider"][:-1]
    (other / "per_image.json").write_text(json.dumps(per_image))
    with pytest.raises(SatError, match=r"per_image.json: beam3: 'cider' is not a list of 40 numbers"):
        evaluate.main([*args, "--compare", str(other)])
    with pytest.raises(SatError, match="decoded at beam sizes 3"):
        evaluate.main([*args[:-4], "--beam-sizes", "1", "--out", str(tmp_path / "out"), "--compare",
                       str(runs["short"])])
    assert not (tmp_path / "out").exists()


def test_captions_and_references_cannot_inject_markup(tmp_path) -> None:
    """Captions and references are text on the page, whatever they hold (a per_image.json from elsewhere)."""
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'
    scores = CaptionScores({"cider": 10.0}, {"cider": [5.0, 15.0]}, {})
    record = gallery.beam_record([hostile, "a red circle"], scores)
    this = gallery.Evaluation("a<b>.pt", "soft", "test", [7, 8], {"beam1": record}, {"beam1": {"cider": 10.0}})
    uniform = torch.full((9, 4), 0.25)  # a 2 x 2 grid
    captions = {1: [Caption([5] * 9, -1.0, uniform, True), Caption([5] * 3, -1.0, uniform[:3], True)]}
    (tmp_path / "per_image.json").write_text(json.dumps(this.to_json()))  # the page links to them, as eval.py
    (tmp_path / "scores.json").write_text(json.dumps(this.scores))  # writes them
    page_path = gallery.write_gallery(tmp_path / "g", this, [[hostile], ["x & y"]],
                                      lambda i: torch.zeros(3, 32, 32, dtype=torch.uint8), captions,
                                      [{"cider": "CIDEr-D"}, {"correct_captions": "correct %"}], strips=2)
    page = Page(page_path)
    check_links(page)
    assert "script" not in page.tags and page.tags.count("img") == 4  # 2 thumbnails, 2 strips
    assert page.caption(page.rows[0], 1) == " ".join(hostile.split())


def test_gallery_screenshot_in_a_headless_browser(runs, tmp_path) -> None:
    """The page renders: thumbnails, captions and strips on screen (only where chromium is installed)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    page = (runs["full"] / "gallery" / "index.html").resolve()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (900, 1200, 3)
    # the shapes' saturated colours come from the thumbnails, dark text from the captions and tables
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 120
    assert saturated.mean() > 0.002 and (pixels.max(axis=2) < 80).mean() > 0.01
