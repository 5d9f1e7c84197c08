"""Caption quality scores, the shapes caption-correctness score and the attention-grounding score.

`caption_scores` computes BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE where possible) exactly as the
COCO caption evaluation does, through the pycocoevalcap package: captions are first run through the
Stanford PTB tokenizer (Java) with punctuation removed. Without Java, a Python tokenizer that mimics it
is used and METEOR/SPICE are reported unavailable. `bleu` is nltk's corpus BLEU, which the old tutorial
reported; the two BLEUs differ (see the README). All scores are x100, as papers report them.
`score_captions` also keeps the per-image scores that the same COCO scorer calls return (the gallery's).
On the shapes data, `caption_correctness` scores whether captions are true of their images, which
n-gram overlap cannot see (`judge_captions` gives each caption's verdict), and `attention_grounding`
whether the model looks where it speaks.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from nltk.translate.bleu_score import corpus_bleu

import shapes

BLEU_WEIGHTS = {
    "bleu1": (1.0, 0, 0, 0),
    "bleu2": (0.5, 0.5, 0, 0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
PTB_PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}


def bleu(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """nltk corpus BLEU-1..4 over whitespace-separated words (the tutorial's number)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets but {len(hypotheses)} hypotheses")
    refs = [[r.split() for r in image_refs] for image_refs in references]
    hyps = [h.split() for h in hypotheses]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a higher-order n-gram never matches: the score is 0 then
        return {name: 100.0 * corpus_bleu(refs, hyps, weights=w) for name, w in BLEU_WEIGHTS.items()}


@functools.cache
def java_available() -> bool:
    if shutil.which("java") is None:
        return False
    try:
        # In its own session, so that a Ctrl-C meant for training cannot kill it and leave "no Java" cached.
        return subprocess.run(["java", "-version"], capture_output=True, timeout=60,
                              start_new_session=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def python_tokenize(caption: str) -> str:
    """A stand-in for the PTB tokenizer: lower case, punctuation split off and dropped."""
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", caption.lower())
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and re.match(r"[a-z0-9]", t))


def tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """PTB-tokenise every caption (Java), or fall back to `python_tokenize`."""
    if not java_available():
        return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}
    return ptb_tokenize(captions)


def ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """The COCO evaluation's tokenisation (pycocoevalcap's PTBTokenizer: the same jar, flags and punctuation).

    Run here rather than through PTBTokenizer because that one starts Java in our process group, so the
    Ctrl-C that asks training to save and stop also killed the tokenizer mid-validation; it also writes its
    temporary file inside site-packages.
    """
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    keys = [k for k, v in captions.items() for _ in v]
    lines = [c.replace("\n", " ") for v in captions.values() for c in v]
    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "captions.txt"
        source.write_text("\n".join(lines), encoding="utf-8")
        done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], capture_output=True, start_new_session=True,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"the Java PTB tokenizer failed: {reason[0]}")
    tokenized = done.stdout.decode("utf-8").split("\n")
    tokenized += [""] * (len(lines) - len(tokenized))  # an empty last caption may leave no line
    result: dict[int, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, tokenized):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return result


def unavailable_reason(metric: str) -> str | None:
    """Why a metric cannot be computed here, or None when it can."""
    if metric in ("meteor", "spice") and not java_available():
        return f"{metric.upper()} needs Java (install a JRE, e.g. apt-get install default-jre-headless)"
    if metric == "spice":
        import pycocoevalcap.spice as spice
        jar = Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
        if not jar.is_file():
            return (f"SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use; it is not "
                    f"at {jar} (run `python -m pycocoevalcap.spice.get_stanford_models` once online)")
    return None


@dataclass
class CaptionScores:
    """A split's caption metrics x100: over the corpus, and per image where the COCO code scores each image."""
    corpus: dict[str, float]  # bleu1..4, meteor, rouge, cider, spice: as papers report them
    per_image: dict[str, list[float]]  # bleu4, meteor, rouge, cider: each image's score, in the split's order
    unavailable: dict[str, str]  # metric -> why it was not computed


def caption_scores(references: list[list[str]], hypotheses: list[str],
                   metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider"),
                   bleu_impl: str = "coco") -> tuple[dict[str, float], dict[str, str]]:
    """COCO caption metrics x100: ({name: score}, {metric: why it was not computed})."""
    scores = score_captions(references, hypotheses, metrics, bleu_impl)
    return scores.corpus, scores.unavailable


def score_captions(references: list[list[str]], hypotheses: list[str],
                   metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider"),
                   bleu_impl: str = "coco") -> CaptionScores:
    """COCO caption metrics x100 over the corpus and, from the same scorer calls, per image.

    Per-image CIDEr-D is each image's term of the corpus score (their mean is the corpus CIDEr-D; the IDF weights
    still come from the whole split), per-image BLEU-4 is sentence BLEU against that image's references.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets but {len(hypotheses)} hypotheses")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    result = CaptionScores({}, {}, {m: r for m in metrics if (r := unavailable_reason(m)) is not None})
    if "bleu" in metrics and bleu_impl == "nltk":
        result.corpus.update(bleu(references, hypotheses))
    wanted = [m for m in metrics if m not in result.unavailable and not (m == "bleu" and bleu_impl == "nltk")]
    if not wanted:
        return result
    both = tokenize({i: list(refs) + [hyp] for i, (refs, hyp) in enumerate(zip(references, hypotheses))})
    gts = {i: caps[:-1] for i, caps in both.items()}
    res = {i: caps[-1:] for i, caps in both.items()}
    for metric in wanted:
        if metric == "cider" and len(gts) == 1:
            # CIDEr-D weighs n-grams by their IDF over the references of the whole test set; with a single
            # image every n-gram of its references has IDF log(1/1) = 0, so the score is 0 by definition.
            result.corpus["cider"], result.per_image["cider"] = 0.0, [0.0]
            continue
        value, each = _scorer(metric).compute_score(gts, res, **({"verbose": 0} if metric == "bleu" else {}))
        if metric == "bleu":
            result.corpus.update({f"bleu{n + 1}": 100.0 * v for n, v in enumerate(value)})
            result.per_image["bleu4"] = [100.0 * float(v) for v in each[3]]
        elif metric == "spice":
            result.corpus[metric] = 100.0 * float(value)  # its per-image scores are dicts of sub-scores
        else:
            result.corpus[metric] = 100.0 * float(value)
            result.per_image[metric] = [100.0 * float(v) for v in each]
    return result


def _scorer(metric: str):
    if metric == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu
        return Bleu(4)
    if metric == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor
        return Meteor()
    if metric == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge
        return Rouge()
    if metric == "cider":
        from pycocoevalcap.cider.cider import Cider  # the COCO code's Cider class computes CIDEr-D
        return Cider()
    from pycocoevalcap.spice.spice import Spice
    return Spice()


# ---------------------------------------------------------------------------------------- attention grounding

def cell_coverage(boxes: list[list[float]], grid: int) -> torch.Tensor:
    """(grid*grid,) share of each attention cell's area inside the union of the boxes ([x0, y0, x1, y1] in 0..1)."""
    fine = 8 * grid  # sample each cell at 8x8 points: exact enough, and simple for unions of boxes
    centres = (torch.arange(fine, dtype=torch.float64) + 0.5) / fine
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    inside = torch.zeros(fine, fine, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return inside.view(grid, 8, grid, 8).double().mean(dim=(1, 3)).flatten()


def attention_grounding(words: list[list[str]], alphas: list[torch.Tensor],
                        objects: list[list[dict]]) -> dict[str, float]:
    """Do the model's eyes follow its words? For every generated word that names an object in the image
    (its colour or shape word): the share of attention mass inside the boxes of the objects it names, and
    whether the most-attended cell lies inside one of them (pointing accuracy; a word that attends to no pixel
    at all, possible with sparse attention, is a miss), both x100; and, for
    comparison, the in-box share that a uniform attention map would get (the boxes' share of the image).

    words: per image, the generated words; alphas: per image, (len(words), P); objects: per image, the
    shapes sidecar's objects ({"box": [...], "words": [...]}).
    """
    shares, hits, chance = [], [], []
    for image_words, image_alphas, image_objects in zip(words, alphas, objects):
        grid = int(round(image_alphas.size(1) ** 0.5)) if len(image_words) else 0
        for word, alpha in zip(image_words, image_alphas):
            boxes = [o["box"] for o in image_objects if word in o["words"]]
            if not boxes:
                continue  # not an object word, or an object the image does not have
            coverage = cell_coverage(boxes, grid)
            shares.append(float((alpha.double() * coverage).sum()))
            chance.append(float(coverage.mean()))  # what a uniform attention map would score
            # Sparse attention can give every pixel exactly 0 (adaptive attention's sentinel took all the weight):
            # such a word pointed nowhere, which is a miss, not a look at cell 0 (the argmax of zeros).
            hits.append(float(bool(alpha.max() > 0) and coverage[int(alpha.argmax())] > 0.5))
    if not shares:
        return {"attention_in_box": 0.0, "uniform_in_box": 0.0, "pointing_accuracy": 0.0, "grounded_words": 0}
    return {"attention_in_box": 100.0 * sum(shares) / len(shares), "uniform_in_box": 100.0 * sum(chance) / len(chance),
            "pointing_accuracy": 100.0 * sum(hits) / len(hits), "grounded_words": len(shares)}


# ------------------------------------------------------------------------------ caption correctness (shapes)

def caption_correctness(hypotheses: list[str], objects: list[list[dict]]) -> dict[str, float]:
    """Are the captions true of their images? CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image
    Captioning") for the shapes data, extended to the templates' other claims; `shapes.parse_caption` reads them.

    Each mention is paired with a distinct object of its image of the same colour and shape (and size, when
    it names one), by the one-to-one pairing that pairs the most mentions; a mention left unpaired is a
    hallucination, so naming an object twice, or with a wrong colour or size, counts. Keys, x100 where shares:
    chair_i: hallucinated mentions / mentions; chair_s: captions with a hallucination / captions;
    object_recall: image objects some mention is paired with / image objects; count_accuracy: true count claims
    ("a single", "one", "alone", "two shapes", "three shapes") / count claims; relation_accuracy: true relation
    claims / relation claims, judged by `shapes.relation` on the paired objects' box centres, a claim about an
    unpaired mention being false; position_accuracy: the same for "near the top / bottom" (`shapes.position`);
    incomplete_captions: captions with a dangling phrase or a word outside the grammar / captions;
    correct_captions: captions with at least one mention, no hallucination, every count, relation and position
    claim true and nothing incomplete / captions; and the denominators: captions, mentions, image_objects,
    count_claims, relation_claims, position_claims. A share over nothing is 0.0.

    hypotheses: per image, the generated caption; objects: per image, the shapes sidecar's objects.
    """
    return correctness_scores(judge_captions(hypotheses, objects))


def judge_captions(hypotheses: list[str], objects: list[list[dict]]) -> list[Verdict]:
    """Each caption's claims and how many of each kind are true, as caption_correctness counts them."""
    if len(hypotheses) != len(objects):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(objects)} object lists")
    return [_judge(shapes.parse_caption(h), [shapes.ShapeObject.from_sidecar(o) for o in objs])
            for h, objs in zip(hypotheses, objects)]


def correctness_scores(verdicts: list[Verdict]) -> dict[str, float]:
    """caption_correctness's scores from the captions' verdicts."""
    total = {name: sum(getattr(v, name) for v in verdicts) for name in Verdict.__dataclass_fields__}
    captions = len(verdicts)
    return {"chair_i": _share(total["hallucinated"], total["mentions"]),
            "chair_s": _share(sum(v.hallucinated > 0 for v in verdicts), captions),
            "object_recall": _share(total["recalled"], total["objects"]),
            "count_accuracy": _share(total["counts_true"], total["counts"]),
            "relation_accuracy": _share(total["relations_true"], total["relations"]),
            "position_accuracy": _share(total["positions_true"], total["positions"]),
            "incomplete_captions": _share(captions - total["complete"], captions),
            "correct_captions": _share(sum(v.correct for v in verdicts), captions),
            "captions": captions, "mentions": total["mentions"], "image_objects": total["objects"],
            "count_claims": total["counts"], "relation_claims": total["relations"],
            "position_claims": total["positions"]}


@dataclass
class Verdict:
    """One caption's claims, and how many of each kind are true."""
    mentions: int
    hallucinated: int
    objects: int
    recalled: int
    counts: int
    counts_true: int
    relations: int
    relations_true: int
    positions: int
    positions_true: int
    complete: bool

    @property
    def correct(self) -> bool:
        return (self.complete and self.mentions > 0 and self.hallucinated == 0 and self.counts_true == self.counts
                and self.relations_true == self.relations and self.positions_true == self.positions)


def _judge(parsed: shapes.ParsedCaption, objs: list[shapes.ShapeObject]) -> Verdict:
    paired = _best_pairing(parsed, objs)
    return Verdict(mentions=len(parsed.mentions), hallucinated=len(parsed.mentions) - len(paired),
                    objects=len(objs), recalled=len(paired),
                    counts=len(parsed.counts), counts_true=sum(n == len(objs) for n in parsed.counts),
                    relations=len(parsed.relations), relations_true=_true_relations(parsed, paired),
                    positions=len(parsed.positions), positions_true=_true_positions(parsed, paired),
                    complete=parsed.complete)


def _best_pairing(parsed: shapes.ParsedCaption, objs: list[shapes.ShapeObject]) -> dict[int, shapes.ShapeObject]:
    """{mention index: object}: of the one-to-one pairings the one that pairs the most mentions and, among
    those, makes the most relation and position claims true, so that a mention that fits two objects (two red
    circles) gets the benefit of the doubt. Brute force over each object's choice of mention: images hold at
    most 3 objects.
    """
    options = [[None, *(k for k, m in enumerate(parsed.mentions) if _describes(m, o))] for o in objs]
    best: dict[int, shapes.ShapeObject] = {}
    best_key = (-1, -1)
    for choice in itertools.product(*options):
        # keyed by mention, so one-to-one: a mention two objects chose keeps one, as in the choice where the other
        # object chose none
        pairing = {k: o for k, o in zip(choice, objs) if k is not None}
        key = (len(pairing), _true_relations(parsed, pairing) + _true_positions(parsed, pairing))
        if key > best_key:
            best, best_key = pairing, key
    return best


def _describes(mention: shapes.Mention, obj: shapes.ShapeObject) -> bool:
    return (mention.colour == obj.colour and mention.shape == obj.shape
            and mention.size in (None, obj.size))


def _true_relations(parsed: shapes.ParsedCaption, paired: dict[int, shapes.ShapeObject]) -> int:
    return sum(a in paired and b in paired and shapes.relation(paired[a], paired[b]) == rel
               for a, rel, b in parsed.relations)


def _true_positions(parsed: shapes.ParsedCaption, paired: dict[int, shapes.ShapeObject]) -> int:
    return sum(a in paired and shapes.position(paired[a], 1.0) == where for a, where in parsed.positions)


def _share(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0
