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
from .paths import default_data_dir


def figures_dir() -> Path:
    """Where notebooks write figures: CLIPCAP_FIGURES, else beside the data folder (`figures/` next to a
    folder named `data`, else inside it), so figures live and persist where the data does: `figures/` of
    the checkout, `/kaggle/working/figures` on Kaggle (kept by its persistence or a saved version), and on
    Colab with the data on Drive (`notebook_setup(drive=True)`), `MyDrive/clipcap-course/figures`."""
    if os.environ.get("CLIPCAP_FIGURES"):
        return Path(os.environ["CLIPCAP_FIGURES"])
    data = Path(default_data_dir()).resolve()
    return data.parent / "figures" if data.name == "data" else data / "figures"


_LR_FORMAT = FuncFormatter(lambda value, _: f"{value:.1e}" if value else "0")


def _save(fig, path: str | Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_lr_schedule(cfg: TrainConfig, total_steps: int, path=None):
    """The learning rate `get_lr(step)` will give at every step, as train() schedules it (the batch recipe and
    a warm-up shortened to a third included; one process): drawn before training starts."""
    from .schedule import batch_recipe, get_lr, warmup_for

    cfg = batch_recipe(cfg)
    warmup = warmup_for(cfg, total_steps)
    steps = np.arange(total_steps)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [get_lr(int(s), cfg, total_steps) for s in steps], color="tab:orange")
    if warmup < total_steps:
        ax.axvline(warmup, color="grey", ls=":", lw=1)
        ax.annotate(f"end of warm-up (step {warmup})", (warmup, cfg.lr), xytext=(6, -14),
                    textcoords="offset points", fontsize=8, color="grey")
        title = f"Linear warm-up over {warmup} steps, then {cfg.decay} decay"
    else:
        title = f"Warm-up only: {total_steps} steps end before warmup_steps={warmup}"
    ax.set(xlabel="optimiser step", ylabel="learning rate", title=title, xlim=(0, max(total_steps - 1, 1)),
           ylim=(0, cfg.lr * 1.08))
    ax.yaxis.set_major_formatter(_LR_FORMAT)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_history(history: dict, path=None):
    """Training loss (with validation loss) per step, and on a second axis the learning rate it was trained at
    (the schedule itself is drawn before training by plot_lr_schedule; here it shows where a spike met the LR)."""
    train = pd.DataFrame(history["train"])
    val = pd.DataFrame(history.get("val", []))
    fig, ax_loss = plt.subplots(figsize=(8, 3.8))
    ax_loss.plot(train["step"], train["loss"], label="training loss", lw=1)
    if len(train) > 20:  # centred: the smoothed curve does not lag behind the loss it smooths
        smooth = train["loss"].rolling(max(len(train) // 20, 2), center=True, min_periods=1).mean()
        ax_loss.plot(train["step"], smooth, label="training loss (smoothed)", lw=2)
    if len(val):
        ax_loss.plot(val["step"], val["val_loss"], "o-", label="validation loss", color="tab:red")
    ax_loss.set_yscale("log")  # a log axis shows the late, small improvements and the train/validation gap
    ax_loss.set(xlabel="optimiser step", ylabel="cross-entropy per caption token (log scale)",
                title="Loss, and the learning rate it was trained at")
    ax_loss.grid(alpha=0.3)
    ax_lr = ax_loss.twinx()
    ax_lr.plot(train["step"], train["lr"], color="tab:gray", lw=1, ls="--", label="learning rate (right axis)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.yaxis.set_major_formatter(_LR_FORMAT)
    lines = ax_loss.get_legend_handles_labels(), ax_lr.get_legend_handles_labels()
    ax_loss.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)
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


def _pca2(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-normalised, centred embeddings projected on their two principal components; and the share of
    the variance each of the two holds."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, s[:2] ** 2 / max(float((s ** 2).sum()), 1e-12)


def neighbour_agreement(features: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """How often an embedding's nearest neighbour (cosine, itself excluded) has its label, counted in all
    dimensions; and what chance gives (the sum of the squared label shares)."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    labels = np.asarray(labels)
    agreement = float((labels[similarity.argmax(1)] == labels).mean())
    return agreement, float(sum((labels == value).mean() ** 2 for value in set(labels.tolist())))


def _scatter_by(ax, xy: np.ndarray, labels: list[str], size: float = 12) -> None:
    names = sorted(set(labels))
    own_colours = all(matplotlib.colors.is_color_like(name) for name in names)  # colour by colour: use its own
    for label in names:
        keep = np.array([lab == label for lab in labels])
        ax.scatter(xy[keep, 0], xy[keep, 1], s=size, alpha=0.7, label=f"{label} ({keep.sum()})",
                   color=label if own_colours else None, edgecolors="dimgray" if own_colours else "none",
                   linewidths=0.3)


def plot_feature_map(features: np.ndarray, labels: list[str], title: str = "CLIP image embeddings", path=None):
    """A 2-D projection (PCA) of CLIP embeddings, coloured by a label: do similar images sit together?"""
    xy, share = _pca2(features)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    _scatter_by(ax, xy, labels)
    ax.set(xlabel=f"first principal component ({share[0]:.1%} of the variance)",
           ylabel=f"second principal component ({share[1]:.1%})", title=title)
    ax.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_feature_panels(features: np.ndarray, labels_by: dict[str, list[str]], title: str = "CLIP image embeddings",
                        path=None):
    """The same 2-D projection (PCA) of CLIP embeddings once per property (e.g. each attribute of the
    embedded set), each panel coloured by that property and titled with its nearest-neighbour agreement
    (in all dimensions) against chance: which properties does the embedding carry?"""
    xy, share = _pca2(features)
    fig, axes = plt.subplots(1, len(labels_by), figsize=(3.3 * len(labels_by), 3.7), squeeze=False)
    for ax, (name, labels) in zip(axes[0], labels_by.items()):
        agreement, chance = neighbour_agreement(features, labels)
        _scatter_by(ax, xy, labels, size=6)
        ax.set_title(f"{name}: neighbour agrees {agreement:.0%}\n(chance {chance:.0%})", fontsize=9)
        ax.set(xticks=[], yticks=[])
        ax.legend(markerscale=1.5, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3,
                  frameon=False, handletextpad=0.1, columnspacing=0.6)
    axes[0][0].set_ylabel(f"PC 2 ({share[1]:.0%})")
    fig.suptitle(f"{title}: first two principal components ({share[0]:.0%} + {share[1]:.0%} of the variance), "
                 "one panel per property", fontsize=10)
    fig.tight_layout()
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
    """From temperature_summary(): per sampling temperature, how many facts the captions state right (when
    the summary has facts_right, the embedded set), how varied the captions of an image are and how often
    one equals greedy's, and how long they are; greedy and beam search as dashed lines, the top-p settings
    as points at their temperature."""
    is_sample = summary["method"] == "sample"
    top_p = summary["top_p"] if "top_p" in summary else pd.Series(1.0, index=summary.index)
    sample = summary[is_sample & (top_p == 1.0)].sort_values("temperature")
    cut = summary[is_sample & (top_p < 1.0)]
    fixed = summary[~is_sample].set_index("method")
    facts = "facts_right" in summary
    fig, axes = plt.subplots(1, 3 if facts else 2, figsize=(15 if facts else 11, 3.6))
    if facts:
        ax = axes[0]
        ax.plot(sample["temperature"], sample["facts_right"], "o-", color="tab:green", label="sampled (top-p 1)")
        for k, row in enumerate(cut.sort_values("facts_right").itertuples()):
            ax.plot(row.temperature, row.facts_right, "D", color="tab:blue", ms=7)
            ax.annotate(f"top-p {row.top_p:g}: {row.facts_right:.2f}", (row.temperature, row.facts_right),
                        textcoords="offset points", xytext=(8, -12 + 14 * k), fontsize=8, color="tab:blue")
        for method, style in (("greedy", "--"), ("beam", ":")):
            if method in fixed.index:
                ax.axhline(float(fixed.loc[method, "facts_right"]), color="tab:gray", ls=style, lw=1, label=method)
        ax.set(xlabel="sampling temperature", ylabel="share of facts stated right", ylim=(-0.03, 1.05),
               title="Facts right (shape, colour, position, size, background)")
        ax.legend(fontsize=8, loc="lower left")
    ax_share, ax_words = axes[-2], axes[-1]
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
    for ax in axes:
        ax.grid(alpha=0.3)
    n = int(sample["captions"].iloc[0]) if len(sample) else 0
    fig.suptitle(f"Greedy, beam and sampled captions of the same images ({n} sampled captions per setting)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_next_token(logits, tokenizer, temperatures=(0.5, 1.0, 2.0), top_p: float = 0.9, shown: int = 12, path=None):
    """One decoding step: the probabilities of the `shown` likeliest next tokens, softmax(logits / T), at each
    temperature; the tokens a top-p cut keeps in colour, those it removes in grey."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    order = logits.argsort(descending=True)[:shown]
    words = [repr(tokenizer.decode(int(i)))[1:-1] or "(empty)" for i in order]
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.2 * len(temperatures), 3.6), sharey=True)
    for ax, t in zip(np.atleast_1d(axes), temperatures):
        probs = torch.softmax(logits / t, dim=-1)
        ranked = probs.sort(descending=True).values
        kept = int(((ranked.cumsum(0) - ranked) < top_p).sum())  # the likeliest tokens holding top_p of it
        p = probs[order].numpy()
        ax.barh(range(len(order)), p, color=["tab:blue" if r < kept else "lightgray" for r in range(len(order))])
        ax.set(title=f"T = {t:g}: top-p {top_p:g} keeps {kept} token{'s' if kept != 1 else ''}",
               xlabel="probability of the next token", xlim=(0, 1))
        ax.grid(alpha=0.3, axis="x")
    first = np.atleast_1d(axes)[0]
    first.set_yticks(range(len(order)), words, fontsize=8)
    first.invert_yaxis()
    fig.suptitle(f"The first caption token: probabilities at {len(temperatures)} temperatures (blue: kept by top-p "
                 f"{top_p:g}, grey: cut)", fontsize=10)
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


def plot_model_diagram(config, lm_dim: int = 768, lm_blocks: int = 12, vocab: int = 50257, path=None):
    """ClipCap as boxes and arrows, every arrow labelled with its tensor's shape: image -> frozen CLIP ->
    mapper -> prefix, joined with the caption's token embeddings -> GPT-2 (which blocks learn, by
    `config.freeze`) -> logits, and where the loss counts. The defaults are the real GPT-2's (124M)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    P, C, D, E = config.prefix_length, config.clip_length, lm_dim, config.clip_dim
    learns = {"frozen": "all frozen", "full": "all learn",
              "partial": f"last {config.train_last_blocks} learn, first {lm_blocks - config.train_last_blocks} frozen"
              + (f" (+ first {config.train_first_blocks})" if config.train_first_blocks else "")}[config.freeze]
    if config.mapper == "transformer":
        mapper = (f"transformer mapper (learns)\nLinear: clip_dim -> clip_length x lm_dim\n= {C} x {D}, "
                  f"+ prefix_length = {P} learned constants\n{config.num_layers} encoder layers, keep the last {P}")
    else:
        mapper = f"MLP mapper (learns)\nLinear {E} -> {P * D // 2}, tanh,\nLinear -> {P} x {D}"
    boxes = [  # (centre x, centre y, height, text, colour)
        (0.2, 0.88, 0.1, "image\n(3, H, W)", "#eeeeee"),
        (0.2, 0.64, 0.13, f"CLIP image encoder {config.backbone}\n(frozen; computed once, notebook 02)", "#dddddd"),
        (0.2, 0.30, 0.22, mapper, "#cfe8cf"),
        (0.7, 0.88, 0.1, "caption tokens\n\"a red circle ...\" + EOS", "#eeeeee"),
        (0.7, 0.64, 0.1, f"GPT-2 token embeddings\n(lookup table {vocab} x {D})", "#dddddd"),
        (0.7, 0.38, 0.12, f"GPT-2: {lm_blocks} blocks, width lm_dim = {D}\n{learns}",
         "#cfe8cf" if config.freeze != "frozen" else "#dddddd"),
        (0.7, 0.10, 0.14, f"logits (B, {P} + T, {vocab})\nloss on caption + EOS only;\n"
                          f"position {P - 1} predicts the first word", "#f3e3c3"),
    ]
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.axis("off")
    for x, y, h, text, colour in boxes:
        ax.add_patch(FancyBboxPatch((x - 0.17, y - h / 2), 0.34, h, boxstyle="round,pad=0.01", fc=colour, ec="dimgray"))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)

    def arrow(a, b, label, at=None):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, color="black", lw=1.2))
        x, y = at or ((a[0] + b[0]) / 2 + 0.01, (a[1] + b[1]) / 2)
        ax.text(x, y, label, fontsize=8.5, color="tab:blue", ha="left", va="center", family="monospace")

    arrow((0.2, 0.83), (0.2, 0.705), "pixels (B, 3, H, W)")
    arrow((0.2, 0.575), (0.2, 0.41), f"clip_embed\n(B, clip_dim={E})")
    arrow((0.37, 0.30), (0.53, 0.37), f"prefix (B, prefix_length={P},\n        lm_dim={D})", at=(0.385, 0.22))
    arrow((0.7, 0.83), (0.7, 0.69), "input_ids (B, T)")
    arrow((0.7, 0.59), (0.7, 0.44), f"(B, T, {D}), after the prefix:\n(B, {P} + T, {D})")
    arrow((0.7, 0.32), (0.7, 0.17), f"hidden states\n(B, {P} + T, {D})")
    ax.set_title(f"ClipCap with the {config.mapper} mapper: tensor shapes at each step (B images, T caption tokens)",
                 fontsize=11)
    return _save(fig, path)


def plot_runs(histories: dict[str, dict], path=None):
    """Training loss (smoothed) of several runs on one log axis, and each run's validation losses as points:
    the runs of a comparison side by side."""
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for (name, history), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3):
        train = pd.DataFrame(history["train"])
        ax.plot(train["step"], train["loss"], lw=1.5, color=colour, label=name)
        val = pd.DataFrame(history.get("val", []))
        if len(val):
            ax.plot(val["step"], val["val_loss"], "o", color=colour, ms=5)
    ax.set_yscale("log")
    ax.set(xlabel="optimiser step", ylabel="training loss (log scale); points: validation",
           title="Short runs compared")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


def plot_prefix_attention(tokens: list[str], share: np.ndarray, prefix_length: int, path=None):
    """For each caption token, the share of its attention (averaged over GPT-2's layers and heads) that goes
    to the prefix positions, against what attending evenly to everything before it would give."""
    share = np.asarray(share, dtype=float)
    positions = np.arange(len(tokens))
    even = prefix_length / (prefix_length + positions + 1)  # uniform attention over the positions before it
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(tokens) + 2), 3.6))
    ax.bar(positions, share, color="tab:blue", label="attention on the prefix")
    ax.plot(positions, even, "k--", lw=1, label="if attention were even over all earlier positions")
    ax.set_xticks(positions, [repr(t)[1:-1] for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="share of attention", ylim=(0, 1.05),
           title=f"How much each caption token looks at the {prefix_length} prefix positions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)
