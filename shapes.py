"""The built-in synthetic *shapes* dataset.

Each image holds 1-3 non-overlapping coloured shapes on a lightly textured background and comes with
5 different captions that name the objects, their colour, size and a spatial relation. The generator
writes the same files a real dataset has (JPEGs plus a Karpathy-format split JSON), so the COCO code
path is exercised end to end, and a sidecar JSON with every object's box and the words that refer to
it, which lets eval.py score whether the model looks where it speaks. `parse_caption` reads the claims of a
caption in the templates' grammar back, so that metrics.caption_correctness can check them against the objects.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": (0.09, 0.11), "large": (0.17, 0.21)}  # radius as a fraction of the image side


@dataclass
class ShapeObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre and radius in pixels
    cy: float
    r: float

    def box(self, side: int) -> list[float]:
        """[x0, y0, x1, y1] normalised to [0, 1]."""
        return [max(0.0, (self.cx - self.r) / side), max(0.0, (self.cy - self.r) / side),
                min(1.0, (self.cx + self.r) / side), min(1.0, (self.cy + self.r) / side)]

    def phrase(self, with_size: bool) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"

    def sidecar(self, side: int) -> dict:
        """The object as `shapes_boxes.json` stores it."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": self.box(side),
                "words": [self.colour, self.shape]}

    @classmethod
    def from_sidecar(cls, obj: dict) -> ShapeObject:
        """A sidecar entry back as an object, in units of the image side: enough for `relation` and `position`."""
        x0, y0, x1, y1 = obj["box"]
        return cls(obj["shape"], obj["colour"], obj["size"], (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2)


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A light, low-contrast texture: a tinted gradient plus smooth noise."""
    base = rng.uniform(215, 245, size=3)
    ys, xs = np.mgrid[0:side, 0:side] / side
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None] * rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 6, size=(side // 16 + 1, side // 16 + 1, 1))
    noise = np.kron(coarse, np.ones((16, 16, 1)))[:side, :side] + rng.normal(0, 3, size=(side, side, 1))
    return np.clip(base + gradient + noise, 0, 255).astype(np.uint8)


def _polygon(obj: ShapeObject) -> list[tuple[float, float]]:
    if obj.shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return [(obj.cx + 0.85 * obj.r * x, obj.cy + 0.85 * obj.r * y) for x, y in corners]
    if obj.shape == "triangle":
        return [(obj.cx + obj.r * math.cos(a), obj.cy + obj.r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if obj.shape == "diamond":
        return [(obj.cx, obj.cy - obj.r), (obj.cx + 0.7 * obj.r, obj.cy),
                (obj.cx, obj.cy + obj.r), (obj.cx - 0.7 * obj.r, obj.cy)]
    # star: ten points alternating between the outer and the inner radius
    return [(obj.cx + rad * math.cos(a), obj.cy + rad * math.sin(a))
            for i in range(10)
            for a, rad in [(-math.pi / 2 + i * math.pi / 5, obj.r if i % 2 == 0 else 0.45 * obj.r)]]


def _draw(image: Image.Image, obj: ShapeObject, rng: np.random.Generator) -> None:
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
    draw = ImageDraw.Draw(image)
    if obj.shape == "circle":
        draw.ellipse([obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r], fill=fill)
    else:
        draw.polygon(_polygon(obj), fill=fill)


def _place_objects(rng: np.random.Generator, side: int, count: int) -> list[ShapeObject]:
    """Rejection-sample `count` objects whose boxes keep a margin from each other and the border."""
    while True:
        objects: list[ShapeObject] = []
        for _ in range(200):
            if len(objects) == count:
                return objects
            size = str(rng.choice(list(SIZES)))
            r = rng.uniform(*SIZES[size]) * side
            cx, cy = rng.uniform(r + 4, side - r - 4, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > (r + o.r) * 1.15 + 4 for o in objects):
                colour = str(rng.choice(list(COLOURS)))
                objects.append(ShapeObject(str(rng.choice(SHAPES)), colour, size, float(cx), float(cy), float(r)))


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where a lies relative to b, along the axis on which they are further apart."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
           "above": "below", "below": "above"}


def position(obj: ShapeObject, side: float) -> str:
    """The single-object templates' "near the top" / "near the bottom": which half holds the centre."""
    return "top" if obj.cy < side / 2 else "bottom"


def _candidate_captions(objs: list[ShapeObject], side: int) -> list[str]:
    """Every caption the templates can make for these objects; five distinct ones are drawn from it."""
    def p(o: ShapeObject, s: bool = True) -> str:
        return o.phrase(with_size=s)

    if len(objs) == 1:
        (a,) = objs
        where = position(a, side)
        return [f"a {p(a)}", f"a {p(a, False)}", f"there is a {p(a)} in the image",
                f"a single {p(a, False)} on a light background", f"one {a.size} {a.shape} coloured {a.colour}",
                f"a picture of a {p(a)}", f"the image shows a {a.colour} {a.shape}",
                f"a {p(a)} alone", f"a {a.colour} {a.shape} near the {where}"]
    if len(objs) == 2:
        a, b = objs
        rel = relation(a, b)
        return [f"a {p(a)} {rel} a {p(b)}", f"a {p(b)} {INVERSE[rel]} a {p(a)}",
                f"a {p(a, False)} {rel} a {p(b, False)}", f"a {p(b, False)} {INVERSE[rel]} a {p(a, False)}",
                f"a {p(a)} and a {p(b)}", f"two shapes : a {p(a, False)} and a {p(b, False)}",
                f"there is a {p(a)} {rel} a {b.colour} {b.shape}"]
    a, b, c = objs
    return [f"a {p(a)} , a {p(b)} and a {p(c)}",
            f"three shapes : a {p(a, False)} , a {p(b, False)} and a {p(c, False)}",
            f"a {p(a)} {relation(a, b)} a {p(b)} and a {p(c)}", f"a {p(c, False)} {relation(c, a)} a {p(a, False)}",
            f"a {p(b)} {relation(b, c)} a {p(c)}", f"a {p(b, False)} , a {p(c, False)} and a {p(a, False)}",
            f"there are three shapes including a {p(c)}"]


# ------------------------------------------------------------------------------------- reading captions back

NUMBERS = {"one": 1, "two": 2, "three": 3}
POSITIONS = ("top", "bottom")
# The templates' words that claim nothing; "picture" and "light" are the only ones that follow an article.
FILLER = frozenset("there is are in the image shows on light background picture of including and , :".split())
AFTER_ARTICLE = ("picture", "light")
SLOTS = {**{w: "size" for w in SIZES}, **{w: "colour" for w in COLOURS}, **{w: "shape" for w in SHAPES}}


@dataclass(frozen=True)
class Mention:
    colour: str
    shape: str
    size: str | None = None  # None when the caption does not say


@dataclass
class ParsedCaption:
    """The claims a caption makes. Relations and positions refer to mentions by their index."""
    mentions: list[Mention] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # claimed numbers of shapes in the image
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # (a, "above", b): a is above b
    positions: list[tuple[int, str]] = field(default_factory=list)  # (a, "top"): a is near the top
    incomplete: list[str] = field(default_factory=list)  # phrases left dangling: "a small red", "to the left of"
    unused: list[str] = field(default_factory=list)  # words the grammar has no place for: "<unk>", "dog"

    @property
    def complete(self) -> bool:
        """Whether every word took part in a claim or a filler phrase: a caption that is not cannot be all true."""
        return not self.incomplete and not self.unused


def parse_caption(text: str) -> ParsedCaption:
    """The claims of a caption in the grammar of `_candidate_captions`, read back leniently so that any model
    output can be scored. Words are split on white space and lower-cased.

        caption  := (object | count | relation | position | FILLER)*
        object   := ["a" ["single"] | "one"] mention     "a single" and "one" also claim a count of 1
        mention  := (SIZE | COLOUR)* SHAPE ["coloured" COLOUR]
                    at most one size and one colour, in any order; it needs a colour and a shape, the size is
                    optional ("one small circle coloured red", "a red circle", "a small red circle")
        count    := ("one" | "two" | "three") ("shape" | "shapes") | "alone"       ("alone" claims 1)
        relation := object RELATION object     RELATION: "to the left of" | "to the right of" | "above" | "below"
        position := object "near the" ("top" | "bottom")

    A relation links the mentions right before and after it ("a X above a Y and a Z": X above Y); chained
    relations each link their neighbours. A phrase that starts but does not finish (a mention without its
    colour or shape, an article with no mention after it, a relation without a mention on both sides, a
    truncated "near the") is recorded in `incomplete` and claims nothing; words no rule uses go to `unused`.
    """
    return _Reader(text.lower().split()).read()


class _Reader:
    """A left-to-right reader of `parse_caption`'s grammar over a caption's words."""

    def __init__(self, words: list[str]):
        self.words, self.i, self.out = words, 0, ParsedCaption()
        self.after_mention = -1  # the index of the word right after the last complete mention

    def peek(self, ahead: int = 0) -> str:
        return self.words[self.i + ahead] if self.i + ahead < len(self.words) else ""

    def read(self) -> ParsedCaption:
        while self.i < len(self.words):
            self.piece()
        return self.out

    def piece(self) -> None:
        word = self.peek()
        if word in ("a", *SLOTS):
            self.object()
        elif word in NUMBERS:
            self.number()
        elif word in ("to", "above", "below"):
            self.relation()
        elif word == "near":
            self.position()
        elif word == "alone":
            self.out.counts.append(1)
            self.i += 1
        else:
            if word not in FILLER:
                self.out.unused.append(word)
            self.i += 1

    def object(self) -> int | None:
        """An article (or none) and a mention: the mention's index, or None when there is no complete one."""
        start = self.i
        if self.peek() == "a":
            if self.peek(1) in AFTER_ARTICLE:
                self.i += 1
                return None
            self.i += 1
            if self.peek() == "single":
                self.out.counts.append(1)
                self.i += 1
        return self.mention(start)

    def mention(self, start: int) -> int | None:
        """Read the mention at self.i; words from `start` on that do not make a complete one are incomplete."""
        said: dict[str, str] = {}
        while SLOTS.get(self.peek()) not in (None, *said) and "shape" not in said:
            said[SLOTS[self.peek()]] = self.peek()
            self.i += 1
        if "shape" in said and "colour" not in said and self.peek() == "coloured":
            self.i += 1
            if self.peek() in COLOURS:
                said["colour"] = self.peek()
                self.i += 1
        if "shape" not in said or "colour" not in said:
            self.out.incomplete.append(" ".join(self.words[start:self.i]))
            return None
        self.out.mentions.append(Mention(said["colour"], said["shape"], said.get("size")))
        self.after_mention = self.i
        return len(self.out.mentions) - 1

    def number(self) -> None:
        start, n = self.i, NUMBERS[self.peek()]
        if self.peek(1) in ("shape", "shapes"):
            self.out.counts.append(n)
            self.i += 2
        elif n == 1 and self.peek(1) in SLOTS:
            self.out.counts.append(1)
            self.i += 1
            self.mention(start)
        else:
            self.out.incomplete.append(self.peek())
            self.i += 1

    def phrase(self, options: list[str]) -> str | None:
        """Consume the option that the next words spell, or the longest start of one (then return None).
        Callers stand on the first word of some option, so this always moves on."""
        for option in options:
            if self.words[self.i:self.i + len(option.split())] == option.split():
                self.i += len(option.split())
                return option
        self.i += max(next(k for k, w in enumerate(o.split()) if w != self.peek(k)) for o in options)
        return None

    def relation(self) -> None:
        start = self.i
        left = len(self.out.mentions) - 1 if self.after_mention == start else None
        rel = self.phrase(list(INVERSE))
        if rel is None:
            self.out.incomplete.append(" ".join(self.words[start:self.i]))
            return
        right = self.object() if self.peek() in ("a", *SLOTS) else None
        if left is None or right is None:
            self.out.incomplete.append(rel)
            return
        self.out.relations.append((left, rel, right))

    def position(self) -> None:
        start, last = self.i, len(self.out.mentions) - 1
        where = self.phrase([f"near the {p}" for p in POSITIONS])
        if where is None or self.after_mention != start:
            self.out.incomplete.append(" ".join(self.words[start:self.i]))
            return
        self.out.positions.append((last, where.split()[-1]))


def make_example(rng: np.random.Generator, side: int = 256) -> tuple[Image.Image, list[ShapeObject], list[str]]:
    """One image, its objects and five distinct captions."""
    objs = _place_objects(rng, side, int(rng.integers(1, 4)))
    image = Image.fromarray(_background(rng, side))
    for obj in objs:
        _draw(image, obj, rng)
    candidates = _candidate_captions(objs, side)
    picks = rng.choice(len(candidates), size=5, replace=False)
    return image, objs, [candidates[i] for i in sorted(picks)]


def generate(out_dir: str | os.PathLike, num_train: int, num_val: int, num_test: int,
             side: int = 256, seed: int = 0) -> tuple[Path, Path]:
    """Write JPEGs, `dataset_shapes.json` (Karpathy format) and `shapes_boxes.json` into out_dir.

    Returns the paths of the two JSON files. The same seed gives byte-identical files.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, boxes = [], {}
    splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    for i, split in enumerate(splits):
        image, objs, captions = make_example(rng, side)
        filename = f"shapes_{i:06d}.jpg"
        image.save(out / "images" / filename, quality=95)
        images.append({"filepath": "images", "filename": filename, "imgid": i, "split": split,
                       "sentids": list(range(5 * i, 5 * i + 5)),
                       "sentences": [{"tokens": c.split(), "raw": c, "imgid": i, "sentid": 5 * i + j}
                                     for j, c in enumerate(captions)]})
        boxes[filename] = [o.sidecar(side) for o in objs]
    karpathy, sidecar = out / "dataset_shapes.json", out / "shapes_boxes.json"
    _write_json(karpathy, {"dataset": "shapes", "images": images})
    _write_json(sidecar, boxes)
    return karpathy, sidecar


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
