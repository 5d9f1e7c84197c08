"""Every decoder behind --decoder: shapes, attention that sums to 1, overfitting, beam search, and checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import caption
import eval as evaluate
import plots
import train
from conftest import V, WORD_MAP, random_captions, tiny_config, train_args
from models import DECODERS, beam_search, decode_tokens
from trainer import loss_terms
from checkpoints import load_checkpoint

ATTENDING = ["soft", "hard", "adaptive"]


def tiny_decoder(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return DECODERS[name](tiny_config(decoder=name, **kw))


def test_every_decoder_is_registered() -> None:
    assert set(DECODERS) == {"soft", "hard", "adaptive", "lstm", "rnn"}


@pytest.mark.parametrize("name", list(DECODERS))
def test_output_shapes_and_attention_sums_to_one(name: str) -> None:
    decoder = tiny_decoder(name).train()  # hard attention samples its locations in training
    captions, lengths = random_captions(3, 2, 9, torch.Generator().manual_seed(0))
    logits, alphas = decoder.teacher_forced_logits(torch.randn(3, 9, 512), captions, lengths)
    T, width = int(lengths.max()) - 1, {"adaptive": 10, "lstm": 0, "rnn": 0}.get(name, 9)
    assert logits.shape == (6, T, V) and alphas.shape == (6, T, width)
    for n, steps in enumerate((lengths.flatten() - 1).tolist()):
        assert torch.count_nonzero(logits[n, steps:]) == 0 and torch.count_nonzero(logits[n, :steps].abs().sum(1)) \
            == steps
        if name in ATTENDING:  # pixels (and the sentinel) share a weight of 1 at every step
            torch.testing.assert_close(alphas[n, :steps].sum(dim=1), torch.ones(steps))
            assert bool((alphas[n, :steps] > 0).all())
    if name == "adaptive":
        beta = alphas[..., -1][alphas.sum(dim=2) > 0]
        assert bool(((beta > 0) & (beta < 1)).all())


@pytest.mark.parametrize("name", list(DECODERS))
def test_teacher_forcing_matches_stepwise_decoding(name: str) -> None:
    """The shared length-sorted loop gives each decoder the logits of stepping each caption alone."""
    decoder = tiny_decoder(name).eval()
    captions, lengths = random_captions(2, 3, 8, torch.Generator().manual_seed(1))
    features = torch.randn(2, 9, 512)
    logits, alphas = decoder.teacher_forced_logits(features, captions, lengths)
    nll, top5, same_alphas = decoder(features, captions, lengths)
    torch.testing.assert_close(same_alphas, alphas)
    targets = captions[:, :, 1:].flatten(0, 1)[:, :logits.size(1)]
    real = (torch.arange(logits.size(1)) < (lengths.flatten() - 1).unsqueeze(1))
    log_probs = torch.log_softmax(logits, dim=2).gather(2, targets.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(nll, -log_probs * real)  # the training forward reduces the same logits
    assert torch.equal(top5, (logits.topk(5, dim=2).indices == targets.unsqueeze(2)).any(dim=2) & real)
    for b in range(2):
        for k in range(3):
            memory = decoder.memory(features[b:b + 1])
            state = decoder.init_state(memory, 1)
            for t in range(int(lengths[b, k]) - 1):
                step_logits, alpha, state = decoder.step(captions[b, k, t:t + 1], state, memory)
                torch.testing.assert_close(step_logits[0], logits[b * 3 + k, t], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(alpha[0], alphas[b * 3 + k, t], atol=1e-6, rtol=1e-5)


def train_tiny(name: str, steps: int, **kw) -> tuple[torch.nn.Module, list[float], torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """Train on 4 images with one caption each, the way trainer.Trainer.train_step combines the losses."""
    decoder = tiny_decoder(name, embed_dim=32, attention_dim=32, decoder_dim=64, **kw).train()
    features = torch.randn(4, 9, 512, generator=torch.Generator().manual_seed(2))
    captions, lengths = random_captions(4, 1, 8, torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        xe, attention, _, log_likelihood = loss_terms(*decoder(features, captions, lengths), lengths)
        loss = xe + attention if decoder.doubly_stochastic else xe
        loss = loss + decoder.auxiliary_loss(log_likelihood, float(log_likelihood.mean()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decoder.end_step(float(log_likelihood.mean()))
        losses.append(float(xe.detach()))
    return decoder.eval(), losses, features, captions, lengths


@pytest.mark.parametrize("name", list(DECODERS))
def test_overfits_a_handful_of_images(name: str) -> None:
    """Cross-entropy falls far below its start and greedy decoding reproduces the training captions."""
    decoder, losses, features, captions, lengths = train_tiny(name, 200)
    assert losses[-1] < 0.1 < losses[0] / 20, losses[::20]
    rev = {i: w for w, i in WORD_MAP.items()}
    for b, decoded in enumerate(beam_search(decoder, features, WORD_MAP, beam_size=1, max_len=10)):
        assert decoded.finished
        n = int(lengths[b, 0])
        assert decode_tokens(decoded.tokens, rev) == decode_tokens(captions[b, 0, :n].tolist(), rev)


@pytest.mark.parametrize("estimator", ["reinforce", "gumbel"])
def test_hard_attention_learns_where_to_look_from_its_estimator(estimator: str) -> None:
    """Without the expected-context steps, the sampled context has no gradient to alpha: the attention scorer
    learns only through the estimator."""
    decoder = tiny_decoder("hard", hard_estimator=estimator, hard_expectation=0.0).train()
    captions, lengths = random_captions(3, 2, 9, torch.Generator().manual_seed(4))
    xe, _, _, log_likelihood = loss_terms(*decoder(torch.randn(3, 9, 512), captions, lengths), lengths)  # no penalty
    scorer = decoder.attention.full_att.weight
    xe.backward(retain_graph=True)
    assert (scorer.grad is None or not scorer.grad.any()) == (estimator == "reinforce")
    decoder.zero_grad()
    (xe + decoder.auxiliary_loss(log_likelihood, float(log_likelihood.mean()))).backward()
    assert bool(scorer.grad.any())
    if estimator == "reinforce":
        assert int(decoder.baseline_updates) == 0  # auxiliary_loss reads the baseline; end_step moves it
        decoder.end_step(float(log_likelihood.mean()))
        assert int(decoder.baseline_updates) == 1 and float(decoder.baseline) == pytest.approx(
            float(log_likelihood.mean()))
        assert decoder.traces["log_p_s"].shape == (6, int(lengths.max()) - 1)


def test_hard_attention_entropy_bonus_weighs_the_attention_entropy() -> None:
    """lambda_e (--hard-entropy) adds -lambda_e times the mean over captions of the entropy summed over their
    words; at 0 only the REINFORCE term is left."""
    decoder = tiny_decoder("hard", hard_expectation=0.0).train()
    captions, lengths = random_captions(3, 2, 9, torch.Generator().manual_seed(5))
    nll, top5, alphas = decoder(torch.randn(3, 9, 512), captions, lengths)
    log_likelihood = loss_terms(nll, top5, alphas, lengths)[3]
    entropy = -(alphas * torch.log(alphas + 1e-12)).sum(dim=(1, 2))  # (B*K,): steps past a caption's end are 0
    base = decoder.auxiliary_loss(log_likelihood, -3.0, 0.0)
    assert float((decoder.auxiliary_loss(log_likelihood, -3.0, 0.5) - base).detach()) == pytest.approx(
        -0.5 * float(entropy.mean().detach()), rel=1e-5)


def test_hard_attention_uses_the_expected_context_at_the_given_rate() -> None:
    """The paper's variance reduction: at rate 1 every step is soft attention's (log p(s) 0 everywhere, the scorer
    trained by cross-entropy alone); at 0.5 about half the steps sample a location."""
    captions, lengths = random_captions(8, 5, 12, torch.Generator().manual_seed(4))
    features = torch.randn(8, 9, 512)
    always = tiny_decoder("hard", hard_expectation=1.0).train()
    outputs = always(features, captions, lengths)
    assert not always.traces["log_p_s"].any()
    loss_terms(*outputs, lengths)[0].backward()
    assert bool(always.attention.full_att.weight.grad.any())
    torch.manual_seed(0)
    half = tiny_decoder("hard", hard_expectation=0.5).train()
    half(features, captions, lengths)
    steps = int((lengths - 1).sum())
    sampled = int((half.traces["log_p_s"] != 0).sum())
    assert 0.4 * steps < sampled < 0.6 * steps, (sampled, steps)


# A bias on <end> for the deep output layer, whose random word distributions otherwise rarely pick it.
END_BIAS = {"soft": 3.0, "hard": 3.0}


@pytest.mark.parametrize("name", list(DECODERS))
def test_batched_beam_search_equals_each_image_alone(name: str) -> None:
    decoder = tiny_decoder(name, seed=5, hard_test="argmax").eval()
    with torch.no_grad():
        decoder.fc.weight.mul_(20)  # peaked distributions: beams diverge and end at different steps
        decoder.fc.bias[WORD_MAP["<end>"]] += END_BIAS.get(name, 0.0)
    generator = torch.Generator().manual_seed(6)
    # Images that differ in their mean feature too, which is all that lstm and rnn see.
    features = torch.randn(6, 9, 512, generator=generator) + 3 * torch.randn(6, 1, 512, generator=generator)
    batched = beam_search(decoder, features, WORD_MAP, beam_size=3, max_len=12)
    assert len({len(c.tokens) for c in batched}) > 1
    for i, c in enumerate(batched):
        alone = beam_search(decoder, features[i:i + 1], WORD_MAP, beam_size=3, max_len=12)[0]
        assert c.tokens == alone.tokens and c.score == pytest.approx(alone.score, abs=1e-4)
        torch.testing.assert_close(c.alphas, alone.alphas)
        assert c.alphas.shape == (len(c.tokens), 9 if name in ATTENDING else 0)
        if name in ATTENDING:  # adaptive: the pixels' share, renormalised; beta is apart
            torch.testing.assert_close(c.alphas.sum(dim=1), torch.ones(len(c.tokens)))
        assert (c.sentinel is None) == (name != "adaptive")
        if c.sentinel is not None:
            torch.testing.assert_close(c.sentinel, alone.sentinel)
            assert c.sentinel.shape == (len(c.tokens),) and bool(((c.sentinel > 0) & (c.sentinel < 1)).all())


@pytest.mark.parametrize("name", list(DECODERS))
def test_checkpoint_loads_in_eval_and_caption_by_its_config(name: str, shapes_data, tmp_path, capsys) -> None:
    folder, data_name = shapes_data
    train.main(train_args(shapes_data, tmp_path, "--cache-features", "--epochs", "1", "--batch-size", "24",
                          "--decoder-lr", "3e-3", "--decoder", name, "--val-max-len", "12"))
    checkpoint = tmp_path / "checkpoint_last.pt"
    saved = load_checkpoint(checkpoint)
    assert saved["model_config"]["decoder"] == name
    if name == "hard":  # the moving-average baseline travels with the weights, so resuming continues it
        assert int(saved["decoder"]["baseline_updates"]) == 10 and float(saved["decoder"]["baseline"]) < 0

    evaluate.main(["--checkpoint", str(checkpoint), "--data-folder", str(folder), "--data-name", data_name,
                   "--beam-sizes", "2", "--metrics", "bleu", "--max-len", "12", "--grounding", "--out",
                   str(tmp_path / "eval")])
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert 0 <= scores["beam2"]["bleu4"] <= 100
    if name in ATTENDING:
        assert 0 <= scores["beam2"]["attention_in_box"] <= 100 and "grounding" not in scores["unavailable"]
    else:
        assert "attention_in_box" not in scores["beam2"] and "n/a" in scores["unavailable"]["grounding"]

    image = folder / "raw" / "images" / "shapes_000300.jpg"
    capsys.readouterr()
    caption.main(["--img", str(image), "--checkpoint", str(checkpoint), "--beam-size", "2", "--max-len", "12",
                  "--out", str(tmp_path / "captions")])
    printed = capsys.readouterr().out
    plot = tmp_path / "captions" / "shapes_000300_attention.png"
    if name in ATTENDING:  # one panel per word (after one epoch, a caption may still be empty)
        words = printed.splitlines()[0].split()
        assert Image.open(plot).size == plots.attention_figure_size(len(words))
    else:
        assert "no attention" in printed and not plot.exists()


def test_beta_is_plotted_per_word(tmp_path: Path) -> None:
    """The adaptive decoder's plot differs from the plain one only by the beta bars and titles."""
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    alphas = torch.softmax(torch.randn(3, 16), dim=1)
    plots.plot_attention(image, ["a", "red", "circle"], alphas, tmp_path / "plain.png")
    plots.plot_attention(image, ["a", "red", "circle"], alphas, tmp_path / "beta.png", torch.tensor([0.9, .1, .2]))
    plain, beta = (Image.open(tmp_path / f"{n}.png") for n in ("plain", "beta"))
    assert plain.size == beta.size == plots.attention_figure_size(3)
    assert plain.tobytes() != beta.tobytes()


def test_hard_attention_resumes_exactly(shapes_data, tmp_path: Path) -> None:
    """Stopped mid-epoch and resumed: the same weights and REINFORCE baseline as an uninterrupted run."""
    def trainer(out: Path, *extra: str) -> trainer.Trainer:
        return train.build_trainer(train.parse_args(train_args(
            shapes_data, out, "--cache-features", "--epochs", "1", "--batch-size", "24", "--decoder-lr", "3e-3",
            "--decoder", "hard", "--val-max-len", "12", *extra)))

    straight = trainer(tmp_path / "straight")
    straight.run()
    stopped = trainer(tmp_path / "stopped")
    step = stopped.train_step

    def stop_at_step_4(*args) -> bool:
        ok = step(*args)
        if stopped.progress.step == 4:
            stopped.stop_signal = 15
        return ok

    stopped.train_step = stop_at_step_4
    stopped.run()
    resumed = trainer(tmp_path / "stopped", "--resume", str(tmp_path / "stopped" / "checkpoint_last.pt"))
    assert int(resumed.model.decoder.baseline_updates) == 4
    resumed.run()
    expected = straight.model.decoder.state_dict()
    for name, tensor in resumed.model.decoder.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_only_a_step_taken_moves_the_reinforce_baseline() -> None:
    """train.py skips a step whose loss is not finite and then does not call end_step: the baseline moves only in
    end_step, as b <- 0.9 b + 0.1 mean."""
    decoder = tiny_decoder("hard").train()
    captions, lengths = random_captions(2, 2, 6, torch.Generator().manual_seed(7))
    decoder(torch.randn(2, 9, 512), captions, lengths)
    decoder.end_step(-3.0)
    before = decoder.baseline.clone()
    assert not torch.isfinite(decoder.auxiliary_loss(torch.tensor([-1.0, float("nan"), -2.0, -3.0]), float("nan")))
    assert torch.equal(decoder.baseline, before) and int(decoder.baseline_updates) == 1
    decoder.end_step(-1.0)
    assert float(decoder.baseline) == pytest.approx(0.9 * -3.0 + 0.1 * -1.0)


