"""Checkpoints of a training run: what they hold, written atomically, read back only after every field is checked.

    checkpoint.pt   version, config (model / train / features), trainable weights, TrainState,
                    optimiser, loss scaler and RNG states: everything a resumed run needs to go on exactly
    best.pt         the same without optimiser, scaler and RNG states (the lowest validation loss so far)
    history.json    the per-step and per-evaluation rows the plots read (and history_<kind>.csv)
    summary.json    what a finished run that keeps only its history (keep="history") reports

A checkpoint may come from anywhere (a classmate, a forum), so loading one is careful: torch.load with
`weights_only=True` (pickled code is refused, never run), then the schema: the types of every field, the
tensors against this model's, the optimiser state against this optimiser's, the step within the run. Any
refusal is one TrainingError naming the file and the field, before anything is changed.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .errors import TrainingError
from .files import atomic_path, write_json

CHECKPOINT_VERSION = 3  # 3: TrainState's fields (2 kept the log window as a list; 1: no schedule horizon)
# TrainConfig fields a resumed run may change without changing what it computes.
FREE_ON_RESUME = {"resume", "max_steps", "out_dir", "checkpoint_every", "checkpoint_minutes", "log_every",
                  "eval_every", "watch_images", "collapse_warning", "patience", "compile", "keep"}
MAX_INFLATION = 4  # a checkpoint's tensors may hold at most this many times its size on disk (+ 64 MiB)


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides the weights and the optimiser, written down once."""

    decay_steps: int  # the optimiser step where the LR schedule ends, fixed when the run starts
    step: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch in progress, from 0
    step_in_epoch: int = 0  # optimiser steps done in it
    best_val_loss: float | None = None
    evals_since_best: int = 0  # evaluations without a better validation loss (--patience)
    skipped_in_a_row: int = 0  # fp16: steps in a row whose loss was not finite (the scaler skipped them)
    zero_sharded: bool = False  # written by a DeepSpeed ZeRO run: its optimiser state is one process's share
    window_loss: float = 0.0  # the log window: the losses summed since the last history row,
    window_steps: int = 0  # how many steps they are,
    window_seconds: float = 0.0  # and the seconds those steps took
    history: dict = field(default_factory=lambda: {"train": [], "val": []})  # + "samples": watched captions

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# TrainState's field types (as annotations read them): the Python types they take, and how a message names them
_KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"),
          "float | None": ((int, float, type(None)), "a number or None"), "bool": ((bool,), "True or False"),
          "dict": ((dict,), "a dict")}


def read_state(saved, path: Path) -> TrainState:
    """A TrainState from a checkpoint's "state", each field of its type; TrainingError naming a field that is not."""
    if not isinstance(saved, dict):
        raise TrainingError(f"{path}: 'state' is a {type(saved).__name__}, not the training state this course "
                            "writes: the file is damaged or not one of its checkpoints. Start a new run.")
    fields = {f.name: f for f in dataclasses.fields(TrainState)}
    values = {}
    for name, f in fields.items():
        if name not in saved:  # a version 3 checkpoint holds every field
            raise TrainingError(f"{path}: the training state has no '{name}': the file is damaged or not one of "
                                "this course's checkpoints. Start a new run.")
        value = saved[name]
        kinds, described = _KINDS[f.type]
        if isinstance(value, bool) and f.type != "bool" or not isinstance(value, kinds):
            raise TrainingError(f"{path}: state.{name} is {value!r:.40}, not {described}: the file is damaged. "
                                "Start a new run.")
        values[name] = value
    state = TrainState(**values)
    history = state.history
    if not all(isinstance(history.get(k), list) for k in ("train", "val")) or \
            not all(isinstance(row, dict) for k in ("train", "val") for row in history[k]):
        raise TrainingError(f"{path}: state.history does not hold lists of rows under 'train' and 'val': the file "
                            "is damaged. Start a new run.")
    if min(state.step, state.epoch, state.step_in_epoch, state.decay_steps - 1, state.evals_since_best,
           state.skipped_in_a_row, state.window_steps) < 0:
        raise TrainingError(f"{path}: the training state holds a negative count (step {state.step}, epoch "
                            f"{state.epoch}, step_in_epoch {state.step_in_epoch}, decay_steps {state.decay_steps}): "
                            "the file is damaged. Start a new run.")
    return state


def check_position(state: TrainState, path: Path, steps_per_epoch: int, epochs: int) -> None:
    """The state's place in the run: the step its epoch and step in the epoch make, within the whole run."""
    if state.step != state.epoch * steps_per_epoch + state.step_in_epoch or state.step_in_epoch > steps_per_epoch \
            or state.step > epochs * steps_per_epoch:
        raise TrainingError(f"{path} is at step {state.step} (epoch {state.epoch + 1}, step {state.step_in_epoch} of "
                            f"it), which is not a place in this run of {epochs} epoch(s) of {steps_per_epoch} steps: "
                            "it was made on other data or settings, or is damaged. Start a new run (another "
                            "--out-dir).")


def config_record(model_cfg, cfg, cache) -> dict:
    """What a checkpoint records of its settings: the model, the training loop and the features it read."""
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
            "features": {k: cache.meta[k] for k in ("backbone", "clip_dim", "images_fingerprint")}
            | {"captions_fingerprint": cache.meta.get("captions_fingerprint")}}


def save_checkpoint(path: Path, captioner, optimizer, scaler, state: TrainState, record: dict,
                    resumable: bool = True) -> None:
    """A checkpoint, written to a temporary name and renamed into place; `resumable=False` (best.pt) leaves
    out the optimiser, scaler and RNG states, which are twice the size of the weights and only a resumed run
    needs."""
    checkpoint = {"version": CHECKPOINT_VERSION, "config": record, "trainable": captioner.trainable_state(),
                  "state": state.as_dict()}
    if resumable:
        checkpoint |= {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)  # a file object: a full disk then raises OSError, not an opaque RuntimeError


def _check_archive(path: Path) -> None:
    """Refuse a file whose tensors would take far more memory than its size on disk (a few KB that inflate to
    GB through compression), before torch allocates any of it."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # not a zip archive: torch.load says what it is
    limit = MAX_INFLATION * path.stat().st_size + 64 * 2**20
    if inflated > limit:
        raise TrainingError(f"{path} would unpack to {inflated / 2**20:.0f} MB from {path.stat().st_size / 2**20:.1f} "
                            "MB on disk: this course's checkpoints are stored uncompressed, so it is refused before "
                            "anything is allocated.")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's top level, read without running any code it may carry, its parts of the right types."""
    if not path.is_file():
        raise TrainingError(f"{path} is not a file: give the checkpoint.pt of a run.")
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: never run it, say what it is
        raise TrainingError(f"{path} cannot be read as a checkpoint of this course ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]}). It is refused, not executed.") from None
    if not isinstance(checkpoint, dict):
        raise TrainingError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint of this course.")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is a version {checkpoint.get('version')!r} checkpoint; this course writes "
                            f"version {CHECKPOINT_VERSION} (an earlier version of the course made it): start a new "
                            "run with another --out-dir.")
    config = checkpoint.get("config")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "train", "features")):
        raise TrainingError(f"{path}: 'config' does not hold the model, train and features settings this course "
                            "records: the file is damaged or not one of its checkpoints.")
    trainable = checkpoint.get("trainable")
    if not isinstance(trainable, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                  for k, v in trainable.items()):
        raise TrainingError(f"{path}: 'trainable' is not a dict of named tensors: the file is damaged.")
    return checkpoint


def refuse_other_settings(path: Path, have: dict, want: dict) -> None:
    """A resumed run must compute what the run it continues computed: the same model, loop and features."""
    diffs = [f"{section}.{k}: checkpoint has {have[section].get(k)!r}, now {v!r}"
             for section in ("model", "train", "features") for k, v in want[section].items()
             if not (section == "train" and k in FREE_ON_RESUME) and have[section].get(k) != v]
    if diffs:
        flags = sorted({"--" + line.split(":")[0].split(".", 1)[1].replace("_", "-") for line in diffs
                        if not line.startswith("features.")})
        raise TrainingError(f"cannot resume {path}: it was made with other settings:\n  " + "\n  ".join(diffs)
                            + "\nResume with the same settings" + (f" ({', '.join(flags)} as the checkpoint has them)"
                                                                    if flags else "")
                            + f", or start a new run with another --out-dir (e.g. {path.parent}-2), or --fresh in "
                            "`python -m utils course`.")


def _check_optimizer(path: Path, saved, optimizer) -> None:
    """The saved optimiser state fits this optimiser: its groups, their sizes, and each moment's shape."""
    ours = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        raise TrainingError(f"{path}: 'optimizer' is not an optimiser state: the file is damaged. Start a new run.")
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in ours["param_groups"]]:
        raise TrainingError(f"{path}: its optimiser state covers {sizes} tensors per group, this model "
                            f"{[len(g['params']) for g in ours['param_groups']]}: it was made with other --freeze or "
                            "model settings. Resume with those, or start a new run.")
    shapes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for key, moments in saved["state"].items():
        if key not in shapes or not isinstance(moments, dict):
            raise TrainingError(f"{path}: optimiser state for tensor {key!r}, which this model does not train.")
        for name, value in moments.items():
            if not torch.is_tensor(value) or (value.dim() and value.shape != shapes[key]):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise TrainingError(f"{path}: optimiser state {name} of tensor {key} is {shape}, the tensor "
                                    f"{tuple(shapes[key])}: the file does not fit this model. Start a new run.")


def _check_rng(path: Path, rng) -> None:
    ours = torch.get_rng_state()
    if not isinstance(rng, dict) or not torch.is_tensor(rng.get("torch")) or rng["torch"].dtype != ours.dtype \
            or rng["torch"].shape != ours.shape or not isinstance(rng.get("cuda"), list) \
            or not all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in rng["cuda"]):
        raise TrainingError(f"{path}: 'rng' does not hold the random number generators' states this course saves "
                            "(a uint8 tensor for torch, a list for CUDA): the file is damaged. Start a new run.")


def load_checkpoint(path: Path, captioner, optimizer, scaler, want: dict) -> TrainState:
    """Put a resumable checkpoint into the captioner, optimiser, scaler and RNGs and return its TrainState;
    every part is checked first, so a refused file changes nothing."""
    checkpoint = read_checkpoint(path)
    refuse_other_settings(path, checkpoint["config"], want)
    if "optimizer" not in checkpoint:
        raise TrainingError(f"{path} holds weights only (no optimiser state): it cannot be resumed. Start a new run "
                            "with another --out-dir.")
    state = read_state(checkpoint.get("state"), path)
    check_trainable(captioner, checkpoint["trainable"], path)
    _check_optimizer(path, checkpoint["optimizer"], optimizer)
    _check_rng(path, checkpoint.get("rng"))
    if not isinstance(checkpoint.get("scaler"), dict):
        raise TrainingError(f"{path}: 'scaler' is not a loss-scaler state: the file is damaged. Start a new run.")
    load_trainable(captioner, checkpoint["trainable"], path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return state


def check_trainable(captioner, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Exactly the tensors that learn here, no more, no fewer, each of its shape and finite; anything else refuses
    the checkpoint (the frozen rest comes from the LM's own weights)."""
    want = captioner.trainable_state()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        def some(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise TrainingError(f"{path} does not fit this model: " + "; ".join(
            ([f"it lacks {len(missing)} tensor(s) that learn here ({some(missing)})"] if missing else [])
            + ([f"it has {len(unexpected)} this model does not train ({some(unexpected)})"] if unexpected else []))
            + ". It was made with other --freeze or model settings: resume with those, or start a new run.")
    for name, tensor in tensors.items():
        if tensor.shape != want[name].shape:
            raise TrainingError(f"{path} does not fit this model: {name} is {tuple(tensor.shape)} in the file, "
                                f"{tuple(want[name].shape)} here. It was made with other model settings.")


def load_trainable(captioner, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put a checkpoint's trainable tensors into `captioner`, after `check_trainable`."""
    check_trainable(captioner, tensors, path)
    captioner.load_state_dict(tensors, strict=False)  # a subset of the state by design; checked above


def save_history(out: Path, history: dict) -> None:
    write_json(out / "history.json", history)
    for kind, rows in history.items():
        with atomic_path(out / f"history_{kind}.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def checkpoint_bytes(captioner, resumable: bool = True) -> int:
    """What one checkpoint of `captioner` takes on disk: its trainable weights, and with the optimiser's two
    AdamW moments (fp32) for a resumable one."""
    weights = sum(t.numel() * t.element_size() for t in captioner.trainable_state().values())
    moments = sum(p.numel() * 4 * 2 for p in captioner.parameters() if p.requires_grad)
    return weights + (moments if resumable else 0)


def bundle_bytes(captioner) -> int:
    """What the captioner's bundle takes: every weight of the mapper and the LM, a tied one (GPT-2's output layer
    is its token embedding) once."""
    unique = {t.data_ptr(): t for t in captioner.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def finite_weights(captioner) -> bool:
    return all(torch.isfinite(p).all() for p in captioner.trainable_state().values())
