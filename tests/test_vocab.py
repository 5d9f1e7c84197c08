"""BPE sub-word vocabularies (create_input_files.py --vocab bpe) and GloVe embeddings (train.py --embeddings)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import embeddings
import eval as evaluate
import shapes
import sources
import train
import vocab
from checkpoints import load_checkpoint, model_from_checkpoint
from datasets import ImageCaptionsDataset
from inference import caption_split
from conftest import WORD_MAP as TINY_WORD_MAP, train_args
from utils import SatError, read_json

CAPTIONS = [["a", "red", "circle", "left", "of", "a", "blue", "square"], ["two", "red", "circles"],
            ["a", "large", "diamond"]] * 5


def test_bpe_learns_exactly_the_merges_asked_and_spells_unseen_words_in_pieces() -> None:
    tokenizer = vocab.train_bpe(CAPTIONS, 10)
    assert vocab.merge_count(tokenizer.to_str()) == 10
    word_map = vocab.word_map_of(tokenizer)
    assert list(word_map)[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and word_map["<pad>"] == 0
    pieces = vocab.encode(tokenizer, ["a", "diamnod", "circle"])  # misspelt: still only known pieces
    assert "<unk>" not in pieces and all(p in word_map for p in pieces)
    assert [w for w, _ in vocab.words(pieces, subwords=True)] == ["a", "diamnod", "circle"]
    assert vocab.encode(tokenizer, ["zebra"])[0] == "<unk>"  # 'z' never occurs in training
    many = vocab.train_bpe(CAPTIONS, 4000)  # runs out of pairs: every training word becomes one piece
    assert vocab.encode(many, ["circle", "left"]) == ["circle</w>", "left</w>"]


def test_words_join_pieces_and_keep_their_positions() -> None:
    pieces = ["a</w>", "di", "am", "ond</w>", "<unk>", "ci", "rc"]  # the last word cut at max_len
    assert vocab.words(pieces, subwords=True) == [("a", [0]), ("diamond", [1, 2, 3]), ("<unk>", [4]),
                                                  ("circ", [5, 6])]
    assert vocab.words(["a", "red"], subwords=False) == [("a", [0]), ("red", [1])]


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bpe")
    karpathy, sidecar = shapes.generate(out / "raw", 60, 16, 16, side=64, seed=3)
    name = datasets.create_input_files(sources.read_karpathy(karpathy, out / "raw"), "shapes", out,
                                       image_size=64, boxes=read_json(sidecar), source=str(karpathy), bpe_merges=40)
    return out, name


def test_bpe_data_files_hold_the_tokenizer_and_pieces_that_join_into_the_references(bpe_data) -> None:
    folder, name = bpe_data
    assert name == "shapes_5_cap_per_img_40_bpe_merges"
    tokenizer_json = (folder / f"TOKENIZER_{name}.json").read_text()
    assert vocab.merge_count(tokenizer_json) == 40
    word_map = read_json(folder / f"WORDMAP_{name}.json")
    assert word_map == vocab.word_map_of(vocab.tokenizer_from_json(tokenizer_json, "test"))
    rev = {i: w for w, i in word_map.items()}
    captions = read_json(folder / f"VAL_CAPTIONS_{name}.json")
    lengths = read_json(folder / f"VAL_CAPLENS_{name}.json")
    refs = read_json(folder / f"VAL_REFS_{name}.json")
    assert any(not rev[t].endswith(vocab.SUFFIX) for c in captions for t in c[1:-1] if t > 3)  # real sub-words
    for i, (caption, length) in enumerate(zip(captions, lengths)):
        assert caption[0] == word_map["<start>"] and caption[length - 1] == word_map["<end>"]
        assert set(caption[length:]) <= {0}
        pieces = [rev[t] for t in caption[1:length - 1]]
        assert " ".join(w for w, _ in vocab.words(pieces, True)) in refs[i // 5]


# ------------------------------------------------------------------------------------------------------- GloVe

def glove_file(tmp_path: Path) -> Path:
    path = tmp_path / "glove.test.4d.txt"
    path.write_text("red 1 0 0 0\nblue 0 1 0 0\ncircle 0 0 1 0\nzebra 0 0 0 1\n")
    return path


WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "red": 4, "blue": 5, "circle": 6, "qwzx": 7}


def test_glove_rows_from_a_text_file_keep_their_geometry_at_the_same_dim(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(8, 4)
    before = embedding.weight.detach().clone()
    rows = embeddings.initialise(embedding, WORD_MAP, False, str(glove_file(tmp_path)))
    assert rows.tolist() == [5, 6, 4]  # blue, circle, red: what the file covers
    weight = embedding.weight.detach()
    torch.testing.assert_close(weight[[0, 1, 2, 3, 7]], before[[0, 1, 2, 3, 7]])  # the rest stay random
    scale = weight[4, 0]
    torch.testing.assert_close(weight[[4, 5, 6]], scale * torch.eye(4)[:3])  # one common scale, same directions
    torch.testing.assert_close(weight[[4, 5, 6]].norm(dim=1).mean(), before.norm(dim=1).mean())
    assert "covers 3 of 8 vocabulary entries (37.5%)" in capsys.readouterr().out


@pytest.mark.parametrize("dim", [2, 9])
def test_a_different_embed_dim_gets_a_projection(tmp_path, dim: int) -> None:
    embedding = torch.nn.Embedding(8, dim)
    embeddings.initialise(embedding, WORD_MAP, False, str(glove_file(tmp_path)))
    vectors = embedding.weight.detach()[[4, 5, 6]]
    gram = vectors @ vectors.T
    if dim == 9:  # orthonormal rows: the one-hot GloVe vectors stay orthogonal and of equal norm
        torch.testing.assert_close(gram, gram[0, 0] * torch.eye(3), atol=1e-6, rtol=1e-5)
    else:  # the top 2 principal directions of three one-hot vectors: rank 2
        assert int(torch.linalg.matrix_rank(vectors)) == 2


def test_packaged_glove_6b_50d_covers_the_shapes_words(capsys) -> None:
    vectors, _ = embeddings.load_vectors("glove", {"red", "diamond", "left", "qwzx"})
    assert set(vectors) == {"red", "diamond", "left"} and vectors["red"].shape == (50,)
    cosine = lambda a, b: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    more = embeddings.load_vectors("glove", {"blue", "circle"})[0]
    assert cosine(vectors["red"], more["blue"]) > cosine(vectors["red"], more["circle"])  # colours cluster


def test_bad_glove_sources_are_one_line(tmp_path) -> None:
    with pytest.raises(SatError, match="not found"):
        embeddings.initialise(torch.nn.Embedding(8, 4), WORD_MAP, False, str(tmp_path / "none.txt"))
    (tmp_path / "bad.txt").write_text("red 1 x 0\n")
    with pytest.raises(SatError, match="line 1"):
        embeddings.initialise(torch.nn.Embedding(8, 4), WORD_MAP, False, str(tmp_path / "bad.txt"))


def test_bpe_training_with_frozen_glove_rows_then_eval_scores_words(bpe_data, tmp_path) -> None:
    """One short run on the BPE data with --embeddings glove --freeze-embeddings (whole-word pieces are looked
    up): the covered rows end exactly as initialised while the others move; the checkpoint records the BPE
    vocabulary, its tokenizer and the rows; eval.py, with no extra flag, scores captions whose pieces were joined
    into words. (Two epochs on 60 images teach little: the captions' quality is not what is tested.)"""
    folder, name = bpe_data
    args = train_args(bpe_data, tmp_path, "--cache-features", "--epochs", "2", "--batch-size", "8",
                      "--decoder-lr", "3e-3", "--embeddings", "glove", "--freeze-embeddings")
    trainer = train.build_trainer(train.parse_args(args))
    rows = trainer.pretrained_rows
    assert len(rows) > 10
    start = trainer.model.decoder.embedding.weight.detach().clone()
    trainer.run()
    end = trainer.model.decoder.embedding.weight.detach()
    assert torch.equal(end[rows], start[rows])
    others = torch.ones(len(start), dtype=torch.bool)
    others[rows] = False
    assert not torch.equal(end[others], start[others])
    checkpoint = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert torch.equal(checkpoint["pretrained_rows"], rows)
    assert checkpoint["model_config"]["vocab"] == "bpe"
    assert checkpoint["tokenizer"] == (folder / f"TOKENIZER_{name}.json").read_text()
    model, _ = model_from_checkpoint(checkpoint)
    assert torch.equal(model.decoder.embedding.weight[rows], start[rows])

    evaluate.main(["--checkpoint", str(tmp_path / "checkpoint_last.pt"), "--data-folder", str(folder),
                   "--data-name", name, "--beam-sizes", "1", "--metrics", "bleu", "--grounding",
                   "--out", str(tmp_path / "eval")])
    hypotheses = [c["caption"] for c in json.loads((tmp_path / "eval" / "captions_beam1.json").read_text())]
    # The same beams, their pieces joined here by plain string operations: eval.py joined them, unasked.
    captions = caption_split(model, ImageCaptionsDataset(folder, name, "test"), checkpoint["word_map"], [1], 50, 16,
                             torch.device("cpu"), progress=False)[1]
    rev = {i: w for w, i in checkpoint["word_map"].items()}
    joined = ["".join(rev[t] for t in c.tokens).replace("</w>", " ").strip() for c in captions]
    plain = [i for i, c in enumerate(captions) if checkpoint["word_map"]["<unk>"] not in c.tokens]
    assert len(plain) > len(captions) // 2 and [hypotheses[i] for i in plain] == [joined[i] for i in plain]
    assert all(vocab.SUFFIX not in h for h in hypotheses)
    assert sum(len(h.split()) for h in hypotheses) < sum(len(c.tokens) for c in captions)  # pieces were joined
    assert "bleu4" in json.loads((tmp_path / "eval" / "scores.json").read_text())["beam1"]

    with pytest.raises(SatError, match="--freeze-embeddings"):
        train.build_trainer(train.parse_args(train_args(bpe_data, tmp_path / "x", "--freeze-embeddings")))


def test_the_tokenizer_travels_in_safetensors_exports(tmp_path) -> None:
    from checkpoints import export_safetensors
    from conftest import tiny_config
    from models import CaptionModel
    model = CaptionModel(tiny_config(vocab="bpe"))
    tokenizer_json = vocab.train_bpe(CAPTIONS, 10).to_str()
    checkpoint = {"model_config": model.config.to_dict(), "word_map": TINY_WORD_MAP, "tokenizer": tokenizer_json,
                  "encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(), "image_size": 64}
    export_safetensors(checkpoint, tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "model.safetensors")
    assert loaded["tokenizer"] == tokenizer_json and loaded["model_config"]["vocab"] == "bpe"
    assert model_from_checkpoint(loaded)[0].config.vocab == "bpe"
