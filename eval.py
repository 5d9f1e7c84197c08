"""Caption a split with beam search at several beam sizes and score it.

Examples:
  python eval.py --checkpoint checkpoints/checkpoint_best.pt --data-folder data/shapes \\
      --data-name shapes_5_cap_per_img_5_min_word_freq --split test --beam-sizes 1 3 5 --gallery
  python eval.py --checkpoint run1/checkpoint_best.pt run2/checkpoint_best.pt ...     # an ensemble of two
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from config import MAX_BEAM_SIZE, MAX_CAPTION_WORDS
from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, bounded_int, device_name, \
    finite_float, read_json, run_cli, write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+", action="extend",
                   help="a checkpoint written by train.py (or its .safetensors export), of either model family, or "
                        "a BLIP folder in the Hugging Face layout (scored as it is, zero-shot); several attention "
                        "checkpoints (--checkpoint A B, or the flag repeated) decode as one ensemble that averages "
                        "their log-probabilities at every step: they must share the word map and the image size")
    p.add_argument("--data-folder", default="data/shapes", help="folder of create_input_files.py's outputs "
                                                                "(default: data/shapes)")
    p.add_argument("--data-name", default="shapes_5_cap_per_img_5_min_word_freq",
                   help="base name of those files (default: shapes_5_cap_per_img_5_min_word_freq)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (default: test)")
    p.add_argument("--beam-sizes", type=bounded_int(1, MAX_BEAM_SIZE), nargs="+", default=[1, 3, 5],
                   help=f"beam sizes to decode with, each up to {MAX_BEAM_SIZE} (default: 1 3 5)")
    p.add_argument("--metrics", default="bleu,meteor,rouge,cider",
                   help="comma-separated, from bleu, meteor, rouge, cider (CIDEr-D), spice; computed as the COCO "
                        "caption evaluation does (default: bleu,meteor,rouge,cider)")
    p.add_argument("--bleu", choices=["coco", "nltk"], default="coco",
                   help="BLEU as the COCO evaluation computes it, or nltk's corpus_bleu over raw words as the old "
                        "tutorial reported it (default: coco)")
    p.add_argument("--grounding", action="store_true",
                   help="shapes data only: score whether the captions are true (hallucinated objects CHAIR-i/-s, "
                        "recall, counts, relations) and how much attention falls inside the box of the object each "
                        "colour/shape word names, and how often the most-attended cell does; the attention part is "
                        "n/a for the decoders without attention, lstm and rnn (default: off)")
    p.add_argument("--max-len", type=bounded_int(1, MAX_CAPTION_WORDS), default=50,
                   help=f"longest caption in words, up to {MAX_CAPTION_WORDS} (default: 50)")
    p.add_argument("--length-penalty", type=finite_float, default=0.0,
                   help="rank finished beams by score / length**this; 0 ranks by total log-probability "
                        "(default: 0)")
    p.add_argument("--batch-size", type=bounded_int(1, 100_000), default=32,
                   help="images decoded together (default: 32)")
    p.add_argument("--workers", type=bounded_int(0, 256), default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", action="store_true",
                   help="decode in bf16 autocast (fp16 on GPUs without bf16); on a CPU only where it has native "
                        "bf16 (AVX512-BF16/AMX), where it is about 1.7x faster. Scores move by rounding only "
                        "(default: off)")
    p.add_argument("--cache-features", action="store_true",
                   help="encode the split once into (or reuse) the fp16 feature cache that train.py "
                        "--cache-features writes, keyed on the checkpoint's encoder weights (default: off)")
    p.add_argument("--out", help="folder for the captions and scores (default: eval_SPLIT beside the checkpoint, "
                                 "eval_SPLIT_ensembleN beside the first of N)")
    p.add_argument("--gallery", action="store_true",
                   help="also write OUT/gallery/index.html: every image of the split with its captions at each beam "
                        "size, the references, per-image CIDEr-D (and with --grounding whether each caption is true "
                        "and where it looked), worst CIDEr-D first, attention strips for the first rows; a static "
                        "page to open from disk (default: off)")
    p.add_argument("--gallery-size", type=bounded_int(0, 1_000_000), default=100, metavar="N",
                   help="rows of the gallery that get an attention strip (every row gets a thumbnail) (default: "
                        "100)")
    p.add_argument("--compare", metavar="OTHER_EVAL_DIR",
                   help="the --out folder of another model's eval.py run on the same split: the gallery (implied) "
                        "shows both models' captions and scores per image, sorted by the difference in per-image "
                        "CIDEr-D at the largest beam size both decoded, where this model loses most first")
    add_trust_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    import gallery
    import metrics
    from datasets import ImageCaptionsDataset, check_word_map
    from devices import resolve_device
    from ensemble import feature_encoder, load_models
    from features import cached_features
    from inference import caption_split, word_attention

    metric_names = parse_metrics(args.metrics)
    show = args.gallery or args.compare is not None
    if show and "cider" not in metric_names:
        raise SatError(f"--metrics {args.metrics}: the gallery sorts by per-image CIDEr-D; add cider")
    other = gallery.read_evaluation(args.compare) if args.compare else None  # before the long part: fail early
    device = resolve_device(args.device)
    model, word_map, _ = load_models(args.checkpoint, trust=args.trust_checkpoint)
    if word_map is not None:  # None: a BLIP folder in the Hugging Face layout, which speaks its own tokens
        check_word_map(word_map, args.data_folder, args.data_name, args.checkpoint[0])
    dataset = ImageCaptionsDataset(args.data_folder, args.data_name, args.split)  # checks the files
    objects = load_boxes(args.data_folder, args.data_name, dataset.files.filenames) if args.grounding else None
    model.to(device)
    if args.cache_features:
        dataset.use_features(cached_features(feature_encoder(model), args.data_folder, args.data_name, args.split,
                                             device, args.batch_size))
    if other is not None:
        gallery.check_same_split(other, dataset.files.image_ids, args.split, args.compare)
        gallery.sort_beam(args.beam_sizes, other, args.compare)
    results = caption_split(model, dataset, word_map, args.beam_sizes, args.max_len, args.batch_size, device,
                            args.length_penalty, args.workers, amp=args.amp)
    ensemble = "" if len(args.checkpoint) == 1 else f"_ensemble{len(args.checkpoint)}"
    out = Path(args.out) if args.out else Path(args.checkpoint[0]).parent / f"eval_{args.split}{ensemble}"
    attends = model.decoder.attends  # lstm and rnn look at no pixel
    scores, per_image, notes = {}, {}, {}
    subwords = model.config.vocab == "bpe"  # BPE pieces are joined into words: every score is on words
    for k, captions in results.items():
        hypotheses = model.sentences(captions, word_map)
        computed = metrics.score_captions(dataset.references, hypotheses, metric_names, args.bleu)
        scores[f"beam{k}"], notes = computed.corpus, computed.unavailable
        verdicts = grounding = None
        if objects is not None:
            verdicts = metrics.judge_captions(hypotheses, objects)
            scores[f"beam{k}"].update(metrics.correctness_scores(verdicts))
            if attends:
                words, alphas, _ = zip(*(word_attention(c, word_map, subwords) for c in captions))
                scores[f"beam{k}"].update(metrics.attention_grounding(list(words), list(alphas), objects))
                grounding = [metrics.attention_grounding([w], [a], [o]) for w, a, o in zip(words, alphas, objects)]
        per_image[f"beam{k}"] = gallery.beam_record(hypotheses, computed, verdicts, grounding)
        write_json(out / f"captions_beam{k}.json",
                   [{"image_id": i, "caption": h} for i, h in zip(dataset.files.image_ids, hypotheses)])
    if args.grounding and not attends:
        notes["grounding"] = f"attention grounding: n/a, decoder '{model.name}' has no attention"
    write_json(out / "scores.json", {**scores, "unavailable": notes})
    evaluation = gallery.Evaluation(" ".join(args.checkpoint), model.name, args.split, dataset.files.image_ids,
                                    per_image, scores)
    write_json(out / gallery.PER_IMAGE, evaluation.to_json())
    if show:
        page = gallery.write_gallery(out / "gallery", evaluation, dataset.references, dataset.files.image, results,
                                     [SCORE_COLUMNS, TRUTH_COLUMNS], args.gallery_size, other)
        print(f"gallery: {page}")
    print(format_table(scores, SCORE_COLUMNS))
    if args.grounding:
        print(format_table(scores, TRUTH_COLUMNS))
    for reason in notes.values():
        print(f"note: {reason}")
    print(f"captions and scores written to {out}{os.sep}")


def parse_metrics(text: str) -> tuple[str, ...]:
    import metrics
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in metrics.METRICS]
    if unknown or not names:
        raise SatError(f"--metrics {text}: unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(metrics.METRICS)}")
    return names


def load_boxes(data_folder: str, data_name: str, filenames: list[str]) -> list[list[dict]]:
    """Each image's objects from the shapes sidecar, in the split's order."""
    path = Path(data_folder) / f"BOXES_{data_name}.json"
    if not path.is_file():
        raise SatError(f"{path}: not found; --grounding needs the box file that create_input_files.py writes for "
                       "--dataset shapes")
    boxes = read_json(path)
    if not isinstance(boxes, dict) or not all(isinstance(v, list) and all(map(_is_box, v)) for v in boxes.values()):
        raise SatError(f"{path}: not a shapes box file (file name -> list of objects with shape, colour, size, box "
                       "and words)")
    return [boxes.get(name, []) for name in filenames]


def _is_box(obj: object) -> bool:
    """One object of shapes.ShapeObject.sidecar: names, a box [x0, y0, x1, y1] in [0, 1], the words naming it."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("shape", "colour", "size")):
        return False
    box, words = obj.get("box"), obj.get("words")
    return isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in box) and \
        isinstance(words, list) and all(isinstance(w, str) for w in words)


def format_table(scores: dict[str, dict[str, float]], columns: dict[str, str]) -> str:
    """Rows = beam sizes, columns = those of `columns` that were scored (the rest stay in scores.json)."""
    names = [n for n in columns if n in next(iter(scores.values()))]
    lines = ["| beam | " + " | ".join(columns[n] for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for beam, row in scores.items():
        cells = [str(row[n]) if isinstance(row[n], int) else f"{row[n]:.2f}" for n in names]
        lines.append(f"| {beam.removeprefix('beam')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SCORE_COLUMNS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                 "rouge": "ROUGE-L", "cider": "CIDEr-D", "spice": "SPICE"}
# --grounding on shapes: are the captions true, and does the attention point at what they name?
TRUTH_COLUMNS = {"correct_captions": "correct %", "chair_s": "CHAIR-s %", "chair_i": "CHAIR-i %",
                 "object_recall": "recall %", "count_accuracy": "count %", "relation_accuracy": "relation %",
                 "attention_in_box": "attention in box %", "uniform_in_box": "uniform in box %",
                 "pointing_accuracy": "pointing %"}


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])  # before torch is imported, so that --help and mistakes answer at once
    run_cli(lambda _argv: run(arguments))
