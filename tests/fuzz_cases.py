"""The hostile inputs of test_fuzz.py: valid starting points (Workspace) and, per kind of input, the mutations that
make each one wrong in one way, turned into command lines (Case) of the scripts that read it."""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from safetensors.torch import save_file

import datasets
import shapes
import sources
from checkpoints import FORMAT, MODEL_PARTS, content_hash, load_checkpoint, save_checkpoint
from config import ModelConfig, TrainConfig
from utils import SPECIAL_TOKENS

SEED = 21
SMALL = ["--encoder", "tf_efficientnet_lite0", "--encoder-weights", "none", "--encoded-size", "2", "--embed-dim", "8",
         "--attention-dim", "8", "--decoder-dim", "8", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
NAN, INF = float("nan"), float("inf")
# Values no field of the type accepts (every int field is bounded, or must equal something: vocab_size).
BAD = {"int": [-1, 2.5, "8", None, True, [3], 10 ** 12, 10 ** 5000],
       "float": [-1.0, NAN, INF, -INF, "0.1", None, True, [0.1], 1.5],
       "str": [7, None, ["soft"], {"a": 1}, 2.5], "bool": ["yes", 1, None, 0.0]}
VARIED = ("config field", "tensor", "word map", "images layout", "captions", "lengths")  # kinds drawn once more


@dataclass
class Case:
    name: str
    script: str
    argv: list[str]
    mention: str  # what the one line must name: the file or the flag


# ----------------------------------------------------------------------------------------------- the workspace

class Workspace:
    """Valid inputs, and a fresh folder per case for its malformed copy. Outputs would go to `out`."""

    def __init__(self, root: Path, trained: Path, shapes_data: tuple[Path, str]):
        self.root, self.rng, self.count = root, random.Random(SEED), 0
        self.out = root / "out"
        self.training = load_checkpoint(trained)
        self.model_only = {k: self.training[k] for k in MODEL_PARTS}
        folder, self.name = shapes_data
        self.test_data = root / "test_data"  # the trained model's word map; the test split only
        self.test_data.mkdir()
        for kind in ("IMAGES", "CAPTIONS", "CAPLENS", "REFS"):
            shutil.copy(datasets.split_file(folder, "TEST", kind, self.name), self.test_data)
        for prefix in ("WORDMAP", "BOXES"):
            shutil.copy(folder / f"{prefix}_{self.name}.json", self.test_data)
        self.photo = folder / "raw" / "images" / "shapes_000300.jpg"
        raw = root / "tiny_raw"  # a dataset small enough to copy per case, for train.py's fresh runs
        karpathy, _ = shapes.generate(raw, 8, 4, 4, side=32, seed=1)
        self.tiny_data = root / "tiny_data"
        self.tiny_name = datasets.create_input_files(sources.read_karpathy(karpathy, raw), "shapes", self.tiny_data,
                                                     min_word_freq=1, image_size=32, source=str(karpathy))
        self.karpathy = json.loads(karpathy.read_text())
        self.images = raw

    def case_dir(self) -> Path:
        self.count += 1
        path = self.root / f"case{self.count:03d}"
        path.mkdir()
        return path

    def snapshot(self) -> dict[str, tuple[int, int] | None]:
        return {str(p.relative_to(self.root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.root.rglob("*")}


# ------------------------------------------------------------------------------------------------- checkpoints

def model_mutations(ws: Workspace) -> dict[str, Callable[[dict, random.Random], None]]:
    """Each mutates a model-only checkpoint dict in place into one that is wrong in one way."""
    def config_field(c, r):
        f = r.choice([f for f in fields(ModelConfig)])
        c["model_config"][f.name] = r.choice(BAD[f.type] + (["no-such-choice"] if f.metadata.get("choices") else []))

    def tensor(c, r):
        part = r.choice(["encoder", "decoder"])
        name = r.choice([n for n, t in c[part].items() if t.is_floating_point() and t.dim() >= 1])
        t = c[part][name]
        c[part][name] = r.choice([t[:-1] if len(t) > 1 else t.repeat(2), t.long(), t.clone().fill_(NAN),
                                  t.clone().index_fill_(0, torch.tensor([0]), INF), t.to(torch.complex64),
                                  torch.zeros(1).expand(t.shape), t.tolist()])

    def word(c, r):
        wm = c["word_map"]
        word = r.choice(sorted(set(wm) - set(SPECIAL_TOKENS)))
        r.choice([lambda: wm.pop(r.choice(["<start>", "<end>", "<pad>", "<unk>"])),
                  lambda: wm.update({word: str(wm[word])}), lambda: wm.update({word: len(wm) + r.randint(0, 99)}),
                  lambda: wm.update({word: -1}), lambda: wm.update({"two words": wm.pop(word)}),
                  lambda: wm.update({"": wm.pop(word)}), lambda: wm.update({"<pad>": 5, word: 0}),
                  lambda: wm.update({word: wm["<unk>"]}), lambda: wm.update({"zebra": len(wm)})])()

    return {
        "config field": config_field,
        "config unknown field": lambda c, r: c["model_config"].update(scheduler="step"),
        "config missing vocab_size": lambda c, r: c["model_config"].pop("vocab_size"),
        "config not a dict": lambda c, r: c.update(model_config=r.choice([[], "soft", None, 3])),
        "part missing": lambda c, r: c.pop(r.choice([k for k in MODEL_PARTS if k != "format"])),
        "unknown entry": lambda c, r: c.update(scheduler={"last_epoch": 3}),
        "image_size": lambda c, r: c.update(image_size=r.choice([6000, 0, 7, "256", 256.0, True, None, -256])),
        "word map not a dict": lambda c, r: c.update(word_map=r.choice([sorted(c["word_map"]), "words", None])),
        "word map": word,
        "weights not a dict": lambda c, r: c.update(decoder=r.choice([[], None, "weights"])),
        "tensor missing": lambda c, r: c["decoder"].pop(r.choice(sorted(c["decoder"]))),
        "tensor extra": lambda c, r: c["encoder"].update({"backdoor.weight": torch.zeros(3)}),
        "tensor": tensor,
    }


def training_mutations() -> dict[str, Callable[[dict, random.Random], None]]:
    def train_field(c, r):
        f = r.choice(fields(TrainConfig))
        c["train_config"][f.name] = r.choice(BAD[f.type] + (["no-such-choice"] if f.metadata.get("choices") else []))

    def progress(c, r):
        name = r.choice(["epoch", "batches_done", "step", "tokens", "samples", "best_score", "loss_sum"])
        c["progress"][name] = r.choice([NAN, INF, "3", None, [1]] if name in ("best_score", "loss_sum")
                                       else [-1, 2.5, "3", None, True, 10 ** 5000])

    def optimizer(c, r):
        groups, state = c["optimizer"]["param_groups"], c["optimizer"]["state"]
        index = r.choice(sorted(state))
        r.choice([lambda: groups.append(copy.deepcopy(groups[0])), lambda: groups[0]["params"].pop(),
                  lambda: groups[0].update(lr=r.choice([NAN, -1e-3, 10.0, 0.0, "1e-3", None])),
                  lambda: groups[0].update(maximize=True), lambda: groups[0].update(betas=(0.9, 1.5)),
                  lambda: groups[0].update(params=torch.arange(len(groups[0]["params"]))),
                  lambda: state[index].pop("exp_avg"), lambda: state[index].update(exp_avg=torch.zeros(3)),
                  lambda: state[index]["exp_avg_sq"].fill_(NAN), lambda: state[index].update(step=torch.tensor(-1.0)),
                  lambda: state.update({10 ** 6: state[index]}), lambda: c["optimizer"].update(state=[])])()

    return {
        "train config field": train_field,
        "train config missing": lambda c, r: c.pop("train_config"),
        "progress": progress,
        "progress unknown field": lambda c, r: c["progress"].update(lr=0.1),
        "progress missing": lambda c, r: c.pop("progress"),
        "rng": lambda c, r: c.update(rng=r.choice([{}, {"torch": torch.zeros(7, dtype=torch.uint8)},
                                                  {"torch": c["rng"]["torch"].float()}, None,
                                                  {"torch": c["rng"]["torch"], "numpy": 3}, {"torch": [1, 2]}])),
        "rng missing": lambda c, r: c.pop("rng"),
        "scaler": lambda c, r: c.update(scaler=r.choice([None, [], {"scale": -1.0}, {"scale": NAN}, "x"])),
        "optimizer": optimizer,
        "optimizer not a dict": lambda c, r: c.update(optimizer=r.choice([[], None, {"state": {}}])),
    }


def raw_damage(ws: Workspace, valid: Path, r: random.Random) -> dict[str, Callable[[Path], None]]:
    """Files that are not what torch.save wrote: damaged bytes, truncated, other formats."""
    with zipfile.ZipFile(valid) as z:
        records = [(i.header_offset, i.file_size, i.filename) for i in z.infolist()]
    data = valid.read_bytes()

    def overwrite_tensor_bytes(path):  # the zip stays valid: only the hash can tell
        offset, size, name = r.choice([rec for rec in records if "/data/" in rec[2] and rec[1] > 64])
        start = offset + 30 + len(name.encode()) + r.randrange(size - 16)
        path.write_bytes(data[:start] + bytes(r.randrange(256) for _ in range(8)) + data[start + 8:])

    def deflated(path):
        with zipfile.ZipFile(valid) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))

    def raw_save(content):
        def save(path):
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(20_000)  # pickling the deeply nested case recurses
            try:
                torch.save(content, path)
            finally:
                sys.setrecursionlimit(limit)
        return save

    return {
        "overwritten tensor bytes": overwrite_tensor_bytes,
        "truncated": lambda p: p.write_bytes(data[:r.randrange(len(data) // 10, len(data) - 100)]),
        "empty file": lambda p: p.write_bytes(b""),
        "random bytes": lambda p: p.write_bytes(bytes(r.randrange(256) for _ in range(4096))),
        "a photo renamed": lambda p: p.write_bytes(ws.photo.read_bytes()),
        "compressed zip": deflated,
        "edited without its hash": raw_save({**ws.model_only, "format": FORMAT, "content_sha256": "0" * 64,
                                             "image_size": 128}),
        "hash missing": raw_save({**ws.model_only, "format": FORMAT}),
        "not a dict": raw_save([1, 2, 3]),
        "format": raw_save({**ws.model_only, "format": r.choice([FORMAT + 1, 0, "3", True, None, 2.0])}),
        "nested too deeply": raw_save({"model_config": {}, "format": 2, "word_map": _nested(3000)}),
    }


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def safetensors_damage(ws: Workspace, r: random.Random) -> dict[str, Callable[[dict], None]]:
    """Mutations of an export's metadata (string -> string) and tensors, written with a matching hash."""
    return {
        "metadata not JSON": lambda m: m.update({r.choice(["model_config", "word_map"]): "{not json"}),
        "metadata word map missing": lambda m: m.pop("word_map"),
        "metadata word map null": lambda m: m.update(word_map="null"),
        "metadata image size": lambda m: m.update(image_size=r.choice(["6000", "abc", "", "1e3"])),
        "metadata version": lambda m: m.update(version=r.choice(["99", "x", "-1"])),
        "metadata hash wrong": lambda m: m.update(content_sha256="f" * 64),
        "stray tensor": lambda m: m.update(_tensors={**m["_tensors"], "other.weight": torch.zeros(2)}),
    }


def write_safetensors(model: dict, path: Path, mutate: Callable[[dict], None]) -> None:
    metadata = {"format": "sat", "version": str(FORMAT), "model_config": json.dumps(model["model_config"]),
                "word_map": json.dumps(model["word_map"]), "image_size": str(model["image_size"]),
                "content_sha256": content_hash({**model, "format": FORMAT}),
                "_tensors": {f"{part}.{n}": t.contiguous() for part in ("encoder", "decoder")
                             for n, t in model[part].items()}}
    mutate(metadata)
    save_file(metadata.pop("_tensors"), str(path), metadata=metadata)


def checkpoint_cases(ws: Workspace) -> list[Case]:
    r, cases = ws.rng, []
    data = ["--data-folder", str(ws.test_data), "--data-name", ws.name]
    scripts = {"eval": lambda p: ["--checkpoint", str(p), *data, "--metrics", "bleu", "--out", str(ws.out)],
               "caption": lambda p: ["--img", str(ws.photo), "--checkpoint", str(p), "--out", str(ws.out)],
               "train": lambda p: [*data, "--checkpoint-dir", str(ws.out), "--device", "cpu", "--resume", str(p)]}
    kinds = model_mutations(ws)
    for kind, mutate in [*kinds.items(), *[(k, kinds[k]) for k in VARIED * 2 if k in kinds]]:
        content = copy.deepcopy(ws.model_only)
        mutate(content, r)
        path = ws.case_dir() / "checkpoint.pt"
        save_checkpoint(path, content)  # with a valid hash: validation, not the hash, must refuse it
        script = r.choice(["eval", "caption"])
        cases.append(Case(f"checkpoint {kind} ({script})", script, scripts[script](path), str(path)))
    for kind, mutate in training_mutations().items():
        content = copy.deepcopy(ws.training)
        mutate(content, r)
        path = ws.case_dir() / "checkpoint_last.pt"
        save_checkpoint(path, content)
        cases.append(Case(f"training checkpoint {kind}", "train", scripts["train"](path), str(path)))
    valid = ws.case_dir() / "valid.pt"
    save_checkpoint(valid, ws.model_only)
    for kind, damage in raw_damage(ws, valid, r).items():
        path = ws.case_dir() / "checkpoint.pt"
        damage(path)
        script = r.choice(list(scripts))
        cases.append(Case(f"file {kind} ({script})", script, scripts[script](path), str(path)))
    for kind, mutate in safetensors_damage(ws, r).items():
        path = ws.case_dir() / "model.safetensors"
        write_safetensors(ws.model_only, path, mutate)
        script = r.choice(["eval", "caption"])
        cases.append(Case(f"export {kind} ({script})", script, scripts[script](path), str(path)))
    return cases


# ------------------------------------------------------------------------------------------------- data folders

def _edit_h5(path: Path, edit: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as h5:
        edit(h5)


def _replace(h5: h5py.File, name: str, data: Any) -> None:
    del h5[name]
    h5.create_dataset(name, data=data)


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """`edit` changes the document in place (returning None) or returns the one to write instead."""
    value = json.loads(path.read_text())
    result = edit(value)
    path.write_text(json.dumps(value if result is None else result))


def data_mutations(r: random.Random) -> dict[str, tuple[str, Callable[[Path], None]]]:
    """kind -> (the file it damages, how): each leaves a data folder unlike what create_input_files writes."""
    def images(h5):
        array = h5["images"][()]
        _replace(h5, "images", r.choice([array.transpose(0, 2, 3, 1), array.reshape(-1), array.astype(np.float64),
                                         array[:, :, :-1, :-1], array[:0], array[:, :1]]))

    def caption(rows):
        i = r.randrange(len(rows))
        n = rows[i].index(2)  # its <end>
        r.choice([lambda: rows[i].append(0), lambda: rows[i].__setitem__(1, 10 ** 4),
                  lambda: rows[i].__setitem__(1, -3), lambda: rows[i].__setitem__(1, "dog"),
                  lambda: rows[i].__setitem__(1, 4.5),
                  lambda: rows[i].__setitem__(0, 4), lambda: rows[i].__setitem__(n, 4),
                  lambda: rows[i].__setitem__(1, 0), lambda: rows[i].__setitem__(1, 1),
                  lambda: rows[i].__setitem__(-1, 5), lambda: rows.__setitem__(i, [rows[i]]),
                  lambda: rows.pop()])()

    def lengths(values):
        i = r.randrange(len(values))
        r.choice([lambda: values.__setitem__(i, r.choice([0, 1, 2, -5, 10 ** 6, "7", 7.5, None])),
                  lambda: values.pop(), lambda: values.append(5)])()

    def references(refs):
        i = r.randrange(len(refs))
        r.choice([lambda: refs.pop(), lambda: refs.__setitem__(i, []), lambda: refs.__setitem__(i, "a dog"),
                  lambda: refs.__setitem__(i, [3]), lambda: refs.append(["one more"])])()

    def garbage(path):
        path.write_bytes(bytes(r.randrange(256) for _ in range(2048)))

    return {
        "images missing": ("IMAGES", lambda p: _edit_h5(p, lambda h5: h5.__delitem__("images"))),
        "image_ids missing": ("IMAGES", lambda p: _edit_h5(p, lambda h5: h5.__delitem__("image_ids"))),
        "filenames missing": ("IMAGES", lambda p: _edit_h5(p, lambda h5: h5.__delitem__("filenames"))),
        "attribute missing": ("IMAGES", lambda p: _edit_h5(p, lambda h5: h5.attrs.__delitem__(
            r.choice(["captions_per_image", "image_size"])))),
        "attribute value": ("IMAGES", lambda p: _edit_h5(p, lambda h5: h5.attrs.__setitem__(
            r.choice(["captions_per_image", "image_size"]), r.choice(["5", 2.5, 0, 10 ** 6, np.arange(3)])))),
        "images layout": ("IMAGES", lambda p: _edit_h5(p, images)),
        "image ids": ("IMAGES", lambda p: _edit_h5(p, lambda h5: _replace(h5, "image_ids", r.choice(
            [h5["image_ids"][()].astype(float), h5["image_ids"][:-1], -h5["image_ids"][()] - 1,
             np.zeros_like(h5["image_ids"][()])])))),
        "file names": ("IMAGES", lambda p: _edit_h5(p, lambda h5: _replace(h5, "filenames",
                                                                           np.arange(len(h5["images"]))))),
        "images truncated": ("IMAGES", lambda p: p.write_bytes(p.read_bytes()[:r.randrange(100,
                                                                                          p.stat().st_size // 2)])),
        "images garbage": ("IMAGES", garbage),
        "captions": ("CAPTIONS", lambda p: _edit_json(p, caption)),
        "captions not a list": ("CAPTIONS", lambda p: _edit_json(p, lambda v: r.choice([{"0": v[0]}, "x", 3, []]))),
        "captions not JSON": ("CAPTIONS", lambda p: p.write_text(p.read_text()[:-3])),
        "captions nested deeply": ("CAPTIONS", lambda p: p.write_text("[" * 100_000 + "]" * 100_000)),
        "lengths": ("CAPLENS", lambda p: _edit_json(p, lengths)),
        "references": ("REFS", lambda p: _edit_json(p, references)),
        "word map": ("WORDMAP", lambda p: _edit_json(p, lambda wm: r.choice(
            [sorted(wm), {k: v for k, v in wm.items() if k != "<end>"}, {**wm, "<unk>": "3"},
             {**wm, "two words": len(wm)}]))),
    }


def data_cases(ws: Workspace) -> list[Case]:
    """Through eval.py (the test split, with the trained model) and train.py --cache-features (a fresh model on
    the tiny dataset: its train and val splits), where garbage once reached the feature cache."""
    r, cases = ws.rng, []
    checkpoint = ws.root / "model.pt"
    save_checkpoint(checkpoint, ws.model_only)
    kinds = data_mutations(r)
    for kind, (target, damage) in [*kinds.items(), *[(k, kinds[k]) for k in VARIED if k in kinds]]:
        script = r.choice(["eval", "train"])
        source, name, split = (ws.test_data, ws.name, "TEST") if script == "eval" else \
            (ws.tiny_data, ws.tiny_name, r.choice(["TRAIN", "VAL"]))
        folder = ws.case_dir() / "data"
        shutil.copytree(source, folder)
        path = folder / f"WORDMAP_{name}.json" if target == "WORDMAP" else \
            datasets.split_file(folder, split, target, name)
        damage(path)
        data = ["--data-folder", str(folder), "--data-name", name]
        argv = ["--checkpoint", str(checkpoint), *data, "--split", split.lower(), "--metrics", "bleu", "--out",
                str(ws.out)] if script == "eval" else \
            [*data, "--checkpoint-dir", str(ws.out), "--cache-features", *SMALL]
        cases.append(Case(f"data {kind} ({script}, {split.lower()})", script, argv, path.name))
    return cases


# ------------------------------------------------------------------------------------------ Karpathy JSON, CSV

def karpathy_mutations(r: random.Random) -> dict[str, Callable[[dict], Any]]:
    """Each returns the damaged document (or None when it changed it in place)."""
    def entry(doc):
        image = r.choice(doc["images"])
        key, value = r.choice([
            ("filename", r.choice([None, 3, "", ["a.jpg"]])), ("filepath", r.choice([None, 4, ["x"]])),
            ("split", r.choice([None, "dev", 3])), ("sentences", r.choice([None, "a dog", {"tokens": ["a"]}, [1]])),
            ("cocoid", r.choice(["12", 1.5, -3, True, 2 ** 70, None]))])
        image[key] = value

    def sentence(doc):
        image = r.choice(doc["images"])
        image["sentences"][0] = r.choice([
            "a red circle", {"raw": "a red circle"}, {"tokens": "a red circle"}, {"tokens": None},
            {"tokens": [1, 2]}, {"tokens": ["a", None]}, {"tokens": ["a red"]}, {"tokens": [""]},
            {"tokens": [["a"]]}])

    def duplicate_id(doc):
        doc["images"][1]["cocoid"] = doc["images"][0]["cocoid"] = 7

    return {
        "not an object": lambda doc: r.choice([doc["images"], "images", 3]),
        "no images list": lambda doc: r.choice([{}, {"images": {}}, {"images": "x"}, {"images": None}]),
        "image not an object": lambda doc: doc["images"].__setitem__(0, r.choice([3, None, "a.jpg", []])),
        "field missing": lambda doc: r.choice(doc["images"]).pop(r.choice(["filename", "split", "sentences"])),
        "field type": entry,
        "sentence": sentence,
        "duplicate id": duplicate_id,
    }


def csv_damage(r: random.Random) -> dict[str, str]:
    rows = "a.png,a red circle\nb.png,a blue square\n"
    return {
        "no header": rows,
        "wrong header": "file,text\n" + rows,
        "header only with a byte-order mark": "\ufefffile,caption\n" + rows,
        "unquoted comma": "image,caption\n" + rows + "c.png,a dog, running\n",
        "no image name": "image,caption\n" + rows + ",a lonely caption\n",
        "short row": "image,caption\n" + rows + "d.png\n",
        "huge field": "image,caption\n" + rows + "e.png,\"" + "word " * r.randint(300_000, 400_000) + "\"\n",
        "empty file": "",
    }


def source_cases(ws: Workspace) -> list[Case]:
    r, cases = ws.rng, []
    for kind, mutate in karpathy_mutations(r).items():
        for _ in range(2):
            doc = copy.deepcopy(ws.karpathy)
            result = mutate(doc)
            path = ws.case_dir() / "dataset.json"
            path.write_text(json.dumps(doc if result is None else result))
            argv = ["--dataset", "coco", "--karpathy-json", str(path), "--image-folder", str(ws.images),
                    "--output-folder", str(ws.out), "--workers", "0"]
            cases.append(Case(f"karpathy {kind}", "create_input_files", argv, str(path)))
    deep = ws.case_dir() / "dataset.json"
    deep.write_text('{"images": [' + "[" * 50_000 + "]" * 50_000 + "]}")
    cases.append(Case("karpathy nested deeply", "create_input_files", ["--dataset", "flickr8k", "--karpathy-json",
                      str(deep), "--image-folder", str(ws.images), "--output-folder", str(ws.out)], str(deep)))
    for kind, text in csv_damage(r).items():
        path = ws.case_dir() / "captions.csv"
        path.write_text(text, encoding="utf-8")
        argv = ["--dataset", "folder", "--captions-csv", str(path), "--image-folder", str(ws.images / "images"),
                "--output-folder", str(ws.out), "--workers", "0"]
        cases.append(Case(f"csv {kind}", "create_input_files", argv, str(path)))
    return cases


# ------------------------------------------------------------------------------------------------------- flags

FLAG_VALUES = {  # flag -> values it must refuse; the issue's own first
    "train": {"--grad-clip": ["nan", "-1", "0", "inf"], "--lr-decay-factor": ["-1", "1.5", "1", "0", "nan"],
              "--seed": [str(2 ** 70), "-1", "1.5"], "--device": ["foo", "mps", "meta", "cuda:-1", "cpu:0", ""],
              "--decoder-lr": ["0", "-1e-4", "nan", "1e309"], "--dropout": ["1", "1.5", "-0.1", "nan"],
              "--encoded-size": ["0", "65", "1e3"], "--batch-size": ["0", "-8", str(10 ** 7)],
              "--val-max-len": ["0", "100000"], "--val-beam-size": ["0", "200000"], "--epochs": ["0", "x"],
              "--workers": ["-1", "100000"], "--scst-samples": ["1", "1000"], "--decoder": ["transformer"],
              "--alpha-c": ["-1", "nan"], "--hard-expectation": ["1.5", "-1"], "--max-bad-steps": ["0"]},
    "eval": {"--beam-sizes": ["0", "200000", "-3"], "--max-len": ["0", "100000"], "--workers": ["100000"],
             "--batch-size": ["0"], "--length-penalty": ["nan", "inf"], "--split": ["dev"],
             "--device": ["foo", "mps", "cuda:99"], "--metrics": ["", "wer", ","]},
    "caption": {"--max-len": ["100000", "0", "-1"], "--beam-size": ["200000", "0"], "--device": ["meta", "tpu"]},
    "create_input_files": {"--image-size": ["6000", "0", "4"], "--captions-per-image": [str(10 ** 9), "0"],
                           "--max-len": [str(10 ** 9), "0"], "--seed": [str(2 ** 70), "-1"],
                           "--val-fraction": ["nan", "1.5", "-0.1"], "--workers": ["-1", "100000"],
                           "--shapes-train": ["0", str(10 ** 9)], "--dataset": ["imagenet"]},
}


def flag_cases(ws: Workspace) -> list[Case]:
    """Each flag with a value it must refuse, on an otherwise valid command line."""
    data = ["--data-folder", str(ws.tiny_data), "--data-name", ws.tiny_name]
    model = ws.root / "model.pt"
    valid = {"train": [*data, "--checkpoint-dir", str(ws.out), *SMALL],
             "eval": ["--checkpoint", str(model), "--data-folder", str(ws.test_data), "--data-name", ws.name,
                      "--metrics", "bleu", "--out", str(ws.out)],
             "caption": ["--img", str(ws.photo), "--checkpoint", str(model), "--out", str(ws.out)],
             "create_input_files": ["--output-folder", str(ws.out), "--shapes-train", "4", "--shapes-val", "2",
                                    "--shapes-test", "2", "--workers", "0"]}
    cases = []
    for script, flags in FLAG_VALUES.items():
        for flag, values in flags.items():
            for value in values:
                cases.append(Case(f"{script} {flag} {value!r}", script, [*valid[script], flag, value], flag))
    cases.append(Case("create_input_files fractions sum over 1", "create_input_files",
                      ["--dataset", "folder", "--captions-csv", str(ws.root / "none.csv"), "--image-folder",
                       str(ws.images), "--output-folder", str(ws.out), "--val-fraction", "0.6", "--test-fraction",
                       "0.5"], "--val-fraction"))
    return cases
