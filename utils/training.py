"""The training loop: cached CLIP features in, a captioner out, resumable at any checkpoint.

One function, `train()`, a reader can hold in their head: AdamW under `get_lr(step)` (linear warm-up,
then linear or cosine decay), mixed precision (fp16 with loss scaling, bf16 where the GPU has it),
gradient accumulation and clipping, validation loss and a best checkpoint, per-step history for the
plots. `accelerate` runs the same code on a CPU, one GPU or several (Kaggle's 2xT4).

A checkpoint carries everything a resumed run needs to continue exactly as if never stopped: the
trainable weights, optimiser and loss-scaler state, RNG states, the position in the data, the configs
and the history. Batches come from a permutation seeded by (seed, epoch), so the position is two ints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .captioner import Captioner, load_language_model
from .config import ModelConfig, RuntimeConfig, TrainConfig
from .features import FeatureCache, load_cache
from .files import atomic_path, write_json
from .runtime import is_offline, resolve_device, supports_bf16

CHECKPOINT_VERSION = 1
# TrainConfig fields a resumed run may change without changing what it computes.
_FREE_ON_RESUME = {"resume", "max_steps", "out_dir", "checkpoint_every", "log_every", "eval_every", "num_workers",
                   "watch_images", "collapse_warning", "patience"}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


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


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up from 0 to cfg.lr over warmup_steps, then decay to min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    if cfg.decay == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    raise ValueError(f"decay must be 'linear', 'cosine' or 'constant', not {cfg.decay!r}")


def epoch_steps(n_captions: int, cfg: TrainConfig, processes: int = 1) -> int:
    """Optimiser steps in one pass over the captions: batches are dealt out to the processes, then
    `grad_accum` of them make one step."""
    return max(math.ceil(n_captions / cfg.batch_size) // processes // cfg.grad_accum, 1)


def make_split(cache: FeatureCache, name: str, captioner: Captioner) -> Split:
    frame = cache.split(name)
    tokens, cut = captioner.encode_captions(frame["caption"].tolist())
    if cut:
        print(f"{name}: {cut} of {len(tokens)} captions cut to {captioner.max_caption_tokens} tokens "
              f"(prefix {captioner.config.prefix_length} + caption must fit the LM)")
    return Split(torch.tensor(frame["feature_row"].to_numpy(), dtype=torch.long), tokens)


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
    if cfg.precision == "auto":
        return "no" if device.type != "cuda" else ("bf16" if supports_bf16(device) else "fp16")
    if cfg.precision == "bf16" and not supports_bf16(device):
        raise TrainingError(f"--precision bf16: this device ({device}) has no bf16; use fp16 (P100, T4) or auto")
    return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[cfg.precision]


def build_captioner(model_cfg: ModelConfig, cache: FeatureCache, runtime: RuntimeConfig,
                    models_dir: Path) -> Captioner:
    """A fresh captioner whose CLIP width and backbone come from the feature cache it will read."""
    model_cfg = dataclasses.replace(model_cfg, clip_dim=int(cache.meta["clip_dim"]), backbone=cache.meta["backbone"])
    lm, tokenizer, lm_name = load_language_model(model_cfg.lm, is_offline(runtime.offline), models_dir)
    return Captioner(dataclasses.replace(model_cfg, lm=lm_name), lm, tokenizer)


@torch.no_grad()
def evaluate_loss(model, captioner: Captioner, features: torch.Tensor, split: Split, batch_size: int,
                  device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        rows = split.rows[start:start + batch_size]
        ids, mask, labels = captioner.pad(split.tokens[start:start + batch_size], device)
        n = int((labels != -100).sum())
        total += float(model(features[rows.to(device)], ids, mask, labels)) * n
        count += n
    model.train()
    return total / max(count, 1)


def train(cache_path: str | Path, model_cfg: ModelConfig = ModelConfig(), cfg: TrainConfig = TrainConfig(),
          runtime: RuntimeConfig = RuntimeConfig(), data_dir: str | Path = "data") -> TrainResult:
    """Train a captioner on a feature cache; writes checkpoints, history and the best bundle to out_dir."""
    from accelerate import Accelerator

    device = resolve_device(runtime.device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=_precision(cfg, device))
    device = accelerator.device
    torch.manual_seed(runtime.seed)
    cache = load_cache(cache_path)
    out = Path(cfg.out_dir or Path(data_dir) / "runs" / f"{cache.meta['dataset']}-{model_cfg.mapper}")
    captioner = build_captioner(model_cfg, cache, runtime, Path(data_dir) / "models").to(device)
    features = torch.tensor(np.asarray(cache.features), dtype=torch.float32, device=device)  # (N, clip_dim)
    train_split, val_split = make_split(cache, "train", captioner), make_split(cache, "val", captioner)
    if not len(train_split):
        raise TrainingError(f"{cache.path} has no training captions: check the dataset's splits.")
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = epoch_steps(len(train_split), cfg, world)
    total_steps = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)
    optimizer = make_optimizer(captioner, cfg)
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val_loss": None,
             "history": {"train": [], "val": []}, "window": [0.0, 0, 0.0]}  # loss sum, steps, seconds
    if cfg.resume and (out / "checkpoint.pt").is_file():
        state = _load_checkpoint(out / "checkpoint.pt", captioner, optimizer, accelerator, cache, cfg)
        accelerator.print(f"resuming {out} at step {state['step']} (epoch {state['epoch'] + 1}, "
              f"step {state['step_in_epoch']} of {steps_per_epoch})")
    elif (out / "checkpoint.pt").is_file():
        raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose "
                            "another --out-dir.")
    model, optimizer = accelerator.prepare(captioner, optimizer)
    accelerator.print(captioner.describe())
    accelerator.print(f"{len(train_split)} training captions, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"precision {accelerator.mixed_precision}, {world} process(es) on {device}")

    def save(name: str = "checkpoint.pt") -> None:
        if accelerator.is_main_process:
            _save_checkpoint(out / name, captioner, optimizer, accelerator, state, cfg, cache)
            _save_history(out, state["history"])

    watch = cache.split("val").drop_duplicates("image_id").head(cfg.watch_images)

    def validate() -> None:
        if not len(val_split):
            return
        val = evaluate_loss(model, captioner, features, val_split, cfg.batch_size, device)
        state["history"]["val"].append({"step": state["step"], "epoch": state["epoch"] + 1, "val_loss": val})
        if len(watch):
            _watch_captions(captioner, features, watch, state, cfg, accelerator.print)
        if state["best_val_loss"] is None or val < state["best_val_loss"]:
            state["best_val_loss"], state["evals_since_best"] = val, 0
            save("best.pt")
        else:
            state["evals_since_best"] = state.get("evals_since_best", 0) + 1

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], unit="step", desc="training", mininterval=2,
               disable=not accelerator.is_main_process)
    while state["step"] < total_steps:
        order = epoch_order(len(train_split), runtime.seed, state["epoch"])
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)][rank::world]
        while state["step_in_epoch"] < steps_per_epoch and state["step"] < total_steps:
            start = time.perf_counter()
            lr = get_lr(state["step"], cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, samples = 0.0, 0
            for micro in range(cfg.grad_accum):
                idx = batches[state["step_in_epoch"] * cfg.grad_accum + micro]
                ids, mask, labels = captioner.pad([train_split.tokens[i] for i in idx.tolist()], device)
                sync = nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss = _step_loss(model, features[train_split.rows[idx].to(device)], ids, mask, labels, cfg)
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += float(loss.detach()) / cfg.grad_accum
                samples += len(idx) * world
            if world > 1:  # every process logs, and stops on, the loss of the whole step
                loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=device), reduction="mean"))
            _check_finite(loss_sum, state["step"], accelerator)
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["step_in_epoch"] += 1
            window = state["window"]
            window[0] += loss_sum
            window[1] += 1
            window[2] += time.perf_counter() - start
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                state["history"]["train"].append({
                    "step": state["step"], "epoch": state["epoch"] + 1, "loss": window[0] / window[1], "lr": lr,
                    "grad_norm": grad_norm, "samples_per_s": samples * window[1] / max(window[2], 1e-9)})
                state["window"] = [0.0, 0, 0.0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", refresh=False)
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                validate()
            if _patience_ran_out(state, cfg):
                break
            if state["step"] % cfg.checkpoint_every == 0:
                save()
        if state["step_in_epoch"] >= steps_per_epoch:
            if not cfg.eval_every:
                validate()
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            save()
        if _patience_ran_out(state, cfg):
            accelerator.print(f"early stop: no better validation loss in {cfg.patience} evaluations "
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
    accelerator.wait_for_everyone()
    return TrainResult(out, bundle, state["history"], state["best_val_loss"], state["step"])


def _patience_ran_out(state: dict, cfg: TrainConfig) -> bool:
    return cfg.patience > 0 and state.get("evals_since_best", 0) >= cfg.patience


def _watch_captions(captioner: Captioner, features: torch.Tensor, watch: pd.DataFrame, state: dict,
                    cfg: TrainConfig, say=print) -> None:
    """Caption the same validation images at every evaluation: the history then shows captions improve,
    and a model that says one caption for every image (ClipCap's users met it only after training) is
    caught while it trains."""
    rows = torch.tensor(watch["feature_row"].to_numpy(), device=features.device)
    captions = captioner.generate(features[rows])
    share = len(set(captions)) / len(captions)
    state["history"].setdefault("samples", []).append({
        "step": state["step"], "epoch": state["epoch"] + 1, "image_ids": watch["image_id"].tolist(),
        "captions": captions, "distinct_share": share})
    if share < cfg.collapse_warning:
        say(f"warning: at step {state['step']} only {len(set(captions))} distinct captions for {len(captions)} "
              f"different images: the captions are collapsing towards one. If it persists, lower --lr, add "
              f"--feature-noise, or check that the features differ between images.")


def _step_loss(model, clip_embed, ids, mask, labels, cfg: TrainConfig) -> torch.Tensor:
    try:
        return model(clip_embed, ids, mask, labels)
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at batch size {cfg.batch_size}: use a smaller --batch-size "
                            f"(e.g. {max(cfg.batch_size // 2, 1)}) with --grad-accum {cfg.grad_accum * 2}, which "
                            "trains the same model in smaller pieces.") from None


def _check_finite(loss: float, step: int, accelerator) -> None:
    """fp16: the loss scaler skips a step whose gradients overflow, so one bad step is fine. Elsewhere a
    non-finite loss means the weights are lost: stop before writing them into a checkpoint."""
    if math.isfinite(loss) or accelerator.mixed_precision == "fp16":
        return
    raise TrainingError(f"the loss became {loss} at step {step}: training diverged, and nothing from this step "
                        "on was saved (the last checkpoint is intact). Start a new run (another --out-dir) with a "
                        "lower --lr or a longer --warmup-steps: --resume keeps the settings that diverged.")


# ---- checkpoints ------------------------------------------------------------------------------------

def _config_record(model_cfg: ModelConfig, cfg: TrainConfig, cache: FeatureCache) -> dict:
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
            "features": {k: cache.meta[k] for k in ("backbone", "clip_dim", "images_fingerprint")}
            | {"captions_fingerprint": cache.meta.get("captions_fingerprint")}}


def _save_checkpoint(path: Path, captioner: Captioner, optimizer, accelerator, state: dict, cfg: TrainConfig,
                     cache: FeatureCache) -> None:
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
    checkpoint = {
        "version": CHECKPOINT_VERSION,
        "config": _config_record(captioner.config, cfg, cache),
        "trainable": captioner.trainable_state(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "state": state,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)  # a file object: a full disk then raises OSError, not an opaque RuntimeError


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
    diffs = [f"{section}.{k}: checkpoint has {have[section].get(k)!r}, now {v!r}"
             for section in ("model", "train", "features") for k, v in want[section].items()
             if not (section == "train" and k in _FREE_ON_RESUME) and have[section].get(k) != v]
    if diffs:
        raise TrainingError(f"cannot resume {path}: it was made with other settings:\n  " + "\n  ".join(diffs)
                            + "\nResume with the same settings, or start a new run with another --out-dir.")
    captioner.load_state_dict(checkpoint["trainable"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if accelerator.scaler is not None and checkpoint["scaler"]:
        accelerator.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["state"]


def _save_history(out: Path, history: dict) -> None:
    write_json(out / "history.json", history)
    for kind, rows in history.items():
        with atomic_path(out / f"history_{kind}.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def _export_best(bundle: Path, captioner: Captioner, state: dict, cache: FeatureCache) -> Path:
    """The best weights (lowest validation loss, else the last) as a self-contained bundle."""
    best = bundle.parent / "best.pt"
    if best.is_file():
        captioner.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["trainable"], strict=False)
    summary = {"steps": state["step"], "epochs": state["epoch"], "best_val_loss": state["best_val_loss"],
               "features": str(cache.path), "dataset": cache.meta.get("dataset"), "standin": cache.meta["standin"]}
    return captioner.save_pretrained(bundle, summary=summary)
