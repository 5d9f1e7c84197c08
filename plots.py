"""Figures, written with matplotlib's Agg backend (no display needed): where the model looked for each word, and
the training curves; and the compact attention strip (Pillow) that the gallery and TensorBoard show."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from utils import atomic_path  # noqa: E402

PANEL_INCHES, PANEL_DPI, PANELS_PER_ROW = 2.4, 100, 5
HEAT_OPACITY = 0.6  # how strongly the attention map covers the image, in the plot and the strip alike


def attention_figure_size(n_words: int) -> tuple[int, int]:
    """Pixel size of the attention plot: one panel for the image, then one per word."""
    rows = math.ceil((n_words + 1) / PANELS_PER_ROW)
    return round(PANELS_PER_ROW * PANEL_INCHES * PANEL_DPI), round(rows * PANEL_INCHES * PANEL_DPI)


def plot_attention(image: Image.Image, words: list[str], alphas: torch.Tensor, path: Path,
                   sentinel: torch.Tensor | None = None) -> None:
    """The image, then for each word the image under its attention map smoothly upsampled to full size.

    With a sentinel (adaptive attention), each word's panel also shows beta, the weight on the visual sentinel:
    a bar along its bottom edge, full when the word came from the language model alone, empty when from the image.
    """
    maps = attention_maps(alphas, image.size[0])
    width, height = attention_figure_size(len(words))
    fig = plt.figure(figsize=(width / PANEL_DPI, height / PANEL_DPI), dpi=PANEL_DPI)
    rows = math.ceil((len(words) + 1) / PANELS_PER_ROW)
    betas = [None] + (sentinel.tolist() if sentinel is not None else [None] * len(words))
    for i, (title, heat, beta) in enumerate(zip([""] + words, [None, *maps], betas)):
        ax = fig.add_subplot(rows, PANELS_PER_ROW, i + 1)
        ax.imshow(image)
        if heat is not None:
            ax.imshow(heat, alpha=HEAT_OPACITY, cmap="Greys_r")
        if beta is not None:
            _beta_bar(ax, beta)
            title = f"{title} (β {beta:.2f})"
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    # Margins in inches, not fractions of the figure: a one-row plot has room for its titles as a tall one has.
    height_inches = height / PANEL_DPI
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.05 / height_inches, top=1 - 0.32 / height_inches,
                        wspace=0.05, hspace=0.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PANEL_DPI)
    plt.close(fig)


def attention_maps(alphas: torch.Tensor, side: int) -> np.ndarray:
    """(n_words, P) attention weights over a square grid -> (n_words, side, side), smoothly (bicubic) upsampled."""
    grid = int(round(math.sqrt(alphas.size(1))))
    return F.interpolate(alphas.view(-1, 1, grid, grid).float(), size=(side, side), mode="bicubic",
                         align_corners=False).clamp(min=0).squeeze(1).numpy()


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    # matplotlib ships DejaVu Sans, which has the Greek letters (beta) that Pillow's built-in font lacks.
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def attention_strip(image: Image.Image, words: list[str], alphas: torch.Tensor, sentinel: torch.Tensor | None = None,
                    panel: int = 96) -> Image.Image:
    """One row of panel x panel squares, one per word: the image under that word's attention map, drawn as
    plot_attention draws it (bright where the model looked), the word below, and beta below that for adaptive
    attention. Drawn with Pillow: about 25x faster than plot_attention's matplotlib figure, for galleries of
    many captions."""
    font, line, gap = _font(12), 16, 2
    step = panel + gap
    height = panel + line * (2 if sentinel is not None else 1)
    strip = Image.new("RGB", (max(1, len(words)) * step - gap, height), "white")
    pixels = np.asarray(image.convert("RGB").resize((panel, panel), Image.BICUBIC), dtype=np.float32)
    draw = ImageDraw.Draw(strip)
    for i, (word, heat) in enumerate(zip(words, attention_maps(alphas, panel))):
        # imshow's default colour scale runs from the map's minimum to its maximum; so does this one
        span = float(heat.max() - heat.min())
        heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
        blended = (1 - HEAT_OPACITY) * pixels + HEAT_OPACITY * 255 * heat[..., None]
        strip.paste(Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)), (i * step, 0))
        draw.text((i * step + panel / 2, panel + 2), _fit(word, font, panel - 4), fill="black", font=font,
                  anchor="ma")
        if sentinel is not None:
            draw.text((i * step + panel / 2, panel + line + 2), f"β {float(sentinel[i]):.2f}", fill="#b35900",
                      font=font, anchor="ma")
    return strip


def _fit(word: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The word, cut with an ellipsis where it is wider than its panel."""
    if font.getlength(word) <= width:
        return word
    while word and font.getlength(word + "…") > width:
        word = word[:-1]
    return word + "…"


def _beta_bar(ax: plt.Axes, beta: float) -> None:
    """A bar inside the bottom of a word's panel, filled to beta."""
    bar = ax.inset_axes((0.04, 0.03, 0.92, 0.08))
    bar.barh([0], [beta], height=1.0, color="tab:orange")
    bar.set_xlim(0, 1)
    bar.set_facecolor((1, 1, 1, 0.7))
    bar.set_xticks([])
    bar.set_yticks([])


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not {"epoch", "val_bleu4", "val_cider"} <= set(record):
        return None
    return record


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Training loss and validation BLEU-4 and CIDEr-D per epoch, from the metrics log (a line that a kill or a full
    disk cut short is left out)."""
    records = [r for r in map(_record, log_path.read_text(errors="replace").splitlines()) if r is not None]
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in records if "train_loss" in r]  # SCST logs its starting point without training
    if any("train_cider" in r for r in trained):
        ax1.plot([r["epoch"] for r in trained], [r["train_cider"] for r in trained], marker="o")
        ax1.set(xlabel="epoch", ylabel="CIDEr-D (x100)", title="SCST reward of the sampled captions")
    else:
        ax1.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], marker="o")
        ax1.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    ax2.plot(epochs, [r["val_bleu4"] for r in records], marker="o", color="tab:green", label="BLEU-4")
    ax2.plot(epochs, [r["val_cider"] for r in records], marker="s", color="tab:purple", label="CIDEr-D")
    ax2.set(xlabel="epoch", ylabel="score (x100)", title="validation, real decoding")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
