"""The training loop: cached CLIP features in, a captioner out, resumable at any checkpoint.

`train()` is one loop a reader can hold in their head, and `train_step()` is one optimiser step of it:
AdamW under `get_lr(step)` (linear warm-up, then linear or cosine decay), mixed precision (fp16 with
loss scaling, bf16 where the GPU has it), gradient accumulation and clipping, validation loss and a
best checkpoint, per-step history for the plots. `accelerate` runs the same code on a CPU, one GPU or
several (Kaggle's 2xT4).

Where a run stops (`max_steps`) is apart from where its learning rate ends (the end of `epochs`, or
`lr_decay_steps`), as nanoGPT keeps `max_iters` apart from `lr_decay_iters`: a run cut into sessions
with `--max-steps` follows the schedule of the whole run. A checkpoint carries everything a resumed run
needs to continue exactly as if never stopped: the trainable weights, optimiser and loss-scaler state,
RNG states, the position in the data, the schedule, the configs and the history. Batches come from a
permutation seeded by (seed, epoch), so the position is two ints. Ctrl-C (a notebook's "Interrupt
kernel") and SIGTERM (a platform ending the session) write a checkpoint before the run stops.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .captioner import Captioner
from .config import ModelConfig, RuntimeConfig, TrainConfig
from .features import FeatureCache, load_cache
from .files import atomic_path, write_json
from .sources import load_language_model
from .paths import models_dir, run_dir
from .schedule import (MAX_WARMUP_SHARE, batch_recipe, effective_batch, epoch_order, epoch_steps,  # noqa: F401
                       get_lr, length_bucketed_batches, padding_share, run_steps, warmup_for)
from .runtime import compile_supported, is_offline, mixed_precision, resolve_device, to_device

CHECKPOINT_VERSION = 2  # 2: the schedule's horizon is recorded; best.pt holds no optimiser state
# TrainConfig fields a resumed run may change without changing what it computes.
_FREE_ON_RESUME = {"resume", "max_steps", "out_dir", "checkpoint_every", "checkpoint_minutes", "log_every",
                   "eval_every", "num_workers", "watch_images", "collapse_warning", "patience", "compile"}
COLLAPSE_EVALS = 3  # evaluations in a row the captions must stay collapsed before the run warns
MAX_SKIPPED_STEPS = 25  # fp16: this many non-finite losses in a row stop the run (the scaler halves each time)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped the run after a checkpoint was written; the message says how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"TrainingInterrupted: {self}"]


@dataclass
class Split:
    """One split, ready for batching: CLIP rows and caption token ids (EOS appended)."""

    rows: torch.Tensor  # (M,) feature row of each caption
    tokens: list[list[int]]  # M lists of token ids

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class TrainResult:
    out_dir: Path
    bundle: Path  # the best captioner, loadable with Captioner.from_pretrained
    history: dict  # {"train": [...], "val": [...]}
    best_val_loss: float | None
    steps: int


def make_split(cache: FeatureCache, name: str, captioner: Captioner) -> Split:
    frame = cache.split(name)
    tokens, cut = captioner.encode_captions(frame["caption"].tolist())
    if cut:
        print(f"{name}: {cut} of {len(tokens)} captions cut to {captioner.max_caption_tokens} tokens "
              f"(prefix {captioner.config.prefix_length} + caption must fit the LM)")
    return Split(torch.tensor(frame["feature_row"].to_numpy(), dtype=torch.long), tokens)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or the constant prefix), as torch's fused
    kernel where it has one (CUDA; CPU too): one pass over each tensor instead of a dozen, the same update."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and not n.endswith("prefix_const")]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and not n.endswith("prefix_const"))]
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") for _, p in params)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused or None)


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    try:
        return mixed_precision(cfg.precision, device)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def _device(runtime: RuntimeConfig) -> torch.device:
    """The device training runs on; `cuda:1` becomes the current CUDA device, which accelerate then uses."""
    device = resolve_device(runtime.device)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise TrainingError(f"--device {runtime.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                                f"numbered from 0; choose cuda:0 ... cuda:{max(torch.cuda.device_count() - 1, 0)}.")
        torch.cuda.set_device(device)
    return device


def build_captioner(model_cfg: ModelConfig, cache: FeatureCache, runtime: RuntimeConfig,
                    models_dir: Path) -> Captioner:
    """A fresh captioner whose CLIP width and backbone come from the feature cache it will read."""
    model_cfg = dataclasses.replace(model_cfg, clip_dim=int(cache.meta["clip_dim"]), backbone=cache.meta["backbone"])
    lm, tokenizer, lm_name = load_language_model(model_cfg.lm, is_offline(runtime.offline))
    torch.manual_seed(runtime.seed)  # after the LM: building a stand-in on first use draws random numbers too
    return Captioner(dataclasses.replace(model_cfg, lm=lm_name), lm, tokenizer)


@torch.no_grad()
def evaluate_loss(model, captioner: Captioner, features: torch.Tensor, split: Split, batch_size: int,
                  device) -> float:
    """Mean loss per caption token over `split`, summed on the device and read back once."""
    model.eval()
    total = count = torch.zeros((), device=features.device)
    for start in range(0, len(split), batch_size):
        rows = split.rows[start:start + batch_size]
        ids, mask, labels = captioner.pad(split.tokens[start:start + batch_size], device)
        n = (labels != -100).sum()
        total = total + model(features[to_device(rows, device)], ids, mask, labels).float() * n
        count = count + n
    model.train()
    return float(total / count.clamp(min=1))


def train_step(model, optimizer, accelerator, micro_batches: list[tuple], lr: float, cfg: TrainConfig,
               step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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


def check_steps(state: dict, pending: list[tuple[int, torch.Tensor, torch.Tensor]], precision: str) -> list[tuple]:
    """Read the (step, loss, grad_norm) of the steps since the last read (one host sync for all of them) and
    stop a run that diverged: a non-finite loss or gradient norm (in fp16, the scaler skips such a step;
    MAX_SKIPPED_STEPS of them in a row stop it). Called at log steps and before anything is saved, so a
    run never writes weights from a step that diverged; returns [(step, loss, grad_norm)] as floats."""
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
    return done


def diverged(what: str) -> str:
    return (f"{what}: training diverged, and nothing from this step on was saved (any earlier checkpoint is "
            "intact). Start a new run (another --out-dir) with a lower --lr or a longer --warmup-steps: --resume "
            "keeps the settings that diverged.")


def count_skipped(state: dict, loss: float, step: int, precision: str) -> None:
    """fp16: the loss scaler skips a step whose loss or gradients are not finite, and lowers its scale;
    a loss that stays non-finite is not an overflow but a run that diverged: stop it."""
    state["skipped_in_a_row"] = 0 if math.isfinite(loss) else state.get("skipped_in_a_row", 0) + 1
    if state["skipped_in_a_row"] >= MAX_SKIPPED_STEPS:
        raise TrainingError(f"the loss was not finite for {MAX_SKIPPED_STEPS} steps in a row (up to step "
                            f"{step}; {precision} skipped each): training diverged. Start a new run "
                            "(another --out-dir) with a lower --lr, a longer --warmup-steps, or --precision bf16 "
                            "or fp32.")


@contextmanager
def stop_signals():
    """While training: SIGINT (Ctrl-C, "Interrupt kernel") and SIGTERM only set `stop["signal"]`, so the loop
    ends its step, writes a checkpoint and stops cleanly. A second signal acts at once, as without us."""
    stop = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
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
          runtime: RuntimeConfig = RuntimeConfig(), data_dir: str | Path = "data") -> TrainResult:
    """Train a captioner on a feature cache; writes checkpoints, history and the best bundle to out_dir.

    Raises TrainingInterrupted (after writing a checkpoint) on Ctrl-C or SIGTERM."""
    from accelerate import Accelerator

    device = _device(runtime)
    if cfg.compile and not compile_supported(device):
        raise TrainingError(f"--compile: torch.compile needs a GPU of compute capability 7.0 or more (a T4 is 7.5, "
                            f"a P100 6.0), and this run is on {device}: leave --compile off.")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=_precision(cfg, device))
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index

    def say(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(message)

    cache = load_cache(cache_path)
    out = Path(cfg.out_dir or run_dir(data_dir, cache.meta["dataset"], model_cfg.mapper))
    checkpoint = out / "checkpoint.pt"
    if cfg.resume is True and not checkpoint.is_file():
        raise TrainingError(f"--resume: {out} holds no checkpoint.pt to continue from. Give the --out-dir of the "
                            "run to continue, or leave out --resume to start a new run there.")
    if not cfg.resume and checkpoint.is_file():
        raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose "
                            "another --out-dir.")
    captioner = build_captioner(model_cfg, cache, runtime, models_dir(data_dir)).to(device)
    features = torch.tensor(np.asarray(cache.features), dtype=torch.float32, device=device)  # (N, clip_dim)
    train_split, val_split = make_split(cache, "train", captioner), make_split(cache, "val", captioner)
    need = effective_batch(cfg, world)
    if len(train_split) < need:
        raise TrainingError(f"{cache.path} has {len(train_split)} training captions, fewer than one optimiser step "
                            f"takes (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} "
                            "process(es)): use more images, or a smaller --batch-size or --grad-accum.")
    steps_per_epoch = epoch_steps(len(train_split), cfg, world)
    total_steps, decay_steps = run_steps(len(train_split), cfg, world)
    schedule = batch_recipe(cfg, world)  # lr and warm-up at this run's batch; checkpoints keep `cfg` as given
    optimizer = make_optimizer(captioner, schedule)
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val_loss": None, "decay_steps": decay_steps,
             "history": {"train": [], "val": []}, "window": [0.0, 0, 0.0]}  # loss sum, steps, seconds
    zero = str(accelerator.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED")
    if checkpoint.is_file():
        if zero:
            _refuse_sharded(checkpoint, "this run is a DeepSpeed one")
        state = _load_checkpoint(checkpoint, captioner, optimizer, accelerator, cache, cfg)
        if state.get("zero_sharded"):
            _refuse_sharded(checkpoint, "it was written by a DeepSpeed ZeRO run")
        decay_steps = state["decay_steps"]  # the schedule of the run as it started, whatever --max-steps is now
        say(f"resuming {out} at step {state['step']} (epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of "
            f"{steps_per_epoch}) from {checkpoint}; the LR schedule runs to step {decay_steps}")
    state["zero_sharded"] = zero
    if schedule is not cfg:
        say(batch_recipe_message(cfg, schedule, world))
    warmup = warmup_for(schedule, decay_steps)
    if warmup < schedule.warmup_steps:
        scaled = schedule is not cfg
        given = math.floor(warmup * effective_batch(cfg, world) / cfg.lr_batch_size) if scaled else warmup
        say(f"warm-up shortened: --warmup-steps {cfg.warmup_steps}"
            + (f" ({schedule.warmup_steps} steps at this batch)" if scaled else "")
            + f" is more than a third of the {decay_steps} steps the LR schedule spans, so the LR would never reach "
            + (f"its peak {schedule.lr:.3g}" if scaled else f"--lr {cfg.lr:g}")
            + f"; warming up over {warmup} steps instead (give --warmup-steps {given} or less to choose it yourself).")
    if cfg.compile:  # shapes vary with the batches' caption lengths: one graph for all of them
        captioner.compile(dynamic=True)
        say("torch.compile: the first steps and the first validation compile the model (minutes), then run faster")
    model, optimizer = accelerator.prepare(captioner, optimizer)
    say(captioner.describe())
    say(f"{len(train_split)} training captions, {steps_per_epoch} steps/epoch, stopping at step {total_steps} "
        f"(LR schedule over {decay_steps}), precision {accelerator.mixed_precision}, {world} process(es) on {device}")

    pending = []  # (step, loss, grad_norm) of the steps since the last log row, still on the device

    def settle() -> list[tuple]:
        """The pending steps read (one host sync) and checked: before any save, validation or log row."""
        done = check_steps(state, pending, accelerator.mixed_precision)
        for _, loss, grad_norm in done:
            state["window"][0] += loss
            state["window"][1] += 1
        return done

    def save(name: str = "checkpoint.pt", quiet: bool = False) -> None:
        settle()
        if any(not torch.isfinite(p).all() for p in captioner.trainable_state().values()):  # never save lost weights
            raise TrainingError(diverged(f"the weights became non-finite by step {state['step']}"))
        if accelerator.is_main_process:
            path = out / name
            _save_checkpoint(path, captioner, optimizer, accelerator, state, cfg, cache, resumable=name != "best.pt")
            _save_history(out, state["history"])
            if not quiet:
                say(f"{'best' if name == 'best.pt' else 'checkpoint'} at step {state['step']}: {path} "
                    f"({path.stat().st_size / 2**20:.1f} MB)")
        saved[0] = time.monotonic()

    saved = [time.monotonic()]
    watch = cache.split("val").drop_duplicates("image_id").head(cfg.watch_images)

    def validate() -> None:
        settle()
        if not len(val_split):
            return
        val = evaluate_loss(model, captioner, features, val_split, cfg.batch_size, device)
        state["history"]["val"].append({"step": state["step"], "epoch": state["epoch"] + 1, "val_loss": val})
        if len(watch):
            _watch_captions(captioner, features, watch, state, cfg, warmup, say)
        if state["best_val_loss"] is None or val < state["best_val_loss"]:
            state["best_val_loss"], state["evals_since_best"] = val, 0
            save("best.pt")
        else:
            state["evals_since_best"] = state.get("evals_since_best", 0) + 1

    def stop_requested(log_step: bool) -> int:
        signum = stop["signal"] or 0
        if world > 1:  # every process stops at the same step: agreed at log steps (a host sync)
            signum = int(accelerator.reduce(torch.tensor(signum, device=device), reduction="max")) if log_step else 0
        return signum

    lengths = [len(t) for t in train_split.tokens]
    bucketed = padding_share(lengths, length_bucketed_batches(lengths, cfg.batch_size, runtime.seed, 0))
    shuffled = padding_share(lengths, list(epoch_order(len(lengths), runtime.seed, 0).split(cfg.batch_size)))
    say(f"batches bucketed by caption length: {bucketed:.0%} of the caption positions computed are padding "
        f"(shuffled batches: {shuffled:.0%})")
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], unit="step", desc="training", mininterval=2,
               disable=not accelerator.is_main_process)
    with stop_signals() as stop:
        while state["step"] < total_steps:
            # batches of captions of similar length (little padding), a pure function of (seed, epoch)
            batches = length_bucketed_batches(lengths, cfg.batch_size, runtime.seed, state["epoch"])[rank::world]
            while state["step_in_epoch"] < steps_per_epoch and state["step"] < total_steps:
                start = time.perf_counter()
                lr = get_lr(state["step"], schedule, decay_steps)
                micro = []
                first = state["step_in_epoch"] * cfg.grad_accum
                for idx in batches[first:first + cfg.grad_accum]:
                    ids, mask, labels = captioner.pad([train_split.tokens[i] for i in idx.tolist()], device)
                    micro.append((features[to_device(train_split.rows[idx], device)], ids, mask, labels))
                loss, grad_norm = train_step(model, optimizer, accelerator, micro, lr, cfg, state["step"])
                pending.append((state["step"], loss, grad_norm))
                state["step"] += 1
                state["step_in_epoch"] += 1
                log_step = state["step"] % cfg.log_every == 0 or state["step"] == total_steps
                if log_step:  # the loop's one host sync: this window's losses and gradient norms read back
                    _, _, grad_norm = settle()[-1]
                state["window"][2] += time.perf_counter() - start  # on a GPU: the window's time, at the sync
                if log_step:
                    window = state["window"]
                    samples = sum(len(m[1]) for m in micro) * world
                    state["history"]["train"].append({
                        "step": state["step"], "epoch": state["epoch"] + 1, "loss": window[0] / window[1],
                        "lr": lr, "grad_norm": grad_norm,
                        "samples_per_s": samples * window[1] / max(window[2], 1e-9)})
                    bar.set_postfix(loss=f"{window[0] / window[1]:.3f}", lr=f"{lr:.2e}", refresh=False)
                    state["window"] = [0.0, 0, 0.0]
                bar.update(1)
                if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    validate()
                if _patience_ran_out(state, cfg):
                    break
                if signum := stop_requested(log_step):
                    bar.close()
                    _interrupted(save, out, state, signum)
                if (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0) or \
                        (cfg.checkpoint_minutes and time.monotonic() - saved[0] >= 60 * cfg.checkpoint_minutes):
                    save()
            if state["step_in_epoch"] >= steps_per_epoch:
                if not cfg.eval_every:
                    validate()
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                save()
            if _patience_ran_out(state, cfg):
                say(f"early stop: no better validation loss in {cfg.patience} evaluations "
                    f"(best {state['best_val_loss']:.4f})")
                break
        bar.close()
        if not state["history"]["val"] or state["history"]["val"][-1]["step"] != state["step"]:
            validate()
        save()
    accelerator.wait_for_everyone()
    bundle = out / "captioner"
    if accelerator.is_main_process:
        _export_best(bundle, captioner, state, cache)
        say(f"captioner bundle (weights only, no optimiser state): {bundle}")
    accelerator.wait_for_everyone()
    return TrainResult(out, bundle, state["history"], state["best_val_loss"], state["step"])


def batch_recipe_message(cfg: TrainConfig, schedule: TrainConfig, processes: int) -> str:
    """The line a run says when `batch_recipe` moved its lr and warm-up to its batch."""
    changes = [f"--lr {cfg.lr:g} -> {schedule.lr:.3g}"]
    if cfg.min_lr:
        changes.append(f"--min-lr {cfg.min_lr:g} -> {schedule.min_lr:.3g}")
    if cfg.warmup_steps:
        changes.append(f"--warmup-steps {cfg.warmup_steps} -> {schedule.warmup_steps}")
    return (f"batch {effective_batch(cfg, processes)} (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} "
            f"x {processes} process{'es' if processes > 1 else ''}): {', '.join(changes[:-1])}"
            f"{' and ' if len(changes) > 1 else ''}{changes[-1]}, the same warm-up in captions as batch "
            f"{cfg.lr_batch_size} (--lr-batch-size 0 to use them as given)")


def _interrupted(save, out: Path, state: dict, signum: int) -> None:
    save(quiet=True)
    path = out / "checkpoint.pt"
    size = f" ({path.stat().st_size / 2**20:.1f} MB)" if path.is_file() else ""
    name = signal.Signals(signum).name
    raise TrainingInterrupted(f"{name} at step {state['step']}: the run is saved in {path}{size}; to continue"
                              " it, run the same command with --resume (in Python: resume=True).", signum)


def _patience_ran_out(state: dict, cfg: TrainConfig) -> bool:
    return cfg.patience > 0 and state.get("evals_since_best", 0) >= cfg.patience


def _watch_captions(captioner: Captioner, features: torch.Tensor, watch: pd.DataFrame, state: dict,
                    cfg: TrainConfig, warmup: int, say=print) -> None:
    """Caption the same validation images at every evaluation: the history then shows captions improve,
    and a model that says one caption for every image (ClipCap's users met it only after training) is
    caught while it trains.

    Judged against the run itself, so healthy runs stay silent: captions still forming say the same few
    things at first. It warns only when, for the last COLLAPSE_EVALS evaluations after the warm-up, the
    captions' distinct share stayed below `collapse_warning` times that of the images' own reference
    captions without rising."""
    rows = torch.tensor(watch["feature_row"].to_numpy(), device=features.device)
    captions = captioner.generate(features[rows])
    share = len(set(captions)) / len(captions)
    reference = watch["caption"].nunique() / len(watch)  # one reference caption per watched image
    samples = state["history"].setdefault("samples", [])
    samples.append({"step": state["step"], "epoch": state["epoch"] + 1, "image_ids": watch["image_id"].tolist(),
                    "captions": captions, "distinct_share": share, "reference_share": reference})
    recent = [s["distinct_share"] for s in samples if s["step"] > warmup][-COLLAPSE_EVALS:]
    if len(recent) == COLLAPSE_EVALS and recent[-1] <= recent[0] and max(recent) < cfg.collapse_warning * reference:
        say(f"warning: at step {state['step']} only {len(set(captions))} distinct captions for {len(captions)} "
            f"different images (their references: {watch['caption'].nunique()}), and no more for "
            f"{COLLAPSE_EVALS} evaluations: the captions are collapsing towards one. If it persists, lower --lr, "
            "add --feature-noise, or check that the features differ between images.")


# ---- checkpoints ------------------------------------------------------------------------------------

def _config_record(model_cfg: ModelConfig, cfg: TrainConfig, cache: FeatureCache) -> dict:
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
            "features": {k: cache.meta[k] for k in ("backbone", "clip_dim", "images_fingerprint")}
            | {"captions_fingerprint": cache.meta.get("captions_fingerprint")}}


def _save_checkpoint(path: Path, captioner: Captioner, optimizer, accelerator, state: dict, cfg: TrainConfig,
                     cache: FeatureCache, resumable: bool = True) -> None:
    """A checkpoint; `resumable=False` (best.pt) leaves out the optimiser, scaler and RNG states, which are
    twice the size of the weights and only a resumed run needs."""
    checkpoint = {
        "version": CHECKPOINT_VERSION,
        "config": _config_record(captioner.config, cfg, cache),
        "trainable": captioner.trainable_state(),
        "state": state,
    }
    if resumable:
        checkpoint |= {
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)  # a file object: a full disk then raises OSError, not an opaque RuntimeError


def _refuse_sharded(path: Path, why: str) -> None:
    """DeepSpeed ZeRO shards the optimiser state over the processes; our checkpoint holds the first one's."""
    raise TrainingError(f"cannot resume {path}: {why}, and ZeRO shards the optimiser state across processes, so "
                        "this checkpoint holds only one process's share of it; a resumed run would not be the same "
                        "run. Start a new run (another --out-dir), or train without DeepSpeed to be able to resume.")


def _load_checkpoint(path: Path, captioner: Captioner, optimizer, accelerator, cache: FeatureCache,
                     cfg: TrainConfig) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: never run it, say what it is
        raise TrainingError(f"{path} cannot be read as a checkpoint of this course ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]}). It is refused, not executed.") from None
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is a version {checkpoint.get('version')} checkpoint; this course writes "
                            f"version {CHECKPOINT_VERSION}.")
    want = _config_record(captioner.config, cfg, cache)
    have = checkpoint["config"]
    # lr_batch_size: a checkpoint from before the batch recipe used --lr and --warmup-steps as given (0), and 0 or
    # the run's own batch make the same schedule
    same = {0, effective_batch(cfg, accelerator.num_processes)}
    if have["train"].get("lr_batch_size", 0) in same and cfg.lr_batch_size in same:
        have = {**have, "train": {**have["train"], "lr_batch_size": cfg.lr_batch_size}}
    diffs = [f"{section}.{k}: checkpoint has {have[section].get(k)!r}, now {v!r}"
             for section in ("model", "train", "features") for k, v in want[section].items()
             if not (section == "train" and k in _FREE_ON_RESUME) and have[section].get(k) != v]
    if diffs:
        raise TrainingError(f"cannot resume {path}: it was made with other settings:\n  " + "\n  ".join(diffs)
                            + "\nResume with the same settings, or start a new run with another --out-dir.")
    if "optimizer" not in checkpoint:
        raise TrainingError(f"{path} holds weights only (no optimiser state): it cannot be resumed. Start a new run "
                            "with another --out-dir.")
    load_trainable(captioner, checkpoint["trainable"], path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if accelerator.scaler is not None and checkpoint["scaler"]:
        accelerator.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["state"]


def load_trainable(captioner: Captioner, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put a checkpoint's trainable tensors into `captioner`: exactly the tensors that learn, no more, no fewer,
    each of its shape; anything else refuses the checkpoint (the frozen rest comes from the LM's own weights)."""
    want = set(captioner.trainable_state())
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        def some(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise TrainingError(f"{path} does not fit this model: " + "; ".join(
            ([f"it lacks {len(missing)} tensor(s) that learn here ({some(missing)})"] if missing else [])
            + ([f"it has {len(unexpected)} this model does not train ({some(unexpected)})"] if unexpected else []))
            + ". It was made with other --freeze or model settings: resume with those, or start a new run.")
    try:
        captioner.load_state_dict(tensors, strict=False)  # a subset of the state by design; checked above
    except RuntimeError as exc:  # a tensor of another shape
        raise TrainingError(f"{path} does not fit this model: {str(exc).splitlines()[-1].strip()}") from None


def _save_history(out: Path, history: dict) -> None:
    write_json(out / "history.json", history)
    for kind, rows in history.items():
        with atomic_path(out / f"history_{kind}.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def _export_best(bundle: Path, captioner: Captioner, state: dict, cache: FeatureCache) -> Path:
    """The best weights (lowest validation loss, else the last) as a self-contained bundle."""
    best = bundle.parent / "best.pt"
    if best.is_file():
        load_trainable(captioner, torch.load(best, map_location="cpu", weights_only=True)["trainable"], best)
    summary = {"steps": state["step"], "epochs": state["epoch"], "best_val_loss": state["best_val_loss"],
               "features": str(cache.path), "dataset": cache.meta.get("dataset"), "standin": cache.meta["standin"]}
    return captioner.save_pretrained(bundle, summary=summary)
