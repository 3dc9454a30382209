"""What a score is read against: calibration rows beside every score, and the course's closing table.

A number alone says little (CIDEr is unbounded, CLIPScore depends on the CLIP, templated captions push every
n-gram metric up), so every table of scores in the course carries three more rows, scored on the same images
with the same metrics: a human reference caption, references shuffled across images, and the most frequent
training caption. The ClipCap paper's numbers join only for the split they were measured on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from .evaluation import (PAPER_REFERENCE, clip_note, clip_scores_of_files, embedded_truth, facts_right,
                         results_table)
from .metrics import METRICS, score_captions

CALIBRATION_ROWS = {
    "reference": "a human reference caption, scored against the image's other references",
    "shuffled": "a reference caption of ANOTHER test image (references shuffled across images)",
    "most frequent": "the most frequent caption of the training split, the same for every image",
}
PAPER_DATASETS = ("karpathy",)  # the paper's numbers are on the COCO Karpathy test split only


def calibration_captions(per_image: pd.DataFrame, train_captions: Iterable[str]) -> dict[str, tuple[list, list]]:
    """The calibration rows' (captions, references), image by image, for the images of `per_image`
    (a frame with a `references` column, as `evaluate_split` returns it).

    reference: each image's first reference, scored against its other references (a human's score;
    images with one reference are scored against themselves); shuffled: the first reference of the next
    image in the frame (a caption that fits some image, but not this one); most frequent: the training
    split's most common caption (ties: the first in sorted order) for every image.
    """
    refs = [list(r) for r in per_image["references"]]
    common = pd.Series(list(train_captions)).value_counts()
    frequent = min(common[common == common.max()].index) if len(common) else ""
    return {
        "reference": ([r[0] for r in refs], [r[1:] or r for r in refs]),
        "shuffled": ([refs[(i + 1) % len(refs)][0] for i in range(len(refs))], refs),
        "most frequent": ([frequent] * len(refs), refs),
    }


def calibration_scores(per_image: pd.DataFrame, train_captions: Iterable[str], metrics: Iterable[str] = METRICS,
                       captioner=None, batch_size: int = 64, embedded: bool = False) -> dict[str, dict[str, float]]:
    """Scores of the calibration rows (`calibration_captions`) on the images of `per_image`, metric by
    metric as `score_captions` gives them; with `captioner`, CLIPScore and RefCLIPScore too (its CLIP reads
    `per_image.image_path`); `embedded`: also each row's `facts_right`. A column for `results_table`."""
    out = {}
    ids = [str(i) for i in per_image["image_id"]]
    for label, (captions, references) in calibration_captions(per_image, train_captions).items():
        scores = score_captions(dict(zip(ids, captions)), dict(zip(ids, references)), metrics)
        if captioner is not None:
            clip_s, ref_s, _ = clip_scores_of_files(captioner, per_image["image_path"].to_list(), captions,
                                                     references, batch_size)
            scores.update(CLIPScore=float(np.nanmean(clip_s)), RefCLIPScore=float(np.nanmean(ref_s)))
        if embedded:
            scores["facts_right"] = float(np.mean([facts_right(c, embedded_truth(r))
                                                   for c, r in zip(captions, per_image["references"])]))
        out[label] = scores
    return out


def closing_table(scores: dict, calibration: dict[str, dict[str, float]], dataset: str,
                  standin: bool) -> tuple[pd.DataFrame, str]:
    """The course's closing table (x100): ours beside the calibration rows, and the paper's columns only on
    the dataset its numbers were measured on; and a "what next" line that reads ours against the rows."""
    table = results_table(scores, compare=PAPER_REFERENCE if dataset in PAPER_DATASETS else None,
                          calibration=calibration, note=clip_note(standin, dataset))
    metric = next((m for m in ("facts_right", "CIDEr", "BLEU-4") if m in table.index), table.index[0])
    low, high, ours = (table.at[metric, c] for c in ("shuffled", "reference", "ours"))
    where = (f"on {metric}, ours is {ours:.1f}: {100 * (ours - low) / (high - low):.0f}% of the way from shuffled "
             f"references ({low:.1f}) to a human reference ({high:.1f})") if high != low else f"ours {ours:.1f}"
    if standin:
        nxt = ("stand-in models measure the mechanics on drawn shapes, not photos: next, run the course on real "
               "captions with the real CLIP and GPT-2 (`python -m utils course --dataset flickr30k`, a T4 GPU)")
    elif dataset not in PAPER_DATASETS:
        nxt = ("to compare with the ClipCap paper, evaluate on the COCO Karpathy test split "
               "(`--dataset karpathy`), the only test its numbers are measured on")
    else:
        nxt = "train longer, or try the other mapper and freezing policy (notebook 03's exercises)"
    return table, f"what next: {where}; {nxt}."


def closing_report(captioner, cache, scores: dict, per_image: pd.DataFrame, clip_score: bool = True,
                   metrics: Iterable[str] = METRICS) -> tuple[pd.DataFrame, str]:
    """The main job's closing table and "what next" line, from what `evaluate_split` returned for `cache`:
    the calibration rows scored on the same images (with CLIPScore when `clip_score`), facts_right on the
    embedded set, the paper's columns only on the Karpathy COCO split (`closing_table`)."""
    dataset, embedded = cache.meta.get("dataset", ""), cache.meta.get("dataset") == "embedded"
    ours = dict(scores)
    if embedded:
        ours["facts_right"] = float(np.mean([facts_right(c, embedded_truth(r))
                                             for c, r in zip(per_image["prediction"], per_image["references"])]))
    calibration = calibration_scores(per_image, cache.split("train")["caption"], metrics,
                                     captioner if clip_score else None, embedded=embedded)
    return closing_table(ours, calibration, dataset, bool(cache.meta.get("standin")))
