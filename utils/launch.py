"""Training on every GPU a notebook sees: Kaggle's two T4s, from a notebook cell.

`accelerate.notebook_launcher` starts one process per GPU (forked from the notebook's kernel, so the
function and its settings need no script), each running the same `train()`; processes take every other
batch and average their gradients, which is what one process does with `grad_accum` twice as large
(tested on two CPU processes). With one GPU, or none, `train()` runs in the kernel itself.

Rule of the launcher: no CUDA and no `Accelerator` may have been started in the kernel before the
launch (a forked process cannot inherit them). The course's notebooks train only through this call, so
running notebook 03 top to bottom keeps the rule; if you trained in the kernel already, restart it first.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .config import ModelConfig, RuntimeConfig, TrainConfig, run_freeze
from .files import read_json
from .paths import bundle_dir, run_dir
from .runtime import is_offline
from .checkpoints import read_checkpoint, read_state
from .errors import CourseError, TrainingError
from .training import TrainResult, train


def visible_gpus() -> int:
    """How many CUDA GPUs this kernel can see (0 on a CPU machine), without starting CUDA in it."""
    return torch.cuda.device_count()


def _train_process(cache_path: str, model_cfg: ModelConfig, cfg: TrainConfig, runtime: RuntimeConfig,
                   data_dir: str | None) -> None:
    """What each launched process runs: the ordinary train(); its Accelerator finds its rank in the environment."""
    train(cache_path, model_cfg, cfg, runtime, data_dir)


def train_everywhere(cache_path: str | Path, model_cfg: ModelConfig = ModelConfig(), cfg: TrainConfig = TrainConfig(),
                     runtime: RuntimeConfig = RuntimeConfig(), data_dir: str | Path | None = None,
                     processes: int | None = None) -> TrainResult:
    """Train with one process per visible GPU (`processes` overrides: 2 on a CPU machine trains with two
    CPU processes); returns what `train()` returns, read back from the run folder the processes wrote."""
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState

    gpus = visible_gpus()
    n = gpus if processes is None else processes
    if n <= 1:
        if processes is None and gpus == 1:
            print("one GPU: training in this kernel")
        return train(cache_path, model_cfg, cfg, runtime, data_dir)
    if AcceleratorState._shared_state:
        raise TrainingError("training on several GPUs starts fresh processes, which cannot share this kernel's "
                            "CUDA: this kernel already trained or used an Accelerator. Restart the kernel "
                            "(Run -> Restart) and run the notebook from the top.")
    if runtime.device not in ("auto", "cuda", "cpu"):
        raise TrainingError(f"--device {runtime.device} names one GPU; training on all {n} takes device 'auto'.")
    from .features import load_cache

    dataset = load_cache(cache_path).meta["dataset"]
    out = Path(cfg.out_dir or run_dir(data_dir, dataset, model_cfg.mapper,
                                      run_freeze(model_cfg, is_offline(runtime.offline))))
    print(f"training with {n} processes (one per {'GPU' if gpus >= n else 'CPU process'}); "
          f"each takes every other batch; the loss and its gradients are per token over all of them")
    first_step, start = _saved_step(out) if cfg.resume else 0, time.perf_counter()
    notebook_launcher(_train_process, args=(str(cache_path), model_cfg, cfg, runtime, data_dir and str(data_dir)),
                      num_processes=n)
    return dataclasses.replace(read_result(out), first_step=first_step, seconds=time.perf_counter() - start)


def _saved_step(out: Path) -> int:
    """The step a resumed run starts from: its checkpoint's (0 when there is none, or it is unreadable: the
    launched processes then say why)."""
    try:
        return read_state(read_checkpoint(out / "checkpoint.pt")["state"], out / "checkpoint.pt").step
    except (OSError, KeyError, TypeError, CourseError):
        return 0


def read_result(out: str | Path) -> TrainResult:
    """The TrainResult of a finished run, from its folder (history.json and the bundle's summary)."""
    out = Path(out)
    bundle = bundle_dir(out)
    if not (bundle / "config.json").is_file():
        raise TrainingError(f"{out} holds no finished run (no {bundle.name}/config.json): the launched processes "
                            "stopped early; their messages are above.")
    summary = read_json(bundle / "config.json").get("summary", {})
    history = read_json(out / "history.json") if (out / "history.json").is_file() else {"train": [], "val": []}
    return TrainResult(out, bundle, history, summary.get("best_val_loss"), int(summary.get("steps", 0)))
