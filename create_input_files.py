"""Turn a captioning dataset into one HDF5 file of images per split plus caption JSONs and a word map.

Examples:
  python create_input_files.py                                   # the built-in shapes data, into data/shapes
  python create_input_files.py --dataset coco --karpathy-json dataset_coco.json \\
      --image-folder /data/coco --output-folder data/coco
  python create_input_files.py --dataset folder --captions-csv captions.csv --image-folder photos/ \\
      --output-folder data/mine
  python create_input_files.py --vocab bpe --bpe-merges 4000      # sub-words instead of whole words
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from config import DEFAULT_MAX_PIXELS, MAX_CAPTION_WORDS, MAX_CAPTIONS_PER_IMAGE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from utils import ArgumentParser, SatError, add_debug_flag, bounded_int, positive_int, probability, read_json, \
    run_cli, seed_value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes", choices=["shapes", "coco", "flickr8k", "flickr30k", "folder"],
                   help="which dataset; 'folder' reads --captions-csv (default: shapes, generated here)")
    p.add_argument("--karpathy-json", help="Karpathy's split JSON (dataset_coco.json etc.); needed for coco/flickr*")
    p.add_argument("--image-folder", help="root the JSON's filepath/filename (or the CSV's image column) are "
                                          "relative to; for shapes, where its JPEGs are generated "
                                          "(default for shapes: OUTPUT_FOLDER/shapes_raw)")
    p.add_argument("--captions-csv", help="for --dataset folder: CSV with columns image,caption, "
                                          "several rows per image")
    p.add_argument("--output-folder", default="data/shapes", help="where the HDF5/JSON files go (default: data/shapes)")
    p.add_argument("--captions-per-image", type=bounded_int(1, MAX_CAPTIONS_PER_IMAGE), default=5,
                   help="captions kept per image: sampled with --seed when there are more, repeated when "
                        f"fewer; up to {MAX_CAPTIONS_PER_IMAGE} (default: 5)")
    p.add_argument("--min-word-freq", type=positive_int, default=5,
                   help="training words seen fewer times become <unk>; whole-word vocabularies only (default: 5)")
    p.add_argument("--word-map", metavar="WORDMAP.json",
                   help="encode the captions with this word map instead of building one from the training "
                        "captions, e.g. the old tutorial's WORDMAP_*.json, so that a model converted with "
                        "convert_tutorial.py can be scored on the outputs; words it lacks become <unk> "
                        "(default: build one)")
    p.add_argument("--vocab", choices=["word", "bpe"], default="word",
                   help="whole words seen --min-word-freq times, or BPE sub-words learnt from the training "
                        "captions (Hugging Face tokenizers), so that rare and misspelt words are spelled in "
                        "pieces instead of becoming <unk> (default: word)")
    p.add_argument("--bpe-merges", type=bounded_int(1, 1_000_000), default=4000,
                   help="--vocab bpe: number of merges, i.e. sub-words beyond the characters (default: 4000)")
    p.add_argument("--max-len", type=bounded_int(1, MAX_CAPTION_WORDS), default=50,
                   help=f"captions longer than this many words are dropped; up to {MAX_CAPTION_WORDS} (default: 50)")
    p.add_argument("--image-size", type=bounded_int(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=256,
                   help=f"images are resized to S x S, S from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default: 256)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed for caption sampling, the CSV split and the "
                                                              "shapes generator, from 0 to 2^31 - 1 (default: 0)")
    p.add_argument("--val-fraction", type=probability, default=0.1, help="for --dataset folder: share of images "
                                                                         "in val, in [0, 1) (default: 0.1)")
    p.add_argument("--test-fraction", type=probability, default=0.1, help="for --dataset folder: share of images "
                                                                          "in test, in [0, 1) (default: 0.1)")
    shapes_count = bounded_int(1, 1_000_000)
    p.add_argument("--shapes-train", type=shapes_count, default=1000, help="shapes: training images (default: 1000)")
    p.add_argument("--shapes-val", type=shapes_count, default=150, help="shapes: validation images (default: 150)")
    p.add_argument("--shapes-test", type=shapes_count, default=150, help="shapes: test images (default: 150)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images and list them in SKIPPED_*.json instead of stopping (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--workers", type=bounded_int(0, 256), default=min(4, os.cpu_count() or 1),
                   help="processes decoding images; 0 decodes in this process (default: min(4, CPUs))")
    p.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"images with more pixels are refused as decompression bombs (default: {DEFAULT_MAX_PIXELS})")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    import shapes
    from datasets import create_input_files, read_word_map
    from sources import read_csv_folder, read_karpathy
    if args.word_map and args.vocab == "bpe":
        raise SatError("--word-map gives a whole-word vocabulary: it cannot combine with --vocab bpe")
    word_map = read_word_map(args.word_map) if args.word_map else None  # a bad one stops us before any work
    boxes = None
    if args.dataset == "shapes":
        raw = Path(args.image_folder or Path(args.output_folder) / "shapes_raw")
        print(f"generating the shapes dataset in {raw}")
        source, sidecar = shapes.generate(raw, args.shapes_train, args.shapes_val, args.shapes_test, seed=args.seed)
        records, boxes = read_karpathy(source, raw), read_json(sidecar)
    elif args.dataset == "folder":
        if not args.captions_csv or not args.image_folder:
            raise SatError("--dataset folder needs --captions-csv and --image-folder")
        if args.val_fraction + args.test_fraction >= 1:
            raise SatError("--val-fraction and --test-fraction must leave images for training (their sum is "
                           f"{args.val_fraction + args.test_fraction:g})")
        source = args.captions_csv
        records = read_csv_folder(source, args.image_folder, args.val_fraction, args.test_fraction, args.seed)
    else:
        if not args.karpathy_json or not args.image_folder:
            raise SatError(f"--dataset {args.dataset} needs --karpathy-json and --image-folder")
        source = args.karpathy_json
        records = read_karpathy(source, args.image_folder)
    data_name = create_input_files(records, args.dataset, args.output_folder, args.captions_per_image,
                                   args.min_word_freq, args.max_len, args.image_size, args.seed,
                                   args.skip_bad_images, args.overwrite, args.workers, args.max_image_pixels,
                                   boxes, str(source), word_map, args.bpe_merges if args.vocab == "bpe" else None)
    print(f"wrote {args.output_folder}/*_{data_name}.* (use --data-folder {args.output_folder} "
          f"--data-name {data_name})")


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])  # before torch is imported, so that --help and mistakes answer at once
    run_cli(lambda _argv: run(arguments))
