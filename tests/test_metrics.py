"""COCO caption metrics through pycocoevalcap, the nltk BLEU, and the attention-grounding score."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

import metrics
import train
from conftest import train_args

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = [
    ["a man riding a wave on top of a surfboard.", "A surfer rides a large wave!", "a person surfing in the ocean"],
    ["two dogs play with a frisbee in the park", "Dogs running on grass, chasing a frisbee.",
     "a couple of dogs playing in a field"],
    ["a plate of food with broccoli and rice", "Rice, broccoli and chicken on a white plate."],
]
HYPOTHESES = ["a man riding a wave on a surfboard", "two dogs playing with a frisbee", "a plate of rice and broccoli"]


def reference_tokens() -> tuple[dict, dict]:
    """References and hypotheses through pycocoevalcap's own tokenizer, as the COCO caption evaluation runs it."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(HYPOTHESES)})
    return gts, res


def reference_scores() -> dict[str, float]:
    """pycocoevalcap used directly, the way the COCO caption evaluation script does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = reference_tokens()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {**{f"bleu{n + 1}": 100 * b for n, b in enumerate(bleu)},
            "meteor": 100 * Meteor().compute_score(gts, res)[0], "rouge": 100 * Rouge().compute_score(gts, res)[0],
            "cider": 100 * Cider().compute_score(gts, res)[0]}


@pytest.mark.skipif(not metrics.java_available(), reason="the COCO evaluation's tokenizer and METEOR need Java")
def test_scores_equal_the_coco_evaluation() -> None:
    scores, unavailable = metrics.caption_scores(REFERENCES, HYPOTHESES, ("bleu", "meteor", "rouge", "cider"))
    expected = reference_scores()
    assert not unavailable and set(scores) == set(expected)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    assert 0 < scores["bleu4"] < scores["bleu1"] < 100 and scores["cider"] > 0 and 0 < scores["meteor"] < 100


@pytest.mark.skipif(not metrics.java_available(), reason="the COCO evaluation's tokenizer needs Java")
def test_per_image_scores_are_the_coco_codes_per_image_scores() -> None:
    """From the same scorer calls as the corpus scores: CIDEr-D per image (whose mean is the corpus CIDEr-D),
    sentence BLEU-4 and ROUGE-L per image, as pycocoevalcap computes them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    computed = metrics.score_captions(REFERENCES, HYPOTHESES, ("bleu", "rouge", "cider"))
    gts, res = reference_tokens()
    cider = Cider().compute_score(gts, res)[1]
    assert computed.per_image["cider"] == pytest.approx([100 * v for v in cider], abs=1e-9)
    assert computed.per_image["rouge"] == pytest.approx([100 * v for v in Rouge().compute_score(gts, res)[1]])
    assert computed.per_image["bleu4"] == pytest.approx([100 * v for v in Bleu(4).compute_score(gts, res, 0)[1][3]])
    assert sum(computed.per_image["cider"]) / 3 == pytest.approx(computed.corpus["cider"])
    assert len(set(computed.per_image["cider"])) == 3  # three different images, three different scores
    assert (computed.corpus, computed.unavailable) == metrics.caption_scores(REFERENCES, HYPOTHESES,
                                                                             ("bleu", "rouge", "cider"))


def test_nltk_bleu_path_is_nltk_corpus_bleu() -> None:
    scores, _ = metrics.caption_scores(REFERENCES, HYPOTHESES, ("bleu",), bleu_impl="nltk")
    refs = [[r.split() for r in refs] for refs in REFERENCES]
    expected = corpus_bleu(refs, [h.split() for h in HYPOTHESES])
    assert scores["bleu4"] == pytest.approx(100 * expected, abs=1e-9)
    # both BLEUs agree where they should: a hypothesis equal to a reference scores 100
    same = [refs[0] for refs in REFERENCES]
    assert metrics.caption_scores(REFERENCES, same, ("bleu",), "nltk")[0]["bleu4"] == pytest.approx(100)
    assert metrics.caption_scores(REFERENCES, same, ("bleu",), "coco")[0]["bleu4"] == pytest.approx(100, abs=1e-4)


def test_cider_on_a_single_image_is_zero_by_definition() -> None:
    from pycocoevalcap.cider.cider import Cider
    scores, _ = metrics.caption_scores(REFERENCES[:1], HYPOTHESES[:1], ("cider",))
    assert scores["cider"] == 0.0
    refs = {0: [metrics.python_tokenize(r) for r in REFERENCES[0]]}
    assert Cider().compute_score(refs, {0: [metrics.python_tokenize(HYPOTHESES[0])]})[0] == 0.0


def test_without_java_meteor_is_unavailable_and_the_rest_still_works() -> None:
    """A real run with no java on PATH."""
    code = ("import json, metrics, tests.test_metrics as t; print(json.dumps(metrics.caption_scores("
            "t.REFERENCES, t.HYPOTHESES, ('bleu', 'meteor', 'rouge', 'cider'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PATH": "", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}, timeout=120)
    assert result.returncode == 0, result.stderr
    scores, unavailable = json.loads(result.stdout)
    assert "meteor" not in scores and "Java" in unavailable["meteor"]
    assert {"bleu4", "rouge", "cider"} <= set(scores)
    if metrics.java_available():  # these captions tokenise the same either way
        with_java, _ = metrics.caption_scores(REFERENCES, HYPOTHESES, ("bleu", "rouge", "cider"))
        for name in ("bleu4", "rouge", "cider"):
            assert scores[name] == pytest.approx(with_java[name], abs=1e-6)


def test_spice_without_corenlp_is_reported_not_crashed() -> None:
    reason = metrics.unavailable_reason("spice")
    if reason is None:
        pytest.skip("Stanford CoreNLP is installed here: SPICE is available")
    scores, unavailable = metrics.caption_scores(REFERENCES, HYPOTHESES, ("bleu", "spice"))
    assert "spice" not in scores and unavailable["spice"] == reason and "bleu4" in scores


def grid_boxes() -> list[dict]:
    return [{"box": [0.0, 0.0, 0.5, 0.5], "words": ["red", "circle"]},
            {"box": [0.5, 0.5, 1.0, 1.0], "words": ["blue", "square"]}]


def test_grounding_is_perfect_for_oracle_attention_and_chance_for_uniform() -> None:
    words = [["a", "red", "circle", "and", "a", "blue", "square"]]
    grid = 4
    oracle = torch.zeros(len(words[0]), grid * grid)
    for t, word in enumerate(words[0]):
        boxes = [o["box"] for o in grid_boxes() if word in o["words"]]
        coverage = metrics.cell_coverage(boxes, grid) if boxes else torch.ones(grid * grid)
        oracle[t] = (coverage / coverage.sum()).float()
    perfect = metrics.attention_grounding(words, [oracle], [grid_boxes()])
    assert perfect == {"attention_in_box": pytest.approx(100.0), "uniform_in_box": pytest.approx(25.0),
                       "pointing_accuracy": 100.0, "grounded_words": 4}
    uniform = metrics.attention_grounding(words, [torch.full((7, grid * grid), 1 / 16)], [grid_boxes()])
    assert uniform["attention_in_box"] == pytest.approx(25.0)  # each box covers a quarter of the image
    assert uniform["uniform_in_box"] == pytest.approx(25.0)
    assert uniform["grounded_words"] == 4


def test_a_short_run_with_the_grounded_recipe_looks_at_the_objects(shapes_data, tmp_path) -> None:
    """The demo's recipe in miniature (the stride-16 grid, no doubly stochastic penalty, enough steps at a high
    enough rate): after 15 short epochs the attention of the object words holds 2.2x the mass a uniform map puts
    in their boxes (21.6 % against 9.7 % when written), and eval.py reports it with the truth scores."""
    torch.manual_seed(0)
    train.main(train_args(shapes_data, tmp_path, "--cache-features", "--epochs", "15", "--patience", "15",
                          "--batch-size", "8", "--decoder-lr", "3e-3", "--dropout", "0.1", "--alpha-c", "0",
                          "--encoder-stride", "16", "--encoded-size", "8"))
    folder, name = shapes_data
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(tmp_path / "checkpoint_best.pt"),
                             "--data-folder", str(folder), "--data-name", name, "--beam-sizes", "3", "--grounding",
                             "--metrics", "bleu,cider,spice", "--out", str(tmp_path / "eval")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "attention in box %" in result.stdout and "CHAIR-s %" in result.stdout
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["beam3"]
    assert scores["grounded_words"] > 40 and scores["captions"] == 40
    assert scores["attention_in_box"] > 1.5 * scores["uniform_in_box"], scores


def test_early_stopping_on_cider(shapes_data, tmp_path) -> None:
    train.main(train_args(shapes_data, tmp_path, "--cache-features", "--epochs", "2", "--batch-size", "16",
                          "--early-stop-metric", "cider"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("val_cider" in r and "val_bleu4" in r for r in records)
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)
    assert best["progress"]["best_score"] == pytest.approx(max(r["val_cider"] for r in records))
    assert best["train_config"]["early_stop_metric"] == "cider"


@pytest.mark.skipif(not metrics.java_available(), reason="the PTB tokenizer needs Java")
def test_ptb_tokenize_equals_pycocoevalcaps_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {0: ["A man (left) rides a WAVE.", "Isn't it a dog's frisbee?!", "café -- naïve \"quotes\"; ok..."],
                7: ["two dogs, playing", ""]}
    expected = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    assert metrics.ptb_tokenize(captions) == expected
