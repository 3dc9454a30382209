"""The course's figures. Each function draws one picture, saves it under figures/ when asked, and
returns the matplotlib Figure so a notebook shows it inline.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "ipympl", "widget")):
    matplotlib.use("Agg")  # scripts and CI draw to files; notebooks keep their inline backend
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter
import numpy as np
import pandas as pd

from .config import TrainConfig


def figures_dir() -> Path:
    """Where notebooks write figures: CLIPCAP_FIGURES, else figures/ of the checkout we run from, else
    ./figures (on Kaggle /kaggle/working/figures, beside the data, so a saved version keeps them)."""
    from .runtime import detect_platform

    if os.environ.get("CLIPCAP_FIGURES"):
        return Path(os.environ["CLIPCAP_FIGURES"])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "figures"
    return Path("/kaggle/working/figures" if detect_platform() == "kaggle" else "figures").resolve()


_LR_FORMAT = FuncFormatter(lambda value, _: f"{value:.1e}" if value else "0")


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
    if cfg.warmup_steps < total_steps:
        ax.axvline(cfg.warmup_steps, color="grey", ls=":", lw=1)
        ax.annotate(f"end of warm-up (step {cfg.warmup_steps})", (cfg.warmup_steps, cfg.lr), xytext=(6, -14),
                    textcoords="offset points", fontsize=8, color="grey")
        title = f"Linear warm-up over {cfg.warmup_steps} steps, then {cfg.decay} decay"
    else:
        title = f"Warm-up only: {total_steps} steps end before warmup_steps={cfg.warmup_steps}"
    ax.set(xlabel="optimiser step", ylabel="learning rate", title=title, xlim=(0, max(total_steps - 1, 1)),
           ylim=(0, cfg.lr * 1.08))
    ax.yaxis.set_major_formatter(_LR_FORMAT)
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
    ax_lr.yaxis.set_major_formatter(_LR_FORMAT)
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_caption_grid(images: list, captions: list, references: list | None = None, columns: int = 4,
                      title: str | None = None, reference_label: str = "ref", path=None):
    """Images with a caption above each (bold) and reference captions under it.

    images: paths or PIL images. captions[i]: the predicted caption (or any str; a list shows one per line).
    references[i]: a str or a list of str, shown in grey under the image (up to three), each after
    `reference_label`.
    """
    from .images import open_image

    def block(texts, width) -> str:
        texts = texts if isinstance(texts, (list, tuple)) else [texts]
        return "\n".join(textwrap.fill(t, width) for t in texts)

    above = [block(c, 38) for c in captions[:len(images)]]
    below = [block([f"{reference_label}: {r}" for r in (refs if isinstance(refs, (list, tuple)) else [refs])[:3]], 44)
             for refs in references[:len(images)]] if references else [""] * len(images)
    rows = -(-len(images) // columns)
    line = 0.15  # inches per line of 8-point text
    heights = []  # per grid row: caption block, image, references block (inches)
    for r in range(rows):
        cells = range(r * columns, min((r + 1) * columns, len(images)))
        heights += [line * (1 + max(above[i].count("\n") + 1 for i in cells)), 2.6,
                    line * (0.6 + max(below[i].count("\n") + 1 if below[i] else 0 for i in cells))]
    top = 0.35 if title else 0.05
    fig = plt.figure(figsize=(2.9 * columns, sum(heights) + top))
    grid = fig.add_gridspec(3 * rows, columns, height_ratios=heights, hspace=0, wspace=0.08,
                            top=1 - top / (sum(heights) + top), bottom=0.01, left=0.01, right=0.99)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        ax = fig.add_subplot(grid[3 * r + 1, c])
        ax.imshow(open_image(image) if isinstance(image, (str, Path)) else image)
        ax.set_xticks([]), ax.set_yticks([])
        ax.text(0, 1.02, above[i], transform=ax.transAxes, va="bottom", ha="left", fontsize=8, fontweight="bold")
        ax.text(0, -0.03, below[i], transform=ax.transAxes, va="top", ha="left", fontsize=7.5, color="dimgray")
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / (sum(heights) + top))
    return _save(fig, path)


def feature_labels(cache, by: str, keywords: tuple[str, ...] = ("dog", "man", "woman", "child", "girl", "boy",
                                                                  "water", "street", "ball", "food")) -> list[str]:
    """One label per feature row of a cache, read from its captions, to colour a feature map by.

    by: an attribute of the embedded set ("shape", "colour", "position", "size", "background"), or
    "keyword": the first of `keywords` any caption of the image mentions ("other" when none does), or
    "split".
    """
    from .embedded import EMBEDDED_ATTRIBUTES, embedded_attributes

    if by == "split":
        return cache.images["split"].tolist()
    text = cache.captions.groupby("feature_row")["caption"].agg(" ".join).reindex(range(len(cache.images)),
                                                                                  fill_value="")
    if by in EMBEDDED_ATTRIBUTES:
        return [embedded_attributes(t)[by] or "not stated" for t in text]
    if by != "keyword":
        raise ValueError(f"colour by one of {', '.join(EMBEDDED_ATTRIBUTES)}, 'keyword' or 'split', not {by!r}")
    words = [set(t.lower().replace(".", " ").replace(",", " ").split()) for t in text]
    return [next((k for k in keywords if k in w), "other") for w in words]


def plot_feature_map(features: np.ndarray, labels: list[str], title: str = "CLIP image embeddings", path=None):
    """A 2-D projection (PCA) of CLIP embeddings, coloured by a label: do similar images sit together?"""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    share = s[:2] ** 2 / max(float((s ** 2).sum()), 1e-12)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    names = sorted(set(labels))
    own_colours = all(matplotlib.colors.is_color_like(name) for name in names)  # colour by colour: use its own
    for label in names:
        keep = np.array([lab == label for lab in labels])
        ax.scatter(xy[keep, 0], xy[keep, 1], s=12, alpha=0.7, label=f"{label} ({keep.sum()})",
                   color=label if own_colours else None, edgecolors="dimgray" if own_colours else "none",
                   linewidths=0.3)
    ax.set(xlabel=f"first principal component ({share[0]:.1%} of the variance)",
           ylabel=f"second principal component ({share[1]:.1%})", title=title)
    ax.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_trainable_parameters(captioner, path=None):
    """Parameters of each part of the captioner, in millions, coloured by whether training changes them."""
    from .model import final_norm, transformer_blocks

    def part(module) -> tuple[float, bool]:
        params = list(module.parameters())
        return sum(p.numel() for p in params) / 1e6, any(p.requires_grad for p in params)

    lm = captioner.lm
    blocks, norm = transformer_blocks(lm), final_norm(lm)
    parts = [(f"{captioner.config.mapper} mapper", captioner.mapper),
             ("token embeddings\n(shared with the output layer)", lm.get_input_embeddings()),
             *((f"LM block {i}", block) for i, block in enumerate(blocks)),
             *([("LM final norm", norm)] if norm is not None else [])]
    rows = [(name, *part(module)) for name, module in parts]
    seen = {id(p) for _, module in parts[1:] for p in module.parameters()}
    rest = [p for p in lm.parameters() if id(p) not in seen]
    if rest:
        rows.append(("other LM parts\n(position embeddings, ...)", sum(p.numel() for p in rest) / 1e6,
                     any(p.requires_grad for p in rest)))
    names, sizes, learns = zip(*rows)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.4))
    colours = ["tab:green" if flag else "lightgrey" for flag in learns]
    ax.barh(range(len(rows)), sizes, color=colours, edgecolor="dimgray", lw=0.5)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    for i, size in enumerate(sizes):
        ax.annotate(f"{size * 1e3:.1f}k" if size < 0.01 else f"{size:.2f}M" if size < 10 else f"{size:.1f}M", (size, i),
                    xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7)
    trained = sum(s for s, flag in zip(sizes, learns) if flag)
    ax.set(xlabel="parameters (millions)", xlim=(0, max(sizes) * 1.18),
           title=f"What learns: {trained:.2f}M of {sum(sizes):.2f}M parameters (green: trained, grey: frozen)")
    ax.title.set_fontsize(10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_temperature_summary(summary: pd.DataFrame, path=None):
    """From temperature_summary(): per sampling temperature, how varied the captions of an image are, how
    often one equals greedy's, and how long they are; greedy and beam search as dashed lines."""
    sample = summary[summary["method"] == "sample"].sort_values("temperature")
    fixed = summary[summary["method"] != "sample"].set_index("method")
    fig, (ax_share, ax_words) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax_share.plot(sample["temperature"], sample["distinct_share"], "o-", label="distinct captions among an image's samples")
    ax_share.plot(sample["temperature"], sample["same_as_greedy"], "s-", label="captions equal to greedy's")
    if "beam" in fixed.index and pd.notna(fixed.loc["beam", "same_as_greedy"]):
        ax_share.axhline(float(fixed.loc["beam", "same_as_greedy"]), color="tab:gray", ls="--", lw=1,
                         label="beam search: equal to greedy's")
    ax_share.set(xlabel="sampling temperature", ylabel="share of captions", ylim=(-0.03, 1.05),
                 title="Variety of sampled captions")
    ax_share.legend(fontsize=8)
    ax_words.plot(sample["temperature"], sample["mean_words"], "o-", color="tab:purple", label="sampled")
    for method, style in (("greedy", "--"), ("beam", ":")):
        if method in fixed.index:
            ax_words.axhline(float(fixed.loc[method, "mean_words"]), color="tab:gray", ls=style, lw=1, label=method)
    longest = max([*sample["mean_words"], *fixed["mean_words"]], default=1)
    ax_words.set(xlabel="sampling temperature", ylabel="words per caption (mean)", ylim=(0, 1.2 * longest),
                 title="Caption length")
    ax_words.legend(fontsize=8, loc="lower right")
    for ax in (ax_share, ax_words):
        ax.grid(alpha=0.3)
    n = int(sample["captions"].iloc[0]) if len(sample) else 0
    fig.suptitle(f"Greedy, beam and sampled captions of the same images ({n} sampled captions per temperature)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_distinct_share(history: dict, warn_below: float | None = None, path=None):
    """Share of distinct captions on the fixed watch images, per evaluation: a fall warns of collapse.
    `warn_below` (TrainConfig.collapse_warning) draws the line under which training printed a warning."""
    watch = pd.DataFrame(history.get("samples", []))
    fig, ax = plt.subplots(figsize=(6, 3))
    if len(watch):
        ax.plot(watch["step"], watch["distinct_share"], "o-", label="distinct share")
    if warn_below is not None:
        ax.axhline(warn_below, color="tab:red", linestyle="--", linewidth=1, label="collapse warning below")
        ax.legend(loc="lower right")
    watched = len(watch["image_ids"].iloc[0]) if len(watch) and "image_ids" in watch else "watched"
    ax.set(xlabel="optimiser step", ylabel=f"distinct captions / {watched} images", ylim=(0, 1.05),
           title="Are the captions still different for different images?")
    ax.grid(alpha=0.3)
    return _save(fig, path)
