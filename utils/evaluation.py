"""Evaluating a trained captioner: its captions of a split scored beside what the scores mean.

`evaluate_split` captions a cache's split from its features, scores them with the COCO metrics (metrics.py:
BLEU, METEOR, ROUGE-L, CIDEr, SPICE through pycocoevalcap) and CLIPScore / RefCLIPScore (clipscore.py: no
reference captions needed, it asks CLIP how well a caption matches the image), and writes one JSON of results.
`results_table` sets the scores beside published ones (PAPER_REFERENCE) and calibration rows; `facts_right`
checks a caption of the embedded set against what its drawing shows; `temperature_table` shows what decoding
settings do to the captions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .clipscore import clip_scores
from .clip_encoder import draft_size
from .config import DecodeConfig
from .embedded import EMBEDDED_ATTRIBUTES, embedded_attributes
from .errors import CourseError
from .images import UnreadableImage, image_name, open_image
from .files import write_json
from .metrics import METRICS, score_captions

# Published numbers to show beside ours (already x100, as printed). Source: Mokady, Hertz, Bermano,
# "ClipCap: CLIP Prefix for Image Captioning", arXiv:2111.09734, Table 1, COCO Karpathy test split.
# They are comparable to ours only on that split, with the real CLIP ViT-B/32 and GPT-2.
PAPER_REFERENCE = {
    "ClipCap paper: MLP + GPT-2 tuning": {"BLEU-4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12},
    "ClipCap paper: Transformer, frozen GPT-2": {"BLEU-4": 33.53, "METEOR": 27.45, "CIDEr": 113.08,
                                                 "SPICE": 21.05},
}

class EvaluationError(CourseError, RuntimeError):
    """A split that cannot be evaluated as asked; the message says why and what to do."""

# ------------------------------------------------------------------------------------- results


def references_by_image(captions: pd.DataFrame) -> dict[str, list[str]]:
    """image id -> its captions, from a frame with image_id and caption columns (a cache split)."""
    return {str(i): list(group) for i, group in captions.groupby("image_id", sort=False)["caption"]}


CLIP_METRICS = ("CLIPScore", "RefCLIPScore")
# What a CLIP score row says where the CLIP that computed it is the offline stand-in and the images are not the
# course's drawings: the stand-in's text tower knows the drawings' captions only, so the number says nothing there.
STANDIN_CLIP_NOTE = "stand-in CLIP: means nothing on these images"


def clip_note(standin: bool, dataset: str | None) -> str | None:
    """The note CLIPScore rows carry: the stand-in CLIP on images other than the course's own drawings."""
    return STANDIN_CLIP_NOTE if standin and dataset != "embedded" else None


def results_table(scores: dict, compare: dict[str, dict[str, float]] | None = None,
                  name: str = "ours", calibration: dict[str, dict[str, float]] | None = None,
                  note: str | None = None) -> pd.DataFrame:
    """One row per metric, x100 and rounded to 1 decimal as papers print them.

    calibration: more columns of scores computed here (as `scores`, not yet x100), e.g. from
    `calibration_scores`: what a reference caption, shuffled references and the most frequent caption score
    on the same images, so that ours can be read between them. compare: extra columns of published numbers
    (already x100), e.g. PAPER_REFERENCE; a metric one column lacks shows as NaN there (a metric we skipped
    stays visible beside the paper's number). note: said beside the CLIPScore rows (`clip_note`).
    """
    def x100(column: dict) -> dict:
        return {metric: round(100 * float(v), 1) for metric, v in column.items()}

    columns = {name: x100(scores), **{label: x100(c) for label, c in (calibration or {}).items()}, **(compare or {})}
    rows = list(dict.fromkeys(metric for column in columns.values() for metric in column))  # ours first
    table = pd.DataFrame({label: pd.Series(column, dtype=float) for label, column in columns.items()},
                         index=pd.Index(rows, name="metric"))
    if note:
        table.index = pd.Index([f"{m} ({note})" if m in CLIP_METRICS else m for m in table.index], name="metric")
    return table


# ---------------------------------------------------------------------- facts of the embedded set

def facts_right(caption: str, truth: dict) -> float:
    """Share of the embedded set's five facts (shape, colour, position, size, background) that `caption`
    states as `truth` (an `embedded_attributes` dict) has them; a fact not stated counts as wrong."""
    said = embedded_attributes(caption)
    return float(np.mean([said[a] == truth[a] for a in EMBEDDED_ATTRIBUTES]))


def embedded_truth(references: list[str]) -> dict:
    """An embedded image's true facts, read from its references (they all state the same five)."""
    return embedded_attributes(references[0])


def linear_probe(features, labels: list, folds: int = 5, weight_decay: float = 1e-3) -> tuple[float, float]:
    """What the features carry of a fact, whatever a captioner learned: a softmax regression from `features`
    (n, d; standardised) to `labels` (n values), with L2 `weight_decay`, fitted by L-BFGS on all folds but
    one and scored on that one, each of `folds` folds in turn, so every image is scored once, by a probe that
    never saw it. Returns (the probe's accuracy, the accuracy of always saying the fitted folds' commonest
    value), over all n images: with a few hundred images that is steady where a test split of a tenth of
    them is not."""
    X = torch.tensor(np.array(features, dtype=np.float32))
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    values = sorted(set(labels))
    y = torch.tensor([values.index(v) for v in labels])
    fold = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)) % folds  # folds of random rows
    probe_right = commonest_right = 0
    for k in range(folds):
        fit, held = fold != k, fold == k
        W, b = _softmax_regression(X[fit], y[fit], len(values), weight_decay)
        probe_right += int(((X[held] @ W + b).argmax(1) == y[held]).sum())
        commonest_right += int((y[held] == torch.bincount(y[fit], minlength=len(values)).argmax()).sum())
    return probe_right / len(y), commonest_right / len(y)


def _softmax_regression(X: torch.Tensor, y: torch.Tensor, n_values: int, weight_decay: float):
    """W (d, n_values) and b (n_values) minimising cross-entropy + weight_decay * |W|^2, by L-BFGS."""
    W = torch.zeros(X.shape[1], n_values, requires_grad=True)
    b = torch.zeros(n_values, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=100)

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(X @ W + b, y) + weight_decay * W.square().sum()
        value.backward()
        return value

    opt.step(loss)
    return W.detach(), b.detach()


def write_results(path_json: str | Path, scores: dict, per_image_captions: list[dict],
                  info: dict | None = None) -> Path:
    """Scores, the captions they were computed from and `info` (how), in one JSON written atomically."""
    def plain(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} cannot be written to JSON")

    data = json.loads(json.dumps({"scores": scores, "captions": per_image_captions, "info": info or {}},
                                 default=plain))
    return write_json(path_json, data)


# -------------------------------------------------------------------------- evaluating a captioner


def evaluate_split(captioner, cache, split: str = "test", decode: DecodeConfig | None = None,
                   clip_score: bool = True, out: str | Path | None = None, metrics: Iterable[str] = METRICS,
                   batch_size: int = 64) -> tuple[dict[str, float], pd.DataFrame]:
    """Caption every image of a feature cache's split and score it against ALL its references.

    Captions come from the cached CLIP features (no image is re-encoded for them). With clip_score,
    CLIPScore and RefCLIPScore read the images again with the captioner's own CLIP; an image that can
    no longer be read is left out of those two (NaN in its row), and named in a printed note and in the
    JSON's info.clip_score_unreadable.
    Returns (scores as score_captions gives them, plus CLIPScore/RefCLIPScore; a per-image frame:
    image_id, image_path, prediction, references and each metric). `out`: write both to this JSON.
    """
    decode = decode or DecodeConfig()
    if decode.num_return_sequences != 1:
        raise EvaluationError(f"evaluation scores one caption per image, not num_return_sequences="
                              f"{decode.num_return_sequences}: leave it at 1.")
    _check_cache_fits(captioner, cache)
    frame = cache.split(split)
    if frame.empty:
        present = ", ".join(sorted(cache.captions["split"].unique()))
        raise EvaluationError(f"the feature cache at {cache.path} has no '{split}' images (it has: {present}); "
                              "choose one of those splits.")
    references = references_by_image(frame)
    images = cache.images.set_index("image_id").loc[list(references)]
    captions = captioner.generate(cache.features[images["feature_row"].to_numpy()], decode, batch_size)
    scores, per_image = score_captions(dict(zip(references, captions)), references, metrics, per_image=True)
    per_image.insert(1, "image_path", images["image_path"].to_list())
    per_image.insert(3, "references", list(references.values()))
    unreadable = []
    if clip_score:
        per_image["CLIPScore"], per_image["RefCLIPScore"], unreadable = clip_scores_of_files(
            captioner, per_image["image_path"].to_list(), captions, list(references.values()), batch_size)
        if len(unreadable) < len(per_image):
            scores.update(CLIPScore=float(per_image["CLIPScore"].mean()),
                          RefCLIPScore=float(per_image["RefCLIPScore"].mean()))
        if unreadable:
            print(f"{len(unreadable)} of {len(per_image)} image(s) could not be read again and are left out of "
                  f"CLIPScore (their captions came from the cache): {', '.join(unreadable[:5])}"
                  + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""))
    if out is not None:
        info = {"split": split, "images": len(per_image), "features": str(cache.path),
                "backbone": cache.meta["backbone"], "standin": bool(cache.meta.get("standin")),
                "decode": dataclasses.asdict(decode), "clip_score_unreadable": unreadable}
        records = per_image.astype(object).where(per_image.notna(), None).to_dict("records")  # NaN -> null
        write_results(out, scores, records, info)
    return scores, per_image


def _check_cache_fits(captioner, cache) -> None:
    cfg = captioner.config
    have = (cache.meta["backbone"], int(cache.meta["clip_dim"]))
    if have != (cfg.backbone, cfg.clip_dim):
        raise EvaluationError(f"the feature cache at {cache.path} holds {have[1]}-d {have[0]} features, but the "
                              f"captioner was trained on {cfg.clip_dim}-d {cfg.backbone} ones: evaluate on a cache "
                              f"made with `python -m utils features --backbone {cfg.backbone}`.")


def clip_scores_of_files(captioner, paths: list[str], captions: list[str], references: list[list[str]],
                          batch_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CLIP-S and RefCLIP-S per image file (NaN where unreadable), `batch_size` images in memory at a time;
    and 'path (why)' for each unreadable one."""
    model, preprocess = captioner.image_encoder()
    clip_s, ref_s, unreadable = np.full(len(paths), np.nan), np.full(len(paths), np.nan), []
    for start in range(0, len(paths), batch_size):
        ok, images = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(open_image(paths[i], draft=draft_size(model)))
                ok.append(i)
            except UnreadableImage as exc:
                unreadable.append(f"{paths[i]} ({exc})")
        if ok:
            clip_s[ok], ref_s[ok] = clip_scores(model, preprocess, images, [captions[i] for i in ok],
                                                [references[i] for i in ok], next(model.parameters()).device,
                                                batch_size=batch_size)
    return clip_s, ref_s, unreadable


def temperature_table(captioner, images, temperatures: Iterable[float] = (0.3, 0.7, 1.0, 1.5), samples: int = 3,
                      methods: Iterable[str] = ("greedy", "beam"), seed: int = 0,
                      names: list[str] | None = None, top_ps: Iterable[float] = (),
                      top_p_temperature: float | None = None) -> pd.DataFrame:
    """The same images captioned by each deterministic method and by sampling at each temperature.

    images: CLIP embeddings (N, clip_dim) (e.g. rows of a feature cache), or PIL images / image paths,
    which the captioner encodes. Sampling draws `samples` captions per image and setting; greedy and beam
    give one (sample 0, temperature NaN). `top_ps`: more sampling settings, each top-p at
    `top_p_temperature` (default: the highest of `temperatures`). Every sampling setting has its own seed
    (`seed` + its position), so two settings never share their random draws, and the table is the same on
    every run.
    Returns one row per image x setting x sample: image, method, temperature, top_p, sample, caption.
    `names` labels the images (default: their file names, or positions for embeddings).
    """
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        embeds, names = images, names or [str(i) for i in range(len(images))]
    else:
        embeds, names = captioner.embed(images), names or [image_name(im, i) for i, im in enumerate(images)]
    temperatures = list(temperatures)
    rows = []
    for method in methods:
        captions = captioner.generate(embeds, DecodeConfig(method=method))
        rows += [(names[i], method, np.nan, np.nan, 0, c) for i, c in enumerate(captions)]
    hot = top_p_temperature if top_p_temperature is not None else max(temperatures, default=1.0)
    settings = [(t, 1.0) for t in temperatures] + [(hot, p) for p in top_ps]
    for k, (t, p) in enumerate(settings):
        drawn = captioner.generate(embeds, DecodeConfig(method="sample", temperature=t, top_p=p,
                                                        num_return_sequences=samples, seed=seed + k))
        drawn = [d if samples > 1 else [d] for d in drawn]  # one sample comes back as a plain caption
        rows += [(names[i], "sample", t, p, j, c) for i, per_image in enumerate(drawn) for j, c in enumerate(per_image)]
    return pd.DataFrame(rows, columns=["image", "method", "temperature", "top_p", "sample", "caption"])


def temperature_summary(table: pd.DataFrame, truth: dict[str, dict] | None = None) -> pd.DataFrame:
    """Per setting of a temperature_table: how varied its captions are, how far from greedy, and (with
    `truth`, image name -> its true facts, embedded set) how many facts they state right.

    distinct_share: distinct captions / captions, per image, averaged (sampling: from 1/samples, every
    draw alike, up to 1, every draw different); same_as_greedy: share of captions equal to the greedy
    one of their image (NaN without greedy rows); mean_words: caption length; facts_right: share of the
    five facts stated right (`facts_right`), averaged over captions.
    """
    if "top_p" not in table:
        table = table.assign(top_p=np.where(table["method"] == "sample", 1.0, np.nan))
    keys = ["method", "temperature", "top_p"]
    greedy = table[table["method"] == "greedy"].set_index("image")["caption"]
    table = table.assign(words=table["caption"].str.split().str.len(),
                         same=(table["caption"] == table["image"].map(greedy)) if len(greedy) else np.nan)
    per_image = table.groupby([*keys, "image"], dropna=False).agg(distinct=("caption", "nunique"), n=("caption", "size"))
    aggregate = dict(captions=("caption", "size"), same_as_greedy=("same", "mean"), mean_words=("words", "mean"))
    if truth is not None:
        table = table.assign(facts=[facts_right(c, truth[i]) for c, i in zip(table["caption"], table["image"])])
        aggregate["facts_right"] = ("facts", "mean")
    summary = table.groupby(keys, dropna=False, sort=False).agg(**aggregate)
    summary.insert(1, "distinct_share", (per_image["distinct"] / per_image["n"]).groupby(keys, dropna=False).mean())
    return summary.reset_index()
