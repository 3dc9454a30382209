"""What watches a training run, as plain functions of its TrainState: divergence, collapse, patience.

- `check_steps`: the losses and gradient norms of the steps since the last read, read back at once (one host
  sync), and a run stopped when they stop being finite (in fp16, after MAX_SKIPPED_STEPS skipped in a row);
- `watch_captions`: the same validation images captioned at every evaluation, so the history shows captions
  improve, and a warning when they collapse towards one caption (compared by content, not exact strings);
- `patience_ran_out`: early stopping after --patience evaluations without a better validation loss.
"""

from __future__ import annotations

import math
import re

import torch

from .checkpoints import TrainState
from .errors import TrainingError

COLLAPSE_EVALS = 3  # evaluations in a row the captions must stay collapsed before the run warns
MAX_SKIPPED_STEPS = 25  # fp16: this many non-finite losses in a row stop the run (the scaler halves each time)
SAME_CAPTION = 0.6  # two captions sharing this share of their word pairs (Jaccard) count as one


def diverged(what: str) -> str:
    return (f"{what}: training diverged, and nothing from this step on was saved (any earlier checkpoint is "
            "intact). Start a new run (another --out-dir) with a lower --lr or a longer --warmup-steps: --resume "
            "keeps the settings that diverged.")


def check_steps(state: TrainState, pending: list[tuple[int, torch.Tensor, torch.Tensor]],
                precision: str) -> list[tuple[int, float, float]]:
    """Read the (step, loss, grad_norm) of the steps since the last read (one host sync for all of them), add
    them to the log window and stop a run that diverged: a non-finite loss or gradient norm (in fp16 the
    scaler skips such a step; MAX_SKIPPED_STEPS of them in a row stop it). Called at log steps and before
    anything is saved, so a run never writes weights from a step that diverged."""
    if not pending:
        return []
    values = torch.stack([torch.stack([loss, norm]) for _, loss, norm in pending]).tolist()
    done = [(step, loss, grad_norm) for (step, _, _), (loss, grad_norm) in zip(pending, values)]
    pending.clear()
    for step, loss, grad_norm in done:
        if precision == "fp16":
            count_skipped(state, loss, step, precision)
        elif not math.isfinite(loss):
            raise TrainingError(diverged(f"the loss became {loss} at step {step}"))
        elif not math.isfinite(grad_norm):
            raise TrainingError(diverged(f"the gradients became {grad_norm} at step {step}"))
        state.window_loss += loss
        state.window_steps += 1
    return done


def count_skipped(state: TrainState, loss: float, step: int, precision: str) -> None:
    """fp16: the loss scaler skips a step whose loss or gradients are not finite, and lowers its scale;
    a loss that stays non-finite is not an overflow but a run that diverged: stop it."""
    state.skipped_in_a_row = 0 if math.isfinite(loss) else state.skipped_in_a_row + 1
    if state.skipped_in_a_row >= MAX_SKIPPED_STEPS:
        raise TrainingError(f"the loss was not finite for {MAX_SKIPPED_STEPS} steps in a row (up to step "
                            f"{step}; {precision} skipped each): training diverged. Start a new run "
                            "(another --out-dir) with a lower --lr, a longer --warmup-steps, or --precision bf16 "
                            "or fp32.")


def _word_pairs(caption: str) -> frozenset:
    words = re.sub(r"[^0-9a-z]+", " ", caption.lower()).split()
    return frozenset(zip(words, words[1:])) or frozenset(words)


def distinct_captions(captions: list[str]) -> int:
    """How many different captions there are by content: captions sharing at least SAME_CAPTION of their word
    pairs (case, punctuation and stray characters aside) count as one, so eight near-copies of one sentence
    are one caption, while "a red circle on the left" and "a blue circle on the left" stay two."""
    kept: list[frozenset] = []
    for pairs in map(_word_pairs, captions):
        if not any(pairs == other or (pairs | other and len(pairs & other) / len(pairs | other) >= SAME_CAPTION)
                   for other in kept):
            kept.append(pairs)
    return len(kept)


def watch_captions(captions: list[str], references: list[str], image_ids: list, state: TrainState,
                   collapse_warning: float, warmup: int) -> str | None:
    """Record the watched images' captions at this evaluation; the warning to print when they collapsed.

    Judged against the run itself, so healthy runs stay silent: captions still forming say the same few
    things at first. It warns only when, for the last COLLAPSE_EVALS evaluations after the warm-up, the
    captions' distinct share stayed below `collapse_warning` times that of the images' own reference
    captions without rising."""
    distinct, ref_distinct = distinct_captions(captions), distinct_captions(references)
    share, reference = distinct / len(captions), ref_distinct / len(references)
    samples = state.history.setdefault("samples", [])
    samples.append({"step": state.step, "epoch": state.epoch + 1, "image_ids": image_ids, "captions": captions,
                    "distinct_share": share, "reference_share": reference})
    recent = [s["distinct_share"] for s in samples if s["step"] > warmup][-COLLAPSE_EVALS:]
    if len(recent) == COLLAPSE_EVALS and recent[-1] <= recent[0] and max(recent) < collapse_warning * reference:
        return (f"warning: at step {state.step} only {distinct} distinct captions for {len(captions)} different images "
                f"(their references: {ref_distinct}), and no more for {COLLAPSE_EVALS} evaluations: the captions are "
                "collapsing towards one. If it persists, lower --lr, add --feature-noise, or check that the features "
                "differ between images.")
    return None


def patience_ran_out(state: TrainState, patience: int) -> bool:
    return patience > 0 and state.evals_since_best >= patience
