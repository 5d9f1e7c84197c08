"""--attention-normalizer sparsemax / entmax15: weights that sum to 1 with exact zeros, through training, beam search,
grounding, plots and checkpoints."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import metrics
import plots
from checkpoints import model_from_checkpoint
from conftest import WORD_MAP, random_captions, tiny_config
from models import DECODERS, CaptionModel, beam_search, normalize_attention
from test_decoders import train_tiny
from trainer import loss_terms
from utils import SatError

SPARSE = ["sparsemax", "entmax15"]


def sharp_decoder(name: str, normalizer: str) -> torch.nn.Module:
    """A random decoder whose attention scores spread widely, as a trained one's do, so that some weights are 0."""
    torch.manual_seed(0)
    decoder = DECODERS[name](tiny_config(decoder=name, attention_normalizer=normalizer))
    with torch.no_grad():
        decoder.attention.full_att.weight.mul_(60)
        decoder.fc.bias[WORD_MAP["<end>"]] = -20.0  # captions run to max_len: every step's weights get looked at
    return decoder.eval()


def test_normalizers_on_known_scores() -> None:
    """sparsemax([1, 0.5, -1]): tau = 0.25 gives (0.75, 0.25, 0); 1.5-entmax keeps more support but zeros -1 too."""
    scores = torch.tensor([[1.0, 0.5, -1.0]])
    torch.testing.assert_close(normalize_attention(scores, 1, "sparsemax"), torch.tensor([[0.75, 0.25, 0.0]]))
    entmax = normalize_attention(scores, 1, "entmax15")
    assert entmax[0, 2] == 0 and 0.25 < entmax[0, 1] < entmax[0, 0] < 0.75
    torch.testing.assert_close(entmax.sum(), torch.tensor(1.0))
    torch.testing.assert_close(normalize_attention(scores, 1, "softmax"), torch.softmax(scores, dim=1))


@pytest.mark.parametrize("name", ["soft", "adaptive"])
@pytest.mark.parametrize("normalizer", SPARSE)
def test_sparse_weights_sum_to_one_with_exact_zeros(name: str, normalizer: str) -> None:
    decoder = sharp_decoder(name, normalizer)
    captions, lengths = random_captions(3, 2, 9, torch.Generator().manual_seed(0))
    *_, alphas = decoder(torch.randn(3, 9, 512), captions, lengths)
    for n, steps in enumerate((lengths.flatten() - 1).tolist()):
        torch.testing.assert_close(alphas[n, :steps].sum(dim=1), torch.ones(steps))
        assert bool((alphas[n, :steps] >= 0).all())
    assert int((alphas == 0).sum()) > int((lengths - 1).sum()), "no pixel got an exact zero"
    # Beam search carries them: every word's pixel weights sum to 1 (renormalised for adaptive) or, for adaptive
    # with beta = 1 exactly, to 0 (it did not look).
    for caption in beam_search(decoder, torch.randn(2, 9, 512), WORD_MAP, beam_size=3, max_len=6):
        sums = caption.alphas.sum(dim=1)
        assert bool(((sums - 1).abs() < 1e-5).all() or (name == "adaptive" and ((sums - 1).abs() < 1e-5)
                                                         | (sums == 0)).all())
        assert bool((caption.alphas == 0).any())


@pytest.mark.parametrize("normalizer", SPARSE)
def test_sparse_soft_attention_trains_with_the_penalty(normalizer: str) -> None:
    """The doubly stochastic penalty and the cross-entropy have finite gradients through exact zeros, and a tiny
    model still overfits four captions."""
    decoder, losses, features, captions, lengths = train_tiny("soft", 150, attention_normalizer=normalizer)
    assert losses[-1] < losses[0] / 10, losses[::15]
    decoder.train()
    xe, penalty, _, _ = loss_terms(*decoder(features, captions, lengths), lengths)
    (xe + penalty).backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)


def test_grounding_counts_a_word_that_attends_nowhere_as_a_miss() -> None:
    """Box on the left half of a 2x2 grid. Word 1 puts all its weight on the top-left cell (in box, a hit); word 2
    attends to no pixel (share 0, and no hit although argmax of zeros is cell 0, inside the box)."""
    objects = [[{"box": [0.0, 0.0, 0.5, 1.0], "words": ["red", "circle"]}]]
    alphas = [torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])]
    scores = metrics.attention_grounding([["red", "circle"]], alphas, objects)
    assert scores["grounded_words"] == 2
    assert scores["attention_in_box"] == pytest.approx(50.0)
    assert scores["pointing_accuracy"] == pytest.approx(50.0)
    assert scores["uniform_in_box"] == pytest.approx(50.0)


def test_plot_of_sparse_maps_and_an_empty_one(tmp_path) -> None:
    alphas = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    path = tmp_path / "sparse.png"
    plots.plot_attention(Image.new("RGB", (64, 64), "white"), ["a", "b", "c"], alphas, path,
                         sentinel=torch.tensor([0.0, 1.0, 0.3]))
    assert Image.open(path).size == plots.attention_figure_size(3)


def test_old_checkpoints_load_as_softmax_and_other_decoders_refuse_it() -> None:
    cfg = tiny_config(decoder="soft")
    model = CaptionModel(cfg)
    saved = {k: v for k, v in cfg.to_dict().items() if k != "attention_normalizer"}  # written before the option
    rebuilt, _ = model_from_checkpoint({"model_config": saved, "encoder": model.encoder.state_dict(),
                                        "decoder": model.decoder.state_dict(), "word_map": WORD_MAP})
    assert rebuilt.config.attention_normalizer == "softmax"
    with pytest.raises(SatError, match="soft and adaptive"):
        CaptionModel(tiny_config(decoder="hard", attention_normalizer="sparsemax"))
