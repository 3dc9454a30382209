"""Tiny offline stand-ins for CLIP, GPT-2 and its tokenizer, loaded through the REAL loaders.

Without network (our CI, a laptop on a train) the hubs that serve CLIP and GPT-2 are out of reach.
Rather than mocking the loaders, we build miniature models of the same classes and save them in the
formats the real weights come in, so `clip.load(...)` and `from_pretrained(...)` run their real code:

- CLIP: a tiny `clip.model.CLIP` saved as a TorchScript archive, as OpenAI publishes it
  (openai-clip 1.0.1 cannot rebuild a model from a plain state-dict file, only from an archive);
- GPT-2: a tiny `GPT2LMHeadModel` saved with `save_pretrained`;
- tokenizer: a byte-level BPE (so any text round-trips) trained with `tokenizers`, saved as GPT-2's
  `vocab.json` + `merges.txt`.

Their weights are random (seeded): they teach the mechanics, never the quality of real captions, and
every name and message that shows them says "stand-in".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .files import atomic_path, write_json

STANDIN_PREFIX = "standin:"
EOS = "<|endoftext|>"

# Tiny shapes: a ViT or a ModifiedResNet of CLIP's own classes. Widths are multiples of 64 because
# clip.model.build_model infers heads as width // 64; the ResNet's attention-pool width is 32 x width.
_CLIP_VIT = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=1)
_CLIP_RN = dict(_CLIP_VIT, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None)
_GPT2 = dict(n_positions=256, n_embd=64, n_layer=2, n_head=2)
_TOKENIZER_VOCAB = 600

# What the tokenizer is trained on: ordinary English around our captions, so BPE merges are sensible.
_CORPUS = """a photo of a dog running across the grass . two young men look at their hands in the yard .
a man in a red shirt rides a bicycle down the street . a woman is cooking food in the kitchen .
a plate of pasta with tomato sauce and cheese . a bowl of soup next to a piece of bread .
children are playing in the park near the water . the cat is sleeping on a small white bed .
a group of people stand on the left side of the picture . there is a large blue car at the top .
a little green triangle sits at the bottom of the image , on a dark background .
an orange square in the centre , a yellow circle on the right , a purple cross on the left !
what is in this picture ? it shows one shape , small or large , in some colour and place ."""


def is_standin(name: str) -> bool:
    return str(name).startswith(STANDIN_PREFIX)


def clip_standin_name(backbone: str) -> str:
    """'ViT-B/32' -> 'standin:ViT' (RN* names get the ResNet stand-in), as recorded in caches."""
    return STANDIN_PREFIX + ("RN" if str(backbone).upper().startswith("RN") else "ViT")


def clip_archive(backbone: str, models_dir: str | Path) -> Path:
    """Path of the stand-in CLIP TorchScript archive for `backbone`, built on first use."""
    import clip.model

    kind = clip_standin_name(backbone).removeprefix(STANDIN_PREFIX)
    path = Path(models_dir) / f"standin-clip-{kind.lower()}.pt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    model = clip.model.CLIP(**(_CLIP_RN if kind == "RN" else _CLIP_VIT)).eval()
    image = torch.randn(1, 3, model.visual.input_resolution, model.visual.input_resolution)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return path


def gpt2_dir(models_dir: str | Path) -> Path:
    """Folder holding the stand-in GPT-2 and its tokenizer in `from_pretrained` layout, built on first use."""
    from transformers import GPT2Config, GPT2LMHeadModel

    dest = Path(models_dir) / "standin-gpt2"
    if (dest / "standin.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _train_tokenizer(tmp)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **_GPT2)
    GPT2LMHeadModel(config).save_pretrained(tmp)
    write_json(tmp / "standin.json", {"standin": True, "what": "tiny random-init GPT-2 for offline runs",
                                      "config": _GPT2, "tokenizer_vocab": len(tokenizer)})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _train_tokenizer(dest: Path):
    """Byte-level BPE on a small corpus, saved and reloaded as a GPT-2 tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    from .datasets import EMBEDDED_ATTRIBUTES

    words = " ".join(w for values in EMBEDDED_ATTRIBUTES.values() for w in values)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS.splitlines() + [words], vocab_size=_TOKENIZER_VOCAB,
                            min_frequency=1, special_tokens=[EOS], show_progress=False)
    dest.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(dest))  # vocab.json + merges.txt, GPT-2's own files
    tokenizer = GPT2Tokenizer.from_pretrained(dest, unk_token=EOS, bos_token=EOS, eos_token=EOS)
    tokenizer.save_pretrained(dest)
    return tokenizer
