"""The training loop: cached CLIP features in, a captioner out, resumable at any checkpoint.

`train()` reads top to bottom as nanoGPT's loop does: the learning rate of this step (`get_lr`: linear warm-up,
then linear or cosine decay), the batches (captions of similar length, a pure function of (seed, epoch)), one
optimiser step (`train_step`: mixed precision, gradient accumulation, clipping), a log row, a validation, a
checkpoint. Everything it needs is made once before it by `prepare_run`; what a checkpoint holds and how it
is checked is checkpoints.py's, what watches the run (divergence, collapse, patience) monitors.py's, and the
schedule schedule.py's. `accelerate` runs the same code on a CPU, one GPU or several (Kaggle's 2xT4).

Where a run stops (`max_steps`) is apart from where its learning rate ends (the end of `epochs`, or
`lr_decay_steps`), as nanoGPT keeps `max_iters` apart from `lr_decay_iters`: a run cut into sessions
with `--max-steps` follows the schedule of the whole run, and a resumed run continues exactly as if never
stopped. Ctrl-C (a notebook's "Interrupt kernel") and SIGTERM (a platform ending the session) write a
checkpoint before the run stops.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ModelConfig, RuntimeConfig, TrainConfig
from .errors import TrainingError
from .monitors import patience_ran_out
from .training_run import Run, prepare_run
from .schedule import get_lr


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped the run after a checkpoint was written; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"TrainingInterrupted: {self}"]


@dataclass
class TrainResult:
    out_dir: Path
    bundle: Path | None  # the best captioner, loadable with Captioner.from_pretrained (None: keep="history")
    history: dict  # {"train": [...], "val": [...]}
    best_val_loss: float | None
    steps: int  # the run's optimiser steps, all sessions together
    first_step: int = 0  # where this session started: 0 for a new run, the checkpoint's step for a resumed one
    seconds: float = 0.0  # this session's time in the loop

    @property
    def resumed(self) -> bool:
        return self.first_step > 0


def train_step(model, optimizer, accelerator, micro_batches: list[tuple], lr: float,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step over `grad_accum` micro-batches, each (clip_embed (B, clip_dim), input_ids (B, T),
    attention_mask (B, T), labels (B, T)); returns (loss, gradient norm before clipping) as 0-d tensors on
    the device, without waiting for them: on a GPU, reading a number back is a host sync that leaves the GPU
    idle until the host has queued the next step, so train() reads them (`check_steps`) at log steps only.

    The loss is per token over the whole step: the sum of every caption token's loss over all
    micro-batches and processes, divided by their number of label tokens (as the HF Trainer's
    `num_items_in_batch`), so a micro-batch of short captions weighs no more than its tokens. Gradient
    clipping and the optimiser step follow; in fp16 the loss scaler skips a step whose gradients overflow.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    world = accelerator.num_processes
    counts = [(labels != -100).sum() for *_, labels in micro_batches]
    tokens = torch.stack(counts).sum()
    if world > 1:  # the label tokens of the whole step, over every process
        tokens = accelerator.reduce(tokens, reduction="sum")
    loss_sum = torch.zeros((), device=tokens.device)
    try:
        for i, ((clip_embed, ids, mask, labels), n) in enumerate(zip(micro_batches, counts)):
            sync = nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
            with sync:
                token_loss = model(clip_embed, ids, mask, labels) * n  # summed over this micro-batch's tokens
                # DDP averages gradients over processes; `* world` makes that the sum over all tokens
                accelerator.backward(token_loss * world / tokens)
            loss_sum += token_loss.detach().float()
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at batch size {cfg.batch_size}: use a smaller --batch-size "
                            f"(e.g. {max(cfg.batch_size // 2, 1)}) with --grad-accum {cfg.grad_accum * 2}, which "
                            "trains the same model in smaller pieces.") from None
    if world > 1:  # every process logs, and stops on, the loss of the whole step
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if not torch.is_tensor(grad_norm):  # DeepSpeed clips inside and reports its norm as a number (or none: 0)
        grad_norm = torch.tensor(float(grad_norm or 0.0), device=loss_sum.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / tokens.clamp(min=1), grad_norm.detach().float()


@contextmanager
def stop_signals():
    """While training: SIGINT (Ctrl-C, "Interrupt kernel") and SIGTERM only set `stop["signal"]`, so the loop
    ends its step, writes a checkpoint and stops cleanly. A second signal acts at once, as without us."""
    stop = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
        stop["signal"] = signum
        signal.signal(signum, previous[signum])

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(cache_path: str | Path, model_cfg: ModelConfig = ModelConfig(), cfg: TrainConfig = TrainConfig(),
          runtime: RuntimeConfig = RuntimeConfig(), data_dir: str | Path | None = None) -> TrainResult:
    """Train a captioner on a feature cache; writes checkpoints, history and the best bundle to the run folder
    (cfg.out_dir, else <data_dir>/runs/<dataset>-<mapper>; data_dir: CLIPCAP_DATA, else the course's data/).

    Raises TrainingInterrupted (after writing a checkpoint) on Ctrl-C or SIGTERM."""
    run = prepare_run(cache_path, model_cfg, cfg, runtime, data_dir)
    if run.finished:  # keep="history": this run finished before; its summary is the result
        return _result(run, run.state.step, 0.0)
    state, started, first_step = run.state, time.monotonic(), run.state.step
    bar = tqdm(total=run.total_steps, initial=state.step, unit="step", desc="training", mininterval=2,
               disable=not run.accelerator.is_main_process)
    with stop_signals() as stop:
        while state.step < run.total_steps:
            batches = run.epoch_batches(state.epoch)  # captions of similar length, a pure function of (seed, epoch)
            while state.step_in_epoch < run.steps_per_epoch and state.step < run.total_steps:
                start = time.perf_counter()
                lr = get_lr(state.step, run.schedule, state.decay_steps)
                micro = run.micro_batches(batches, state.step_in_epoch)
                loss, grad_norm = train_step(run.model, run.optimizer, run.accelerator, micro, lr, cfg)
                run.pending.append((state.step, loss, grad_norm))
                state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
                log_step = run.log(lr, micro, start)  # at log steps the loop's one host sync, and a history row
                bar.update(1)
                if run.eval_due():
                    run.validate()
                if patience_ran_out(state, cfg.patience):
                    break
                if signum := run.stop_requested(stop["signal"], log_step):
                    bar.close()
                    _interrupted(run, signum)
                if run.checkpoint_due():
                    run.save()
            if state.step_in_epoch >= run.steps_per_epoch:  # the end of an epoch: validate, then a checkpoint
                run.end_epoch()
            if patience_ran_out(state, cfg.patience):
                run.say(f"early stop: no better validation loss in {cfg.patience} evaluations "
                        f"(best {state.best_val_loss:.4f})")
                break
        bar.close()
        run.validate()  # where the run stops (skipped when it just did)
        run.save()
    run.finish()
    return _result(run, first_step, time.monotonic() - started)


def _result(run: Run, first_step: int, seconds: float) -> TrainResult:
    bundle = run.bundle if run.cfg.keep == "all" else None
    return TrainResult(run.out, bundle, run.state.history, run.state.best_val_loss, run.state.step, first_step, seconds)


def _interrupted(run: Run, signum: int) -> None:
    run.save(quiet=True)
    path = run.out / "checkpoint.pt"
    size = f" ({path.stat().st_size / 2**20:.1f} MB)" if path.is_file() else ""
    raise TrainingInterrupted(f"{signal.Signals(signum).name} at step {run.state.step}: the run is saved in "
                              f"{path}{size}; to continue it, run the same command with --resume (in Python: "
                              "resume=True).", signum)
