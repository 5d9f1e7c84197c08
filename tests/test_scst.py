"""Self-critical sequence training: the CIDEr-D reward, the policy gradient, and short runs of train.py --scst."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import scst
import train
from conftest import WORD_MAP, tiny_config, train_args
from config import ModelConfig
from models import DECODERS, DecoderWithAttention
from utils import SatError


def random_corpus(images: int, refs: int, max_words: int, vocab: range, seed: int) -> tuple[torch.Tensor, ...]:
    """words (images*refs, max_words) and lengths, image-major, padded with 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_words + 1, (images * refs,), generator=g)
    words = torch.randint(vocab.start, vocab.stop, (images * refs, max_words), generator=g)
    return words * (torch.arange(max_words) < lengths.unsqueeze(1)), lengths


def as_text(words: torch.Tensor, length: torch.Tensor) -> str:
    return " ".join(f"w{int(w)}" for w in words[:int(length)])


def test_cider_d_equals_the_coco_evaluation_code() -> None:
    """With the scored images' own references as the corpus, every per-image score equals pycocoevalcap's."""
    from pycocoevalcap.cider.cider import Cider

    images, refs, L = 30, 5, 10
    ref_words, ref_lengths = random_corpus(images, refs, L, range(3, 11), seed=0)  # few words: many shared n-grams
    hyp_words, hyp_lengths = random_corpus(images, 1, L, range(3, 13), seed=1)
    cider = scst.CiderD.from_captions(ref_words, ref_lengths, refs, vocab_size=13)
    ours = cider(hyp_words.view(images, 1, L), hyp_lengths.view(images, 1), ref_words.view(images, refs, L),
                 ref_lengths.view(images, refs)).squeeze(1)
    gts = {i: [as_text(ref_words[i * refs + r], ref_lengths[i * refs + r]) for r in range(refs)]
           for i in range(images)}
    res = {i: [as_text(hyp_words[i], hyp_lengths[i])] for i in range(images)}
    _, expected = Cider().compute_score(gts, res)
    assert expected.max() > 0.5  # a test with real overlap, not zeros against zeros
    torch.testing.assert_close(ours.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


def test_a_reference_caption_earns_more_than_a_random_one() -> None:
    images, refs, L = 20, 5, 8
    ref_words, ref_lengths = random_corpus(images, refs, L, range(3, 40), seed=2)
    cider = scst.CiderD.from_captions(ref_words, ref_lengths, refs, vocab_size=40)
    own = ref_words.view(images, refs, L)[:, :1]  # each image's first reference, as a hypothesis
    noise, noise_lengths = random_corpus(images, 1, L, range(3, 40), seed=3)
    rewards = cider(torch.cat([own, noise.view(images, 1, L)], dim=1),
                    torch.stack([ref_lengths.view(images, refs)[:, 0], noise_lengths], dim=1),
                    ref_words.view(images, refs, L), ref_lengths.view(images, refs))  # (images, 2)
    assert bool((rewards[:, 0] > rewards[:, 1]).all()), rewards


def test_baseline_is_the_mean_of_the_other_samples() -> None:
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert scst.baseline(rewards, 3).tolist() == [4.0, 3.5, 1.5, 1.5, 1.5, 0.0]


def sequence_log_probs(decoder: DecoderWithAttention, encoder_out: torch.Tensor, tokens: torch.Tensor,
                       mask: torch.Tensor, word_map: dict[str, int]) -> torch.Tensor:
    """log p of each sampled caption by teacher forcing, with <start> and <pad> excluded as in sampling."""
    captions = torch.cat([torch.full((len(tokens), 1), word_map["<start>"]), tokens], dim=1).unsqueeze(0)
    logits, _ = decoder.teacher_forced_logits(encoder_out, captions, (1 + mask.sum(dim=1)).unsqueeze(0))
    logits[:, :, [word_map["<start>"], word_map["<pad>"]]] = float("-inf")
    chosen = F.log_softmax(logits, dim=2).gather(2, tokens[:, :logits.size(1)].unsqueeze(2)).squeeze(2)
    return torch.where(mask[:, :logits.size(1)], chosen, 0.0).sum(dim=1)


def test_the_policy_gradient_raises_samples_above_the_baseline_and_lowers_the_rest() -> None:
    torch.manual_seed(0)
    word_map = {"<pad>": 0, **{f"w{i}": i for i in range(1, 9)}, "<unk>": 9, "<start>": 10, "<end>": 11}
    cfg = ModelConfig(vocab_size=12, encoder="resnet18", embed_dim=16, attention_dim=16, decoder_dim=16, dropout=0.0)
    decoder = DecoderWithAttention(cfg)
    encoder_out = torch.randn(1, 4, cfg.encoder_dim)
    tokens, log_probs, mask = scst.sample(decoder, encoder_out, word_map, n=2, max_len=6)
    assert not torch.equal(tokens[0], tokens[1])
    before = sequence_log_probs(decoder, encoder_out, tokens, mask, word_map).detach()
    torch.testing.assert_close(before, (log_probs * mask).sum(dim=1).detach())  # sampling's log p is the model's
    loss = scst.policy_loss(log_probs, mask, advantage=torch.tensor([1.0, -1.0]))
    loss.backward()
    with torch.no_grad():
        for p in decoder.parameters():
            p -= 0.05 * p.grad
    after = sequence_log_probs(decoder, encoder_out, tokens, mask, word_map).detach()
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sampled_captions_hold_at_most_max_len_words() -> None:
    """A model that never ends: every sample is cut after max_len words, without <end> and without the log-prob of
    a dropped word."""
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_config(output_layer="linear"))
    with torch.no_grad():
        decoder.fc.bias[WORD_MAP["<end>"]] = -1e4
    tokens, log_probs, mask = scst.sample(decoder, torch.randn(2, 9, 512), WORD_MAP, 3, max_len=6)
    assert scst.caption_lengths(tokens, WORD_MAP["<end>"], WORD_MAP["<pad>"]).tolist() == [6] * 6
    assert mask.sum(dim=1).tolist() == [6] * 6 and bool((log_probs[~mask] == 0).all())
    assert not bool((tokens == WORD_MAP["<end>"]).any())


def test_scst_trains_hard_attention_where_it_samples_locations() -> None:
    """With REINFORCE hard attention the policy picks words and locations: log p(location) joins the sampled
    log-probability, so the reward reaches the attention scorer (without it, the scorer's gradient is 0)."""
    torch.manual_seed(0)
    decoder = DECODERS["hard"](tiny_config(decoder="hard", hard_expectation=0.0)).train()
    tokens, log_probs, mask = scst.sample(decoder, torch.randn(2, 9, 512), WORD_MAP, 3, max_len=6)
    scst.policy_loss(log_probs, mask, torch.randn(6)).backward()
    assert bool(decoder.attention.full_att.weight.grad.abs().sum() > 0)


def test_scst_does_not_lower_validation_cider_and_resumes(shapes_data, trained_checkpoint, tmp_path) -> None:
    out = tmp_path / "scst"
    # A tiny model in 2 short epochs: 5e-5, the default for real models, moves validation CIDEr-D only by noise.
    args = train_args(shapes_data, out, "--cache-features", "--batch-size", "8", "--scst", "--decoder-lr", "2e-4")
    train.main(args + ["--resume", str(trained_checkpoint), "--epochs", "2"])
    log = records(out)
    assert [r["epoch"] for r in log] == [-1, 0, 1]
    start, end = log[0]["val_cider"], log[-1]["val_cider"]
    assert end >= start, (start, end)
    assert all(r["train_cider"] > 0 for r in log[1:])
    last = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert last["train_config"]["scst"] and last["progress"]["epoch"] == 2
    assert torch.load(out / "checkpoint_best.pt", weights_only=True)["progress"]["best_score"] == max(
        r["val_cider"] for r in log)
    assert (out / "curves.png").stat().st_size > 0

    train.main(args + ["--resume", str(out / "checkpoint_last.pt"), "--epochs", "3"])  # continues that run
    assert [r["epoch"] for r in records(out)] == [-1, 0, 1, 2]
    # Without --scst the checkpoint's phase continues; --no-scst would start a cross-entropy phase from its weights.
    resumed = train.build_trainer(train.parse_args(train_args(shapes_data, out) + ["--resume",
                                                                                   str(out / "checkpoint_last.pt")]))
    assert resumed.tc.scst and resumed.tc.batch_size == 8 and resumed.progress.epoch == 3


def test_scst_with_the_greedy_baseline_runs(shapes_data, trained_checkpoint, tmp_path) -> None:
    train.main(train_args(shapes_data, tmp_path, "--cache-features", "--batch-size", "16", "--scst",
                          "--scst-baseline", "greedy", "--resume", str(trained_checkpoint), "--epochs", "1"))
    log = records(tmp_path)
    assert log[-1]["epoch"] == 0 and log[-1]["train_cider"] > 0


def test_scst_needs_a_checkpoint_to_start_from(shapes_data, tmp_path) -> None:
    with pytest.raises(SatError, match="--scst fine-tunes a trained model"):
        train.main(train_args(shapes_data, tmp_path, "--scst"))
    assert not tmp_path.joinpath("checkpoint_last.pt").exists()
