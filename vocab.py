"""Sub-word vocabularies: byte-pair encoding (Sennrich et al. 2016) through Hugging Face `tokenizers`.

A BPE vocabulary starts from the characters of the training words and merges the most frequent adjacent pair, a
given number of times; every word then splits into known pieces, so a rare or misspelt word is spelled out in
pieces instead of becoming <unk>. A piece that ends a word carries the suffix `</w>`: joining the pieces of a
caption back into words is string concatenation, with no tokenizer needed (decoding, metrics and plots see words).

The trained tokenizer is saved as JSON beside the word map (TOKENIZER_{name}.json) and inside checkpoints; its
vocabulary is the word map, the special tokens first (<pad> = 0, as for whole words).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from utils import SPECIAL_TOKENS, SatError, read_json

SUFFIX = "</w>"  # ends the last piece of every word


def tokenizer_file(data_folder: str | os.PathLike, data_name: str) -> Path:
    return Path(data_folder) / f"TOKENIZER_{data_name}.json"


def train_bpe(captions: list[list[str]], merges: int):
    """A BPE tokenizer (tokenizers.Tokenizer) learnt from tokenised training captions with up to `merges` merges
    (fewer when the words run out of pairs to merge)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    words = [w for c in captions for w in c]
    # The starting vocabulary: the special tokens, every character, and each character that ends a word with the
    # suffix; the trainer's vocab_size counts them, so the merges come on top.
    chars = {ch for w in words for ch in w}
    final = {w[-1] for w in words if w}
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix=SUFFIX))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.BPEDecoder(suffix=SUFFIX)
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL_TOKENS) + len(chars) + len(final) + merges,
                                  special_tokens=list(SPECIAL_TOKENS), end_of_word_suffix=SUFFIX,
                                  initial_alphabet=sorted(chars), show_progress=False)
    tokenizer.train_from_iterator((" ".join(c) for c in captions), trainer)
    return tokenizer


def merge_count(tokenizer_json: str) -> int:
    return len(json.loads(tokenizer_json)["model"]["merges"])


def word_map_of(tokenizer) -> dict[str, int]:
    word_map = dict(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    assert [word_map[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))), "special tokens come first"
    return word_map


def encode(tokenizer, words: list[str]) -> list[str]:
    """A tokenised caption -> its sub-word pieces."""
    return tokenizer.encode(words, is_pretokenized=True).tokens


def load_tokenizer_json(data_folder: str | os.PathLike, data_name: str) -> str | None:
    """The data's tokenizer as a JSON string, or None for a whole-word vocabulary."""
    path = tokenizer_file(data_folder, data_name)
    if not path.is_file():
        return None
    read_json(path)  # one clear line if it is not JSON
    return path.read_text()


def tokenizer_from_json(text: str, source: str):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own exception types
        raise SatError(f"{source}: not a readable tokenizer ({str(e).splitlines()[0]})") from None


def words(pieces: list[str], subwords: bool) -> list[tuple[str, list[int]]]:
    """Tokens of a caption (special tokens already left out) -> each word and the positions of its pieces.

    Whole words map one to one. Sub-words join until a piece that ends with `</w>`; a special token (<unk>) is a
    word of its own, and pieces left open at the end (a caption cut at max_len) still make a word."""
    if not subwords:
        return [(p, [i]) for i, p in enumerate(pieces)]
    joined: list[tuple[str, list[int]]] = []
    text, positions = "", []
    for i, piece in enumerate(pieces):
        if piece in SPECIAL_TOKENS:
            if positions:
                joined.append((text, positions))
            joined.append((piece, [i]))
            text, positions = "", []
            continue
        text, positions = text + piece.removesuffix(SUFFIX), positions + [i]
        if piece.endswith(SUFFIX):
            joined.append((text, positions))
            text, positions = "", []
    if positions:
        joined.append((text, positions))
    return joined


def whole_word(token: str, subwords: bool) -> str | None:
    """The word a vocabulary entry stands for when it is a whole word, else None (a piece inside a word)."""
    if not subwords:
        return token
    return token.removesuffix(SUFFIX) if token.endswith(SUFFIX) else None
