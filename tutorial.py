"""Checkpoints of the old PyTorch tutorial (sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning), read without
running code from them and converted into sat checkpoints that compute what the tutorial's model computed.

A tutorial checkpoint (`BEST_checkpoint_<data_name>.pth.tar`) is a pickled dict: `epoch`,
`epochs_since_improvement`, `bleu-4`, the whole `encoder` and `decoder` modules and their Adam optimizers
(`encoder_optimizer` is None unless the encoder was fine-tuned). Unpickling calls whatever functions the file
names, so `load_pickled` resolves names through an allow-list: the tutorial's classes, and the torch classes
they are built of, become inert stand-ins that only hold the attributes the file gives them; tensors are rebuilt
by torch's own functions; any other name (os.system, eval, ...) stops the load before it is called.

The tutorial's model is sat's soft-attention decoder with the tutorial's choices: ReLU in the attention MLP,
h0 and c0 from the mean annotation vector, the sigmoid gate f_beta on the context, and words from
fc(dropout(h_t)), i.e. ModelConfig(decoder="soft", attention_activation="relu", output_layer="linear"). Its
`resnet.*` is sat's `backbone.*`, `decode_step` sat's `lstm`. The tutorial normalised [0, 1] floats with
ImageNet's mean and std; sat's Encoder does the same arithmetic on uint8 input.
"""
from __future__ import annotations

import functools
import os
import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from checkpoints import export_safetensors, model_from_checkpoint, save_checkpoint
from config import ENCODER_CHANNELS, ModelConfig, from_dict
from datasets import read_word_map
from utils import SatError

IMAGE_SIZE = 256  # the tutorial resized every image to 256 x 256

# ----------------------------------------------------------------------------------------------- the allow-list

# Classes whose objects become StandIns. A stand-in runs no code of the class it replaces (the tutorial's code
# is not needed, nor imported), so admitting a class name can only ever produce inert data.
TUTORIAL_MODULES = ("models", "__main__")  # its models.py, or a notebook that defined the classes
TUTORIAL_CLASSES = ("Encoder", "Attention", "DecoderWithAttention")
TORCH_CLASSES = {  # what the tutorial's modules and optimizers are made of
    "torch.nn.modules.container": ("Sequential",),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.activation": ("ReLU", "Sigmoid", "Softmax"),
    "torch.nn.modules.pooling": ("MaxPool2d", "AdaptiveAvgPool2d"),
    "torch.nn.modules.linear": ("Linear",),
    "torch.nn.modules.sparse": ("Embedding",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.rnn": ("LSTMCell",),
    "torchvision.models.resnet": ("Bottleneck", "BasicBlock"),
    "torch.optim.adam": ("Adam",),
}


def _plain_dict(*_args: Any) -> dict:
    """Adam's state, a defaultdict, read as a plain dict: its default factory is dropped, so never called."""
    return {}


# Functions the pickle may call. Each only builds data from its arguments, whatever they are. Storages
# (torch.FloatStorage, ...) never reach this list: torch's loader resolves them itself and reads their bytes.
CALLABLES = {
    # A tensor over a storage torch read from the file; torch's own weights_only loader admits these two.
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,  # how PyTorch 0.4 pickled a parameter
    ("collections", "OrderedDict"): OrderedDict,  # every module's _parameters, _buffers, _modules, hooks
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "dict"): dict,  # the defaultdict's factory, dropped above
    ("builtins", "set"): set,  # _non_persistent_buffers_set
}


class StandIn:
    """An inert object in place of an allowed class: it keeps the attributes the pickle gives it in `attrs` and
    has no behaviour, so no pickled value can make it run anything."""

    pickled_as = ""  # "module.Class" as the file names it
    dump_patches = False  # torch's pre-1.6 loader asks this of module classes whose source it compares

    def __new__(cls, *_args: Any, **_kwargs: Any) -> "StandIn":
        obj = super().__new__(cls)
        obj.attrs = {}
        return obj

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        """Calling the class, as a pickle may, with any arguments, builds an empty stand-in."""

    def __setstate__(self, state: Any) -> None:
        # Kept apart from the object's own __dict__: a pickled '__class__' or 'attrs' key is just data here.
        self.attrs = dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"StandIn({self.pickled_as})"


@functools.cache
def _stand_in(module: str, name: str) -> type[StandIn]:
    return type(name, (StandIn,), {"pickled_as": f"{module}.{name}", "__module__": __name__,
                                   "__qualname__": f"StandIn[{module}.{name}]"})


class RefusedGlobal(pickle.UnpicklingError):
    """A global the allow-list does not admit; `name` is module.name as the pickle wrote it."""

    def __init__(self, name: str):
        super().__init__(f"refused {name}")
        self.name = name


class AllowListUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class answers only from the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 names Python 2's module
        if (module, name) in CALLABLES:
            return CALLABLES[(module, name)]
        if name in TORCH_CLASSES.get(module, ()) or (module in TUTORIAL_MODULES and name in TUTORIAL_CLASSES):
            return _stand_in(module, name)
        raise RefusedGlobal(f"{module}.{name}")


# What torch.load takes as its pickle_module: the allow-list in place of the pickle module.
ALLOW_LIST = types.SimpleNamespace(__name__="sat_allow_list", Unpickler=AllowListUnpickler,
                                   load=lambda f, **kw: AllowListUnpickler(f, **kw).load())


def load_pickled(path: str | os.PathLike) -> Any:
    """A pickled checkpoint (zip, or the bare pickle of PyTorch < 1.6) through the allow-list: tensors, plain
    containers and StandIns; any other global is refused before it could be called."""
    with warnings.catch_warnings():
        # PyTorch < 1.6 saved each module class's source, and its loader warns that a stand-in's differs.
        warnings.simplefilter("ignore")
        try:  # weights_only=False only lets torch take another pickle module: ALLOW_LIST, not pickle
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=ALLOW_LIST)
        except RefusedGlobal as e:
            raise SatError(f"{path}: refused: its pickle asks for {e.name}, which is not on the allow-list (the "
                           "tutorial's model classes, tensors, containers), so it was never called") from None
        except Exception as e:  # noqa: BLE001 - a malformed pickle can fail inside any allowed constructor
            raise SatError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") \
                from None


def _class_name(obj: Any) -> str:
    """The pickled class of a stand-in (without its module), else the Python type."""
    return obj.pickled_as.rsplit(".", 1)[-1] if isinstance(obj, StandIn) else type(obj).__name__


def is_tutorial_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("decoder"), StandIn) and \
        _class_name(obj["decoder"]) == "DecoderWithAttention"


def load_trusted(path: str | os.PathLike) -> Any:
    """load_checkpoint's --trust-checkpoint branch: the allow-list, and a tutorial checkpoint sent to the
    converter (it needs its word map, which the tutorial kept in another file)."""
    obj = load_pickled(path)
    if is_tutorial_checkpoint(obj):
        raise SatError(f"{path}: a checkpoint of the old tutorial; convert it once with python convert_tutorial.py "
                       f"--checkpoint {path} --word-map WORDMAP_<data_name>.json --out model.pt "
                       "--trust-checkpoint, then use model.pt")
    return obj


# ----------------------------------------------------------------------------------------- reading the modules

def state_dict(module: StandIn, source: str, prefix: str = "", above: frozenset[int] = frozenset()) -> dict[str, Any]:
    """A pickled module's state_dict, walked from its _parameters, _buffers and _modules as nn.Module would."""
    if id(module) in above:  # a pickle can make a module its own child: that would never end
        raise SatError(f"{source}: module '{prefix.rstrip('.')}' contains itself")
    attrs = module.attrs
    skip = attrs.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, set) else set()
    out = {}
    for table in ("_parameters", "_buffers"):
        for name, tensor in _table(attrs, table, source, prefix).items():
            if tensor is None or (table == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise SatError(f"{source}: '{prefix}{name}' is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach().clone()  # a plain tensor: no pickled hooks come along
    for name, child in _table(attrs, "_modules", source, prefix).items():
        if child is None:
            continue
        if not isinstance(child, StandIn):
            raise SatError(f"{source}: '{prefix}{name}' is a {type(child).__name__}, not a module")
        out.update(state_dict(child, source, f"{prefix}{name}.", above | {id(module)}))
    return out


def _table(attrs: dict, table: str, source: str, prefix: str) -> dict:
    value = attrs.get(table) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SatError(f"{source}: the {table} of module '{prefix.rstrip('.') or 'top'}' is not a dict of names")
    return value


def _child(module: StandIn, name: str, kind: str, source: str) -> StandIn:
    """The submodule `name`, which must be pickled as class `kind` (its name without the module)."""
    modules = module.attrs.get("_modules")
    child = modules.get(name) if isinstance(modules, dict) else None
    if not isinstance(child, StandIn) or _class_name(child) != kind:
        found = "nothing" if child is None else f"a {_class_name(child)}"
        raise SatError(f"{source}: where the tutorial's {_class_name(module)} holds a {kind} '{name}', this file "
                       f"has {found}: not the tutorial's model")
    return child


# ResNet blocks per stage -> torchvision's name; the tutorial used resnet101, any depth converts.
RESNETS = {("BasicBlock", (2, 2, 2, 2)): "resnet18", ("BasicBlock", (3, 4, 6, 3)): "resnet34",
           ("Bottleneck", (3, 4, 6, 3)): "resnet50", ("Bottleneck", (3, 4, 23, 3)): "resnet101",
           ("Bottleneck", (3, 8, 36, 3)): "resnet152"}


def resnet_name(encoder_state: dict[str, Any]) -> str | None:
    """Which torchvision ResNet the tutorial Encoder's `resnet.*` tensors are (the children of the ResNet before
    its pooling and classifier: conv1, bn1, relu, maxpool, then layer1..4 as children 4..7), or None."""
    blocks = tuple(len({k.split(".")[2] for k in encoder_state if k.startswith(f"resnet.{stage}.")})
                   for stage in range(4, 8))
    kind = "Bottleneck" if "resnet.4.0.conv3.weight" in encoder_state else "BasicBlock"
    return RESNETS.get((kind, blocks))


# --------------------------------------------------------------------------------------------------- conversion

def from_tutorial(checkpoint: Any, word_map: dict[str, int], source: str, image_size: int = IMAGE_SIZE) -> dict:
    """A sat checkpoint (state_dicts, ModelConfig, word map, image size) of the tutorial's model."""
    if not is_tutorial_checkpoint(checkpoint) or _class_name(checkpoint.get("encoder")) != "Encoder" or \
            not isinstance(checkpoint["encoder"], StandIn):
        raise SatError(f"{source}: not a checkpoint of the tutorial (a dict holding its Encoder as 'encoder' and its "
                       "DecoderWithAttention as 'decoder')")
    encoder, decoder = checkpoint["encoder"], checkpoint["decoder"]
    enc, dec = state_dict(encoder, source), state_dict(decoder, source)
    cfg = _model_config(encoder, decoder, enc, dec, len(word_map), source)
    converted = {"model_config": cfg.to_dict(), "word_map": word_map, "image_size": image_size,
                 "encoder": {"backbone." + k.removeprefix("resnet."): v for k, v in enc.items()},
                 "decoder": {k.replace("decode_step.", "lstm.", 1) if k.startswith("decode_step.") else k: v
                             for k, v in dec.items()}}
    # Loading into sat's model checks every name and shape; its state_dicts are then the checkpoint's (a BatchNorm
    # of PyTorch 0.4.0, which had no num_batches_tracked yet, gets sat's zero).
    model, _ = model_from_checkpoint(converted, source)
    return {**converted, "encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict()}


def _model_config(encoder: StandIn, decoder: StandIn, enc: dict[str, Any], dec: dict[str, Any], words: int,
                  source: str) -> ModelConfig:
    """The ModelConfig under which sat computes what the tutorial's modules computed: their layout checked,
    their sizes read from the tensors' shapes."""
    _child(_child(decoder, "attention", "Attention", source), "relu", "ReLU", source)  # its nonlinearity
    _child(decoder, "decode_step", "LSTMCell", source)
    name = resnet_name(enc)
    if name is None:
        raise SatError(f"{source}: its encoder is not one of torchvision's ResNet-18/34/50/101/152")
    shapes = {k: tuple(v.shape) for k, v in dec.items()}
    for key in ("embedding.weight", "attention.encoder_att.weight", "init_h.weight"):
        if len(shapes.get(key, ())) != 2:
            raise SatError(f"{source}: its decoder has no 2-d '{key}': not the tutorial's DecoderWithAttention")
    vocab_size, embed_dim = shapes["embedding.weight"]
    if words != vocab_size:
        raise SatError(f"{source}: its decoder has {vocab_size} words, the word map {words}: not the word map it "
                       "was trained with")
    if shapes["init_h.weight"][1] != ENCODER_CHANNELS[name][32]:
        raise SatError(f"{source}: its decoder reads {shapes['init_h.weight'][1]} channels, its {name} encoder "
                       f"gives {ENCODER_CHANNELS[name][32]}")
    values = {"vocab_size": vocab_size, "encoder": name,
              "encoded_size": _pooled_size(_child(encoder, "adaptive_pool", "AdaptiveAvgPool2d", source), source),
              "decoder": "soft", "embed_dim": embed_dim, "attention_dim": shapes["attention.encoder_att.weight"][0],
              "decoder_dim": shapes["init_h.weight"][0],
              "dropout": _child(decoder, "dropout", "Dropout", source).attrs.get("p"),
              # what the tutorial computes, whatever sat's defaults: its last ResNet stage, h0/c0 from the mean
              # annotation vector, plain attention, the linear output layer
              "encoder_stride": 32, "init_state": "mean", "coverage": False, "coordinates": False,
              "attention_activation": "relu", "output_layer": "linear"}
    return from_dict(ModelConfig, values, source)  # each value checked as train.py's flag would check it


def _pooled_size(pool: StandIn, source: str) -> Any:
    size = pool.attrs.get("output_size")
    if isinstance(size, tuple) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool):
        raise SatError(f"{source}: its encoder pools to {size!r}, not a square grid")
    return size


def convert(checkpoint_path: str | os.PathLike, word_map_path: str | os.PathLike, out: str | os.PathLike,
            safetensors: str | os.PathLike | None = None, image_size: int = IMAGE_SIZE) -> dict:
    """Read a tutorial checkpoint and its word map, write the sat checkpoint `out` (and a safetensors export).

    Returns the sat checkpoint, plus under 'tutorial' the epoch, epochs_since_improvement and bleu-4 the tutorial
    saved (for the user to see; not written)."""
    for target in (out, safetensors):
        if target is not None and Path(target).resolve() == Path(checkpoint_path).resolve():
            raise SatError(f"{target}: is the checkpoint being converted; write the result elsewhere")
    word_map = read_word_map(word_map_path)
    tutorial = load_pickled(checkpoint_path)
    converted = from_tutorial(tutorial, word_map, str(checkpoint_path), image_size)
    save_checkpoint(out, converted)
    if safetensors is not None:
        export_safetensors(converted, safetensors)
    return {**converted, "tutorial": {k: tutorial.get(k) for k in ("epoch", "epochs_since_improvement", "bleu-4")}}
