"""Caption quality scores and the attention-grounding score.

`caption_scores` computes BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE where possible) exactly as the
COCO caption evaluation does, through the pycocoevalcap package: captions are first run through the
Stanford PTB tokenizer (Java) with punctuation removed. Without Java, a Python tokenizer that mimics it
is used and METEOR/SPICE are reported unavailable. `bleu` is nltk's corpus BLEU, which the old tutorial
reported; the two BLEUs differ (see the README). All scores are x100, as papers report them.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from nltk.translate.bleu_score import corpus_bleu

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


def caption_scores(references: list[list[str]], hypotheses: list[str],
                   metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider"),
                   bleu_impl: str = "coco") -> tuple[dict[str, float], dict[str, str]]:
    """COCO caption metrics x100: ({name: score}, {metric: why it was not computed})."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets but {len(hypotheses)} hypotheses")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    scores: dict[str, float] = {}
    skipped = {m: r for m in metrics if (r := unavailable_reason(m)) is not None}
    if "bleu" in metrics and bleu_impl == "nltk":
        scores.update(bleu(references, hypotheses))
    wanted = [m for m in metrics if m not in skipped and not (m == "bleu" and bleu_impl == "nltk")]
    if not wanted:
        return scores, skipped
    both = tokenize({i: list(refs) + [hyp] for i, (refs, hyp) in enumerate(zip(references, hypotheses))})
    gts = {i: caps[:-1] for i, caps in both.items()}
    res = {i: caps[-1:] for i, caps in both.items()}
    for metric in wanted:
        if metric == "cider" and len(gts) == 1:
            # CIDEr-D weighs n-grams by their IDF over the references of the whole test set; with a single
            # image every n-gram of its references has IDF log(1/1) = 0, so the score is 0 by definition.
            scores["cider"] = 0.0
            continue
        value = _scorer(metric).compute_score(gts, res, **({"verbose": 0} if metric == "bleu" else {}))[0]
        if metric == "bleu":
            scores.update({f"bleu{n + 1}": 100.0 * v for n, v in enumerate(value)})
        else:
            scores[metric] = 100.0 * float(value)
    return scores, skipped


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
    whether the most-attended cell lies inside one of them (pointing accuracy), both x100; and, for
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
            hits.append(float(coverage[int(alpha.argmax())] > 0.5))
    if not shares:
        return {"attention_in_box": 0.0, "uniform_in_box": 0.0, "pointing_accuracy": 0.0, "grounded_words": 0}
    return {"attention_in_box": 100.0 * sum(shares) / len(shares), "uniform_in_box": 100.0 * sum(chance) / len(chance),
            "pointing_accuracy": 100.0 * sum(hits) / len(hits), "grounded_words": len(shares)}
