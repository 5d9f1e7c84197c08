"""Caption images with a trained checkpoint and plot where the model looked for each word.

Examples:
  python caption.py --img photo.jpg --checkpoint checkpoints/checkpoint_best.pt
  python caption.py --img photos/ --checkpoint checkpoints/checkpoint_best.pt --out captions/
  python caption.py --img photo.jpg --checkpoint run1/checkpoint_best.pt run2/checkpoint_best.pt   # an ensemble
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from config import MAX_BEAM_SIZE, MAX_CAPTION_WORDS
from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, atomic_path, bounded_int, device_name, \
    run_cli

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise SatError(f"{path}: no such file or folder")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise SatError(f"{path}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img", required=True, help="an image file (JPEG, PNG, ... any size or mode) or a folder of them")
    p.add_argument("--checkpoint", required=True, nargs="+", action="extend",
                   help="a checkpoint written by train.py (holds the word map), of either model family, or a BLIP "
                        "folder in the Hugging Face layout; several attention checkpoints decode as one ensemble "
                        "(same word map and image size) whose attention plot is the mean of its members'. BLIP "
                        "has no attention over a grid: it writes no plot")
    p.add_argument("--beam-size", type=bounded_int(1, MAX_BEAM_SIZE), default=5,
                   help=f"beam size, up to {MAX_BEAM_SIZE} (default: 5)")
    p.add_argument("--max-len", type=bounded_int(1, MAX_CAPTION_WORDS), default=50,
                   help=f"longest caption in words, up to {MAX_CAPTION_WORDS} (default: 50)")
    p.add_argument("--out", default="captions", help="folder for the attention plots ({image}_attention.png) "
                                                     "and, for a folder of images, captions.csv (default: "
                                                     "./captions)")
    p.add_argument("--no-plot", action="store_true", help="only print the captions (default: plots are written)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_trust_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    from datasets import BadImage, load_image
    from devices import resolve_device
    from ensemble import load_models
    from inference import caption_images, word_attention
    from plots import plot_attention

    device = resolve_device(args.device)
    paths = list_images(Path(args.img))
    model, word_map, size = load_models(args.checkpoint, trust=args.trust_checkpoint)
    images = []
    for path in paths:
        try:
            images.append(load_image(path, size))
        except BadImage as e:
            raise SatError(f"{path}: {e}") from None
    captions = caption_images(model.to(device), images, word_map, args.beam_size, args.max_len, device)
    subwords = model.config.vocab == "bpe"
    sentences = model.sentences(captions, word_map)
    out = Path(args.out)
    plot = not args.no_plot and model.decoder.attends
    if not args.no_plot and not plot:
        print(f"note: decoder '{model.name}' has no attention: no attention plots")
    written = []
    for path, name, image, caption, sentence in zip(paths, plot_names(paths), images, captions, sentences):
        print(sentence if len(paths) == 1 else f"{path.name}: {sentence}")
        if plot:
            written.append(out / name)
            words, alphas, sentinel = word_attention(caption, word_map, subwords)  # one map per word
            plot_attention(image, words, alphas, written[-1], sentinel)
    if Path(args.img).is_dir():
        written.append(out / "captions.csv")
        with atomic_path(written[-1]) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows((p.name, s) for p, s in zip(paths, sentences))
    for path in written[:10]:
        print(f"wrote {path}")
    if len(written) > 10:
        print(f"... and {len(written) - 10} more files in {out}")


def plot_names(paths: list[Path]) -> list[str]:
    """{stem}_attention.png, or {name}_attention.png where two images share a stem (a.jpg and a.png), each name
    distinct: a name still taken (a.jpg and a.png beside a.jpg.png) gets a number."""
    stems = [p.stem for p in paths]
    names, taken = [], set()
    for path in paths:
        base = path.name if stems.count(path.stem) > 1 else path.stem
        name, n = f"{base}_attention.png", 1
        while name in taken:
            n += 1
            name = f"{base}_{n}_attention.png"
        taken.add(name)
        names.append(name)
    return names


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])  # before torch is imported, so that --help and mistakes answer at once
    run_cli(lambda _argv: run(arguments))
