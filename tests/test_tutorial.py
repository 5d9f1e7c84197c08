"""Checkpoints of the old tutorial: built here in its format (its module, class and attribute names, whole modules
pickled by torch.save with their Adam optimizers), converted, and decoded by sat exactly as the tutorial decoded
them; a pickle that names any other global is refused without running it."""
from __future__ import annotations

import builtins
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path
from unittest import mock

import h5py
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import convert_tutorial
import create_input_files
import datasets
import eval as evaluate
import shapes
import sources
import tutorial
from checkpoints import FORMAT, load_checkpoint, model_from_checkpoint
from inference import caption_images
from utils import SatError

SIDE, ENCODED, MIN_WORD_FREQ = 64, 3, 3
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


# ------------------------------------------------------ the tutorial's model, from its description (not sat's code)

class Encoder(nn.Module):
    def __init__(self, encoded_image_size: int):
        super().__init__()
        self.enc_image_size = encoded_image_size
        resnet = torchvision.models.resnet18(weights=None)  # the tutorial's is resnet101: too slow for a test
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])  # without its pooling and classifier
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) -> (B, S, S, C)."""
        return self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)


class Attention(nn.Module):
    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.full_att(self.relu(self.encoder_att(encoder_out) + self.decoder_att(h).unsqueeze(1)))
        alpha = self.softmax(scores.squeeze(2))  # (k, P)
        return (encoder_out * alpha.unsqueeze(2)).sum(dim=1), alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim: int, embed_dim: int, decoder_dim: int, vocab_size: int, encoder_dim: int,
                 dropout: float):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
        self.decoder_dim, self.vocab_size = decoder_dim, vocab_size
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def init_hidden_state(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = encoder_out.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)


TUTORIAL_CLASSES = (Encoder, Attention, DecoderWithAttention)
for _cls in TUTORIAL_CLASSES:
    _cls.__module__ = "models"  # the tutorial's models.py: what its pickles name


def save_tutorial_checkpoint(path: Path, encoder: Encoder, decoder: DecoderWithAttention, legacy: bool = False,
                             **extra) -> Path:
    """torch.save of the dict the tutorial's save_checkpoint wrote, while `models` names the tutorial's module."""
    models = types.ModuleType("models")
    for cls in TUTORIAL_CLASSES:
        setattr(models, cls.__name__, cls)
    state = {"epoch": 7, "epochs_since_improvement": 2, "bleu-4": 0.2345, "encoder": encoder, "decoder": decoder,
             "encoder_optimizer": None, "decoder_optimizer": torch.optim.Adam(decoder.parameters(), lr=4e-4),
             **extra}
    with mock.patch.dict(sys.modules, {"models": models}):
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def tutorial_word_map(karpathy_json: Path, min_word_freq: int) -> dict[str, int]:
    """The tutorial's rule: words of every split seen more than min_word_freq times, numbered from 1 in the order
    first seen, then <unk>, <start>, <end>; <pad> is 0."""
    counts = Counter(w for image in json.loads(karpathy_json.read_text())["images"]
                     for sentence in image["sentences"] for w in sentence["tokens"])
    word_map = {w: i + 1 for i, w in enumerate(w for w, n in counts.items() if n > min_word_freq)}
    for token in ("<unk>", "<start>", "<end>"):
        word_map[token] = len(word_map) + 1
    return {**word_map, "<pad>": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Tiny shapes data in sat's format, encoded with the tutorial's word map, as a tutorial user would build it."""
    out = tmp_path_factory.mktemp("tutorial_data")
    karpathy, _ = shapes.generate(out / "raw", 12, 4, 6, side=SIDE, seed=3)
    word_map = tutorial_word_map(karpathy, MIN_WORD_FREQ)
    (out / "WORDMAP_tutorial.json").write_text(json.dumps(word_map))
    name = datasets.create_input_files(sources.read_karpathy(karpathy, out / "raw"), "shapes", out,
                                       min_word_freq=MIN_WORD_FREQ, image_size=SIDE, word_map=word_map)
    with h5py.File(datasets.split_file(out, "TEST", "IMAGES", name), "r") as h5:
        images = torch.from_numpy(h5["images"][()])
    return {"folder": out, "name": name, "word_map": word_map, "word_map_file": out / "WORDMAP_tutorial.json",
            "test_images": images}


@pytest.fixture(scope="module")
def model(data) -> tuple[Encoder, DecoderWithAttention]:
    """The tutorial's model with random weights, made like a trained one where decoding depends on it: BatchNorm
    statistics that are not the identity, <start> and <pad> never predicted (they are never a training target),
    and captions that end after a few words, at a length that depends on the image. A random LSTM falls into a
    fixed point or a cycle and never ends, so one unit is a clock: its gates held open, its cell grows by a
    constant every step from an image-dependent start, and <end> becomes likely once it is high enough."""
    torch.manual_seed(0)
    encoder = Encoder(ENCODED)
    D, end = 20, data["word_map"]["<end>"]
    decoder = DecoderWithAttention(attention_dim=12, embed_dim=16, decoder_dim=D, vocab_size=len(data["word_map"]),
                                   encoder_dim=512, dropout=0.3)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1), m.num_batches_tracked.fill_(1000)
        decoder.fc.weight.mul_(10)  # peaked word distributions: beams diverge
        decoder.fc.bias[[data["word_map"]["<start>"], data["word_map"]["<pad>"]]] = -30.0
        lstm, clock = decoder.decode_step, [0, D, 2 * D, 3 * D]  # unit 0's rows of the i, f, g, o gates
        lstm.weight_ih[clock], lstm.weight_hh[clock], lstm.bias_hh[clock] = 0.0, 0.0, 0.0
        lstm.bias_ih[clock] = torch.tensor([10.0, 10.0, 0.2, 10.0])  # c <- c + tanh(0.2), h = tanh(c)
        # The clock starts at about -1.5 +- 0.5 on the test images (their mean annotation vectors projected).
        features = encoder.eval()(normalise(data["test_images"])).flatten(1, 2).mean(dim=1)  # (N, C)
        w = torch.randn(512)
        w *= 0.5 / (features @ w).std()
        decoder.init_c.weight[0], decoder.init_c.bias[0] = w, -1.5 - (features @ w).mean()
        decoder.fc.weight[end, 0], decoder.fc.bias[end] = 20.0, -10.0  # <end> wins from h of about 0.5
    return encoder.eval(), decoder.eval()


@pytest.fixture(scope="module")
def tutorial_checkpoint(model, tmp_path_factory) -> Path:
    return save_tutorial_checkpoint(tmp_path_factory.mktemp("old") / "BEST_checkpoint_shapes.pth.tar", *model)


@pytest.fixture(scope="module")
def converted(data, tutorial_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tutorial.pt"
    tutorial.convert(tutorial_checkpoint, data["word_map_file"], out)
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """The tutorial's input: uint8 (B, 3, H, W) to [0, 1], then ImageNet's mean and std."""
    return (images.float() / 255 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


@torch.no_grad()
def tutorial_beam_search(model: tuple[Encoder, DecoderWithAttention], image: torch.Tensor, word_map: dict[str, int],
                         k: int) -> tuple[list[int], float]:
    """The tutorial's caption.py decoding of one uint8 image (3, H, W), step by step with its own modules: k beams
    from <start>, every step the k best continuations; a beam that emits <end> leaves (k shrinks), and the
    best-scoring finished sequence wins. Returns its words (no <start>, <end>) and its summed log-probability."""
    encoder, decoder = model
    features = encoder(normalise(image.unsqueeze(0)))
    features = features.view(1, -1, features.size(3)).expand(k, -1, -1)  # (k, P, C)
    V, start, end = decoder.vocab_size, word_map["<start>"], word_map["<end>"]
    words, seqs, scores = torch.full((k,), start), [[start]] * k, torch.zeros(k)
    h, c = decoder.init_hidden_state(features)
    complete = []
    for step in range(51):  # the tutorial stopped after 50 steps
        context, _ = decoder.attention(features, h)
        context = decoder.sigmoid(decoder.f_beta(h)) * context
        h, c = decoder.decode_step(torch.cat([decoder.embedding(words), context], dim=1), (h, c))
        candidates = scores.unsqueeze(1) + torch.log_softmax(decoder.fc(h), dim=1)  # (k, V)
        top_scores, top = (candidates[0] if step == 0 else candidates.view(-1)).topk(k)
        beams, next_words = (top // V).tolist(), (top % V).tolist()
        seqs = [seqs[b] + [w] for b, w in zip(beams, next_words)]
        complete += [(s, float(v)) for s, v, w in zip(seqs, top_scores, next_words) if w == end]
        alive = [i for i, w in enumerate(next_words) if w != end]
        k = len(alive)
        if k == 0:
            break
        seqs, scores, words = [seqs[i] for i in alive], top_scores[alive], torch.tensor(next_words)[alive]
        rows = torch.tensor(beams)[alive]
        h, c, features = h[rows], c[rows], features[rows]
    else:
        raise AssertionError("a beam is still open after 50 steps: the test model should end sooner")
    seq, score = max(complete, key=lambda item: item[1])
    return seq[1:-1], score


# --------------------------------------------------------------------------------------------------------- tests

def test_converted_checkpoint_is_a_plain_sat_checkpoint(converted, data) -> None:
    raw = torch.load(converted, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["word_map"] == data["word_map"] and raw["image_size"] == 256
    cfg = raw["model_config"]
    assert (cfg["encoder"], cfg["encoded_size"], cfg["decoder"]) == ("resnet18", ENCODED, "soft")
    assert (cfg["output_layer"], cfg["attention_activation"]) == ("linear", "relu")
    assert (cfg["embed_dim"], cfg["attention_dim"], cfg["decoder_dim"], cfg["vocab_size"]) == \
        (16, 12, 20, len(data["word_map"]))
    assert cfg["dropout"] == pytest.approx(0.3)


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_sat_decodes_the_converted_model_as_the_tutorial_did(converted, model, data, beam_size) -> None:
    sat_model, word_map = model_from_checkpoint(load_checkpoint(converted))
    images = data["test_images"]
    captions = caption_images(sat_model, [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images],
                              word_map, beam_size, 50, torch.device("cpu"))
    for image, caption in zip(images, captions):
        tokens, score = tutorial_beam_search(model, image, word_map, beam_size)
        assert caption.finished and caption.tokens == tokens
        assert caption.score == pytest.approx(score, abs=1e-4)
    assert len({len(c.tokens) for c in captions}) > 1, "all captions equally long: a weak test model"


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # torch.save of a class defined here
def test_pre_1_6_pickles_convert_to_the_tutorial_weights(model, data, tmp_path) -> None:
    """PyTorch before 1.6 (the tutorial's 0.4 included) wrote a bare pickle stream, module classes by reference."""
    path = save_tutorial_checkpoint(tmp_path / "BEST_checkpoint_old.pth.tar", *model, legacy=True)
    weights = tutorial.convert(path, data["word_map_file"], tmp_path / "sat.pt")
    encoder, decoder = model
    for name, tensor in encoder.resnet.state_dict().items():
        assert torch.equal(weights["encoder"][f"backbone.{name}"], tensor), name
    renamed = {"decode_step": "lstm"}
    for name, tensor in decoder.state_dict().items():
        first, rest = name.split(".", 1)
        assert torch.equal(weights["decoder"][f"{renamed.get(first, first)}.{rest}"], tensor), name
    assert weights["tutorial"] == {"epoch": 7, "epochs_since_improvement": 2, "bleu-4": 0.2345}


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_the_encoder_depth_comes_from_its_tensors(depth: int) -> None:
    with torch.device("meta"):  # shapes without memory: ResNet-152 in milliseconds
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    keys = {f"resnet.{k}": v for k, v in nn.Sequential(*list(resnet.children())[:-2]).state_dict().items()}
    assert tutorial.resnet_name(keys) == f"resnet{depth}"


def test_convert_then_eval_and_the_safetensors_export(model, data, tutorial_checkpoint, tmp_path, capsys) -> None:
    """The README's commands: convert_tutorial.py, then eval.py with no flags scores the old model."""
    out, exported = tmp_path / "tutorial.pt", tmp_path / "tutorial.safetensors"
    convert_tutorial.main(["--checkpoint", str(tutorial_checkpoint), "--word-map", str(data["word_map_file"]),
                           "--out", str(out), "--safetensors", str(exported), "--trust-checkpoint"])
    assert "epoch 7" in capsys.readouterr().out
    evaluate.main(["--checkpoint", str(out), "--data-folder", str(data["folder"]), "--data-name", data["name"],
                   "--split", "test", "--beam-sizes", "1", "3", "--metrics", "bleu,rouge,cider",  # METEOR: 30 s more
                   "--out", str(tmp_path / "eval")])
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "rouge", "cider"} <= set(scores["beam3"])
    rev = {i: w for w, i in data["word_map"].items()}
    wanted = [" ".join(rev[t] for t in tutorial_beam_search(model, im, data["word_map"], 3)[0])
              for im in data["test_images"]]
    got = json.loads((tmp_path / "eval" / "captions_beam3.json").read_text())
    assert [c["caption"] for c in got] == wanted
    pt, st = load_checkpoint(out), load_checkpoint(exported)
    assert st["model_config"] == pt["model_config"] and st["word_map"] == pt["word_map"]
    for part in ("encoder", "decoder"):
        assert st[part].keys() == pt[part].keys()
        assert all(torch.equal(st[part][k], v) for k, v in pt[part].items())


def test_converting_needs_the_trust_flag(data, tutorial_checkpoint, tmp_path) -> None:
    with pytest.raises(SatError, match="can run code.*--trust-checkpoint"):
        convert_tutorial.main(["--checkpoint", str(tutorial_checkpoint), "--word-map", str(data["word_map_file"]),
                               "--out", str(tmp_path / "sat.pt")])
    assert not list(tmp_path.iterdir())


def test_trusting_a_tutorial_checkpoint_elsewhere_points_to_the_converter(tutorial_checkpoint) -> None:
    with pytest.raises(SatError, match="old tutorial; convert it once with python convert_tutorial.py"):
        load_checkpoint(tutorial_checkpoint, trust=True)


def test_a_word_map_of_another_size_is_refused(data, tutorial_checkpoint, tmp_path) -> None:
    V = len(data["word_map"])
    path = tmp_path / "WORDMAP_other.json"
    path.write_text(json.dumps({**data["word_map"], "zebra": V}))
    with pytest.raises(SatError, match=f"its decoder has {V} words, the word map {V + 1}"):
        tutorial.convert(tutorial_checkpoint, path, tmp_path / "sat.pt")
    assert not (tmp_path / "sat.pt").exists()


class Payload:
    """Unpickles as call(argument): how a hostile pickle runs code."""

    def __init__(self, call, argument: str):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("call, name, legacy", [(os.system, "posix.system", False),
                                                (builtins.exec, "builtins.exec", True)])  # legacy: PyTorch < 1.6
def test_a_pickle_asking_for_any_other_global_is_refused_and_runs_nothing(model, data, tmp_path, call, name,
                                                                          legacy) -> None:
    marker = tmp_path / "ran"
    command = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w').close()"
    # After the genuine modules, so that everything up to the payload is accepted.
    path = save_tutorial_checkpoint(tmp_path / "BEST_checkpoint.pth.tar", *model, legacy=legacy,
                                    payload=Payload(call, command))
    with pytest.raises(SatError, match=f"refused: its pickle asks for {name}, which is not on the allow-list"):
        tutorial.convert(path, data["word_map_file"], tmp_path / "sat.pt")
    with pytest.raises(SatError, match=f"refused: its pickle asks for {name}, which is not on the allow-list"):
        load_checkpoint(path, trust=True)  # what eval.py, caption.py and train.py do with --trust-checkpoint
    assert not marker.exists() and not (tmp_path / "sat.pt").exists()


def test_create_input_files_encodes_with_a_given_word_map(data) -> None:
    folder, name, word_map = data["folder"], data["name"], data["word_map"]
    assert json.loads(datasets.word_map_file(folder, name).read_text()) == word_map
    captions = json.loads(datasets.split_file(folder, "TEST", "CAPTIONS", name).read_text())
    references = json.loads(datasets.split_file(folder, "TEST", "REFS", name).read_text())
    lengths = json.loads(datasets.split_file(folder, "TEST", "CAPLENS", name).read_text())
    rev = {i: w for w, i in word_map.items()}
    unknown = 0
    for i, (caption, n) in enumerate(zip(captions, lengths)):
        assert caption[0] == word_map["<start>"] and caption[n - 1] == word_map["<end>"]
        assert set(caption[n:]) <= {0}
        words = [rev[t] for t in caption[1:n - 1]]
        matches = [r.split() for r in references[i // 5] if len(r.split()) == len(words)]
        assert any(all(w == x or (w == "<unk>" and x not in word_map) for w, x in zip(words, r)) for r in matches)
        unknown += words.count("<unk>")
    assert unknown > 0, "every word known: min_word_freq made no <unk> to check"


@pytest.mark.parametrize("word_map, problem", [({"<pad>": 0, "<start>": 1, "<end>": 2, "a": 3}, "lacks <unk>"),
                                               ({"<pad>": 3, "<start>": 1, "<end>": 2, "<unk>": 0}, "<pad> = 3, not 0"),
                                               ({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5},
                                                "not exactly 0 to 3")])
def test_a_bad_word_map_stops_create_input_files_before_any_work(tmp_path, word_map, problem) -> None:
    path = tmp_path / "WORDMAP.json"
    path.write_text(json.dumps(word_map))
    with pytest.raises(SatError, match=problem):
        create_input_files.main(["--word-map", str(path), "--output-folder", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
