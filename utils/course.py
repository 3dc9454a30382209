"""The main job as one call: every stage of the course in order, `run_course(...)`.

    download -> records -> feature cache -> training run -> captioner bundle -> captions -> scores

Run again, it does only what is not done yet, and says so: a finished feature cache is reused (no image
is encoded again) and an unfinished one continued; a finished training run is reused and an unfinished
one resumed from its last checkpoint. `fresh=True` (`--fresh`) keeps the earlier run under another name
and trains a new one. `python -m utils course` (and `bash course.sh main`) only parse flags into the
configs and call this.

`run_notebooks(...)` is README's run-all loop: the five notebooks in order with papermill, stopping at the
first that fails or is interrupted with one message saying which cell, and how to continue.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import (DataConfig, DecodeConfig, FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig,
                     default_configs, run_freeze)
from .files import read_json
from .paths import bundle_dir, default_cache_dir, models_dir, run_dir
from .runtime import announce_offline, is_offline

EXAMPLES = 5  # test images captioned at the end, to read


@dataclass
class CourseResult:
    """What one run of the course made, and what it found already made."""

    cache: Path  # the feature cache
    run: Path  # the training run: checkpoints, history, results-test.json
    bundle: Path  # the captioner bundle, for Captioner.from_pretrained
    scores: dict | None = None  # test-split scores (None: the test split is empty)
    captions: list[dict] = field(default_factory=list)  # caption_files() results of a few test images
    done: dict[str, str] = field(default_factory=dict)  # stage -> "made" | "reused" | "continued"
    set_aside: Path | None = None  # fresh=True: where the earlier run was moved


def load_captions(data: DataConfig, runtime: RuntimeConfig, say=print):
    """The records of the chosen dataset, downloaded first where it is one the course can fetch;
    returns (records, the downloaded folder or None)."""
    from .download import dataset_root
    from .readers import load_records

    root = dataset_root(data, is_offline(runtime.offline))  # None: the user's own files (--path), no download
    captions = load_records(data, root)
    say(captions.summary())
    for line in captions.problems[:20]:
        say("  note: " + line)
    if len(captions.problems) > 20:
        say(f"  ... and {len(captions.problems) - 20} more notes")
    return captions, root


def report_cache(cache, say=print) -> None:
    """What a finished feature cache holds, and the first images it could not read."""
    m, out = cache.meta, cache.path
    say(f"feature cache ready at {out}: {m['num_images']} images, {m['num_captions']} captions, "
        f"{m['clip_dim']}-d {m['backbone']}; {m['num_skipped']} unreadable image(s)"
        + (f" listed in {out / 'skipped.csv'}" if m["num_skipped"] else ""))
    for path, reason in cache.skipped[["image_path", "reason"]].head(10).itertuples(index=False):
        say(f"  skipped {path}: {reason}")
    if m["num_skipped"] > 10:
        say(f"  ... and {m['num_skipped'] - 10} more")


def training_report(result) -> str:
    """The lines a finished training prints: this session's steps and time (a resumed run says from where), the
    best validation loss, where the bundle is."""
    val = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a (no validation split)"
    session = result.steps - result.first_step
    if result.resumed and not session:
        done = f"the run had finished: {result.steps} optimiser steps, nothing left to train"
    elif result.resumed:
        done = f"resumed at step {result.first_step}: trained {session} steps in this session, to step {result.steps}"
    else:
        done = f"trained {result.steps} steps"
    if session:
        done += f" ({result.seconds / 60:.1f} min)"
    bundle = f"captioner bundle: {result.bundle}\n" if result.bundle else ""
    return f"{done}; best validation loss {val}\n{bundle}history: {result.out_dir / 'history.json'}"


def cache_state(out: Path) -> str:
    """'finished', 'unfinished' (chunks written, not joined) or 'new' for a feature cache folder."""
    meta = out / "meta.json"
    if meta.is_file() and read_json(meta).get("complete") and (out / "features.npy").is_file():
        return "finished"
    return "unfinished" if (out / "chunks").is_dir() and any((out / "chunks").iterdir()) else "new"


def run_state(run: Path) -> str:
    """'finished' (its bundle was exported after its last checkpoint), 'unfinished' (a checkpoint to
    resume from) or 'new' for a training run folder."""
    checkpoint, exported = run / "checkpoint.pt", bundle_dir(run) / "config.json"
    if not checkpoint.is_file():
        return "new"
    if exported.is_file() and exported.stat().st_mtime >= checkpoint.stat().st_mtime:
        return "finished"  # train() exports the bundle as its very last step
    return "unfinished"


def set_aside(run: Path) -> Path:
    """Move an earlier run to <run>.1 (or .2, ...) so a fresh one can start in its folder; returns where."""
    k = 1
    while run.with_name(f"{run.name}.{k}").exists():
        k += 1
    target = run.with_name(f"{run.name}.{k}")
    run.rename(target)
    return target


def run_course(data: DataConfig | None = None, features: FeatureConfig | None = None,
               model: ModelConfig | None = None, train: TrainConfig | None = None,
               runtime: RuntimeConfig | None = None, decode: DecodeConfig | None = None, fresh: bool = False,
               examples: int = EXAMPLES, say=print) -> CourseResult:
    """Download, cache CLIP features, train, caption a few test images and score the test split.

    model / train default to `default_configs` (offline: the stand-in preset). The run goes to
    train.out_dir, else <data>/runs/<dataset>-<mapper> (-<freeze> when model.freeze is not the default's), the
    folder notebooks 03-05 use at their default parameters. Returns the paths made and the scores.
    """
    from .captioner import Captioner
    from .calibration import closing_report
    from .evaluation import evaluate_split
    from .metrics import METRICS
    from .features import cache_features, load_cache
    from .runtime import resolve_device
    from .errors import TrainingError
    from .training import train as train_captioner

    data, features, runtime = data or DataConfig(), features or FeatureConfig(), runtime or RuntimeConfig()
    offline = is_offline(runtime.offline)
    if offline:
        runtime = dataclasses.replace(runtime, offline=True)
        announce_offline(f"running the course on the '{data.dataset}' dataset with stand-in models")
    base_model, base_train = default_configs(offline)
    model, train = model or base_model, train or base_train
    done: dict[str, str] = {}

    say("== 1/5 download ==")
    captions, _ = load_captions(data, runtime, say)

    say("== 2/5 CLIP features ==")
    cache_dir = Path(features.cache_dir) if features.cache_dir else default_cache_dir(data, features.backbone, offline)
    state = cache_state(cache_dir)
    done["features"] = {"finished": "reused", "unfinished": "continued", "new": "made"}[state]
    say({"finished": f"reusing the finished feature cache at {cache_dir}: no image is encoded again",
         "unfinished": f"continuing the unfinished feature cache at {cache_dir}",
         "new": f"encoding every image once into {cache_dir}"}[state])
    cache_dir = cache_features(captions, dataclasses.replace(features, cache_dir=str(cache_dir)), data, runtime)
    cache = load_cache(cache_dir)
    report_cache(cache, say)

    say("== 3/5 train the mapper ==")
    # a freeze other than the course's default trains in a folder of its own (as a notebook's `freeze` does)
    run = Path(train.out_dir) if train.out_dir else run_dir(data.data_dir, data.dataset, model.mapper,
                                                            run_freeze(model, offline))
    aside = None
    if fresh and run.exists() and any(run.iterdir()):
        aside = set_aside(run)
        say(f"--fresh: the earlier run is kept at {aside}; training a new one in {run}")
    state = run_state(run)
    bundle = bundle_dir(run)
    if state == "finished":
        done["training"] = "reused"
        steps = read_json(bundle / "config.json").get("summary", {}).get("steps")
        say(f"reusing the finished training run at {run} ({steps} steps): nothing is trained again. To train "
            "anew (other settings, say), pass --fresh: the earlier run is kept beside the new one.")
    else:
        done["training"] = "continued" if state == "unfinished" else "made"
        if state == "unfinished":
            say(f"continuing the unfinished training run at {run} from its last checkpoint")
        try:
            result = train_captioner(cache_dir, model, dataclasses.replace(train, out_dir=str(run),
                                                                           resume=state == "unfinished"),
                                     runtime, data.data_dir)
        except TrainingError as exc:
            if state != "unfinished":
                raise
            raise TrainingError(f"{exc}\nWith the course: --fresh starts a new run, keeping this one beside it."
                                ) from None
        say(training_report(result))
        bundle = result.bundle

    course = CourseResult(cache_dir, run, bundle, done=done, set_aside=aside)
    captioner = Captioner.from_pretrained(bundle, resolve_device(runtime.device))
    captioner.image_encoder(models_dir(data.data_dir))  # the course's CLIP, from its own data folder
    images = cache.images.loc[cache.images["split"] == "test", "image_path"].head(examples).to_list()
    say("== 4/5 caption ==")
    if not images:
        say("the test split is empty, so there is nothing to caption or evaluate: use more images")
        return course
    decode = decode or DecodeConfig()
    course.captions = captioner.caption_files(images, decode)
    for r in course.captions:
        if r["error"]:
            say(f"skipped {r['image']}: {r['error']} (replace or remove the file)")
        else:
            for caption in [r["caption"]] if isinstance(r["caption"], str) else r["caption"]:
                say(f"{r['image']}\t{caption}")

    say("== 5/5 evaluate ==")
    out = run / "results-test.json"
    course.scores, per_image = evaluate_split(captioner, cache, "test", decode, True, out, METRICS)
    say(f"{len(per_image)} 'test' images of {cache_dir}, captioned by {decode.method} decoding (scores x100):")
    table, what_next = closing_report(captioner, cache, course.scores, per_image)
    say(table.to_string())
    say(what_next)
    say(f"scores and per-image captions written to {out}")
    say("done: " + ", ".join(f"{stage} {what}" for stage, what in done.items()))
    return course


NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class NotebookStopped(RuntimeError):
    """A notebook of the run-all loop failed or was interrupted: the message names it, the cell, and what to do;
    the notebooks after it did not run."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"NotebookStopped: {self}"]


def _child_processes() -> list[int]:
    """The processes this one started (the notebook's kernel, under papermill); Linux's /proc, else none."""
    me, children = os.getpid(), []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == me:
                children.append(int(entry.name))
    return children


def _stopped(path: Path, executed: Path, exc, rest: list[str]) -> NotebookStopped:
    """The one message of a notebook that raised: interrupted (with how to continue) or failed."""
    after = f" {', '.join(rest)} did not run." if rest else ""
    cell = f"cell In [{exc.exec_count}]"
    if exc.ename == "TrainingInterrupted":
        return NotebookStopped(
            f"{path.name} was INTERRUPTED during training, at its {cell}: {exc.evalue}\nTo continue, run the loop "
            f"again: {path.name} resumes the training from that checkpoint (its resume='auto'), then the rest runs."
            f"{after} The executed copy, with the same line, is {executed}.")
    if exc.ename == "KeyboardInterrupt":
        return NotebookStopped(
            f"{path.name} was INTERRUPTED at its {cell}.{after} To continue, run the loop again: what is finished is "
            f"reused and a feature cache continues from its last chunk. The executed copy is {executed}.")
    fix = ("\nThe run folder holds a run made with other settings: give the parameters the run's settings again, "
           "or name a `freeze` (it trains in a folder of its own), or move that folder aside and run the loop again."
           if exc.ename == "TrainingError" and "cannot resume" in str(exc.evalue) else "")
    return NotebookStopped(f"{path.name} FAILED at its {cell}: {exc.ename}: {exc.evalue}{fix}\n{after.strip()} The "
                           f"executed copy {executed} shows the cell and its output.")


# Only the kernel's errors reach this loop's output: ipykernel 7 warns at every start that it "is running over
# TCP without encryption", which says nothing about the course (papermill's kernels listen on localhost, as
# JupyterLab's do).
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


def run_notebooks(out_dir: str | Path, parameters: dict | None = None, notebooks: list[str | Path] | None = None,
                  kernel_name: str | None = None, say=print) -> list[Path]:
    """Run the course's notebooks in order with papermill (README's run-all loop), each with the `parameters`
    it declares, writing the executed copies (with their figures) into `out_dir`; returns their paths.

    Stops at the first notebook that fails or is interrupted, raising NotebookStopped with one message: which
    notebook and cell, the error or the resume line of an interrupted training, and which notebooks did not
    run. Ctrl-C (Jupyter's Interrupt) while a notebook runs is passed on to that notebook's kernel, so its
    training writes a checkpoint and says how to continue, as it does when run by hand.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    paths = [Path(p) for p in notebooks] if notebooks is not None else sorted(NOTEBOOKS_DIR.glob("[0-9]*.ipynb"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    asked: list[int] = []

    def forward(signum, _frame):  # Interrupt: the running notebook's kernel stops as Ctrl-C stops it in Jupyter
        asked.append(signum)
        if len(asked) >= 3:  # asked three times: stop the loop itself
            raise KeyboardInterrupt
        for pid in _child_processes():
            try:
                os.kill(pid, signal.SIGINT)
            except OSError:
                pass

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, forward) if main_thread else None
    done: list[Path] = []
    try:
        for k, path in enumerate(paths):
            rest = [p.name for p in paths[k + 1:]]
            if asked:
                raise NotebookStopped(f"interrupted before {path.name}: it and {', '.join(rest) or 'nothing else'} "
                                      "did not run. Run the loop again to continue.")
            executed = out / path.name
            declared = papermill.inspect_notebook(str(path))
            given = {name: value for name, value in (parameters or {}).items() if name in declared}
            say(f"== {path.name} -> {executed}")
            start = time.perf_counter()
            try:
                papermill.execute_notebook(str(path), str(executed), parameters=given, cwd=str(path.parent),
                                           kernel_name=kernel_name, progress_bar=False, extra_arguments=QUIET_KERNEL)
            except PapermillExecutionError as exc:
                raise _stopped(path, executed, exc, rest) from None
            say(f"   {path.name} ran in {time.perf_counter() - start:.0f} s")
            done.append(executed)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return done
