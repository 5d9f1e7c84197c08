"""Convert a checkpoint of the old PyTorch tutorial (a-PyTorch-Tutorial-to-Image-Captioning) into a sat checkpoint.

The tutorial pickled its whole Encoder and DecoderWithAttention; this reads them through an allow-list (their
classes become inert stand-ins, nothing from the file runs), and writes their weights with the ModelConfig
that computes what the tutorial computed and its word map: a checkpoint eval.py and caption.py load with no
flags. The tutorial's code is not needed.

Example:
  python convert_tutorial.py --checkpoint BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \\
      --word-map WORDMAP_coco_5_cap_per_img_5_min_word_freq.json --out checkpoints/tutorial.pt \\
      --safetensors checkpoints/tutorial.safetensors --trust-checkpoint
"""
from __future__ import annotations

import argparse
import sys

from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, bounded_int, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the tutorial's BEST_checkpoint_*.pth.tar (or checkpoint_*)")
    p.add_argument("--word-map", required=True, help="the tutorial's WORDMAP_*.json it was trained with")
    p.add_argument("--out", required=True, help="the sat checkpoint to write (e.g. checkpoints/tutorial.pt)")
    p.add_argument("--safetensors", metavar="PATH.safetensors",
                   help="also write the converted model as safetensors, for sharing (default: none)")
    p.add_argument("--image-size", type=bounded_int(1, 4096), default=256,
                   help="side the model's images are resized to; the tutorial's is 256 (default: 256)")
    add_trust_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    if not args.trust_checkpoint:
        raise SatError(f"{args.checkpoint}: a tutorial checkpoint is a pickle, and unpickling a file can run code; "
                       "sat reads it through an allow-list of the tutorial's classes and tensors, but only "
                       "with --trust-checkpoint: pass it if you trust the file's source")
    from tutorial import convert
    converted = convert(args.checkpoint, args.word_map, args.out, args.safetensors, args.image_size)
    cfg, old = converted["model_config"], converted["tutorial"]
    trained = ", ".join(f"{k} {v}" for k, v in old.items() if isinstance(v, (int, float)))
    print(f"converted {args.checkpoint}{f' ({trained})' if trained else ''}: {cfg['encoder']} encoder pooled to "
          f"{cfg['encoded_size']}x{cfg['encoded_size']}, embed/attention/decoder {cfg['embed_dim']}/"
          f"{cfg['attention_dim']}/{cfg['decoder_dim']}, {cfg['vocab_size']} words")
    print(f"wrote {args.out}" + (f" and {args.safetensors}" if args.safetensors else ""))


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])  # before torch is imported, so that --help and mistakes answer at once
    run_cli(lambda _argv: run(arguments))
