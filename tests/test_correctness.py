"""shapes.parse_caption and metrics.caption_correctness: CHAIR-style scores of whether shapes captions are true."""
from __future__ import annotations

import json

import numpy as np
import pytest

import metrics
import shapes
from shapes import Mention, ParsedCaption

ZERO = {"chair_i": 0.0, "chair_s": 0.0, "object_recall": 0.0, "count_accuracy": 0.0, "relation_accuracy": 0.0,
        "position_accuracy": 0.0, "incomplete_captions": 0.0, "correct_captions": 0.0, "captions": 0,
        "mentions": 0, "image_objects": 0, "count_claims": 0, "relation_claims": 0, "position_claims": 0}


def obj(shape: str, colour: str, size: str, cx: float, cy: float) -> dict:
    """A sidecar object centred at (cx, cy), in units of the image side."""
    return shapes.ShapeObject(shape, colour, size, cx, cy, 0.1).sidecar(1)


# The red circle is left of the triangle; in THREE the circle is left of the square, the square above the star
# and the circle above the star; ONE's diamond is in the bottom half.
TWO = [obj("circle", "red", "small", 0.25, 0.5), obj("triangle", "green", "large", 0.75, 0.45)]
THREE = [obj("circle", "red", "small", 0.2, 0.2), obj("square", "blue", "large", 0.8, 0.3),
         obj("star", "yellow", "small", 0.5, 0.8)]
ONE = [obj("diamond", "purple", "large", 0.4, 0.7)]
TWINS = [obj("circle", "red", "small", 0.2, 0.5), obj("circle", "red", "small", 0.8, 0.5)]


def score(caption: str, objects: list[dict]) -> dict[str, float]:
    return metrics.caption_correctness([caption], [objects])


def expect(**figures: float) -> dict[str, float]:
    """ZERO with the given figures, for one caption."""
    return pytest.approx({**ZERO, "captions": 1, **figures})


# Per template, in _candidate_captions' order: (mentions, objects they recall, count, relation, position claims).
TEMPLATES = {
    1: [(1, 1, 0, 0, 0), (1, 1, 0, 0, 0), (1, 1, 0, 0, 0), (1, 1, 1, 0, 0), (1, 1, 1, 0, 0), (1, 1, 0, 0, 0),
        (1, 1, 0, 0, 0), (1, 1, 1, 0, 0), (1, 1, 0, 0, 1)],
    2: [(2, 2, 0, 1, 0), (2, 2, 0, 1, 0), (2, 2, 0, 1, 0), (2, 2, 0, 1, 0), (2, 2, 0, 0, 0), (2, 2, 1, 0, 0),
        (2, 2, 0, 1, 0)],
    3: [(3, 3, 0, 0, 0), (3, 3, 1, 0, 0), (3, 3, 0, 1, 0), (2, 2, 0, 1, 0), (2, 2, 0, 1, 0), (3, 3, 0, 0, 0),
        (1, 1, 1, 0, 0)],
}


def test_every_template_caption_is_scored_true() -> None:
    side, seen, everything = 128, set(), ([], [])
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            _, objs, _ = shapes.make_example(rng, side)
            sidecar, n = [o.sidecar(side) for o in objs], len(objs)
            captions = shapes._candidate_captions(objs, side)
            assert len(captions) == len(TEMPLATES[n])
            seen.add(n)
            for caption, (mentions, recalled, counts, relations, positions) in zip(captions, TEMPLATES[n]):
                assert score(caption, sidecar) == expect(
                    object_recall=100 * recalled / n, count_accuracy=100.0 * (counts > 0),
                    relation_accuracy=100.0 * (relations > 0), position_accuracy=100.0 * (positions > 0),
                    correct_captions=100.0, mentions=mentions, image_objects=n, count_claims=counts,
                    relation_claims=relations, position_claims=positions), caption
                everything[0].append(caption)
                everything[1].append(sidecar)
    assert seen == {1, 2, 3}
    together = metrics.caption_correctness(*everything)
    assert together["correct_captions"] == 100.0 and together["chair_i"] == together["chair_s"] == 0.0
    assert together["captions"] == len(everything[0]) and together["position_claims"] > 0


def test_generated_files_score_true(tmp_path) -> None:
    """Through generate()'s JSON files: the references of every image against its sidecar objects."""
    karpathy, sidecar = shapes.generate(tmp_path, 12, 4, 4, side=64, seed=5)
    boxes = json.loads(sidecar.read_text())
    images = json.loads(karpathy.read_text())["images"]
    captions = [s["raw"] for image in images for s in image["sentences"]]
    objects = [boxes[image["filename"]] for image in images for _ in image["sentences"]]
    scores = metrics.caption_correctness(captions, objects)
    assert scores["captions"] == 100 and scores["correct_captions"] == 100.0 and scores["chair_i"] == 0.0


def test_the_parser_reads_each_kind_of_claim() -> None:
    red, blue = Mention("red", "circle", "small"), Mention("blue", "square")
    assert shapes.parse_caption("one small circle coloured red") == ParsedCaption(mentions=[red], counts=[1])
    assert shapes.parse_caption("A single RED circle on a light background") == ParsedCaption(
        mentions=[Mention("red", "circle")], counts=[1])
    assert shapes.parse_caption("two shapes : a small red circle and a blue square") == ParsedCaption(
        mentions=[red, blue], counts=[2])
    assert shapes.parse_caption("a small red circle above a blue square and a green star") == ParsedCaption(
        mentions=[red, blue, Mention("green", "star")], relations=[(0, "above", 1)])
    assert shapes.parse_caption("a blue square to the right of a small red circle below a blue square") == (
        ParsedCaption(mentions=[blue, red, blue], relations=[(0, "to the right of", 1), (1, "below", 2)]))
    assert shapes.parse_caption("a blue square near the bottom") == ParsedCaption(mentions=[blue],
                                                                                  positions=[(0, "bottom")])
    assert shapes.parse_caption("a small red circle alone") == ParsedCaption(mentions=[red], counts=[1])
    assert shapes.parse_caption("there are three shapes including a small red circle") == ParsedCaption(
        mentions=[red], counts=[3])
    assert shapes.parse_caption("a picture of a small red circle") == ParsedCaption(mentions=[red])


def test_the_parser_records_what_it_cannot_use() -> None:
    assert shapes.parse_caption("a small red") == ParsedCaption(incomplete=["a small red"])
    assert shapes.parse_caption("a small circle") == ParsedCaption(incomplete=["a small circle"])
    assert shapes.parse_caption("a blue square to the left of") == ParsedCaption(
        mentions=[Mention("blue", "square")], incomplete=["to the left of"])
    assert shapes.parse_caption("to the left of a blue square") == ParsedCaption(
        mentions=[Mention("blue", "square")], incomplete=["to the left of"])
    assert shapes.parse_caption("a blue square near the") == ParsedCaption(
        mentions=[Mention("blue", "square")], incomplete=["near the"])
    # a relation or a position claims about the mention right before it, not about the background
    assert shapes.parse_caption("a blue square on a light background to the left of a red circle") == ParsedCaption(
        mentions=[Mention("blue", "square"), Mention("red", "circle")], incomplete=["to the left of"])
    assert shapes.parse_caption("a blue square on a light background near the top") == ParsedCaption(
        mentions=[Mention("blue", "square")], incomplete=["near the top"])
    assert shapes.parse_caption("a blue <unk> square") == ParsedCaption(incomplete=["a blue", "square"],
                                                                       unused=["<unk>"])
    assert not shapes.parse_caption("a blue square dog").complete and shapes.parse_caption("a blue square").complete


def test_a_swapped_colour_is_one_hallucination_of_two() -> None:
    assert score("a small green circle and a large green triangle", TWO) == expect(
        chair_i=50.0, chair_s=100.0, object_recall=50.0, mentions=2, image_objects=2)
    assert score("a small green circle to the left of a large red triangle", TWO) == expect(
        chair_i=100.0, chair_s=100.0, mentions=2, image_objects=2, relation_claims=1)


def test_an_object_named_twice_is_a_hallucination() -> None:
    # the brief's example: one red circle and a green triangle; the relation involves the unpaired mention
    assert score("a small red circle below a small red circle", TWO) == expect(
        chair_i=50.0, chair_s=100.0, object_recall=50.0, mentions=2, image_objects=2, relation_claims=1)
    assert score("a small red circle a small red circle a small red circle", TWO) == expect(
        chair_i=100 * 2 / 3, chair_s=100.0, object_recall=50.0, mentions=3, image_objects=2)
    # two red circles in the image: a third is one too many
    assert score("a red circle , a red circle and a red circle", TWINS) == expect(
        chair_i=100 / 3, chair_s=100.0, object_recall=100.0, mentions=3, image_objects=2)


def test_a_wrong_size_is_a_hallucination() -> None:
    assert score("a large red circle and a large green triangle", TWO) == expect(
        chair_i=50.0, chair_s=100.0, object_recall=50.0, mentions=2, image_objects=2)
    assert score("a small red circle and a green triangle", TWO) == expect(
        object_recall=100.0, correct_captions=100.0, mentions=2, image_objects=2)


def test_a_wrong_count_is_counted() -> None:
    assert score("two shapes : a red circle and a blue square", THREE) == expect(
        object_recall=100 * 2 / 3, mentions=2, image_objects=3, count_claims=1)
    assert score("a single red circle on a light background", TWO) == expect(
        object_recall=50.0, mentions=1, image_objects=2, count_claims=1)
    assert score("a small red circle alone", TWO) == expect(object_recall=50.0, mentions=1, image_objects=2,
                                                            count_claims=1)
    assert score("there are three shapes including a blue square", THREE) == expect(
        object_recall=100 / 3, count_accuracy=100.0, correct_captions=100.0, mentions=1, image_objects=3,
        count_claims=1)


def test_a_flipped_relation_is_counted() -> None:
    for flipped in ("a small red circle to the right of a large green triangle",
                    "a large green triangle to the left of a small red circle", "a red circle above a green triangle"):
        assert score(flipped, TWO) == expect(object_recall=100.0, mentions=2, image_objects=2,
                                             relation_claims=1), flipped
    assert score("a large green triangle to the right of a red circle", TWO) == expect(
        object_recall=100.0, relation_accuracy=100.0, correct_captions=100.0, mentions=2, image_objects=2,
        relation_claims=1)


def test_in_a_list_the_relation_is_between_its_neighbours() -> None:
    # the circle is left of the square but above the star
    assert score("a red circle to the left of a blue square and a yellow star", THREE) == expect(
        object_recall=100.0, relation_accuracy=100.0, correct_captions=100.0, mentions=3, image_objects=3,
        relation_claims=1)
    assert score("a red circle to the left of a yellow star and a blue square", THREE) == expect(
        object_recall=100.0, mentions=3, image_objects=3, relation_claims=1)


def test_a_mention_that_fits_two_objects_gets_the_benefit_of_the_doubt() -> None:
    for true in ("a red circle to the left of a red circle", "a red circle to the right of a small red circle"):
        assert score(true, TWINS) == expect(object_recall=100.0, relation_accuracy=100.0, correct_captions=100.0,
                                            mentions=2, image_objects=2, relation_claims=1), true
    assert score("a red circle above a red circle", TWINS) == expect(object_recall=100.0, mentions=2,
                                                                     image_objects=2, relation_claims=1)


def test_a_wrong_position_is_counted() -> None:
    assert score("a purple diamond near the top", ONE) == expect(object_recall=100.0, mentions=1, image_objects=1,
                                                                 position_claims=1)
    assert score("a purple diamond near the bottom", ONE) == expect(
        object_recall=100.0, position_accuracy=100.0, correct_captions=100.0, mentions=1, image_objects=1,
        position_claims=1)


def test_scores_add_up_over_captions() -> None:
    captions = ["a small red circle to the left of a green triangle", "a small green circle and a green triangle", ""]
    assert metrics.caption_correctness(captions, [TWO, TWO, TWO]) == pytest.approx(
        {**ZERO, "chair_i": 25.0, "chair_s": 100 / 3, "object_recall": 50.0, "relation_accuracy": 100.0,
         "correct_captions": 100 / 3, "captions": 3, "mentions": 4, "image_objects": 6, "relation_claims": 1})


@pytest.mark.parametrize("caption, mentions, recalled", [
    ("a small red", 0, 0), ("a small circle", 0, 0), ("a small red circle <unk>", 1, 1), ("<unk> <unk>", 0, 0),
    ("a small red circle to the left of", 1, 1), ("a small red circle to the left of a", 1, 1),
    ("a dog near the tree", 0, 0), ("one <unk>", 0, 0), ("a a a", 0, 0), ("coloured", 0, 0), ("a single", 0, 0),
    ("red circle circle", 1, 1), ("to the left of a small red circle", 1, 1), ("a small red circle near the", 1, 1),
    ("three", 0, 0), ("a small red circle coloured", 1, 1),
])
def test_broken_captions_are_never_correct(caption: str, mentions: int, recalled: int) -> None:
    scores = score(caption, TWO)
    assert scores["correct_captions"] == 0.0 and scores["incomplete_captions"] == 100.0
    assert scores["mentions"] == mentions and scores["object_recall"] == 50.0 * recalled
    assert scores["chair_i"] == 0.0 and scores["relation_claims"] == scores["position_claims"] == 0


def test_nothing_to_score_is_zero() -> None:
    assert metrics.caption_correctness([], []) == ZERO
    assert score("", TWO) == expect(image_objects=2)
    assert score("a red circle", []) == expect(chair_i=100.0, chair_s=100.0, mentions=1)
    with pytest.raises(ValueError):
        metrics.caption_correctness(["a red circle"], [])
