"""matplotlib figures the notebooks show and the run directory keeps: image grids with captions, the training loss.

Figures are made here and written with `save_figure` (atomically, like every file in a run directory); showing
them is the caller's business (a notebook displays a returned figure, headless runs only save it).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from .files import atomic_path


def image_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, *, ncols: int = 4,
               size: float = 2.6, wrap: int = 28, title: str | None = None) -> Figure:
    """A grid of images, each with its caption wrapped underneath. Returns the figure (saved or shown by caller)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 1.35 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            if captions is not None:
                ax.set_title("\n".join(textwrap.wrap(captions[i], wrap)[:4]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def difference(before: Image.Image, after: Image.Image) -> tuple[Image.Image, float]:
    """Where two images of one size differ: |after - before| per pixel, stretched so the largest change is white
    (small changes stay visible), and the mean absolute difference in 0-255 units (what the stretch hides)."""
    a = np.asarray(before.convert("RGB"), np.float64)
    b = np.asarray(after.convert("RGB"), np.float64)
    diff = np.abs(b - a)
    stretched = diff * (255.0 / diff.max()) if diff.max() > 0 else diff
    return Image.fromarray(stretched.astype(np.uint8)), float(diff.mean())


def loss_plot(steps: Sequence[int], losses: Sequence[float], *, smooth: int = 10, ax: plt.Axes | None = None,
              val_steps: Sequence[int] = (), val_losses: Sequence[float] = ()) -> Figure:
    """Per-step loss (faint) and its moving average (bold): flow-matching loss is noisy step to step. With
    val_steps/val_losses: the held-out loss at fixed noise (fluxnb.train.validation), as dots joined by a line."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3))
    else:
        fig = ax.figure
        ax.clear()
    ax.plot(steps, losses, alpha=0.3, label="loss")
    if len(losses) >= 2:
        k = max(1, min(smooth, len(losses)))
        averaged = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, averaged, label=f"mean of last {k}")
    if len(val_losses):
        ax.plot(val_steps, val_losses, "o-", color="black", markersize=4, label="validation (held out, fixed noise)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write `fig` as a PNG at `path`, whole or not at all."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
