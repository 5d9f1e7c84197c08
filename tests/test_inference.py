"""The batched beam search against a one-image-at-a-time reference, and eval.py / caption.py end to end."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import skimage
import torch
from PIL import Image

from plots import attention_figure_size
from datasets import ImageCaptionsDataset
from checkpoints import model_from_checkpoint
from config import ModelConfig
from models import DecoderWithAttention, beam_search
import metrics
from inference import caption_split, texts
from checkpoints import load_checkpoint
from utils import SatError

ROOT = Path(__file__).resolve().parents[1]
V = 12
WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, V)}}


def random_decoder(end_bias: float, seed: int = 0) -> DecoderWithAttention:
    """The tutorial's decoder (linear output layer) with random weights; the trained-model test below covers the
    deep output layer."""
    torch.manual_seed(seed)
    decoder = DecoderWithAttention(ModelConfig(vocab_size=V, encoder="resnet18", embed_dim=8, attention_dim=8,
                                               decoder_dim=16, dropout=0.0, output_layer="linear")).eval()
    with torch.no_grad():
        decoder.fc.weight.mul_(20)  # peaked distributions make beams diverge and end at different steps
        decoder.fc.bias[2] += end_bias
    return decoder


@torch.no_grad()
def reference_beam_search(decoder: DecoderWithAttention, features: torch.Tensor, k: int,
                          max_len: int) -> tuple[list[int], float]:
    """The tutorial's algorithm for one image: finished beams leave, the beam shrinks, best finished wins. After
    max_len words a beam can only end or be cut there, with the score of the words it has."""
    memory = decoder.memory(features)  # one image: its rows are however many beams are alive
    state = decoder.init_state(memory, k)
    words = torch.full((k,), 1)
    seqs, scores = [[] for _ in range(k)], torch.zeros(k)
    complete: list[tuple[list[int], float]] = []
    for t in range(max_len + 1):  # max_len words, then <end>
        logits, _, state = decoder.step(words, state, memory)
        log_probs = torch.log_softmax(logits, dim=1)
        log_probs[:, [0, 1]] = float("-inf")
        V = log_probs.size(1)
        if t == max_len:
            ends_and_cuts = torch.cat([scores + log_probs[:, 2], scores])  # the k ends, then the k cuts
            top_scores, top = ends_and_cuts.topk(k)
            complete += [(seqs[int(i)], float(v)) for v, i in zip(top_scores, top) if i < k]
            cuts = [(seqs[int(i) - k], float(v)) for v, i in zip(top_scores, top) if i >= k]
            return max(complete or cuts, key=lambda c: c[1])
        candidates = (scores.unsqueeze(1) + log_probs).view(-1) if t else log_probs[0]
        top_scores, top = candidates.topk(k)
        beams, next_words = top // V, top % V
        new_seqs = [seqs[b] + [int(w)] for b, w in zip(beams.tolist(), next_words.tolist())]
        alive = [i for i, w in enumerate(next_words.tolist()) if w != 2]
        complete += [(new_seqs[i][:-1], float(top_scores[i])) for i in range(len(new_seqs)) if i not in alive]
        k -= len(new_seqs) - len(alive)
        if k == 0:
            break
        seqs = [new_seqs[i] for i in alive]
        scores, words = top_scores[alive], next_words[alive]
        state = {n: v[beams[alive]] for n, v in state.items()}
    return max(complete, key=lambda c: c[1])


@torch.no_grad()
def greedy(decoder: DecoderWithAttention, features: torch.Tensor, max_len: int) -> list[int]:
    memory = decoder.memory(features)
    state, word, out = decoder.init_state(memory, 1), torch.tensor([1]), []
    for _ in range(max_len):
        logits, _, state = decoder.step(word, state, memory)
        logits[:, [0, 1]] = float("-inf")
        word = logits.argmax(dim=1)
        if int(word) == 2:
            break
        out.append(int(word))
    return out


def check_against_reference(decoder: DecoderWithAttention, features: torch.Tensor, word_map: dict[str, int],
                            beam_size: int, max_len: int) -> set[int]:
    """Batched == each image alone == the reference; returns the caption lengths seen."""
    batched = beam_search(decoder, features, word_map, beam_size, max_len)
    lengths = set()
    for i, caption in enumerate(batched):
        alone = beam_search(decoder, features[i:i + 1], word_map, beam_size, max_len)[0]
        tokens, score = reference_beam_search(decoder, features[i:i + 1], beam_size, max_len)
        assert caption.tokens == alone.tokens == tokens
        assert caption.score == pytest.approx(score, abs=1e-4)
        assert caption.alphas.shape == (len(caption.tokens), features.size(1))
        torch.testing.assert_close(caption.alphas.sum(dim=1), torch.ones(len(caption.tokens)))
        lengths.add(len(caption.tokens))
    return lengths


@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
def test_batched_beam_search_equals_reference_random_model(beam_size: int) -> None:
    """A random model whose beams end at step 1, 2, ... or never, within one batch."""
    decoder = random_decoder(end_bias=1.0)
    features = torch.randn(8, 9, 512, generator=torch.Generator().manual_seed(beam_size))
    lengths = check_against_reference(decoder, features, WORD_MAP, beam_size, max_len=12)
    assert len(lengths) > 1 and 12 in lengths, "the batch should mix finished and unfinished captions"


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_beam_search_equals_reference_trained_model(shapes_data, trained_checkpoint, beam_size) -> None:
    """Real captions of different lengths from the tiny shapes model."""
    model, word_map = model_from_checkpoint(load_checkpoint(trained_checkpoint))
    model.eval()
    images = torch.stack([ImageCaptionsDataset(*shapes_data, "test")[i][0] for i in range(12)])
    with torch.no_grad():
        features = model.encoder(images)
    lengths = check_against_reference(model.decoder, features, word_map, beam_size, max_len=30)
    assert len(lengths) > 1


def test_beam_size_one_is_greedy() -> None:
    decoder = random_decoder(end_bias=1.0, seed=3)
    features = torch.randn(6, 9, 512, generator=torch.Generator().manual_seed(7))
    decoded = beam_search(decoder, features, WORD_MAP, beam_size=1, max_len=15)
    assert [c.tokens for c in decoded] == [greedy(decoder, features[i:i + 1], 15) for i in range(6)]


def test_no_beam_ends_returns_best_unfinished_sequence() -> None:
    decoder = random_decoder(end_bias=-1e4)
    features = torch.randn(3, 9, 512, generator=torch.Generator().manual_seed(0))
    for i, caption in enumerate(beam_search(decoder, features, WORD_MAP, beam_size=3, max_len=7)):
        assert not caption.finished
        assert len(caption.tokens) == 7 and all(t >= 3 for t in caption.tokens)
        # the score is that of exactly the 7 words returned, not of an 8th word that was cut
        assert caption.score == pytest.approx(words_log_probability(decoder, features[i:i + 1], caption.tokens),
                                              abs=1e-4)


@torch.no_grad()
def words_log_probability(decoder: DecoderWithAttention, features: torch.Tensor, tokens: list[int]) -> float:
    """log p of these words, stepping the decoder word by word."""
    memory = decoder.memory(features)
    state, word, total = decoder.init_state(memory, 1), torch.tensor([1]), 0.0
    for token in tokens:
        logits, _, state = decoder.step(word, state, memory)
        total += float(torch.log_softmax(logits, dim=1)[0, token])
        word = torch.tensor([token])
    return total


def test_length_penalty_prefers_longer_finished_captions() -> None:
    decoder = random_decoder(end_bias=1.0)
    features = torch.randn(16, 9, 512, generator=torch.Generator().manual_seed(11))
    plain = beam_search(decoder, features, WORD_MAP, 5, max_len=12, length_penalty=0.0)
    normalised = beam_search(decoder, features, WORD_MAP, 5, max_len=12, length_penalty=1.0)
    assert sum(len(c.tokens) for c in normalised) > sum(len(c.tokens) for c in plain)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_writes_coco_results_and_bleu(shapes_data, trained_checkpoint, tmp_path) -> None:
    folder, name = shapes_data
    result = run_script("eval.py", "--checkpoint", str(trained_checkpoint), "--data-folder", str(folder),
                        "--data-name", name, "--split", "test", "--beam-sizes", "1", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "| 3 |" in result.stdout
    h5_ids = json.loads((folder / f"TEST_REFS_{name}.json").read_text())
    for k in (1, 3):
        captions = json.loads((tmp_path / f"captions_beam{k}.json").read_text())
        assert len(captions) == len(h5_ids) == 40
        assert all(set(c) == {"image_id", "caption"} and isinstance(c["image_id"], int) for c in captions)
        assert len({c["image_id"] for c in captions}) == 40
        assert all(c["caption"] and "<" not in c["caption"] for c in captions)
    scores = json.loads((tmp_path / "scores.json").read_text())
    for beam in ("beam1", "beam3"):
        assert all(0 <= scores[beam][f"bleu{n}"] <= 100 for n in range(1, 5))
        assert scores[beam]["bleu1"] >= scores[beam]["bleu4"] > 10


@pytest.mark.parametrize("photo,mode", [("astronaut.png", "RGB"), ("camera.png", "L")])
def test_caption_writes_attention_plot_for_real_photos(trained_checkpoint, tmp_path, photo, mode) -> None:
    path = Path(skimage.data_dir) / photo
    assert Image.open(path).mode == mode
    result = run_script("caption.py", "--img", str(path), "--checkpoint", str(trained_checkpoint),
                        "--beam-size", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    words = result.stdout.splitlines()[0].split()
    assert words
    plot = tmp_path / f"{Path(photo).stem}_attention.png"
    assert Image.open(plot).size == attention_figure_size(len(words))


def test_caption_folder_writes_csv(shapes_data, trained_checkpoint, tmp_path) -> None:
    folder, _ = shapes_data
    images = tmp_path / "images"
    images.mkdir()
    for name in ("shapes_000300.jpg", "shapes_000301.jpg"):
        (images / name).write_bytes((folder / "raw" / "images" / name).read_bytes())
    Image.open(Path(skimage.data_dir) / "coffee.png").convert("RGBA").save(images / "coffee.png")
    result = run_script("caption.py", "--img", str(images), "--checkpoint", str(trained_checkpoint),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "captions.csv")))
    assert [r["image"] for r in rows] == ["coffee.png", "shapes_000300.jpg", "shapes_000301.jpg"]
    assert all(r["caption"] for r in rows)
    assert len(list((tmp_path / "out").glob("*_attention.png"))) == 3


def test_bf16_decoding_gives_nearly_the_same_captions(shapes_data, trained_checkpoint) -> None:
    model, word_map = model_from_checkpoint(load_checkpoint(trained_checkpoint))
    test = ImageCaptionsDataset(*shapes_data, "test")
    cpu = torch.device("cpu")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(SatError, match="bf16"):
            caption_split(model, test, word_map, [3], 30, 16, cpu, amp=True)
        return
    exact = caption_split(model, test, word_map, [3], 30, 16, cpu)[3]
    bf16 = caption_split(model, test, word_map, [3], 30, 16, cpu, amp=True)[3]
    same = sum(a.tokens == b.tokens for a, b in zip(exact, bf16))
    scores = [metrics.bleu(test.references, texts(c, word_map))["bleu4"] for c in (exact, bf16)]
    assert same >= len(exact) // 2 and abs(scores[0] - scores[1]) < 5, (same, scores)
