"""Caption a split with beam search at several beam sizes and score it.

Example:
  python eval.py --checkpoint checkpoints/checkpoint_best.pt --data-folder data/shapes \\
      --data-name shapes_5_cap_per_img_5_min_word_freq --split test --beam-sizes 1 3 5
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import metrics
from datasets import ImageCaptionsDataset, word_map_file
from features import cached_features
from models import Caption, CaptionModel, beam_search, decode_tokens, model_from_checkpoint
from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, load_checkpoint, non_negative_int, \
    positive_int, read_json, resolve_device, run_cli, write_json


def encode(encoder: torch.nn.Module, inputs: torch.Tensor, from_features: bool) -> torch.Tensor:
    """Encoder output (B, P, C) from images, or straight from cached fp16 features."""
    return inputs.float() if from_features else encoder(inputs)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise SatError("--amp: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX); run without --amp")
    return torch.bfloat16


@torch.no_grad()
def caption_split(model: CaptionModel, dataset: ImageCaptionsDataset, word_map: dict[str, int],
                  beam_sizes: list[int], max_len: int, batch_size: int, device: torch.device,
                  length_penalty: float = 0.0, workers: int = 0, progress: bool = True,
                  amp: bool = False, indices: range | None = None) -> dict[int, list[Caption]]:
    """Decode every image of the split (or those of `indices`, e.g. one rank's share) once per beam size; each
    batch is encoded once for all beam sizes."""
    model.eval()
    dtype = autocast_dtype(device) if amp else torch.float32
    loader = DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    results: dict[int, list[Caption]] = {k: [] for k in beam_sizes}
    for inputs, *_ in tqdm(loader, desc="decoding", unit="batch", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            encoder_out = encode(model.encoder, inputs.to(device, non_blocking=True), dataset.features is not None)
            for k in beam_sizes:
                results[k].extend(beam_search(model.decoder, encoder_out, word_map, k, max_len, length_penalty))
    return results


def texts(captions: list[Caption], word_map: dict[str, int]) -> list[str]:
    rev = {i: w for w, i in word_map.items()}
    return [decode_tokens(c.tokens, rev) for c in captions]


def check_word_map(checkpoint_word_map: dict[str, int], data_folder: str, data_name: str, source: str) -> None:
    path = word_map_file(data_folder, data_name)
    data_word_map = read_json(path)
    if data_word_map != checkpoint_word_map:
        raise SatError(f"{source}: its word map ({len(checkpoint_word_map)} words) differs from {path} "
                       f"({len(data_word_map)} words): the model was trained on other data")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    p.add_argument("--data-folder", default="data/shapes", help="folder of create_input_files.py's outputs "
                                                                "(default: data/shapes)")
    p.add_argument("--data-name", default="shapes_5_cap_per_img_5_min_word_freq",
                   help="base name of those files (default: shapes_5_cap_per_img_5_min_word_freq)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (default: test)")
    p.add_argument("--beam-sizes", type=positive_int, nargs="+", default=[1, 3, 5],
                   help="beam sizes to decode with (default: 1 3 5)")
    p.add_argument("--metrics", default="bleu,meteor,rouge,cider",
                   help="comma-separated, from bleu, meteor, rouge, cider (CIDEr-D), spice; computed as the COCO "
                        "caption evaluation does (default: bleu,meteor,rouge,cider)")
    p.add_argument("--bleu", choices=["coco", "nltk"], default="coco",
                   help="BLEU as the COCO evaluation computes it, or nltk's corpus_bleu over raw words as the old "
                        "tutorial reported it (default: coco)")
    p.add_argument("--grounding", action="store_true",
                   help="shapes data only: score how much attention falls inside the box of the object each "
                        "colour/shape word names, and how often the most-attended cell does; n/a for the decoders "
                        "without attention, lstm and rnn (default: off)")
    p.add_argument("--max-len", type=positive_int, default=50, help="longest caption in words (default: 50)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="rank finished beams by score / length**this; 0 ranks by total log-probability "
                        "(default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images decoded together (default: 32)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--amp", action="store_true",
                   help="decode in bf16 autocast (fp16 on GPUs without bf16); on a CPU only where it has native "
                        "bf16 (AVX512-BF16/AMX), where it is about 1.7x faster. Scores move by rounding only "
                        "(default: off)")
    p.add_argument("--cache-features", action="store_true",
                   help="encode the split once into (or reuse) the fp16 feature cache that train.py "
                        "--cache-features writes, keyed on the checkpoint's encoder weights (default: off)")
    p.add_argument("--out", help="folder for the captions and scores (default: eval_SPLIT beside the checkpoint)")
    add_trust_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metric_names = parse_metrics(args.metrics)
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    model, word_map = model_from_checkpoint(checkpoint, args.checkpoint)
    check_word_map(word_map, args.data_folder, args.data_name, args.checkpoint)
    model.to(device)
    features = None
    if args.cache_features:
        features = cached_features(model.encoder, args.data_folder, args.data_name, args.split, device,
                                   args.batch_size)
    dataset = ImageCaptionsDataset(args.data_folder, args.data_name, args.split, features=features)
    results = caption_split(model, dataset, word_map, args.beam_sizes, args.max_len, args.batch_size, device,
                            args.length_penalty, args.workers, amp=args.amp)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}"
    grounding = args.grounding and model.decoder.attends  # lstm and rnn look at no pixel
    boxes = load_boxes(args.data_folder, args.data_name, dataset) if grounding else None
    scores, notes = {}, {}
    for k, captions in results.items():
        hypotheses = texts(captions, word_map)
        scores[f"beam{k}"], notes = metrics.caption_scores(dataset.references, hypotheses, metric_names, args.bleu)
        if boxes is not None:
            scores[f"beam{k}"].update(metrics.attention_grounding([h.split() for h in hypotheses],
                                                                  [c.alphas for c in captions], boxes))
        write_json(out / f"captions_beam{k}.json",
                   [{"image_id": i, "caption": h} for i, h in zip(dataset.files.image_ids, hypotheses)])
    if args.grounding and not grounding:
        notes["grounding"] = f"attention grounding: n/a, decoder '{model.config.decoder}' has no attention"
    write_json(out / "scores.json", {**scores, "unavailable": notes})
    print(format_table(scores))
    for reason in notes.values():
        print(f"note: {reason}")
    print(f"captions and scores written to {out}{os.sep}")


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in metrics.METRICS]
    if unknown or not names:
        raise SatError(f"--metrics {text}: unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(metrics.METRICS)}")
    return names


def load_boxes(data_folder: str, data_name: str, dataset: ImageCaptionsDataset) -> list[list[dict]]:
    """Each image's objects from the shapes sidecar, in the split's order."""
    path = Path(data_folder) / f"BOXES_{data_name}.json"
    if not path.is_file():
        raise SatError(f"{path}: not found; --grounding needs the box file that create_input_files.py writes for "
                       "--dataset shapes")
    boxes = read_json(path)
    return [boxes.get(name, []) for name in dataset.files.filenames]


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """Rows = beam sizes, columns = metrics."""
    names = list(next(iter(scores.values())))
    header = [COLUMN_NAMES.get(n, n) for n in names]
    lines = ["| beam | " + " | ".join(header) + " |", "|---:|" + "---:|" * len(names)]
    for beam, row in scores.items():
        cells = [str(row[n]) if isinstance(row[n], int) else f"{row[n]:.2f}" for n in names]
        lines.append(f"| {beam.removeprefix('beam')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLUMN_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                "rouge": "ROUGE-L", "cider": "CIDEr-D", "spice": "SPICE", "attention_in_box": "attention in box %",
                "uniform_in_box": "uniform in box %",
                "pointing_accuracy": "pointing %", "grounded_words": "grounded words"}


if __name__ == "__main__":
    run_cli(main)
