"""Benchmark training and decoding speed on generated shapes data, against the old reference tutorial.

Run:
  .venv/bin/python bench.py                        # ResNet-101 at 14x14, dims 512, 256 px (minutes)
  .venv/bin/python bench.py --quick                # tiny model and data: a smoke run of every path
  .venv/bin/python bench.py --paths train_cached eval_end2end --steps 20

What it measures, each path in its own fresh process (so each gets its own peak RSS and CUDA peak), with
--warmup untimed steps first, through the project's own code (trainer.from_args, Trainer.train_step,
features.cached_features, inference.caption_split), with random encoder weights (speed does not depend on them):
  train_frozen    captions/s, encoder frozen, every batch of images through the encoder
  cache_build     images/s of building the train split's fp16 feature cache (a one-time cost)
  train_cached    captions/s, decoder trained from that cache
  train_finetune  captions/s, encoder layers 2-4 trained too (--fine-tune-encoder)
  eval_end2end    images/s per beam size, encoder + batched beam search (the encoder time counts in each)
  eval_cached     images/s per beam size, batched beam search from the cached features
  train_scst      sampled captions/s of self-critical training from the cache (5 samples per image, mean
                  baseline), and the share of the step spent computing the CIDEr-D rewards
The encoder weights are torchvision's random init with zero_init_residual=True, saved once into --out and
passed as --encoder-weights PATH: with the plain random init (--encoder-weights none) ResNet-101's activations
grow block after block until about 7% of the fp16 cache is inf, and every cached training step would be
skipped as non-finite. A timed training step with a non-finite loss stops the benchmark for the same reason.
Training steps include reading their batch from the HDF5 files, as train.py does (--workers 0). Decoding is
capped at the steps the longest test caption needs (its <end> included). By default the decoder is untrained
and seldom emits <end>, a worst case; --decoder-epochs N first trains it on the cached features (untimed) so
that its captions end as a trained model's do. The mean decoded caption length and the share of captions that
ended are printed under the table. On a GPU, pass more --steps (e.g. 100): steps are short.
The reference numbers are the tutorial's, measured on 2 CPU cores without a GPU (2,000 train images,
batch 32 captions, one image at a time in eval). The data folder under --out is reused while its settings match.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torchvision
from torch.utils.data import DataLoader

import shapes
from config import train_parser
from datasets import ImageCaptionsDataset, base_name, create_input_files, word_map_file
from devices import resolve_device
from features import cached_features, feature_file
from inference import caption_split
from sources import read_karpathy
from trainer import EpochBatches, Trainer
from trainer import from_args as trainer_from_args
from utils import SatError, atomic_path, non_negative_int, positive_int, read_json, run_cli, \
    write_json

PATHS = ("train_frozen", "cache_build", "train_cached", "train_finetune", "eval_end2end", "eval_cached", "train_scst")
DATA_NAME = base_name("shapes", 5, 5)
# Flags left unset take these; the model settings are not flags, the comparison with the reference is for them.
FULL = {"image_size": 256, "encoder": "resnet101", "encoded_size": 14, "dim": 512, "steps": 10, "warmup": 2,
        "train_images": 200, "images_per_batch": 6, "cached_batch_images": 32, "eval_images": 64, "eval_batch": 32,
        "decoder_epochs": 0}
QUICK = {"image_size": 64, "encoder": "resnet18", "encoded_size": 4, "dim": 32, "steps": 2, "warmup": 1,
         "train_images": 8, "images_per_batch": 2, "cached_batch_images": 4, "eval_images": 4, "eval_batch": 2,
         "decoder_epochs": 0}
# The tutorial's numbers: captions/s, images/s at each beam size, peak memory in GB.
REFERENCE = {"train_frozen": 3.2, "train_cached": 3.2, "train_finetune": 1.6}
REFERENCE_EVAL = {1: 4.7, 3: 3.2, 5: 2.8}
REFERENCE_PEAK = {"train_frozen": 3.0, "train_cached": 3.0, "train_finetune": 7.8}
TARGETS = {"train_cached": 10.0, "train_finetune": 3.0, "eval_end2end beam 5": 20.0, "eval_cached beam 5": 20.0}
LABELS = {"train_frozen": "train, frozen encoder, from images", "cache_build": "feature cache build (one-time)",
          "train_cached": "train, frozen encoder, from fp16 cache", "train_finetune": "train, fine-tuning encoder",
          "eval_end2end": "eval beam {k}, end-to-end (encoder + search)",
          "eval_cached": "eval beam {k}, from cache (search only)",
          "train_scst": "train, SCST from fp16 cache (5 samples per image)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f, q = FULL, QUICK

    def count(flag: str, key: str, text: str) -> None:
        p.add_argument(flag, type=positive_int, help=f"{text} (default: {f[key]}; with --quick: {q[key]})")

    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    count("--steps", "steps", "timed optimizer steps per training path")
    count("--warmup", "warmup", "untimed steps before them; for eval, untimed passes over the val split")
    count("--train-images", "train_images", "training images generated (the steps repeat them as needed)")
    count("--images-per-batch", "images_per_batch", "images per batch of train_frozen and train_finetune, "
                                                    "each with its 5 captions")
    count("--cached-batch-images", "cached_batch_images", "images per batch of train_cached and of the cache build")
    count("--eval-images", "eval_images", "test images decoded per beam size")
    count("--eval-batch", "eval_batch", "images decoded together; also the size of the val split the eval "
                                        "warm-up decodes")
    p.add_argument("--decoder-epochs", type=non_negative_int,
                   help="eval paths: first train the decoder this many epochs on the cached train features "
                        "(untimed, once, kept in --out), so that beams end as a trained model's do; 0 decodes "
                        f"with the untrained decoder, a worst case (default: {f['decoder_epochs']})")
    p.add_argument("--beam-sizes", type=positive_int, nargs="+", default=[1, 3, 5],
                   help="beam sizes of the eval paths (default: 1 3 5)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), metavar="PATH",
                   help=f"paths to run, from {', '.join(PATHS)}, always in that order; train_cached and "
                        "eval_cached build the caches themselves (untimed, adding to their peak memory) unless "
                        "cache_build ran first (default: all)")
    p.add_argument("--out", default="bench_out", help="folder for the generated data and the feature caches "
                                                      "(default: bench_out)")
    p.add_argument("--json", help="write the results here (default: OUT/bench.json)")
    p.add_argument("--amp", action="store_true", help="mixed precision: training as train.py --amp (CUDA only), "
                                                      "decoding as eval.py --amp (bf16, also on CPUs with native "
                                                      "bf16) (default: off)")
    p.add_argument("--quick", action="store_true", help="tiny model (resnet18, 4x4 grid, dims 32, 64 px) and "
                                                        "counts: a smoke run of every path (default: off)")
    p.add_argument("--worker", choices=PATHS, metavar="PATH",
                   help="internal: measure this one path and write its result into OUT (default: off, run every "
                        "path in a subprocess)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.json = args.json or str(Path(args.out) / "bench.json")
    return args


# ------------------------------------------------------------------------------------------------------- data

def data_folder(args: argparse.Namespace) -> Path:
    """One folder per data setting, so a run with the same settings reuses it."""
    return Path(args.out) / f"shapes_{args.image_size}px_{args.train_images}_{args.eval_batch}_{args.eval_images}"


def prepare_data(args: argparse.Namespace) -> None:
    folder = data_folder(args)
    if word_map_file(folder, DATA_NAME).is_file():  # written together with every other output, or not at all
        print(f"data: reusing {folder}")
        return
    start = time.perf_counter()
    raw = folder / "shapes_raw"
    source, _ = shapes.generate(raw, args.train_images, args.eval_batch, args.eval_images, side=args.image_size)
    create_input_files(read_karpathy(source, raw), "shapes", folder, image_size=args.image_size, overwrite=True,
                       source=str(source))
    print(f"data: generated {folder} in {time.perf_counter() - start:.0f} s")


def encoder_weights(args: argparse.Namespace) -> Path:
    return Path(args.out) / f"{args.encoder}_zero_init_residual.pt"


def prepare_encoder_weights(args: argparse.Namespace) -> None:
    """Random weights whose features stay small enough for the fp16 cache (see the module docstring)."""
    path = encoder_weights(args)
    if not path.is_file():
        torch.manual_seed(0)  # the same file, hence the same cache fingerprint, on every machine
        model = getattr(torchvision.models, args.encoder)(weights=None, zero_init_residual=True)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)


# ----------------------------------------------------------------------------------------------------- workers

def build_trainer(args: argparse.Namespace, batch_images: int, *flags: str) -> Trainer:
    """A Trainer exactly as train.py builds one from these flags."""
    d = str(args.dim)
    argv = ["--data-folder", str(data_folder(args)), "--data-name", DATA_NAME, "--device", args.device,
            "--checkpoint-dir", str(Path(args.out) / "checkpoints"), "--encoder", args.encoder,
            "--encoder-weights", str(encoder_weights(args)), "--encoded-size", str(args.encoded_size),
            "--embed-dim", d, "--attention-dim", d, "--decoder-dim", d, "--batch-size", str(batch_images), *flags]
    trainer = trainer_from_args(train_parser().parse_args(argv + ["--amp"] * args.amp))
    trainer.close()  # the benchmark times steps; each worker process is alone with its folder anyway
    return trainer


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA work is asynchronous: wait for it before reading the clock
    return time.perf_counter()


def full_batches(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches drawn as Trainer.train_epoch draws them, epoch after epoch; short last batches are left out
    so that every timed step has the stated batch size."""
    for epoch in itertools.count():
        sampler = EpochBatches(len(trainer.train_set), trainer.tc.batch_size, trainer.tc.seed, epoch)
        loader = DataLoader(trainer.train_set, batch_sampler=sampler, pin_memory=trainer.device.type == "cuda")
        for inputs, captions, lengths, _ in loader:
            if len(inputs) == trainer.tc.batch_size:
                yield inputs, captions, lengths


class TimedReward:
    """Wraps the CIDEr-D reward so that the benchmark can report the share of the step it takes."""

    def __init__(self, cider: object, device: torch.device):
        self.cider, self.device, self.seconds = cider, device, 0.0

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        start = clock(self.device)
        rewards = self.cider(*tensors)
        self.seconds += clock(self.device) - start
        return rewards


def training_flags(args: argparse.Namespace, path: str) -> list[str]:
    if path == "train_scst":  # SCST starts from a cross-entropy checkpoint: an untrained one, saved first, does
        start_from = build_trainer(args, args.cached_batch_images, "--cache-features").save("xe")
        return ["--cache-features", "--scst", "--resume", str(start_from), "--val-beam-size", "1"]
    return {"train_frozen": [], "train_cached": ["--cache-features"], "train_finetune": ["--fine-tune-encoder"]}[path]


def bench_training(args: argparse.Namespace, path: str) -> list[dict]:
    batch = args.cached_batch_images if path in ("train_cached", "train_scst") else args.images_per_batch
    trainer = build_trainer(args, batch, *training_flags(args, path))
    scst = trainer.tc.scst
    if scst:
        trainer.cider = TimedReward(trainer.cider, trainer.device)
    trainer.model.train()
    batches = full_batches(trainer)
    for _ in range(args.warmup):
        trainer.train_step(*next(batches))
    if scst:
        trainer.cider.seconds = 0.0
    captions, skipped = 0, 0  # with SCST, the sampled ones
    start = clock(trainer.device)
    for _ in range(args.steps):
        inputs, caps, lengths = next(batches)
        skipped += not trainer.train_step(inputs, caps, lengths)
        captions += caps.shape[0] * (trainer.tc.scst_samples if scst else caps.shape[1])
    seconds = clock(trainer.device) - start
    if skipped:  # such a step stops before the backward pass: its time is not a training step's
        raise SatError(f"{path}: {skipped} of {args.steps} timed steps had a non-finite loss")
    row = {"path": path, "value": captions / seconds, "unit": "sampled captions/s" if scst else "captions/s",
           "seconds": seconds, "batch": f"{batch} img = {captions // args.steps} {'samples' if scst else 'cap'}"}
    return [{**row, "reward_share": trainer.cider.seconds / seconds} if scst else row]


def bench_cache_build(args: argparse.Namespace) -> list[dict]:
    trainer = build_trainer(args, args.cached_batch_images)
    encoder, folder, device = trainer.model.encoder, data_folder(args), trainer.device
    # A cache that is still valid would just be reused, and the build is what is timed here.
    feature_file(folder, DATA_NAME, "train", encoder).unlink(missing_ok=True)
    start = clock(device)
    cached_features(encoder, folder, DATA_NAME, "train", device, args.cached_batch_images)
    seconds = clock(device) - start
    for split in ("val", "test"):  # for train_cached and eval_cached, so that they only read
        cached_features(encoder, folder, DATA_NAME, split, device, args.cached_batch_images)
    return [{"path": "cache_build", "value": args.train_images / seconds, "unit": "images/s", "seconds": seconds,
             "batch": f"{args.cached_batch_images} img"}]


def trained_decoder(args: argparse.Namespace) -> Path:
    """The decoder's weights after --decoder-epochs of train.py's training on the cached features; trained by
    the first eval path that needs them, reused by the next."""
    path = Path(args.out) / f"decoder_{args.encoder}_{args.encoded_size}x{args.encoded_size}_{args.dim}_" \
                            f"{args.train_images}img_{args.decoder_epochs}ep.pt"
    if not path.is_file():
        trainer = build_trainer(args, args.cached_batch_images, "--cache-features", "--epochs",
                                str(args.decoder_epochs), "--decoder-lr", "1e-3")
        trainer.run()
        with atomic_path(path) as tmp:
            torch.save(trainer.model.decoder.state_dict(), tmp)
    return path


def bench_eval(args: argparse.Namespace, path: str) -> list[dict]:
    trainer = build_trainer(args, args.eval_batch)  # the model exactly as train.py would start it
    model, word_map, device, folder = trainer.model, trainer.word_map, trainer.device, data_folder(args)
    if args.decoder_epochs:
        model.decoder.load_state_dict(torch.load(trained_decoder(args), map_location=device, weights_only=True))

    def split(name: str) -> ImageCaptionsDataset:
        features = None
        if path == "eval_cached":
            features = cached_features(model.encoder, folder, DATA_NAME, name, device, args.eval_batch)
        return ImageCaptionsDataset(folder, DATA_NAME, name, features=features)

    test, val = split("test"), split("val")
    max_len = int(test.files.lengths.max()) - 2  # words of the longest caption: decoding runs one more step
    for _ in range(args.warmup):
        caption_split(model, val, word_map, args.beam_sizes, max_len, args.eval_batch, device, progress=False,
                      amp=args.amp)
    rows = []
    for k in args.beam_sizes:
        start = clock(device)
        captions = caption_split(model, test, word_map, [k], max_len, args.eval_batch, device, progress=False,
                                 amp=args.amp)[k]
        seconds = clock(device) - start
        words = sum(len(c.tokens) for c in captions) / len(captions)
        rows.append({"path": path, "beam": k, "value": len(test) / seconds, "unit": "images/s", "seconds": seconds,
                     "batch": f"{args.eval_batch} img", "max_len": max_len, "mean_words": words,
                     "finished": sum(c.finished for c in captions) / len(captions)})
    return rows


def run_worker(args: argparse.Namespace) -> None:
    path = args.worker
    if path == "cache_build":
        rows = bench_cache_build(args)
    elif path.startswith("eval"):
        rows = bench_eval(args, path)
    else:
        rows = bench_training(args, path)
    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # ru_maxrss is in KiB
    if resolve_device(args.device).type == "cuda":
        peak["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    write_json(worker_result(args, path), [{**row, **peak} for row in rows])


def worker_result(args: argparse.Namespace, path: str) -> Path:
    return Path(args.out) / f"worker_{path}.json"


# ------------------------------------------------------------------------------------------------------ report

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": f"{device.type} ({name})", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}


def settings(args: argparse.Namespace) -> dict:
    keys = ["quick", "image_size", "encoder", "encoded_size", "dim", "images_per_batch", "cached_batch_images",
            "eval_batch", "beam_sizes", "steps", "warmup", "train_images", "eval_images", "decoder_epochs", "amp"]
    return {k: getattr(args, k) for k in keys}


def with_reference(row: dict, compare: bool) -> dict:
    """Adds the reference value, speed-up and target a row is compared with (none for --quick's tiny model)."""
    key = f"{row['path']} beam {row['beam']}" if "beam" in row else row["path"]
    reference = REFERENCE_EVAL.get(row["beam"]) if "beam" in row else REFERENCE.get(row["path"])
    reference = reference if compare else None
    speedup = row["value"] / reference if reference else None
    target = TARGETS.get(key) if compare else None
    return {**row, "label": LABELS[row["path"]].format(k=row.get("beam")), "reference": reference,
            "speedup": speedup, "target": target, "target_met": None if target is None else speedup >= target,
            "reference_peak_gb": REFERENCE_PEAK.get(row["path"])}


def table(rows: list[dict], cuda: bool) -> str:
    def num(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    columns = ["path", "value", "unit", "batch", "reference", "speed-up", "target", "peak RSS (GB)", "ref peak (GB)"]
    lines = ["| " + " | ".join(columns + ["peak CUDA (GB)"] * cuda) + " |", "|---" * (len(columns) + cuda) + "|"]
    for r in rows:
        target = "-" if r["target"] is None else f">= {r['target']:g}x {'met' if r['target_met'] else 'MISSED'}"
        cells = [r["label"], num(r["value"]), r["unit"], r["batch"], num(r["reference"], "g"),
                 num(r["speedup"], ".1f") + "x" * (r["speedup"] is not None), target, num(r["peak_rss_gb"]),
                 num(r["reference_peak_gb"], ".1f")] + [num(r.get("peak_cuda_gb"))] * cuda
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    device = resolve_device(args.device)
    if max(args.images_per_batch, args.cached_batch_images) > args.train_images:
        raise SatError("--train-images must be at least --images-per-batch and --cached-batch-images")
    host = machine(device)  # the load average before this benchmark adds its own
    prepare_data(args)
    prepare_encoder_weights(args)
    rows = []
    for path in (p for p in PATHS if p in args.paths):
        print(f"--- {path}", flush=True)
        start = time.perf_counter()
        if subprocess.run([sys.executable, __file__, *argv, "--worker", path]).returncode != 0:
            raise SatError(f"the {path} worker failed (its error is above)")
        rows += [with_reference(r, compare=not args.quick) for r in read_json(worker_result(args, path))]
        print(f"--- {path}: {time.perf_counter() - start:.0f} s in all", flush=True)
    print(f"\n{host['device']}, torch {host['torch']}, {host['threads']} threads, {host['cpus']} CPUs, "
          f"load average {host['load_average']} at start")
    print(", ".join(f"{k} {v}" for k, v in settings(args).items()) + "\n")
    print(table(rows, device.type == "cuda"))
    for path in ("eval_end2end", "eval_cached"):
        evals = [r for r in rows if r["path"] == path]
        if evals:
            words = " / ".join(f"{r['mean_words']:.1f}" for r in evals)
            beams = " / ".join(str(r["beam"]) for r in evals)
            ended = " / ".join(f"{100 * r['finished']:.0f}%" for r in evals)
            print(f"{path}: at most {evals[0]['max_len'] + 1} decoding steps per batch; mean decoded caption {words} "
                  f"words at beam {beams}; {ended} of the captions ended with <end>")
    for r in rows:
        if "reward_share" in r:
            print(f"train_scst: {100 * r['reward_share']:.1f}% of the step time computes the CIDEr-D rewards")
    write_json(args.json, {"machine": host, "settings": settings(args), "rows": rows})
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    run_cli(main)
