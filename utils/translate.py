"""Captions in another language: English -> `lang` with the MarianMT models of Helsinki-NLP (opus-mt-en-<lang>).

`load_translator("de")` loads `Helsinki-NLP/opus-mt-en-de` with transformers' own `from_pretrained` (its
tokenizer is a MarianTokenizer, which needs the sentencepiece package). Offline, a tiny random stand-in
Marian model (utils/standins.py) is loaded the same way from a local folder: it shows the mechanics only,
so every line it gives starts with STANDIN_LABEL and is never shown as a translation.

Used by `python -m utils caption --translate de`, the web demo's and the explorer's language choice.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import CourseError
from .runtime import announce_offline, is_offline
from .sources import NO_REMOTE_CODE
from .standin_names import STANDIN_PREFIX, is_standin
from .standin_text import marian_dir

HUB_NAME = "Helsinki-NLP/opus-mt-en-{lang}"
# The choices the demo and the explorer offer: opus-mt-en-<lang> models with one target language (those
# for several, such as en-zh, want a target token first). `--translate` takes any other code too.
LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch", "sv": "Swedish",
             "fi": "Finnish", "cs": "Czech", "ru": "Russian", "uk": "Ukrainian"}
STANDIN_LABEL = "[stand-in model, not a translation]"
SENTENCEPIECE = "sentencepiece==0.2.3"  # what MarianTokenizer needs (pip install it)


class TranslationError(CourseError, ValueError):
    """No translation model for that language here; the message says why and what to do."""


def language_name(lang: str) -> str:
    return LANGUAGES.get(lang, f"'{lang}'")


@dataclass
class Translator:
    """English -> `lang` with a loaded Marian model; call it on a list of texts."""

    lang: str
    name: str  # the hub name it was loaded by, or standin:marian
    model: object
    tokenizer: object

    @property
    def standin(self) -> bool:
        return is_standin(self.name)

    @property
    def about(self) -> str:
        """What made the translations, in words for the page, the explorer and the CLI."""
        if self.standin:
            return (f"{language_name(self.lang)}: a tiny random stand-in Marian model (offline), so the lines below "
                    f"are random words, not a translation")
        return f"{language_name(self.lang)}, translated by {self.name}"

    def __call__(self, texts: list[str], batch_size: int = 16) -> list[str]:
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                                   max_length=256)
            with torch.no_grad():
                ids = self.model.generate(**batch, max_new_tokens=3 * batch["input_ids"].shape[1] // 2 + 8)
            out += [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return [f"{STANDIN_LABEL} {t}" for t in out] if self.standin else out


def load_translator(lang: str, offline: bool | None = None, models_dir: str | Path | None = None) -> Translator:
    """The English -> `lang` translator: `Helsinki-NLP/opus-mt-en-<lang>`, or offline the stand-in.

    TranslationError when `lang` is not a language code, when sentencepiece is missing, or when there is
    no such model (or the hub cannot be reached).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    lang = (lang or "").strip().lower()
    if not re.fullmatch(r"[a-z]{2,3}", lang):
        raise TranslationError(f"--translate {lang!r}: give a language code such as de or fr "
                               f"({', '.join(LANGUAGES)} have models).")
    if is_offline(offline):
        announce_offline(f"translation to {language_name(lang)} by a tiny random stand-in Marian model: "
                         "its output is random words, labelled so, not a translation")
        source = marian_dir(Path(models_dir) if models_dir else None)  # the stand-ins: once per machine
        name = STANDIN_PREFIX + "marian"
    else:
        source = name = HUB_NAME.format(lang=lang)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(source, **NO_REMOTE_CODE).eval()
    except OSError as exc:  # not on the hub, no network, a broken download
        raise TranslationError(f"no translation model for {language_name(lang)}: {name} cannot be loaded "
                               f"({str(exc).splitlines()[0]}). Models exist for {', '.join(LANGUAGES)} and more "
                               "(see huggingface.co/Helsinki-NLP); offline, --offline uses a stand-in.") from None
    # The model first: a language without one is named before anything else. Its MarianTokenizer needs
    # sentencepiece (the stand-in's tokenizer does not).
    if not is_standin(name) and importlib.util.find_spec("sentencepiece") is None:
        raise TranslationError(f"translating to {language_name(lang)} with {name} needs the sentencepiece "
                               f"package (for its tokenizer): pip install {SENTENCEPIECE}")
    return Translator(lang, name, model, AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE))


class Translators:
    """Translators by language, each loaded on its first use and kept: what the demo and the explorer hold."""

    def __init__(self, offline: bool | None = None, models_dir: str | Path | None = None):
        self.offline, self.models_dir = offline, models_dir
        self._loaded: dict[str, Translator] = {}
        self._lock = threading.Lock()

    def __getitem__(self, lang: str) -> Translator:
        lang = (lang or "").strip().lower()  # "DE", " de" and "de": one model, loaded once
        with self._lock:
            if lang not in self._loaded:
                self._loaded[lang] = load_translator(lang, self.offline, self.models_dir)
            return self._loaded[lang]


def add_translations(results: list[dict], translator: Translator | None) -> list[dict]:
    """`Captioner.caption_files` results with "translation" (a text, or a list as "caption" is) and
    "translated_by" added to each captioned one; unchanged when `translator` is None."""
    if translator is None:
        return results
    texts = [c for r in results if r["caption"] is not None for c in _as_list(r["caption"])]
    translated = iter(translator(texts))
    for r in results:
        if r["caption"] is not None:
            these = [next(translated) for _ in _as_list(r["caption"])]
            r["translation"] = these[0] if isinstance(r["caption"], str) else these
            r["translated_by"] = translator.about
    return results


def _as_list(caption: str | list[str]) -> list[str]:
    return [caption] if isinstance(caption, str) else caption
