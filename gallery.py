"""The gallery (eval.py --gallery): one static HTML page of every evaluated image, worst caption first, and the
comparison of two models on the same split (eval.py --compare).

An evaluation folder holds, besides the COCO-format captions, `scores.json` (the split's scores) and
`per_image.json` (each image's captions and scores at every beam size); `Evaluation` is those two files. The page
is `gallery/index.html` beside them, with a JPEG thumbnail of every image and, for the first rows, a strip of
where the model looked for each word (`plots.attention_strip`; JPEG too, as the strips hold photos: a fifth of a
PNG's size). No server and no script: it opens from disk.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from metrics import CaptionScores, Verdict
from models import Caption
from plots import attention_strip
from utils import SatError, atomic_folder, read_json

PER_IMAGE, SCORES = "per_image.json", "scores.json"
THUMBNAIL = 128  # px, the longest side of the thumbnails (smaller images stay as they are): ~4 kB each
STRIP_PANEL = 96  # px, one word's square in the attention strips


@dataclass
class Evaluation:
    """One model's evaluation of one split: what eval.py writes to per_image.json and scores.json."""
    checkpoint: str
    decoder: str
    split: str
    image_ids: list[int]
    per_image: dict[str, dict[str, list]]  # "beam3" -> {"captions": [...], "cider": [...], ...} in the split's order
    scores: dict[str, dict[str, float]]  # "beam3" -> the split's scores

    def beams(self) -> list[int]:
        return sorted(int(name.removeprefix("beam")) for name in self.per_image)

    def label(self) -> str:
        return f"{self.checkpoint} ({self.decoder})"

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "decoder": self.decoder, "split": self.split,
                "image_ids": self.image_ids, **self.per_image}


def beam_record(captions: list[str], scores: CaptionScores, verdicts: list[Verdict] | None = None,
                grounding: list[dict[str, float]] | None = None) -> dict[str, list]:
    """One beam size's entry of per_image.json: per image, the caption, its scores, and on shapes whether it is
    true (metrics.judge_captions) and where it looked (metrics.attention_grounding of that caption alone)."""
    record: dict[str, list] = {"captions": captions, **scores.per_image}
    if verdicts is not None:
        record.update(correct=[v.correct for v in verdicts], complete=[v.complete for v in verdicts],
                      mentions=[v.mentions for v in verdicts], hallucinated=[v.hallucinated for v in verdicts],
                      objects=[v.objects for v in verdicts], recalled=[v.recalled for v in verdicts],
                      false_claims=[(v.counts - v.counts_true) + (v.relations - v.relations_true)
                                    + (v.positions - v.positions_true) for v in verdicts])
    if grounding is not None:
        # None where the caption names no object of its image: nothing to ground, not a score of 0
        record.update({name: [g[name] if g["grounded_words"] else None for g in grounding]
                       for name in ("attention_in_box", "uniform_in_box", "pointing_accuracy")},
                      grounded_words=[g["grounded_words"] for g in grounding])
    return record


# ---------------------------------------------------------------------------------------- reading another run

def read_evaluation(folder: str | Path) -> Evaluation:
    """The evaluation eval.py wrote to `folder`, checked: a broken or foreign file gets one line, not a traceback."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SatError(f"{folder}: not a folder (--compare takes the --out folder of another eval.py run)")
    path = folder / PER_IMAGE
    if not path.is_file():
        raise SatError(f"{path}: not found; --compare needs a folder that eval.py wrote (run eval.py for that "
                       "model first)")
    data, scores = read_json(path), read_json(folder / SCORES)
    if not isinstance(data, dict) or not isinstance(scores, dict):
        raise SatError(f"{path}: not an eval.py per-image file (expected a JSON object)")
    for name in ("checkpoint", "decoder", "split"):
        if not isinstance(data.get(name), str):
            raise SatError(f"{path}: '{name}' is missing or not a string")
    ids = data.get("image_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise SatError(f"{path}: 'image_ids' is missing or not a list of whole numbers")
    beams = {name: value for name, value in data.items() if re.fullmatch(r"beam[1-9]\d*", name)}
    if not beams:
        raise SatError(f"{path}: holds no beam size (no 'beam1', 'beam3', ... entry)")
    for name, record in beams.items():
        _check_beam(record, len(ids), f"{path}: {name}")
        if not isinstance(scores.get(name), dict):
            raise SatError(f"{folder / SCORES}: has no scores for {name}, which {PER_IMAGE} has")
    return Evaluation(data["checkpoint"], data["decoder"], data["split"], ids, beams,
                      {name: scores[name] for name in beams})


def _check_beam(record: object, n: int, where: str) -> None:
    if not isinstance(record, dict):
        raise SatError(f"{where} is not a JSON object")
    captions, cider = record.get("captions"), record.get("cider")
    if not isinstance(captions, list) or len(captions) != n or not all(isinstance(c, str) for c in captions):
        raise SatError(f"{where}: 'captions' is not a list of {n} strings, one per image")
    if not isinstance(cider, list) or len(cider) != n or not all(_is_number(v) for v in cider):
        raise SatError(f"{where}: 'cider' is not a list of {n} numbers, one per image (evaluated without CIDEr-D?)")
    correct = record.get("correct")
    if correct is not None and (not isinstance(correct, list) or len(correct) != n
                                or not all(isinstance(c, bool) for c in correct)):
        raise SatError(f"{where}: 'correct' is not a list of {n} true/false values")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_same_split(other: Evaluation, image_ids: list[int], split: str, source: str) -> None:
    """Refuse to compare evaluations of different images."""
    common = len(set(other.image_ids) & set(image_ids))
    if set(other.image_ids) != set(image_ids) or len(other.image_ids) != len(image_ids):
        raise SatError(f"{source}: it evaluated {len(other.image_ids)} images of the {other.split} split, this run "
                       f"{len(image_ids)} of the {split} split, {common} in common; compare evaluations of the "
                       "same split of the same data")


def sort_beam(beams: list[int], other: Evaluation | None, source: str = "") -> int:
    """The beam size the page sorts by: the largest one evaluated (by both runs, when comparing)."""
    shared = sorted(set(beams) & set(other.beams())) if other is not None else sorted(beams)
    if not shared:
        raise SatError(f"{source}: it was decoded at beam sizes {', '.join(map(str, other.beams()))}, this run at "
                       f"{', '.join(map(str, beams))}; pass --beam-sizes with one of its sizes")
    return shared[-1]


# ------------------------------------------------------------------------------------------------ the page

def write_gallery(folder: str | Path, this: Evaluation, references: list[list[str]],
                  image: Callable[[int], torch.Tensor], captions: dict[int, list[Caption]],
                  tables: list[dict[str, str]], strips: int = 100, other: Evaluation | None = None) -> Path:
    """Write `folder`/index.html, its thumbnails and attention strips, and return the page's path.

    Rows are sorted by per-image CIDEr-D at the largest beam size, worst first, or, with `other`, by this model's
    CIDEr-D minus the other's on the same image, where this model loses most first. The first `strips` rows (with
    `other`: the `strips` rows where the two differ most) get an attention strip of that beam's caption.
    image(i): image i of the split, uint8 (3, S, S); captions: beam search's output per beam size, for the strips;
    tables: the summary tables' columns ({score name: heading}), each shown where some of its scores exist.
    """
    k = sort_beam(this.beams(), other)
    beam = f"beam{k}"
    cider = this.per_image[beam]["cider"]
    matched, delta = None, None  # when comparing: the other's index of each image, and this minus the other
    if other is not None:
        position = {image_id: j for j, image_id in enumerate(other.image_ids)}
        matched = [position[image_id] for image_id in this.image_ids]
        delta = [cider[i] - other.per_image[beam]["cider"][j] for i, j in enumerate(matched)]
    order = sorted(range(len(cider)), key=lambda i: (delta[i] if delta else 0.0, cider[i]))
    first_win = next((i for i in order if delta[i] > 0), None) if delta else None
    # the rows most worth a look at the attention: the worst ones, or those where the two models differ most
    attends = all(c.alphas.size(1) > 0 for c in captions[k])
    ranked = order if delta is None else sorted(order, key=lambda i: -abs(delta[i]))
    with_strip = {i for i in ranked[:strips] if captions[k][i].tokens} if attends else set()
    with atomic_folder(folder) as tmp:
        (tmp / "thumbs").mkdir()
        (tmp / "attention").mkdir()
        rows = []
        for rank, i in enumerate(order):
            picture = _picture(image(i))
            _thumbnail(picture).save(tmp / "thumbs" / f"{i}.jpg", quality=80)
            if i in with_strip:
                c = captions[k][i]
                attention_strip(picture, this.per_image[beam]["captions"][i].split(), c.alphas, c.sentinel,
                                STRIP_PANEL).save(tmp / "attention" / f"{i}.jpg", quality=85)
            rows.append(_row(rank, i, this, None if other is None else (other, matched[i]), references[i],
                             None if delta is None else delta[i], i in with_strip,
                             "wins" if i == first_win else f"image-{this.image_ids[i]}"))
        (tmp / "index.html").write_text(_page(this, other, k, tables, rows, delta, strips, attends),
                                        encoding="utf-8")
    return Path(folder) / "index.html"


def _picture(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _thumbnail(picture: Image.Image) -> Image.Image:
    small = picture.copy()
    small.thumbnail((THUMBNAIL, THUMBNAIL), Image.BICUBIC)
    return small


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 4px 8px; vertical-align: top; text-align: left; }
table.summary { margin-bottom: 8px; }
table.summary td { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th, table.summary td, tr.image td { border-top: 1px solid #ddd; }
.caption { margin: 2px 0; }
.beam { color: #888; font-size: 12px; }
.cider, .delta { font-variant-numeric: tabular-nums; font-weight: 600; }
.true { color: #087a08; } .false { color: #b00020; }
.note { color: #666; font-size: 12px; }
ul.refs { margin: 0; padding-left: 16px; color: #555; font-size: 12px; }
tr.attention div { overflow-x: auto; max-width: calc(100vw - 120px); }
tr.attention img { display: block; }
.win { color: #087a08; } .loss { color: #b00020; }
"""


def _page(this: Evaluation, other: Evaluation | None, k: int, tables: list[dict[str, str]], rows: list[str],
          delta: list[float] | None, strips: int, attends: bool) -> str:
    e = html.escape
    n = len(this.image_ids)
    title = f"{this.split} split, {n} images: {this.label()}"
    if delta is None:
        how = f"Sorted by per-image CIDEr-D at beam {k}, worst first."
        strips_note = f"the first {strips} rows" if strips < n else "every row"
    else:
        better, worse = sum(d > 0 for d in delta), sum(d < 0 for d in delta)
        how = (f"This model against <b>{e(other.label())}</b>, per-image CIDEr-D at beam {k}: better on "
               f"{better} images, worse on {worse}, equal on {n - better - worse}. Sorted by the difference (this "
               f"minus the other), where this model loses most first; <a href=\"#wins\">where it wins</a> "
               f"comes last.")
        strips_note = f"the {strips} rows where the two models differ most" if strips < n else "every row"
    strip_text = (f"Attention strips (where the model looked for each word of its beam-{k} caption, bright = "
                  f"attended{'; β: the weight on the visual sentinel' if this.decoder == 'adaptive' else ''}) for "
                  f"{strips_note}." if attends and strips else
                  "No attention strips (this decoder attends nowhere)." if not attends else "No attention strips.")
    head = ["#", "image", "this model" if other is not None else "captions"]
    if other is not None:
        head += ["the other model", "Δ CIDEr-D"]
    head.append("references")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{e(title)}</h1>",
        *(_summary(this, other, columns) for columns in tables),
        f"<p>{how} {e(strip_text)} Scores ×100; the page's data: <a href=\"../{PER_IMAGE}\">{PER_IMAGE}</a>, "
        f"<a href=\"../{SCORES}\">{SCORES}</a>.</p>",
        '<table class="images">', "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>",
        "<tbody>", *rows, "</tbody>", "</table>", "</body>", "</html>", ""])


def _summary(this: Evaluation, other: Evaluation | None, columns: dict[str, str]) -> str:
    """The split's scores, one row per model and beam size, in eval.py's columns."""
    models = [("this", this)] + ([("other", other)] if other is not None else [])
    shown = [name for name in columns if any(name in s for _, m in models for s in m.scores.values())]
    if not shown:
        return ""
    lines = ['<table class="summary">', "<thead><tr>" + ("<th>model</th>" if other is not None else "")
             + "<th>beam</th>" + "".join(f"<th>{html.escape(columns[name])}</th>" for name in shown)
             + "</tr></thead>", "<tbody>"]
    for who, model in models:
        for k in model.beams():
            row = model.scores[f"beam{k}"]
            cells = "".join(f"<td>{_number(row.get(name))}</td>" for name in shown)
            lines.append("<tr>" + (f"<th>{who}</th>" if other is not None else "") + f"<th>{k}</th>{cells}</tr>")
    return "\n".join(lines + ["</tbody>", "</table>"])


def _number(value: object) -> str:
    if not _is_number(value):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def _row(rank: int, i: int, this: Evaluation, other: tuple[Evaluation, int] | None, references: list[str],
         delta: float | None, strip: bool, anchor: str) -> str:
    """Image i's row (the rank-th of the page), and under it its attention strip if it has one."""
    e = html.escape
    image_id = this.image_ids[i]
    attributes = f'class="image" id="{anchor}" data-image-id="{image_id}"'
    cells = [f'<td>{rank + 1}<br><span class="note">id {image_id}</span></td>',
             f'<td><img src="thumbs/{i}.jpg" alt="image {image_id}" loading="lazy"></td>',
             f"<td>{_captions(this, i)}</td>"]
    if other is not None:
        cells.append(f"<td>{_captions(*other)}</td>")
        cells.append(f'<td><span class="delta {"win" if delta > 0 else "loss" if delta < 0 else ""}">'
                     f"{delta:+.1f}</span></td>")
    cells.append('<td><ul class="refs">' + "".join(f"<li>{e(r)}</li>" for r in references) + "</ul></td>")
    lines = [f"<tr {attributes}>" + "".join(cells) + "</tr>"]
    if strip:
        lines.append(f'<tr class="attention"><td></td><td colspan="{len(cells) - 1}"><div><img src="attention/{i}.jpg" '
                     f'alt="attention of image {image_id}" loading="lazy"></div></td></tr>')
    return "\n".join(lines)


def _captions(model: Evaluation, i: int) -> str:
    """A model's caption of image i at each beam size, with its CIDEr-D and, on shapes, its truth and grounding."""
    parts = []
    for k in model.beams():
        record = model.per_image[f"beam{k}"]
        parts.append(f'<div class="caption" data-beam="{k}"><span class="beam">beam {k}</span> '
                     f"{html.escape(record['captions'][i]) or '<i>(empty)</i>'} "
                     f'<span class="cider" data-beam="{k}" title="CIDEr-D of this caption">'
                     f"{record['cider'][i]:.1f}</span>{_truth(record, i)}{_grounding(record, i)}</div>")
    return "".join(parts)


def _truth(record: dict[str, list], i: int) -> str:
    """✓ when the caption is wholly true of its image (shapes, --grounding), else ✗ and what is wrong."""
    if "correct" not in record:
        return ""
    if record["correct"][i]:
        return ' <span class="true" title="every claim is true">✓ true</span>'
    wrong = []
    if "hallucinated" in record:
        if record["hallucinated"][i]:
            wrong.append(f"{record['hallucinated'][i]} of {record['mentions'][i]} mentions hallucinated")
        if record["false_claims"][i]:
            wrong.append(f"{record['false_claims'][i]} false claim{'s' if record['false_claims'][i] > 1 else ''}")
        if not record["complete"][i]:
            wrong.append("incomplete")
        if not record["mentions"][i]:
            wrong.append("names no object")
    return f' <span class="false">✗ {html.escape(", ".join(wrong) or "not true")}</span>'


def _grounding(record: dict[str, list], i: int) -> str:
    if record.get("attention_in_box", [None] * (i + 1))[i] is None:
        return ""
    words = record["grounded_words"][i]
    hits = round(record["pointing_accuracy"][i] * words / 100)
    return (f'<br><span class="note" title="attention mass inside the boxes of the objects its words name (what a '
            f'uniform map would get); object words whose most-attended cell lies in such a box">attention in box '
            f'{record["attention_in_box"][i]:.0f}% (uniform {record["uniform_in_box"][i]:.0f}%) · pointing '
            f'{hits}/{words}</span>')
