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

This module gathers them: the names (`utils/standin_names.py`, the leaf every layer may import), what
the builds share (`utils/standin_build.py`), the CLIP and the text models.
"""

from __future__ import annotations

from .standin_build import CLIP_DATA, EOS  # noqa: F401
from .standin_clip import _CLIP_FIT, EMBED_DIM, caption_key, clip_archive  # noqa: F401
from .standin_names import (STANDIN_CLIP_DIM, STANDIN_PREFIX, STANDINS_ENV, clip_standin_name, is_standin,  # noqa: F401
                             standins_home)
from .standin_text import gpt2_dir, marian_dir, t5_dir  # noqa: F401

_caption_key = caption_key  # the name tests used
