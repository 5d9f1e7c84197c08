"""The training loop: cross-entropy with the doubly stochastic attention penalty, or self-critical sequence
training (SCST); validation by real decoding, early stopping, checkpoints, exact resume, torchrun.

A run has phases, each a (loss, encoder) pair: cross-entropy with the encoder frozen (stage 1), cross-entropy with
it fine-tuned (stage 2), SCST. `build_trainer` resumes a checkpoint exactly when the phase is the same, and starts
a new phase from its weights (a new optimizer and schedule, the starting model validated as the score to beat)
when the command line asks for another one.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import distributed
from augment import Augment
import embeddings
import metrics
import scst
from board import IMAGES, Board, run_name
import vocab
from checkpoints import Progress, load_checkpoint, model_from_checkpoint, save_checkpoint
from config import ModelConfig, TrainConfig, defaults, explicit, flag, from_dict
from datasets import ImageCaptionsDataset, check_word_map, read_word_map, word_map_file
from devices import autocast_dtype, resolve_device, restore_rng, restore_scaler, rng_state
from features import cached_features
from inference import caption_split, encode
from models import Caption, CaptionModel, beam_search
from plots import plot_curves
from utils import FolderLock, SatError, remove_stale_temp_files

METRIC_NAMES = {"bleu4": "BLEU-4", "cider": "CIDEr-D"}


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


def loss_terms(nll: torch.Tensor, top5: torch.Tensor, alphas: torch.Tensor,
               lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over real tokens, the doubly stochastic penalty, the top-5 hits, and log p(caption), from a
    decoder's teacher-forcing outputs: nll and top5 (N, T), alphas (N, T, P), lengths (B, K) with N = B*K.

    The penalty is the paper's eq. 14, sum_i (1 - sum_t alpha_ti)^2 summed over the P pixels, averaged over the
    captions.
    """
    tokens = (lengths - 1).sum().clamp(min=1)
    xe = nll.sum() / tokens
    penalty = ((1.0 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()
    return xe, penalty, top5.sum().float(), -nll.detach().sum(dim=1)


class Trainer:
    """One phase of training: its model, data, optimizer, progress, and the checkpoints it writes."""

    def __init__(self, tc: TrainConfig, model: CaptionModel, word_map: dict[str, int], device: torch.device,
                 pretrained_rows: torch.Tensor | None = None):
        self.tc, self.model, self.word_map, self.device = tc, model, word_map, device
        # Embedding rows initialised from GloVe (saved in checkpoints); --freeze-embeddings keeps them fixed.
        self.pretrained_rows = pretrained_rows
        if tc.freeze_embeddings and pretrained_rows is None:
            raise SatError("--freeze-embeddings keeps pretrained embedding rows fixed: start the run with "
                           "--embeddings glove (or a GloVe file)")
        self.pad = word_map["<pad>"]
        # A BPE vocabulary's tokenizer (JSON), saved in every checkpoint with the word map it defines.
        self.tokenizer_json = vocab.load_tokenizer_json(tc.data_folder, tc.data_name)
        self.out = Path(tc.checkpoint_dir)  # nothing is written there before run() holds its lock
        self.phase_from: str | None = None  # the checkpoint a new phase starts from, scored first by run()
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
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        self.stop_signal: int | None = None
        self.batch_log_likelihood = 0.0  # mean log p(caption) of the last batch, all ranks, where a decoder needs it
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss
        use_cache = tc.cache_features and not tc.fine_tune_encoder
        if use_cache and tc.augment:
            raise SatError("--augment changes every image at every epoch, and the feature cache holds one view of "
                           "each: drop --cache-features (or --augment)")
        self.augment = Augment(word_map, model.config.vocab == "bpe") if tc.augment else None
        self.train_set = ImageCaptionsDataset(tc.data_folder, tc.data_name, "train")
        self.val_set = ImageCaptionsDataset(tc.data_folder, tc.data_name, "val")
        # Everything is checked: from here on the checkpoint folder is this run's (until run() ends, or close()),
        # and a second run is refused before it builds a feature cache or writes anything.
        self.lock = self._lock_folder()
        try:
            if use_cache:
                for split, dataset in (("train", self.train_set), ("val", self.val_set)):
                    with distributed.main_first():  # rank 0 builds the cache; the others then find it up to date
                        dataset.use_features(cached_features(model.encoder, tc.data_folder, tc.data_name, split,
                                                             device, batch_size=tc.batch_size))
            self.cider = self._cider() if tc.scst else None
        except BaseException:
            self.close()
            raise
        on_board = tc.tensorboard and distributed.is_main()
        self.board = Board(self.out / "tensorboard" / run_name(*tc.phase())) if on_board else None
        # One loader for the whole run, so that worker processes persist; each epoch only moves the sampler.
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

    # -------------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        extras = {"tokenizer": self.tokenizer_json} if self.tokenizer_json is not None else {}
        if self.pretrained_rows is not None:
            extras["pretrained_rows"] = self.pretrained_rows
        return {"model_config": self.model.config.to_dict(), "train_config": asdict(self.tc),
                "word_map": self.word_map, **extras, "image_size": self.train_set.files.image_size,
                "encoder": self.model.encoder.state_dict(), "decoder": self.model.decoder.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.device), "progress": asdict(self.progress)}

    def restore(self, checkpoint: dict) -> None:
        """Continue exactly where the checkpoint stopped (the learning rates live in the optimizer's state)."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        restore_scaler(self.scaler, checkpoint.get("scaler"))
        self.progress = from_dict(Progress, checkpoint["progress"], "checkpoint")
        restore_rng(checkpoint["rng"], self.device)

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
        """Train until --epochs or early stopping; returns the best validation score. Then the checkpoint folder
        is given back."""
        try:
            if self.phase_from is not None:
                self.start_phase(self.phase_from)
                self.phase_from = None
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Give the checkpoint folder back: another run may train into it now (run() does this when it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _lock_folder(self) -> FolderLock | None:
        """Rank 0 locks the checkpoint folder (utils.FolderLock) and clears the temp files of killed runs' saves;
        every rank of a torchrun job stops alike if another run holds it."""
        lock = FolderLock(self.out, "train.py run") if distributed.is_main() else None
        problem = distributed.from_main(lambda: lock.try_acquire())
        if problem:
            raise SatError(problem)
        if lock is None:
            return None
        if lock.took_over:
            print(f"note: took over {lock.path} from pid {lock.took_over.get('pid')} on "
                  f"{lock.took_over.get('host')}, which no longer runs")
        remove_stale_temp_files(self.out)  # utils.atomic_path's temp files, left by a run killed mid-write
        return lock

    def _train(self) -> float:
        tc, p = self.tc, self.progress
        try:
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
        finally:
            if self.board is not None:
                self.board.close()
        return p.best_score

    def train_epoch(self) -> None:
        tc, p, model = self.tc, self.progress, self.model
        model.train()
        self.sampler.epoch, self.sampler.skip = p.epoch, p.batches_done
        bar = tqdm(self.loader, desc=f"epoch {p.epoch}", unit="batch", initial=p.batches_done,
                   total=p.batches_done + len(self.sampler), disable=not distributed.is_main())
        for inputs, captions, lengths, _ in bar:
            ok = self.train_step(inputs, captions, lengths)
            self.bad_steps = 0 if ok else self.bad_steps + 1  # counted across epochs: short epochs must not reset it
            if self.bad_steps >= tc.max_bad_steps:
                last = (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                        else "no checkpoint was written yet")
                raise SatError(f"training stopped: {self.bad_steps} consecutive steps had a non-finite loss (lower "
                               f"the learning rate, check --alpha-c, or disable --amp); {last}")
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
        if self.augment is not None:
            inputs, captions = self.augment(inputs, captions)
        stand_in = self.sampler.stand_in(p.batches_done)  # this rank's share of the batch weighs zero
        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            encoder_out = encode(self.encoder, inputs, self.train_set.features is not None)
            terms, sums = (self.scst_loss if tc.scst else self.xe_loss)(encoder_out, captions, lengths, stand_in)
            loss = sum(term for term, _ in terms)
        self.optimizer.zero_grad(set_to_none=True)
        counts = [0 if stand_in else n for _, n in terms]
        if stand_in:
            sums = dict.fromkeys(sums, 0.0)
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
        if self.tc.freeze_embeddings:
            # Zero from the first step on, so that Adam's moments for these rows stay zero and so do their updates.
            self.model.decoder.embedding.weight.grad[self.pretrained_rows] = 0.0
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([q for g in self.optimizer.param_groups for q in g["params"]], tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        p.step += 1
        self.model.decoder.end_step(self.batch_log_likelihood)
        batch = dict(zip(sums, totals[len(terms):]))
        for name, total in batch.items():
            setattr(p, name, getattr(p, name) + type(getattr(p, name))(total))
        if self.board is not None:
            self.board.train(self.averages(batch), p.step)
        return True

    def xe_loss(self, encoder_out: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                stand_in: bool) -> tuple[list[tuple[torch.Tensor, int]], dict[str, float]]:
        """Cross-entropy (a mean over tokens), the doubly stochastic penalty where attention over pixels sums to 1
        and hard attention's REINFORCE term (each a mean over captions), each with the count it averages over,
        and this batch's sums for Progress."""
        decoder = self.model.decoder  # its flags and auxiliary loss; its forward runs through self.decoder (DDP)
        nll, top5, alphas = self.decoder(encoder_out, captions, lengths)
        xe, penalty, top5, log_likelihood = loss_terms(nll, top5, alphas, lengths)
        n, rows = int((lengths - 1).sum()), nll.size(0)
        terms = [(xe, n)]
        if decoder.doubly_stochastic:
            terms.append((self.tc.alpha_c * penalty, rows))
        self.batch_log_likelihood = 0.0
        if decoder.needs_log_likelihood:
            # The mean over the whole batch (every rank's share), so that every rank moves its baseline alike.
            total, count = distributed.sum_over_ranks([0.0, 0] if stand_in else [float(log_likelihood.sum()), rows])
            self.batch_log_likelihood = total / max(count, 1)
            aux = decoder.auxiliary_loss(log_likelihood, self.batch_log_likelihood, self.tc.hard_entropy)
            terms.append((aux, rows))
        return terms, {"loss_sum": float(xe.detach()) * n, "top5_sum": float(top5), "tokens": n}

    def scst_loss(self, encoder_out: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                  stand_in: bool) -> tuple[list[tuple[torch.Tensor, int]], dict[str, float]]:
        """Self-critical policy gradient: samples rewarded by CIDEr-D against the image's references."""
        tc, n = self.tc, self.tc.scst_samples
        B, end, pad = captions.size(0), self.word_map["<end>"], self.pad
        self.batch_log_likelihood = 0.0
        tokens, log_probs, mask = self.decoder(encoder_out, self.word_map, n, tc.scst_max_len)  # scst.Sampler
        with torch.no_grad():
            refs, ref_lengths = captions[:, :, 1:int(lengths.max()) - 1], lengths - 2  # words only
            rewards = self.cider(tokens.view(B, n, -1), scst.caption_lengths(tokens, end, pad).view(B, n), refs,
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
        return self.averages(asdict(self.progress))

    def averages(self, sums: dict[str, float]) -> dict[str, float]:
        """Averages from Progress's sums (of an epoch so far, or of one batch)."""
        averages = {"train_loss": sums["loss_sum"] / max(sums["tokens"], 1)}
        if self.tc.scst:
            return {**averages, "train_cider": 100 * sums["reward_sum"] / max(sums["samples"], 1)}
        return {**averages, "train_top5": 100 * sums["top5_sum"] / max(sums["tokens"], 1)}

    def validate(self) -> tuple[dict[str, float], list[Caption]]:
        """BLEU-1..4 and CIDEr-D of real (beam search) decoding of the validation split, and this rank's captions
        (rank 0's are those of the split's first images)."""
        tc = self.tc
        # Each rank decodes its share of the images; rank 0 scores all the captions and tells the others.
        captions = caption_split(self.model, self.val_set, self.word_map, [tc.val_beam_size], tc.val_max_len,
                                 batch_size=64, device=self.device, progress=distributed.is_main(),
                                 indices=distributed.shard(len(self.val_set)))[tc.val_beam_size]
        hypotheses = distributed.gather(self.model.sentences(captions, self.word_map))
        return distributed.from_main(
            lambda: metrics.caption_scores(self.val_set.references, hypotheses, ("bleu", "cider"))[0]), captions

    def start_phase(self, source: str) -> None:
        """Score the model a new phase starts from (stage 2, SCST): it is the first best checkpoint to beat."""
        p = self.progress
        scores, captions = self.validate()
        p.best_score = scores[self.tc.early_stop_metric]
        self.save("best")
        self.log({"epoch": -1, "step": 0, "phase_from": source, **{f"val_{k}": v for k, v in scores.items()},
                  "time": time.time()}, captions)
        print(f"{self.phase_name()} starts from {source}: val BLEU-4 {scores['bleu4']:.2f}, CIDEr-D "
              f"{scores['cider']:.2f} (beam {self.tc.val_beam_size})")

    def phase_name(self) -> str:
        return ("SCST" if self.tc.scst else "cross-entropy") + (", encoder fine-tuned" if self.tc.fine_tune_encoder
                                                                else "")

    def end_epoch(self) -> None:
        """Validate by real decoding, keep the best model, decay the LR, log and plot."""
        tc, p = self.tc, self.progress
        scores, captions = self.validate()
        score = scores[tc.early_stop_metric]
        improved = score > p.best_score
        p.best_score = max(score, p.best_score)
        p.epochs_since_improvement = 0 if improved else p.epochs_since_improvement + 1
        if not improved and p.epochs_since_improvement % tc.lr_decay_patience == 0:
            # The tutorial's schedule, on the same notion of "improved" as the best checkpoint and early stopping:
            # decay after every lr_decay_patience epochs without improvement.
            for group in self.optimizer.param_groups:
                group["lr"] *= tc.lr_decay_factor
        learning_rates = {"lr": self.optimizer.param_groups[0]["lr"]}
        if tc.fine_tune_encoder:
            learning_rates["encoder_lr"] = self.optimizer.param_groups[1]["lr"]
        record = {"epoch": p.epoch, "step": p.step, **self.running_averages(),
                  **{f"val_{k}": v for k, v in scores.items()}, **learning_rates, "time": time.time()}
        p.epoch, p.batches_done, p.loss_sum, p.top5_sum, p.tokens = p.epoch + 1, 0, 0.0, 0.0, 0
        p.reward_sum, p.samples = 0.0, 0
        if improved:
            self.save("best")
        self.save("last")
        self.log(record, captions)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, val BLEU-4 {scores['bleu4']:.2f}, "
              f"CIDEr-D {scores['cider']:.2f} (best {METRIC_NAMES[tc.early_stop_metric]} {p.best_score:.2f}"
              f"{', saved' if improved else ''})")

    def log(self, record: dict, captions: list[Caption]) -> None:
        """A validation: metrics.jsonl, curves.png and, with --tensorboard, its scores and first captions."""
        if not distributed.is_main():
            return
        log_path = self.out / "metrics.jsonl"
        with open(log_path, "ab+") as f:  # appends, wherever it reads
            torn = False
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # the last line was cut short (a kill, a full disk): end it first
            f.write(b"\n" * torn + json.dumps(record).encode() + b"\n")
        plot_curves(log_path, self.out / "curves.png")
        if self.board is not None:
            self.board.validation(record, record["step"])
            shown = captions[:IMAGES]
            images = [self.val_set.files.image(i) for i in range(len(shown))]
            self.board.captions(images, self.model.sentences(shown, self.word_map), shown, record["step"])


# ---------------------------------------------------------------------------------------------------- phases

def from_args(args: argparse.Namespace) -> Trainer:
    """The Trainer that train.py's command line (config.train_parser) asks for."""
    return build_trainer(explicit(args, ModelConfig), explicit(args, TrainConfig), args.resume,
                         args.trust_checkpoint)


def build_trainer(model_options: dict[str, Any], train_options: dict[str, Any], resume: str | None = None,
                  trust: bool = False) -> Trainer:
    """A Trainer for the options the command line set (the rest take their defaults), fresh or from `resume`:
    the same phase continues exactly, another phase starts from the checkpoint's weights."""
    checkpoint = load_checkpoint(resume, trust=trust) if resume else None
    tc, new_phase = _train_config(train_options, checkpoint, resume)
    device = distributed.setup(resolve_device(tc.device))
    torch.manual_seed(tc.seed)
    word_map = read_word_map(word_map_file(tc.data_folder, tc.data_name))
    if checkpoint is None and tc.model == "blip":
        _check_blip_run(model_options, tc)
        import blip
        model, pretrained_rows = blip.from_pretrained(tc.pretrained, word_map), None
    elif checkpoint is None:
        kind = "word" if vocab.load_tokenizer_json(tc.data_folder, tc.data_name) is None else "bpe"
        model = CaptionModel(ModelConfig(vocab_size=len(word_map), vocab=kind, **model_options), tc.encoder_weights)
        pretrained_rows = None if tc.embeddings == "random" else \
            embeddings.initialise(model.decoder.embedding, word_map, kind == "bpe", tc.embeddings, tc.seed)
    else:
        _refuse_other_model(model_options, checkpoint, resume)
        if tc.model == "blip":
            _check_blip_run(model_options, tc)
        check_word_map(checkpoint["word_map"], tc.data_folder, tc.data_name, resume)
        model, _ = model_from_checkpoint(checkpoint, resume)
        pretrained_rows = checkpoint.get("pretrained_rows")
    trainer = Trainer(tc, model.to(device), word_map, device, pretrained_rows)
    if checkpoint is not None and new_phase:
        trainer.phase_from = resume  # a new phase: only the weights carry over; run() scores them first
    elif checkpoint is not None:
        trainer.restore(checkpoint)
        trainer.last_saved = Path(resume)
        print(f"resumed from {resume} at epoch {trainer.progress.epoch}, step {trainer.progress.step}")
    if distributed.rank() > 0:
        # Every rank draws its own dropout masks; rank 0 continues the stream the checkpoint saved.
        torch.manual_seed(tc.seed + 1_000_003 * distributed.rank() + trainer.progress.step)
    return trainer


def _train_config(options: dict[str, Any], checkpoint: dict | None, source: str | None) -> tuple[TrainConfig, bool]:
    """The run's TrainConfig, and whether it starts a new phase from the checkpoint.

    Fresh: the defaults (SCST's own with --scst) under the command line's options. The same phase as the
    checkpoint's: its saved config, with options that may change between sessions (epochs, patience, workers,
    device, folders, ...) taken from the command line and a different value of a fixed one refused, because the
    saved position, optimizer or best score would silently stop meaning what they meant. Another phase: the saved
    config with the phase's own defaults, then the command line.
    """
    if checkpoint is None:
        if options.get("scst"):
            raise SatError("--scst fine-tunes a trained model: pass --resume CHECKPOINT (the best cross-entropy one)")
        return TrainConfig(**{**defaults(TrainConfig), **options}), False
    if "optimizer" not in checkpoint or "train_config" not in checkpoint:
        raise SatError(f"{source}: an exported model holds no training state to resume; resume from a "
                       "checkpoint_*.pt that train.py wrote")
    saved = from_dict(TrainConfig, checkpoint["train_config"], source)
    phase = (options.get("scst", saved.scst), options.get("fine_tune_encoder", saved.fine_tune_encoder))
    if phase != saved.phase():
        scst_defaults = {f.name: defaults(TrainConfig, scst=phase[0])[f.name] for f in fields(TrainConfig)
                         if f.metadata["scst_default"] is not None}
        return replace(saved, **{**scst_defaults, "scst": phase[0], "fine_tune_encoder": phase[1], **options}), True
    changed = [f.name for f in fields(TrainConfig)
               if f.metadata["fixed"] and f.name in options and options[f.name] != getattr(saved, f.name)]
    if changed:
        was = ", ".join(f"{flag(name)} {getattr(saved, name)}" for name in changed)
        raise SatError(f"{source}: resuming this run continues it exactly, with its {was}; drop "
                       f"{'that flag' if len(changed) == 1 else 'those flags'} (or start a new run)")
    return replace(saved, **options), False


def _check_blip_run(model_options: dict[str, Any], tc: TrainConfig) -> None:
    """What a BLIP run cannot do, refused before anything is loaded: the attention model's flags, SCST, the CNN
    feature cache, GloVe rows and the data's own BPE vocabulary (BLIP spells words in its own sub-words)."""
    refused = [flag(name) for name in model_options] + [
        flag(name) for name in ("scst", "cache_features", "freeze_embeddings") if getattr(tc, name)]
    if tc.embeddings != "random":
        refused.append("--embeddings")
    if refused:
        raise SatError(f"--model blip: {', '.join(refused)} {'is' if len(refused) == 1 else 'are'} for the "
                       "attention models; BLIP brings its own encoder, decoder, embeddings and loss (drop "
                       f"{'it' if len(refused) == 1 else 'them'})")
    if vocab.load_tokenizer_json(tc.data_folder, tc.data_name) is not None:
        raise SatError(f"--model blip: {vocab.tokenizer_file(tc.data_folder, tc.data_name)} makes this a BPE "
                       "vocabulary; BLIP spells words in its own sub-words: use data made with --vocab word")


def _refuse_other_model(options: dict[str, Any], checkpoint: dict, source: str) -> None:
    """The model is the checkpoint's: a model flag that asks for another one is refused, not ignored."""
    saved = checkpoint["model_config"]
    changed = [name for name, value in options.items() if name in saved and saved[name] != value]
    if changed:
        was = ", ".join(f"{flag(name)} {saved[name]}" for name in changed)
        raise SatError(f"{source}: the model comes from the checkpoint, whose {was}; drop "
                       f"{'that flag' if len(changed) == 1 else 'those flags'}")
