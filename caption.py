"""Caption images with a trained checkpoint and plot where the model looked for each word.

Examples:
  python caption.py --img photo.jpg --checkpoint checkpoints/checkpoint_best.pt
  python caption.py --img photos/ --checkpoint checkpoints/checkpoint_best.pt --out captions/
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from datasets import BadImage, load_image  # noqa: E402
from eval import texts  # noqa: E402
from models import Caption, CaptionModel, beam_search, model_from_checkpoint  # noqa: E402
from utils import ArgumentParser, SatError, add_debug_flag, add_trust_flag, atomic_path, load_checkpoint, \
    positive_int, resolve_device, run_cli  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PANEL_INCHES, PANEL_DPI, PANELS_PER_ROW = 2.4, 100, 5


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise SatError(f"{path}: no such file or folder")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise SatError(f"{path}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


@torch.no_grad()
def caption_images(model: CaptionModel, images: list[Image.Image], word_map: dict[str, int], beam_size: int,
                   max_len: int, device: torch.device, batch_size: int = 16) -> list[Caption]:
    """Beam-search captions for RGB images already resized to the training size."""
    model.eval()
    captions: list[Caption] = []
    for first in range(0, len(images), batch_size):
        batch = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
                             for im in images[first:first + batch_size]]).to(device)
        captions += beam_search(model.decoder, model.encoder(batch), word_map, beam_size, max_len)
    return captions


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
    side = image.size[0]
    grid = int(round(math.sqrt(alphas.size(1))))
    maps = F.interpolate(alphas.view(-1, 1, grid, grid).float(), size=(side, side), mode="bicubic",
                         align_corners=False).clamp(min=0).squeeze(1).numpy()  # (n_words, side, side)
    width, height = attention_figure_size(len(words))
    fig = plt.figure(figsize=(width / PANEL_DPI, height / PANEL_DPI), dpi=PANEL_DPI)
    rows = math.ceil((len(words) + 1) / PANELS_PER_ROW)
    betas = [None] + (sentinel.tolist() if sentinel is not None else [None] * len(words))
    for i, (title, heat, beta) in enumerate(zip([""] + words, [None, *maps], betas)):
        ax = fig.add_subplot(rows, PANELS_PER_ROW, i + 1)
        ax.imshow(image)
        if heat is not None:
            ax.imshow(heat, alpha=0.6, cmap="Greys_r")
        if beta is not None:
            _beta_bar(ax, beta)
            title = f"{title} (β {beta:.2f})"
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.15)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PANEL_DPI)
    plt.close(fig)


def _beta_bar(ax: plt.Axes, beta: float) -> None:
    """A bar inside the bottom of a word's panel, filled to beta."""
    bar = ax.inset_axes((0.04, 0.03, 0.92, 0.08))
    bar.barh([0], [beta], height=1.0, color="tab:orange")
    bar.set_xlim(0, 1)
    bar.set_facecolor((1, 1, 1, 0.7))
    bar.set_xticks([])
    bar.set_yticks([])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img", required=True, help="an image file (JPEG, PNG, ... any size or mode) or a folder of them")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (holds the word map)")
    p.add_argument("--beam-size", type=positive_int, default=5, help="beam size (default: 5)")
    p.add_argument("--max-len", type=positive_int, default=50, help="longest caption in words (default: 50)")
    p.add_argument("--out", default="captions", help="folder for the attention plots and, for a folder of "
                                                     "images, captions.csv (default: captions)")
    p.add_argument("--no-plot", action="store_true", help="only print the captions (default: plots are written)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    add_trust_flag(p)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    paths = list_images(Path(args.img))
    checkpoint = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    model, word_map = model_from_checkpoint(checkpoint, args.checkpoint)
    size = int(checkpoint.get("image_size", 256))
    images = []
    for path in paths:
        try:
            images.append(load_image(path, size))
        except BadImage as e:
            raise SatError(f"{path}: {e}") from None
    captions = caption_images(model.to(device), images, word_map, args.beam_size, args.max_len, device)
    sentences = texts(captions, word_map)
    out = Path(args.out)
    plot = not args.no_plot and model.decoder.attends
    if not args.no_plot and not plot:
        print(f"note: decoder '{model.config.decoder}' has no attention: no attention plots")
    for path, image, caption, sentence in zip(paths, images, captions, sentences):
        print(sentence if len(paths) == 1 else f"{path.name}: {sentence}")
        if plot:
            plot_attention(image, sentence.split(), caption.alphas, out / f"{path.stem}_attention.png",
                           caption.sentinel)
    if Path(args.img).is_dir():
        with atomic_path(out / "captions.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows((p.name, s) for p, s in zip(paths, sentences))
    if plot or Path(args.img).is_dir():
        print(f"wrote {out}/")


if __name__ == "__main__":
    run_cli(main)
