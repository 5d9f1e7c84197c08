"""Self-critical sequence training (Rennie et al. 2017): fine-tune a captioner for CIDEr-D with REINFORCE.

For each image, `sample` draws n captions from the model; each is rewarded with its CIDEr-D against the
image's reference captions (`CiderD`, batched on tensors), and `policy_loss` raises the log-probability of
samples that beat the baseline: the mean reward of the image's other samples, or its greedy caption's.

Rewards are computed on word ids (the word map's tokenisation, `<unk>` included), with document frequencies
fixed once from the training captions, as in the self-critical literature; the reported CIDEr-D scores
come from the COCO evaluation code (metrics.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils import SatError

Tensor = torch.Tensor


def ngram_keys(words: Tensor, lengths: Tensor, n: int, vocab_size: int) -> Tensor:
    """words (N, L) word ids, lengths (N,) words per row -> one int64 key per n-gram (N, L-n+1); -1 where the
    n-gram runs past the row's end. Keys are exact (base-vocab_size digits), so equal keys mean equal n-grams."""
    N, L = words.shape
    if L < n:
        return words.new_full((N, 0), -1)
    digits = vocab_size ** torch.arange(n - 1, -1, -1, device=words.device)  # (n,)
    keys = (words.unfold(1, n, 1) * digits).sum(dim=2)  # (N, L-n+1)
    valid = torch.arange(L - n + 1, device=words.device) + n <= lengths.unsqueeze(1)
    return keys.masked_fill(~valid, -1)


def term_frequencies(keys: Tensor) -> tuple[Tensor, Tensor]:
    """keys (N, G) -> (tf (N, G): how often each position's n-gram occurs in its row, first (N, G): True at the
    first occurrence of each valid n-gram), so that a row's distinct n-grams are its `first` positions."""
    same = (keys.unsqueeze(2) == keys.unsqueeze(1)) & (keys >= 0).unsqueeze(2)  # (N, G, G)
    earlier = torch.ones(keys.size(1), keys.size(1), dtype=torch.bool, device=keys.device).tril(-1)
    return same.sum(dim=2), (keys >= 0) & ~(same & earlier).any(dim=2)


class CiderD:
    """CIDEr-D (the COCO evaluation code's `Cider`) with document frequencies fixed from a reference corpus.

    Equal to pycocoevalcap's per-image scores when the corpus is the scored set's own references; for SCST
    the corpus is the training set, counted once (`from_captions`).
    """

    def __init__(self, df_keys: list[Tensor], df_counts: list[Tensor], num_documents: int, vocab_size: int,
                 sigma: float = 6.0):
        self.df_keys, self.df_counts = df_keys, df_counts  # per n: sorted n-gram keys and their image counts
        self.log_documents = math.log(num_documents)
        self.vocab_size, self.sigma = vocab_size, sigma

    @classmethod
    def from_captions(cls, words: Tensor, lengths: Tensor, captions_per_image: int, vocab_size: int,
                      n: int = 4) -> "CiderD":
        """words (I*cpi, L), lengths (I*cpi,): every reference of I images, image-major. A document is an image:
        an n-gram's frequency is the number of images with it in any of their references."""
        if vocab_size ** n >= 2 ** 63:
            raise SatError(f"a vocabulary of {vocab_size} words is too large for exact {n}-gram keys")
        df_keys, df_counts = [], []
        for k in range(1, n + 1):
            keys = ngram_keys(words, lengths, k, vocab_size)
            # (I, cpi*G): each image's n-grams, sorted so that duplicates sit side by side
            keys = keys.reshape(-1, captions_per_image * keys.size(1)).sort(dim=1).values
            first = torch.ones_like(keys, dtype=torch.bool)
            first[:, 1:] = keys[:, 1:] != keys[:, :-1]
            unique, counts = torch.unique(keys[first & (keys >= 0)], return_counts=True)  # sorted
            df_keys.append(unique)
            df_counts.append(counts.float())
        return cls(df_keys, df_counts, len(words) // captions_per_image, vocab_size)

    def to(self, device: torch.device) -> "CiderD":
        self.df_keys = [k.to(device) for k in self.df_keys]
        self.df_counts = [c.to(device) for c in self.df_counts]
        return self

    def _document_frequency(self, keys: Tensor, k: int) -> Tensor:
        table, counts = self.df_keys[k - 1], self.df_counts[k - 1]
        if len(table) == 0:
            return torch.zeros(keys.shape, device=keys.device)
        at = torch.searchsorted(table, keys).clamp(max=len(table) - 1)
        return torch.where(table[at] == keys, counts[at], torch.zeros_like(counts[at]))

    def _vectors(self, words: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """words (N, L), lengths (N,) -> keys (N, G), tf-idf weights (N, G) (zero except at each distinct
        n-gram's first position), norms (N,)."""
        keys = ngram_keys(words, lengths, k, self.vocab_size)
        tf, first = term_frequencies(keys)
        idf = self.log_documents - torch.log(self._document_frequency(keys, k).clamp(min=1.0))
        weights = tf * idf * first
        return keys, weights, weights.pow(2).sum(dim=1).sqrt()

    def __call__(self, hyp_words: Tensor, hyp_lengths: Tensor, ref_words: Tensor, ref_lengths: Tensor) -> Tensor:
        """hyp_words (B, S, Lh), hyp_lengths (B, S): S captions of each of B images; ref_words (B, R, Lr),
        ref_lengths (B, R): each image's R references -> CIDEr-D (B, S) on the COCO code's scale (x10)."""
        B, S, R = *hyp_words.shape[:2], ref_words.size(1)
        # The COCO code's length is the number of bigrams.
        delta = ((hyp_lengths - 1).clamp(min=0).unsqueeze(2) - (ref_lengths - 1).clamp(min=0).unsqueeze(1)).float()
        penalty = torch.exp(-delta ** 2 / (2 * self.sigma ** 2))  # (B, S, R)
        total = torch.zeros(B, S, R, device=hyp_words.device)
        n = len(self.df_keys)
        for k in range(1, n + 1):
            h_keys, h_vec, h_norm = (t.view(B, S, -1) for t in self._vectors(hyp_words.flatten(0, 1),
                                                                             hyp_lengths.flatten(), k))
            r_keys, r_vec, r_norm = (t.view(B, R, -1) for t in self._vectors(ref_words.flatten(0, 1),
                                                                             ref_lengths.flatten(), k))
            h_vec, r_vec = h_vec[:, :, None, :, None], r_vec[:, None, :, None, :]  # (B, S, 1, Gh, 1), (B, 1, R, 1, Gr)
            match = (h_keys[:, :, None, :, None] == r_keys[:, None, :, None, :]) & (h_vec > 0)  # (B, S, R, Gh, Gr)
            value = (torch.minimum(h_vec, r_vec) * r_vec * match).sum(dim=(3, 4))  # (B, S, R)
            norms = h_norm.view(B, S, 1) * r_norm.view(B, 1, R)
            value = torch.where(norms > 0, value / norms.clamp(min=1e-30), value)
            total += value * penalty
        return 10.0 * total.sum(dim=2) / (n * R)


def caption_lengths(tokens: Tensor, end: int, pad: int) -> Tensor:
    """Sampled tokens (N, T), each row words then <end> or a cut, then padding -> words per row."""
    return ((tokens != end) & (tokens != pad)).sum(dim=1)


def sample(decoder: nn.Module, encoder_out: Tensor, word_map: dict[str, int], n: int,
           max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """n captions per image by multinomial sampling from the decoder, with gradients.

    encoder_out (B, P, C) -> tokens (B*n, T) image-major (words, <end>, then <pad>), log_probs (B*n, T) of each
    sampled token, mask (B*n, T): True up to and including <end>. After max_len words a caption either draws
    <end> or is cut there: its draw is dropped, so no caption holds more than max_len words. A decoder that
    samples where it looks (hard attention's REINFORCE) adds log p(location) of each step to the step's log-prob:
    the policy chooses both, so the reward trains the attention too.
    """
    start, end, pad = word_map["<start>"], word_map["<end>"], word_map["<pad>"]
    memory = decoder.memory(encoder_out)  # per image, shared by its n samples
    state = decoder.init_state(memory, n)
    rows = encoder_out.size(0) * n
    words = torch.full((rows,), start, dtype=torch.long, device=encoder_out.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=encoder_out.device)
    tokens, log_probs, masks = [], [], []
    for t in range(max_len + 1):
        logits, _, state = decoder.step(words, state, memory)
        logits = logits.float().index_fill(1, torch.tensor([start, pad], device=logits.device), float("-inf"))
        step_log_probs = F.log_softmax(logits, dim=1)  # (B*n, V)
        drawn = torch.multinomial(step_log_probs.detach().exp(), 1).squeeze(1)
        cut = ~finished & (drawn != end) if t == max_len else torch.zeros_like(finished)
        dropped = finished | cut
        words = torch.where(dropped, torch.full_like(drawn, pad), drawn)
        chosen = step_log_probs.gather(1, torch.where(finished, end, drawn).unsqueeze(1)).squeeze(1)
        if "log_p_s" in state:
            chosen = chosen + state["log_p_s"]
        tokens.append(words)
        log_probs.append(torch.where(dropped, torch.zeros_like(chosen), chosen))
        masks.append(~dropped)
        finished = finished | (words == end)
        if bool(finished.all()):
            break
    return torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


class Sampler(nn.Module):
    """`sample` as a module's forward: DistributedDataParallel syncs the gradients of what runs through the
    forward of the module it wraps, and the decoder's own forward is teacher forcing."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, encoder_out: Tensor, word_map: dict[str, int], n: int,
                max_len: int) -> tuple[Tensor, Tensor, Tensor]:
        return sample(self.decoder, encoder_out, word_map, n, max_len)


def baseline(rewards: Tensor, n: int) -> Tensor:
    """The mean reward of each sample's n-1 siblings (same image): rewards (B*n,) -> (B*n,)."""
    per_image = rewards.view(-1, n)
    return ((per_image.sum(dim=1, keepdim=True) - per_image) / (n - 1)).view(-1)


def policy_loss(log_probs: Tensor, mask: Tensor, advantage: Tensor) -> Tensor:
    """REINFORCE with a baseline: -(reward - baseline) * log p(token), averaged over sampled tokens, <end>
    included (so that ending properly is rewarded, not fragments). log_probs, mask (N, T); advantage (N,)."""
    return -(advantage.detach().unsqueeze(1) * log_probs * mask).sum() / mask.sum().clamp(min=1)
