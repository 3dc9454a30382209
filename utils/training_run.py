"""A training run's parts, made once before the loop, and the acts the loop calls on them.

`prepare_run` does everything `train()` needs before its first step, and refuses, with one message, what cannot
work before any long work starts: the device and precision, the feature cache and the run folder (a new run, or
the one to resume, checked field by field: checkpoints.py), the captioner and its optimiser, the schedule (with the
messages of the batch recipe and of a shortened warm-up), and the disk space its checkpoints and bundle will take.
It returns a `Run`, whose methods are the loop's acts: the batches of an epoch, a log row, a validation, a
checkpoint, the end of an epoch and of the run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .captioner import Captioner
from .checkpoints import (TrainState, bundle_bytes, check_position, checkpoint_bytes, config_record, finite_weights,
                          load_checkpoint, load_trainable, read_checkpoint, refuse_other_settings, save_checkpoint,
                          save_history)
from .config import ModelConfig, RuntimeConfig, TrainConfig, run_freeze
from .errors import TrainingError
from .features import FeatureCache, load_cache
from .files import free_bytes, read_json, write_json
from .monitors import check_steps, diverged, watch_captions
from .paths import bundle_dir, run_dir
from .runtime import compile_supported, is_offline, mixed_precision, resolve_device, to_device
from .schedule import (batch_recipe, effective_batch, epoch_order, epoch_steps, length_bucketed_batches,
                       padding_share, run_steps, warmup_for)
from .sources import load_language_model


@dataclass
class Split:
    """One split, ready for batching: CLIP rows and caption token ids (EOS appended)."""

    rows: torch.Tensor  # (M,) feature row of each caption
    tokens: list[list[int]]  # M lists of token ids

    def __len__(self) -> int:
        return len(self.tokens)


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


def build_captioner(model_cfg: ModelConfig, cache: FeatureCache, runtime: RuntimeConfig) -> Captioner:
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


@dataclass
class Run:
    """Everything the training loop needs, made once by `prepare_run`."""

    out: Path  # the run folder
    cfg: TrainConfig  # the settings as given: what checkpoints record
    schedule: TrainConfig  # lr and warm-up at this run's batch (batch_recipe), what get_lr reads
    cache: FeatureCache
    captioner: Captioner
    model: torch.nn.Module  # the captioner as accelerate prepared it (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    accelerator: object
    features: torch.Tensor  # (N, clip_dim) every image's CLIP embedding, on the device
    train_split: Split
    val_split: Split
    watch: pd.DataFrame  # validation images captioned at every evaluation
    state: TrainState
    steps_per_epoch: int
    total_steps: int  # where this session stops (max_steps), never past the schedule's end
    warmup: int
    seed: int
    finished: bool = False  # keep="history": the run had finished; its summary is read back, nothing trains
    pending: list = field(default_factory=list)  # (step, loss, grad_norm) since the last read, still on the device
    last_save: float = field(default_factory=time.monotonic)

    @property
    def bundle(self) -> Path:
        return bundle_dir(self.out)

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """This process's batches of `epoch`: captions of similar length (little padding), every `world`-th."""
        lengths = [len(t) for t in self.train_split.tokens]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return length_bucketed_batches(lengths, self.cfg.batch_size, self.seed, epoch)[rank::world]

    def micro_batches(self, batches: list[torch.Tensor], step_in_epoch: int) -> list[tuple]:
        """The grad_accum micro-batches of one optimiser step: (clip_embed, input_ids, attention_mask, labels)."""
        first, device, split = step_in_epoch * self.cfg.grad_accum, self.accelerator.device, self.train_split
        micro = []
        for idx in batches[first:first + self.cfg.grad_accum]:
            ids, mask, labels = self.captioner.pad([split.tokens[i] for i in idx.tolist()], device)
            micro.append((self.features[to_device(split.rows[idx], device)], ids, mask, labels))
        return micro

    def settle(self) -> list[tuple]:
        """The pending steps read (one host sync) and checked: before any save, validation or log row."""
        return check_steps(self.state, self.pending, self.accelerator.mixed_precision)

    def log(self, lr: float, micro: list[tuple], start: float) -> bool:
        """The step's time into the log window, and at log steps a history row; whether this was a log step."""
        state = self.state
        log_step = state.step % self.cfg.log_every == 0 or state.step == self.total_steps
        if log_step:  # the loop's one host sync: this window's losses and gradient norms read back
            _, _, grad_norm = self.settle()[-1]
        state.window_seconds += time.perf_counter() - start  # on a GPU: the window's time, at the sync
        if log_step:
            samples = sum(len(m[1]) for m in micro) * self.accelerator.num_processes
            loss = state.window_loss / state.window_steps
            state.history["train"].append({
                "step": state.step, "epoch": state.epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "samples_per_s": samples * state.window_steps / max(state.window_seconds, 1e-9)})
            state.window_loss, state.window_steps, state.window_seconds = 0.0, 0, 0.0
        return log_step

    def eval_due(self) -> bool:
        return bool(self.cfg.eval_every) and self.state.step % self.cfg.eval_every == 0

    def checkpoint_due(self) -> bool:
        cfg = self.cfg
        return bool(cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0) or \
            bool(cfg.checkpoint_minutes and time.monotonic() - self.last_save >= 60 * cfg.checkpoint_minutes)

    def stop_requested(self, signum: int | None, log_step: bool) -> int:
        """The signal that stops the run (0: none); with several processes, agreed at log steps (a host sync)."""
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            signum = int(self.accelerator.reduce(torch.tensor(signum or 0, device=device), reduction="max")) \
                if log_step else 0
        return signum or 0

    def save(self, name: str = "checkpoint.pt", quiet: bool = False) -> None:
        self.settle()
        if not finite_weights(self.captioner):  # never save lost weights
            raise TrainingError(diverged(f"the weights became non-finite by step {self.state.step}"))
        if self.accelerator.is_main_process:
            path = self.out / name
            save_checkpoint(path, self.captioner, self.optimizer, self.accelerator.scaler, self.state,
                            config_record(self.captioner.config, self.cfg, self.cache), resumable=name != "best.pt")
            save_history(self.out, self.state.history)
            if not quiet:
                self.say(f"{'best' if name == 'best.pt' else 'checkpoint'} at step {self.state.step}: {path} "
                         f"({path.stat().st_size / 2**20:.1f} MB)")
        self.last_save = time.monotonic()

    def validate(self) -> None:
        """Validation loss, the watched captions, and best.pt when it is the best so far; once per step."""
        self.settle()
        state, val_rows = self.state, self.state.history["val"]
        if not len(self.val_split) or (val_rows and val_rows[-1]["step"] == state.step):
            return
        device = self.accelerator.device
        val = evaluate_loss(self.model, self.captioner, self.features, self.val_split, self.cfg.batch_size, device)
        val_rows.append({"step": state.step, "epoch": state.epoch + 1, "val_loss": val})
        if len(self.watch):
            rows = torch.tensor(self.watch["feature_row"].to_numpy(), device=self.features.device)
            warning = watch_captions(self.captioner.generate(self.features[rows]), self.watch["caption"].tolist(),
                                     self.watch["image_id"].tolist(), state, self.cfg.collapse_warning, self.warmup)
            if warning:
                self.say(warning)
        if state.best_val_loss is None or val < state.best_val_loss:
            state.best_val_loss, state.evals_since_best = val, 0
            self.save("best.pt")
        else:
            state.evals_since_best += 1

    def end_epoch(self) -> None:
        if not self.cfg.eval_every:
            self.validate()
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.save()

    def finish(self) -> None:
        """The best weights as a bundle; keep="history": the history and summary.json only."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if self.cfg.keep == "history":
                record = config_record(self.captioner.config, self.cfg, self.cache)
                write_json(self.out / "summary.json", self.summary() | {"config": record})
                for name in ("checkpoint.pt", "best.pt"):
                    (self.out / name).unlink(missing_ok=True)
                self.say(f"kept the history only (keep='history'): {self.out / 'history.json'}")
            else:
                self.export_best()
                self.say(f"captioner bundle (weights only, no optimiser state): {self.bundle}")
        self.accelerator.wait_for_everyone()

    def summary(self) -> dict:
        return {"steps": self.state.step, "epochs": self.state.epoch, "best_val_loss": self.state.best_val_loss,
                "features": str(self.cache.path), "dataset": self.cache.meta.get("dataset"),
                "standin": self.cache.meta["standin"]}

    def export_best(self) -> Path:
        """The best weights (lowest validation loss, else the last) as a self-contained bundle."""
        best = self.out / "best.pt"
        if best.is_file():
            load_trainable(self.captioner, read_checkpoint(best)["trainable"], best)
        return self.captioner.save_pretrained(self.bundle, summary=self.summary())


def _device(runtime: RuntimeConfig) -> torch.device:
    """The device training runs on; `cuda:1` becomes the current CUDA device, which accelerate then uses."""
    device = resolve_device(runtime.device)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise TrainingError(f"--device {runtime.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                                f"numbered from 0; choose cuda:0 ... cuda:{max(torch.cuda.device_count() - 1, 0)}.")
        torch.cuda.set_device(device)
    return device


def _accelerator(cfg: TrainConfig, runtime: RuntimeConfig):
    from accelerate import Accelerator

    device = _device(runtime)
    if cfg.compile and not compile_supported(device):
        raise TrainingError(f"--compile: torch.compile needs a GPU of compute capability 7.0 or more (a T4 is 7.5, "
                            f"a P100 6.0), and this run is on {device}: leave --compile off.")
    try:
        precision = mixed_precision(cfg.precision, device)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def _run_folder(cfg: TrainConfig, out: Path) -> None:
    """A new run where there is none, the one there continued only when asked."""
    held = (out / "checkpoint.pt").is_file() or (out / "summary.json").is_file()
    if cfg.resume is True and not held:
        raise TrainingError(f"--resume: {out} holds no checkpoint.pt to continue from. Give the --out-dir of the "
                            "run to continue, or leave out --resume to start a new run there.")
    if not cfg.resume and held:
        raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose "
                            "another --out-dir.")


def _check_disk(out: Path, captioner: Captioner, keep: str) -> None:
    """Refuse, with the numbers, a run whose checkpoints (each written beside the last before replacing it) and
    bundle would not fit on the disk of its folder; what they already take there is counted as free."""
    need = 2 * checkpoint_bytes(captioner) + 2 * checkpoint_bytes(captioner, resumable=False)
    need += bundle_bytes(captioner) if keep == "all" else 0
    held = sum(p.stat().st_size for p in (out / "checkpoint.pt", out / "best.pt") if p.is_file())
    free = free_bytes(out) + held
    if free < need:
        raise TrainingError(f"{out} is on a disk with {free / 2**30:.2f} GB free, and this run's checkpoints "
                            f"{'and bundle ' if keep == 'all' else ''}need about {need / 2**30:.2f} GB. Free some "
                            "space (df -h), or choose an --out-dir on a larger disk"
                            + (", or keep='history' for a comparison run" if keep == "all" else "") + ".")


def prepare_run(cache_path: str | Path, model_cfg: ModelConfig, cfg: TrainConfig, runtime: RuntimeConfig,
                data_dir: str | Path | None) -> Run:
    """Everything before the first step, each refusal said before any long work; see the module's docstring."""
    accelerator = _accelerator(cfg, runtime)
    device, world = accelerator.device, accelerator.num_processes
    cache = load_cache(cache_path)
    out = Path(cfg.out_dir or run_dir(data_dir, cache.meta["dataset"], model_cfg.mapper,
                                      run_freeze(model_cfg, is_offline(runtime.offline))))
    _run_folder(cfg, out)
    captioner = build_captioner(model_cfg, cache, runtime).to(device)
    features = torch.tensor(np.asarray(cache.features), dtype=torch.float32, device=device)  # (N, clip_dim)
    train_split, val_split = make_split(cache, "train", captioner), make_split(cache, "val", captioner)
    if len(train_split) < effective_batch(cfg, world):
        raise TrainingError(f"{cache.path} has {len(train_split)} training captions, fewer than one optimiser step "
                            f"takes (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} "
                            "process(es)): use more images, or a smaller --batch-size or --grad-accum.")
    steps_per_epoch = epoch_steps(len(train_split), cfg, world)
    total_steps, decay_steps = run_steps(len(train_split), cfg, world)
    schedule = batch_recipe(cfg, world)  # lr and warm-up at this run's batch; checkpoints keep `cfg` as given
    optimizer = make_optimizer(captioner, schedule)
    watch = cache.split("val").drop_duplicates("image_id").head(cfg.watch_images)
    run = Run(out, cfg, schedule, cache, captioner, captioner, optimizer, accelerator, features, train_split,
              val_split, watch, TrainState(decay_steps=decay_steps), steps_per_epoch, total_steps, 0, runtime.seed)
    if (out / "summary.json").is_file() and not (out / "checkpoint.pt").is_file():
        return _finished(run, out / "summary.json")
    _check_disk(out, captioner, cfg.keep)
    _resume(run)
    run.warmup = warmup_for(schedule, run.state.decay_steps)
    _say_schedule(run, world)
    if cfg.compile:  # shapes vary with the batches' caption lengths: one graph for all of them
        captioner.compile(dynamic=True)
        run.say("torch.compile: the first steps and the first validation compile the model (minutes), then run faster")
    run.model, run.optimizer = accelerator.prepare(captioner, optimizer)
    run.say(captioner.describe())
    run.say(f"{len(train_split)} training captions, {steps_per_epoch} steps/epoch, stopping at step {total_steps} "
            f"(LR schedule over {run.state.decay_steps}), precision {accelerator.mixed_precision}, {world} "
            f"process(es) on {device}")
    lengths = [len(t) for t in train_split.tokens]
    bucketed = padding_share(lengths, length_bucketed_batches(lengths, cfg.batch_size, runtime.seed, 0))
    shuffled = padding_share(lengths, list(epoch_order(len(lengths), runtime.seed, 0).split(cfg.batch_size)))
    run.say(f"batches bucketed by caption length: {bucketed:.0%} of the caption positions computed are padding "
            f"(shuffled batches: {shuffled:.0%})")
    run.model.train()
    return run


def _refuse_sharded(path: Path, why: str) -> None:
    """DeepSpeed ZeRO shards the optimiser state over the processes; our checkpoint holds the first one's."""
    raise TrainingError(f"cannot resume {path}: {why}, and ZeRO shards the optimiser state across processes, so "
                        "this checkpoint holds only one process's share of it; a resumed run would not be the same "
                        "run. Start a new run (another --out-dir), or train without DeepSpeed to be able to resume.")


def _resume(run: Run) -> None:
    """Continue the run in the folder from its checkpoint, when it has one: every field checked first."""
    checkpoint = run.out / "checkpoint.pt"
    zero = str(run.accelerator.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED")
    if checkpoint.is_file():
        if zero:
            _refuse_sharded(checkpoint, "this run is a DeepSpeed one")
        want = config_record(run.captioner.config, run.cfg, run.cache)
        state = load_checkpoint(checkpoint, run.captioner, run.optimizer, run.accelerator.scaler, want)
        if state.zero_sharded:
            _refuse_sharded(checkpoint, "it was written by a DeepSpeed ZeRO run")
        check_position(state, checkpoint, run.steps_per_epoch, run.cfg.epochs)
        run.state = state  # the schedule of the run as it started (decay_steps), whatever --max-steps is now
        if state.step >= run.total_steps:
            run.say(f"{run.out} has already run to step {state.step} of {run.total_steps}: nothing left to train; "
                    "its bundle is written again from its best weights")
        else:
            run.say(f"resuming {run.out} at step {state.step} of {run.total_steps} (epoch {state.epoch + 1} of "
                    f"{run.cfg.epochs}, step {state.step_in_epoch} of {run.steps_per_epoch}) from {checkpoint}; the "
                    f"LR schedule runs to step {state.decay_steps}")
    run.state.zero_sharded = zero


def _say_schedule(run: Run, world: int) -> None:
    cfg, schedule, warmup, decay_steps = run.cfg, run.schedule, run.warmup, run.state.decay_steps
    if schedule is not cfg:
        run.say(batch_recipe_message(cfg, schedule, world))
    if warmup < schedule.warmup_steps:
        scaled = schedule is not cfg
        given = math.floor(warmup * effective_batch(cfg, world) / cfg.lr_batch_size) if scaled else warmup
        run.say(f"warm-up shortened: --warmup-steps {cfg.warmup_steps}"
                + (f" ({schedule.warmup_steps} steps at this batch)" if scaled else "")
                + f" is more than a third of the {decay_steps} steps the LR schedule spans, so the LR would never "
                + (f"reach its peak {schedule.lr:.3g}" if scaled else f"reach --lr {cfg.lr:g}")
                + f"; warming up over {warmup} steps instead (give --warmup-steps {given} or less to choose it "
                "yourself).")


def _finished(run: Run, path: Path) -> Run:
    """keep="history": a run that finished before is reused when its settings are these (its summary.json)."""
    summary = read_json(path)
    refuse_other_settings(path, summary.get("config", {"model": {}, "train": {}, "features": {}}),
                          config_record(run.captioner.config, run.cfg, run.cache))
    history = read_json(run.out / "history.json")
    run.state = dataclasses.replace(run.state, step=summary["steps"], epoch=summary["epochs"],
                                    best_val_loss=summary["best_val_loss"], history=history)
    run.finished = True
    run.say(f"reusing the finished run at {run.out} ({summary['steps']} steps; keep='history')")
    return run
