"""BLIP, the second model family: a tiny randomly initialised BlipConfig saved as a Hugging Face folder (no download),
fine-tuned by train.py's loop on the shapes data, resumed exactly, scored by eval.py, captioning a folder into a CSV,
its checkpoints checked like any other; and what it refuses."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blip
import caption
import eval as evaluate
import train
from checkpoints import content_hash, load_checkpoint, model_from_checkpoint
from conftest import ROOT
from datasets import ImageCaptionsDataset, load_image, read_word_map, word_map_file
from inference import caption_images, caption_split
from models import beam_search
from utils import SatError

# 2 layers of width 32 at 64 px: seconds per epoch. val-max-len 8: an untrained model rarely ends a caption, and
# validation would decode to the limit.
RUN = ["--model", "blip", "--fine-tune-encoder", "--batch-size", "16", "--decoder-lr", "2e-3", "--encoder-lr",
       "2e-3", "--val-max-len", "8", "--device", "cpu"]


def blip_args(data: tuple[Path, str], folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-folder", str(data[0]), "--data-name", data[1], "--checkpoint-dir", str(out),
            "--pretrained", str(folder), *RUN, *extra]


@pytest.fixture(scope="module")
def tiny_blip(shapes_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blip") / "tiny"
    blip.write_scratch_folder(folder, read_word_map(word_map_file(*shapes_data)), "tiny", image_size=64)
    return folder


@pytest.fixture(scope="module")
def blip_run(shapes_data, tiny_blip, tmp_path_factory) -> Path:
    """The checkpoint folder of 2 epochs of fine-tuning."""
    out = tmp_path_factory.mktemp("blip_run")
    train.main(blip_args(shapes_data, tiny_blip, out, "--epochs", "2"))
    return out


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_scratch_folder_is_a_blip_in_the_hugging_face_layout(tiny_blip) -> None:
    import transformers
    names = {p.name for p in tiny_blip.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}  # the name transformers 5 and 4 write
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]  # nothing pickled
    model = transformers.BlipForConditionalGeneration.from_pretrained(tiny_blip, use_safetensors=True)
    assert model.config.vision_config.image_size == 64 and model.config.text_config.num_hidden_layers == 2
    tokenizer = transformers.BlipProcessor.from_pretrained(tiny_blip).tokenizer
    assert tokenizer.tokenize("a red circle") == ["a", "red", "circle"]  # the data's words are whole tokens


def test_fine_tuning_lowers_the_loss_and_writes_checkpoints_that_load_without_pickle(blip_run) -> None:
    losses = [r["train_loss"] for r in records(blip_run)]
    assert len(losses) == 2 and losses[1] < 0.85 * losses[0], losses
    checkpoint = load_checkpoint(blip_run / "checkpoint_last.pt")  # weights_only, then checked part by part
    assert checkpoint["model_config"]["family"] == "blip" and checkpoint["train_config"]["model"] == "blip"
    assert checkpoint["progress"]["epoch"] == 2
    # each tensor once: the output layer, tied to the word embeddings, is not stored twice
    assert "text.cls.predictions.decoder.weight" not in checkpoint["decoder"]
    assert "text.bert.embeddings.word_embeddings.weight" in checkpoint["decoder"]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(shapes_data, tiny_blip, blip_run, tmp_path) -> None:
    train.main(blip_args(shapes_data, tiny_blip, tmp_path, "--epochs", "1"))
    train.main(["--resume", str(tmp_path / "checkpoint_last.pt"), "--epochs", "2"])
    got, want = load_checkpoint(tmp_path / "checkpoint_last.pt"), load_checkpoint(blip_run / "checkpoint_last.pt")
    for part in ("encoder", "decoder"):
        for name, tensor in want[part].items():
            assert torch.equal(got[part][name], tensor), (part, name)
    assert [r["train_loss"] for r in records(tmp_path)] == [r["train_loss"] for r in records(blip_run)]


def test_greedy_decoding_through_the_one_beam_search_is_what_transformers_generates(shapes_data, blip_run) -> None:
    model, word_map = model_from_checkpoint(load_checkpoint(blip_run / "checkpoint_best.pt"), "best")
    model.eval()
    images = torch.stack([ImageCaptionsDataset(*shapes_data, "test")[i][0] for i in range(6)])
    ours = beam_search(model.decoder, model.encoder(images), word_map, beam_size=1, max_len=12)
    enc = model.encoder
    pixels = (torch.nn.functional.interpolate(images.float(), size=(64, 64), mode="bicubic", antialias=True)
              .clamp(0, 255) - enc.mean) / enc.std
    theirs = model.hf_model().generate(pixel_values=pixels, num_beams=1, do_sample=False, max_new_tokens=13)
    _, end, pad = model.decoder.special_tokens(word_map)
    for mine, generated in zip(ours, theirs.tolist()):
        tokens = [t for t in generated[1:] if t != pad]  # after the [DEC] it starts from
        assert mine.tokens == (tokens[:tokens.index(end)] if end in tokens else tokens[:12])
    assert any(mine.tokens for mine in ours)


def test_eval_scores_blip_with_the_same_table_and_files(shapes_data, blip_run, capsys) -> None:
    out = blip_run / "eval"
    evaluate.main(["--checkpoint", str(blip_run / "checkpoint_best.pt"), "--data-folder", str(shapes_data[0]),
                   "--data-name", shapes_data[1], "--beam-sizes", "1", "2", "--max-len", "12", "--grounding",
                   "--metrics", "bleu,cider", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| beam | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr-D |" in printed
    assert "| beam | correct % | CHAIR-s % |" in printed  # truth is scored on the text
    assert "attention grounding: n/a, decoder 'blip' has no attention" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"beam1", "beam2", "unavailable"} and "attention_in_box" not in scores["beam1"]
    captions = [c["caption"] for c in json.loads((out / "captions_beam1.json").read_text())]
    # BLIP's own tokens, decoded by its tokenizer: the greedy captions of the test images, word for word
    model, word_map = model_from_checkpoint(load_checkpoint(blip_run / "checkpoint_best.pt"), "best")
    decoded = caption_split(model, ImageCaptionsDataset(*shapes_data, "test"), word_map, [1], 12, 8,
                            torch.device("cpu"), progress=False)[1]
    tokenizer = model.decoder.tokenizer
    assert captions == [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in decoded]
    assert len(captions) == 40 and all(captions) and all(set(c.split()) <= set(word_map) for c in captions)


def test_caption_writes_the_csv_for_a_folder_and_says_why_there_is_no_plot(shapes_data, blip_run, tmp_path,
                                                                             capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((shapes_data[0] / "raw" / "images").iterdir())[:3]:
        shutil.copy(path, images / path.name)
    caption.main(["--img", str(images), "--checkpoint", str(blip_run / "checkpoint_best.pt"), "--out",
                  str(tmp_path / "out"), "--device", "cpu", "--max-len", "10", "--beam-size", "1"])
    printed = capsys.readouterr().out
    assert "note: decoder 'blip' has no attention: no attention plots" in printed
    with open(tmp_path / "out" / "captions.csv", newline="") as f:
        rows = list(csv.reader(f))
    names = sorted(p.name for p in images.iterdir())
    assert rows[0] == ["image", "caption"] and [r[0] for r in rows[1:]] == names
    model, word_map = model_from_checkpoint(load_checkpoint(blip_run / "checkpoint_best.pt"), "best")
    pictures = [load_image(images / name, 128) for name in names]
    expected = model.sentences(caption_images(model, pictures, word_map, 1, 10, torch.device("cpu")))
    assert [r[1] for r in rows[1:]] == expected and all(expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["captions.csv"]


def test_a_hugging_face_folder_is_scored_as_it_is(shapes_data, tiny_blip, tmp_path, capsys) -> None:
    """A pretrained folder (here the untrained one) needs no train.py checkpoint: zero-shot scores."""
    evaluate.main(["--checkpoint", str(tiny_blip), "--data-folder", str(shapes_data[0]), "--data-name",
                   shapes_data[1], "--beam-sizes", "1", "--max-len", "4", "--metrics", "bleu", "--device", "cpu",
                   "--out", str(tmp_path)])
    assert len(json.loads((tmp_path / "captions_beam1.json").read_text())) == 40


def test_exported_blip_weights_decode_like_the_checkpoint(blip_run, tmp_path) -> None:
    train.main(["--resume", str(blip_run / "checkpoint_best.pt"), "--export", str(tmp_path / "blip.safetensors")])
    exported = load_checkpoint(tmp_path / "blip.safetensors")
    a, _ = model_from_checkpoint(exported, "export")
    b, _ = model_from_checkpoint(load_checkpoint(blip_run / "checkpoint_best.pt"), "best")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # without .safetensors: a Hugging Face folder, which transformers and --pretrained read
    train.main(["--resume", str(blip_run / "checkpoint_best.pt"), "--export", str(tmp_path / "hf")])
    assert not list(tmp_path.glob(".hf.*"))  # written atomically: no temp folder left
    c = blip.from_pretrained(str(tmp_path / "hf"))
    for part in ("encoder", "decoder"):
        want = getattr(b, part).state_dict()
        assert all(torch.equal(t, want[name]) for name, t in getattr(c, part).state_dict().items()), part


def test_two_processes_fine_tune_blip_as_one(shapes_data, tiny_blip, tmp_path) -> None:
    """torchrun: DDP around BLIP's vision and text transformers, the ranks' shares weighted by their words."""
    run = ["--epochs", "1", "--batch-size", "120", "--val-max-len", "4"]
    train.main(blip_args(shapes_data, tiny_blip, tmp_path / "one", *run))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *blip_args(shapes_data, tiny_blip, tmp_path / "two", *run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = records(tmp_path / "two"), records(tmp_path / "one")
    assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"], rel=1e-4)
    assert got[0]["val_bleu4"] == pytest.approx(want[0]["val_bleu4"], abs=1e-6)
    # The weights after the 2 steps, all together (normwise): an unsynchronised gradient moves them by about 1e-1.
    # A key bias adds the same q.b to every score of a query, which the softmax ignores: its true gradient is 0,
    # its computed one round-off noise that Adam scales up to steps of the learning rate, so it is left out.
    a, b = (load_checkpoint(tmp_path / run / "checkpoint_last.pt") for run in ("two", "one"))
    names = [(part, n) for part in ("encoder", "decoder") for n in b[part] if not n.endswith("key.bias")]
    got, want = (torch.cat([c[part][n].flatten() for part, n in names]) for c in (a, b))
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_what_a_blip_run_refuses(shapes_data, tiny_blip, blip_run, trained_checkpoint, tmp_path) -> None:
    with pytest.raises(SatError, match="--embed-dim is for the attention models"):
        train.build_trainer(train.parse_args(blip_args(shapes_data, tiny_blip, tmp_path, "--embed-dim", "64")))
    with pytest.raises(SatError, match="no such folder.*hf download Salesforce/blip-image-captioning-base"):
        train.build_trainer(train.parse_args(blip_args(shapes_data, tmp_path / "absent", tmp_path)))
    with pytest.raises(SatError, match="--scst is for the attention models"):
        train.build_trainer(train.parse_args(["--resume", str(blip_run / "checkpoint_best.pt"), "--scst",
                                              "--checkpoint-dir", str(tmp_path / "scst")]))
    with pytest.raises(SatError, match="cannot join an ensemble"):
        evaluate.main(["--checkpoint", str(trained_checkpoint), str(blip_run / "checkpoint_best.pt"),
                       "--data-folder", str(shapes_data[0]), "--data-name", shapes_data[1]])


def rewrite(checkpoint: dict, path: Path) -> Path:
    checkpoint = {k: v for k, v in checkpoint.items() if k != "content_sha256"}
    torch.save({**checkpoint, "content_sha256": content_hash(checkpoint)}, path)
    return path


def test_a_hostile_or_mismatched_blip_config_is_refused_in_one_line(blip_run, tmp_path) -> None:
    checkpoint = load_checkpoint(blip_run / "checkpoint_best.pt")
    config = checkpoint["model_config"]
    huge = json.loads(json.dumps(config))
    huge["hf_config"]["text_config"]["num_hidden_layers"] = 10 ** 9
    with pytest.raises(SatError, match=r"text_config.num_hidden_layers is 1000000000, not from 1 to 64"):
        load_checkpoint(rewrite({**checkpoint, "model_config": huge}, tmp_path / "huge.pt"))
    deeper = json.loads(json.dumps(config))
    deeper["hf_config"]["vision_config"]["num_hidden_layers"] = 3
    with pytest.raises(SatError, match="encoder weights do not match its config: missing vision.encoder.layers.2"):
        load_checkpoint(rewrite({**checkpoint, "model_config": deeper}, tmp_path / "deeper.pt"))


def test_the_attention_models_scripts_do_not_import_transformers() -> None:
    code = "import sys, train, eval, caption, trainer, checkpoints, ensemble; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "False", result.stderr[-2000:]
