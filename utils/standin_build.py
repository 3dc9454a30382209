"""What building every stand-in shares: its folder, the progress line, a private seeded RNG, the one LR
schedule of the short fits, and the one reader of the private drawings' captions."""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from pathlib import Path

import torch

from .standin_names import standins_home

EOS = "<|endoftext|>"
CLIP_DATA = "standin-clip-data"  # folder under models_dir holding the private training drawings
PRIVATE_DRAWINGS = dict(images=3000, seed=12345)  # the course's own set is seed 0: never trained on


def folder(models_dir: str | Path | None) -> Path:
    return Path(models_dir) if models_dir is not None else standins_home()


def announce(what: str, where: Path, seconds: str) -> float:
    print(f"building the {what} once for this machine in {where} (about {seconds} on one CPU core; "
          "every later run reuses it)", file=sys.stderr, flush=True)
    return time.perf_counter()


@contextlib.contextmanager
def private_torch_state():
    """Seeded RNG and one CPU thread for a build, leaving the caller's RNG state and thread count as they
    were. With one thread the fitted weights do not depend on the machine's core count (another CPU or
    library version may still round differently), and it is barely slower: the tiny models' matrices
    are too small for threads to pay off, and two threads on a busy two-core machine are far slower."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """The short fits' schedule, as a factor of the peak LR: linear warm-up over `warmup` steps, then a
    cosine down to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def private_drawings(models_dir: Path) -> tuple[Path, dict[str, list[str]]]:
    """The private drawings the stand-ins are fitted on (`utils.embedded.make_embedded` with a seed the
    course never uses, generated on first use under `models_dir / CLIP_DATA`): their folder, and each
    image's captions by file name, sorted by name."""
    from .embedded import make_embedded

    where = make_embedded(models_dir / CLIP_DATA, n_images=PRIVATE_DRAWINGS["images"], seed=PRIVATE_DRAWINGS["seed"])
    captions: dict[str, list[str]] = {}
    with open(where / "captions.csv", newline="", encoding="utf-8") as f:
        for name, caption in list(csv.reader(f))[1:]:
            captions.setdefault(name, []).append(caption)
    return where, dict(sorted(captions.items()))
