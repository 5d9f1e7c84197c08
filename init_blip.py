"""Write a randomly initialised BLIP model as a Hugging Face folder, for train.py --model blip --pretrained FOLDER.

Offline no pretrained BLIP can be downloaded; this gives the same architecture, trained from scratch, with a
WordPiece tokenizer whose vocabulary is the data's words (BLIP's special tokens first).

Examples:
  python init_blip.py --data-folder data/shapes --out checkpoints/blip_init --size small
  python train.py --model blip --pretrained checkpoints/blip_init --fine-tune-encoder ...
"""
from __future__ import annotations

import argparse
import sys

from utils import ArgumentParser, add_debug_flag, bounded_int, run_cli

SIZES = ("tiny", "small", "base")  # blip.SIZES, named here so that --help answers before torch is imported


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-folder", default="data/shapes", help="create_input_files.py's output folder, whose word "
                                                                "map becomes the tokenizer's vocabulary (default: "
                                                                "data/shapes)")
    p.add_argument("--data-name", default="shapes_5_cap_per_img_5_min_word_freq",
                   help="base name of its files (default: shapes_5_cap_per_img_5_min_word_freq)")
    p.add_argument("--out", required=True, help="the folder to write (replaced atomically if it exists)")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="tiny (2 layers of width 32, for tests), small (3 layers of width 128, the shapes "
                        "comparison) or base (BLIP-base's ViT-B/16 and 12-layer BERT decoder) (default: small)")
    p.add_argument("--image-size", type=bounded_int(16, 1024), default=224,
                   help="the vision transformer's input side in pixels, a multiple of its 16 px patches "
                        "(default: 224)")
    add_debug_flag(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    import blip
    from datasets import read_word_map, word_map_file
    from utils import SatError
    if args.image_size % 16:
        raise SatError(f"--image-size {args.image_size}: not a multiple of the 16 px patches")
    word_map = read_word_map(word_map_file(args.data_folder, args.data_name))
    folder = blip.write_scratch_folder(args.out, word_map, args.size, args.image_size)
    print(f"wrote a randomly initialised BLIP-{args.size} ({len(word_map)} words) to {folder}")


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    run_cli(lambda _argv: run(arguments))
