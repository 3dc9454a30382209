"""Tiny offline stand-ins for CLIP, GPT-2 and its tokenizer, loaded through the REAL loaders.

Without network (our CI, a laptop on a train) the hubs that serve CLIP and GPT-2 are out of reach.
Rather than mocking the loaders, we build miniature models of the same classes and save them in the
formats the real weights come in, so `clip.load(...)` and `from_pretrained(...)` run their real code:

- CLIP (`utils/standin_clip.py`): a tiny `clip.model.CLIP` saved as a TorchScript archive, as OpenAI
  publishes it. Its 112-d image embedding holds, for ANY image, the mean colour of each cell of a 4x4
  grid (48 dimensions computed by weights set by hand: which colours are where, light and dark, coarse
  layout), beside 64 dimensions fitted with CLIP's contrastive loss on private drawings of the course's
  kind (shape, colour, position, size and background of one drawn shape). A stand-in is a test double
  for CLIP on any data, not a model of our own drawings: tests/test_standins.py checks it on images the
  course did not make.
- GPT-2 and its tokenizer (`utils/standin_text.py`): a byte-level BPE (so any text round-trips) whose
  vocabulary holds a few thousand everyday caption words, trained with `tokenizers` on a private
  generated corpus and saved as GPT-2's `vocab.json` + `merges.txt`; a `GPT2LMHeadModel` with GPT-2's
  12 blocks at width 64, pre-fitted on caption text, saved with `save_pretrained`.
- Marian and T5 (`utils/standin_text.py`): tiny random models, for the mechanics of translation and of
  an encoder-decoder LM.

None of them is a real model, and every name and message that shows them says "stand-in". They are built
ONCE PER MACHINE, in `standins_home()` (`$CLIPCAP_STANDINS`, else `$XDG_CACHE_HOME/clipcap-course`, else
`~/.cache/clipcap-course`), with a progress line, and every data folder reuses them.

The names are `utils/standin_names.py` (the leaf every layer may import), the models `utils/standin_clip.py`
and `utils/standin_text.py` (with `utils/standin_words.py`, the private word lists); this module holds what
building every stand-in shares: its folder (`standins_home`), the progress line, a private seeded RNG, the one
LR schedule of the short fits, and the one reader of the private drawings' captions.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from pathlib import Path

import torch

from .paths import user_cache
from .standin_names import STANDINS_ENV

_STANDINS_VERSION = 3  # bump when a stand-in's recipe changes: the machine's old copies are then not used
EOS = "<|endoftext|>"
CLIP_DATA = "standin-clip-data"  # folder under models_dir holding the private training drawings
PRIVATE_DRAWINGS = dict(images=3000, seed=12345)  # the course's own set is seed 0: never trained on


def standins_home() -> Path:
    """The folder the stand-in models are built in, once per machine, and read from by every data folder:
    `$CLIPCAP_STANDINS`, else `$XDG_CACHE_HOME/clipcap-course`, else `~/.cache/clipcap-course` (a
    `standins-v<N>` folder inside, so a course with other stand-ins never reads these)."""
    return user_cache(STANDINS_ENV) / f"standins-v{_STANDINS_VERSION}"


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
