"""Where the pre-trained models come from: a hub name, a folder, or offline the tiny stand-in.

The one place that decides it. `clip.load` and transformers' `from_pretrained` always run their real code;
offline (no network, or `--offline`), the name they are handed is the stand-in's file or folder instead of a
hub name, and a line says so (`runtime.announce_offline`). The model file (model.py) knows nothing of hubs
or stand-ins: it is handed a loaded LM.

Nothing read from a folder is ever executed: every `from_pretrained` here passes `trust_remote_code=False`,
so a folder whose config asks for custom code is refused instead of prompting on stdin.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .runtime import announce_offline
from .standin_names import STANDIN_PREFIX, clip_standin_name, is_standin
from .standin_clip import clip_archive
from .standin_text import gpt2_dir, t5_dir

NO_REMOTE_CODE = {"trust_remote_code": False}  # every from_pretrained of a file or name a user gives


def clip_source(backbone: str, offline: bool) -> tuple[str, str]:
    """What `clip.load` reads for `backbone` (a name, or a local .pt archive), and the name caches record;
    offline, the stand-in archive (built once per machine)."""
    if not offline:
        return backbone, backbone
    name = clip_standin_name(backbone)
    announce_offline(f"CLIP {name}, the tiny stand-in this captioner was trained on" if is_standin(backbone)
                     else f"CLIP '{backbone}' replaced by the tiny stand-in {name}")
    return str(clip_archive(backbone)), name


def load_clip(backbone: str, device, offline: bool, models_dir: str | Path):
    """`clip.load` a real backbone by name (downloaded into `models_dir`/clip), or offline the stand-in
    archive through the same call. Returns (model, preprocess, backbone name as recorded in caches)."""
    import clip

    source, name = clip_source(backbone, offline)
    with warnings.catch_warnings():  # OpenAI publishes CLIP as TorchScript: torch 2.10+ calls its loader deprecated
        warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)
        model, preprocess = clip.load(source, device=device, jit=False, download_root=str(Path(models_dir) / "clip"))
    return model.eval(), preprocess, name


def _is_t5_name(name: str) -> bool:
    """T5-family names (t5-small, google/flan-t5-base, bigscience/T0_3B, ...): offline, the stand-in T5."""
    base = str(name).lower().rsplit("/", 1)[-1]
    return "t5" in base or base.startswith("t0")


def language_model_source(name: str, offline: bool) -> tuple[str, str]:
    """Where `from_pretrained` reads the LM `name` (hub name or folder) from, and the name checkpoints
    record; offline, the stand-in GPT-2 (the stand-in T5 for a T5-family name)."""
    standins = {"t5": t5_dir, "gpt2": gpt2_dir}
    if offline and not Path(name).is_dir():
        kind = "t5" if _is_t5_name(name) else "gpt2"
        announce_offline(f"language model '{name}' replaced by the tiny stand-in {kind.upper()}")
        return str(standins[kind]()), STANDIN_PREFIX + kind  # the stand-ins: once per machine
    if name.startswith(STANDIN_PREFIX):
        return str(standins.get(name[len(STANDIN_PREFIX):], gpt2_dir)()), name
    return name, name


def lm_class(source: str | Path):
    """The transformers Auto class for the LM at `source` and its config: a causal LM (GPT-2, Llama, ...) or
    an encoder-decoder (T5, T0), which reads the prefix with its encoder and writes the caption with its decoder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(source, **NO_REMOTE_CODE)
    return (AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM), config


def load_tokenizer(source: str | Path):
    """The tokenizer saved beside an LM (a hub name or folder), never running code it ships."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE)


def load_language_model(name: str, offline: bool):
    """`from_pretrained` the LM and its tokenizer by hub name or folder; offline, a stand-in.

    Returns (lm, tokenizer, name as recorded in checkpoints).
    """
    source, recorded = language_model_source(name, offline)
    tokenizer = load_tokenizer(source)
    cls, config = lm_class(source)
    if config.model_type == "gpt2" and getattr(config, "activation_function", None) == "gelu_new":
        # the same tanh GELU (within ~1e-6 in fp32) as one fused kernel, not a chain of small ops
        config.activation_function = "gelu_pytorch_tanh"
    lm = cls.from_pretrained(source, config=config, **NO_REMOTE_CODE)
    return lm, tokenizer, recorded
