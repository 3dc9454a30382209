"""The schedule of a run, pure functions of the settings: how many steps, the LR at each step (nanoGPT's
`get_lr`, with lr and warm-up moved to the run's batch by `batch_recipe`), and which captions make each
batch (a shuffle of (seed, epoch), bucketed by caption length).

Nothing here holds state, so a resumed run recomputes exactly the schedule and the batches of the run
it continues; `training.py` calls these.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import TrainConfig

MAX_WARMUP_SHARE = 3  # a warm-up longer than 1/3 of the schedule is shortened to it (and the run says so)


def effective_batch(cfg: TrainConfig, processes: int = 1) -> int:
    """Captions per optimiser step: --batch-size x --grad-accum x processes."""
    return cfg.batch_size * cfg.grad_accum * processes


def batch_recipe(cfg: TrainConfig, processes: int = 1) -> TrainConfig:
    """`cfg` with lr, min_lr and warmup_steps moved from the batch they are set for (`cfg.lr_batch_size`) to the
    run's effective batch: the warm-up keeps its number of captions (warmup_steps x lr_batch_size / batch, at
    least 1 step), and the LR scales by sqrt(batch / lr_batch_size), Adam's square-root rule (Malladi et al.
    2022, "On the SDEs and scaling rules for adaptive gradient algorithms"). `cfg` itself when the batches are
    equal or `lr_batch_size` is 0."""
    batch = effective_batch(cfg, processes)
    if not cfg.lr_batch_size or batch == cfg.lr_batch_size:
        return cfg
    ratio = batch / cfg.lr_batch_size
    warmup = max(round(cfg.warmup_steps / ratio), 1) if cfg.warmup_steps else 0
    scale = math.sqrt(ratio)
    return dataclasses.replace(cfg, lr=cfg.lr * scale, min_lr=cfg.min_lr * scale, warmup_steps=warmup)


def warmup_for(cfg: TrainConfig, decay_steps: int) -> int:
    """The warm-up a run uses: cfg.warmup_steps, shortened to a third of the schedule when longer (a
    5,000-step warm-up in an 830-step run would peak at a sixth of the chosen lr)."""
    return min(cfg.warmup_steps, max(decay_steps // MAX_WARMUP_SHARE, 1))


def get_lr(step: int, cfg: TrainConfig, decay_steps: int) -> float:
    """Linear warm-up from 0 to cfg.lr over `warmup_for(cfg, decay_steps)` steps, then decay to min_lr at
    `decay_steps` (the schedule's horizon, not the step a run stops at)."""
    warmup = warmup_for(cfg, decay_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.decay == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)  # cosine


def epoch_steps(n_captions: int, cfg: TrainConfig, processes: int = 1) -> int:
    """Optimiser steps in one pass over the captions: batches are dealt out to the processes, then
    `grad_accum` of them make one step."""
    return max(math.ceil(n_captions / cfg.batch_size) // processes // cfg.grad_accum, 1)


def run_steps(n_captions: int, cfg: TrainConfig, processes: int = 1) -> tuple[int, int]:
    """(the step a run stops at, the step its LR schedule ends at). `max_steps` moves only the first."""
    full = cfg.epochs * epoch_steps(n_captions, cfg, processes)
    return min(cfg.max_steps or full, full), cfg.lr_decay_steps or full


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): resuming needs no saved permutation."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def length_bucketed_batches(lengths, batch_size: int, seed: int, epoch: int,
                            window: int = 100) -> list[torch.Tensor]:
    """One epoch's batches, each of captions of similar length, a pure function of (seed, epoch).

    The epoch's shuffle (`epoch_order`) is cut into windows of `window` batches; each window is sorted by
    caption length (ties stay in shuffled order) and cut into batches, and the batches are then shuffled.
    Every caption comes once per epoch as before, batches still mix captions from all over the data,
    and padding to the longest caption of a batch costs little (see `padding_share`).
    """
    lengths = torch.as_tensor(lengths)
    order = epoch_order(len(lengths), seed, epoch)
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches += list(chunk.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 7))
    return [batches[i] for i in shuffle.tolist()]


def padding_share(lengths, batches: list[torch.Tensor]) -> float:
    """Share of the caption positions computed that are padding, when each batch pads to its longest caption."""
    lengths = torch.as_tensor(lengths)
    real = padded = 0
    for batch in batches:
        n = lengths[batch]
        real += int(n.sum())
        padded += int(n.max()) * len(n) if len(n) else 0
    return 1 - real / max(padded, 1)
