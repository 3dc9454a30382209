"""The course's figures. Each function draws one picture, saves it under figures/ when asked, and
returns the matplotlib Figure so a notebook shows it inline.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "ipympl", "widget")):
    matplotlib.use("Agg")  # scripts and CI draw to files; notebooks keep their inline backend
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .config import TrainConfig


def _save(fig, path: str | Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_lr_schedule(cfg: TrainConfig, total_steps: int, path=None):
    """The learning rate `get_lr(step)` will give at every step: drawn before training starts."""
    from .training import get_lr

    steps = np.arange(total_steps)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [get_lr(int(s), cfg, total_steps) for s in steps], color="tab:orange")
    ax.axvline(cfg.warmup_steps, color="grey", ls=":", lw=1)
    ax.annotate(f"end of warm-up (step {cfg.warmup_steps})", (cfg.warmup_steps, cfg.lr), xytext=(6, -14),
                textcoords="offset points", fontsize=8, color="grey")
    ax.set(xlabel="optimiser step", ylabel="learning rate", title=f"Linear warm-up, then {cfg.decay} decay")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_history(history: dict, path=None):
    """Training loss (with validation loss) and the learning rate it was trained at, per step."""
    train = pd.DataFrame(history["train"])
    val = pd.DataFrame(history.get("val", []))
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax_loss.plot(train["step"], train["loss"], label="training loss", lw=1)
    if len(train) > 20:
        smooth = train["loss"].rolling(max(len(train) // 20, 2), min_periods=1).mean()
        ax_loss.plot(train["step"], smooth, label="training loss (smoothed)", lw=2)
    if len(val):
        ax_loss.plot(val["step"], val["val_loss"], "o-", label="validation loss", color="tab:red")
    ax_loss.set(xlabel="optimiser step", ylabel="cross-entropy per caption token", title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(train["step"], train["lr"], color="tab:orange")
    ax_lr.set(xlabel="optimiser step", ylabel="learning rate", title="Learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_caption_grid(images: list, captions: list[str], references: list[str] | None = None, columns: int = 4,
                      path=None):
    """Images with the predicted caption (bold) and a reference caption under each."""
    from .datasets import open_image

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(open_image(image) if isinstance(image, (str, Path)) else image)
        text = textwrap.fill(captions[i], 34)
        if references:
            text += "\n" + textwrap.fill(f"ref: {references[i]}", 34)
        ax.set_title(text, fontsize=8, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def plot_feature_map(features: np.ndarray, labels: list[str], title: str = "CLIP image embeddings", path=None):
    """A 2-D projection (PCA) of CLIP embeddings, coloured by a label: do similar images sit together?"""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in sorted(set(labels)):
        keep = np.array([lab == label for lab in labels])
        ax.scatter(xy[keep, 0], xy[keep, 1], s=10, alpha=0.7, label=label)
    ax.set(xlabel="first principal component", ylabel="second principal component", title=title)
    ax.legend(markerscale=2, fontsize=8)
    return _save(fig, path)


def plot_distinct_share(history: dict, path=None):
    """Share of distinct captions on the fixed watch images, per evaluation: a fall warns of collapse."""
    watch = pd.DataFrame(history.get("samples", []))
    fig, ax = plt.subplots(figsize=(6, 3))
    if len(watch):
        ax.plot(watch["step"], watch["distinct_share"], "o-")
    ax.set(xlabel="optimiser step", ylabel="distinct captions / images", ylim=(0, 1.05),
           title="Are the captions still different for different images?")
    ax.grid(alpha=0.3)
    return _save(fig, path)
