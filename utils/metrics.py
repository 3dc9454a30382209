"""The COCO caption metrics: BLEU, METEOR, ROUGE-L, CIDEr and SPICE, through pycocoevalcap.

Called the way its COCO evaluation calls them (captions first tokenized by Stanford's PTBTokenizer, every
reference of an image used), so ours can sit beside published numbers. Three of its parts are Java programs:
the PTB tokenizer, METEOR and SPICE. Without Java the course still scores BLEU, ROUGE-L and CIDEr (with a close
Python tokenizer) and says once what it skipped and how to install Java (a MetricSkipped warning). SPICE also
needs Stanford CoreNLP models that pycocoevalcap downloads on first use (a large download) and Java 8; it runs
only where both are already there. The METEOR JVM is kept for the session and closed by `close_meteor`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_METRIC_NAMES = {"bleu": "BLEU", "meteor": "METEOR", "rouge_l": "ROUGE_L", "rouge-l": "ROUGE_L",
                 "rouge": "ROUGE_L", "cider": "CIDEr", "spice": "SPICE"}

JAVA_HELP = ("Install Java and rerun: `apt-get install -y default-jre-headless` (Debian/Ubuntu, as root) "
             "or `conda install openjdk`; Kaggle and Colab already have it.")
SPICE_SKIPPED = ("SPICE needs to download Stanford CoreNLP models at run time: skipped. To score it, run "
                 "`python -m pycocoevalcap.spice.get_stanford_models` once with network, and use Java 8.")


class MetricSkipped(UserWarning):
    """A metric could not be computed here; the message says why and what to install."""



# ----------------------------------------------------------------------------------------- Java


def java_available() -> bool:
    """True when a `java` on PATH really runs (macOS ships a stub that only prints an error)."""
    return _java_version() is not None


def _java_version() -> str | None:
    java = shutil.which("java")
    return _java_version_of(java) if java else None


@functools.lru_cache(maxsize=None)
def _java_version_of(java: str) -> str | None:
    """First line of `java -version` (it prints to stderr), or None when it does not run."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return (lines[0] if lines else "java") if proc.returncode == 0 else None


def spice_ready() -> bool:
    """SPICE can run only with Java and the CoreNLP jars already beside it (it would download them)."""
    from pycocoevalcap.spice import get_stanford_models as corenlp

    lib = Path(corenlp.SPICEDIR) / corenlp.SPICELIB
    return java_available() and all((lib / f"{corenlp.JAR}{part}.jar").is_file() for part in ("", "-models"))


# ----------------------------------------------------------------------------------- tokenizing

_PUNCTUATION = "\"'`,;:!?-"  # stripped from word edges, as PTBTokenizer splits them off and COCO drops them
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_INSIDE = re.compile(r"(?<!\d)[,:]|[,:](?!\d)|;|--+|\.\.\.+")  # "a,b" but not "1,000" or "3:30"
_SPLIT_OFF = re.compile(r"([$#%()\[\]{}])")
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'m|'re|'ve|'ll|'d)$")
_PTB_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}


def simple_tokenize(text: str) -> str:
    """What PTBTokenizer + COCO's punctuation removal make of a caption: Python, for machines without Java.

    Lower-cases; drops , ; : ! ? quotes, dashes and sentence periods; splits contractions ("isn't" ->
    "is n't", "dog's" -> "dog 's") and $ # %; keeps "3.5", "1,000", "e.g." and hyphenated words. Like
    COCO's own list (upper case, applied after lower-casing) it keeps brackets, as "-lrb-" etc.
    Known differences: abbreviations ("mr." loses its period), runs like "?!" (PTB keeps them), and a
    single letter before a period ("near a."), which PTB may read as an initial, depending on what follows.
    """
    text = _SPLIT_INSIDE.sub(" ", _SPLIT_OFF.sub(r" \1 ", text.lower()))
    words = []
    for token in text.split():
        if token in _BRACKETS:
            words.append(_BRACKETS[token])
            continue
        token = token.strip(_PUNCTUATION)
        if "." not in token.rstrip("."):  # "dog." loses its period; "p.m." and "3.5" keep theirs
            token = token.rstrip(".").strip(_PUNCTUATION)
        contraction = _CONTRACTION.search(token)
        if contraction:
            words += [token[:contraction.start()], contraction.group(1)]
        elif token:
            words.append(_PTB_WORDS.get(token, token))
    return " ".join(words)


def _ptb_tokenize(captions: dict) -> dict:
    """pycocoevalcap's PTBTokenizer over {key: [caption, ...]} in ONE Java run (it starts a JVM per call).

    Blank captions are not sent: they come back as "" whatever Java makes of an empty line.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = {key: [""] * len(texts) for key, texts in captions.items()}
    send = {(key, i): [{"caption": text}] for key, texts in captions.items()
            for i, text in enumerate(texts) if text}
    if send:
        with _quiet_stderr():  # Java's "PTBTokenizer tokenized N tokens at ..." line, on every call
            tokenized = PTBTokenizer().tokenize(send)
        for (key, i), (tokens,) in tokenized.items():
            out[key][i] = tokens
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """The process's stderr (file descriptor 2, which a Java child inherits, and which a notebook shows) sent to
    /dev/null while the block runs."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ------------------------------------------------------------------------------ COCO metrics


def score_captions(predictions: dict[str, str], references: dict[str, list[str]],
                   metrics: Iterable[str] = METRICS, tokenize: bool = True,
                   per_image: bool = False) -> dict[str, float] | tuple[dict[str, float], pd.DataFrame]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where it can run) of one caption per image.

    predictions: image id -> generated caption ("" is scored as an empty caption);
    references: image id -> all its reference captions; both must name the same images.
    tokenize: True tokenizes both as COCO eval does (PTBTokenizer, punctuation dropped); False takes
    them as already tokenized (space-separated words).
    Returns {"BLEU-1": ..., "METEOR": ..., "CIDEr": ...} (0-1 scale, CIDEr 0-10), without the metrics
    that could not run here (a MetricSkipped warning says which and why). With per_image=True returns
    (that dict, a DataFrame with one row per image: image_id, prediction and each metric's score).
    """
    wanted = _metric_names(metrics)
    ids = _check_ids(predictions, references)
    preds = {i: " ".join((predictions[i] or "").split()) for i in ids}  # newlines would break Java's lines
    refs = {i: [" ".join((r or "").split()) for r in references[i]] for i in ids}
    java = java_available()
    if not java:
        skipped = [m for m in wanted if m in ("METEOR", "SPICE")]
        _tell_java_missing(skipped, tokenize)
        wanted = [m for m in wanted if m not in skipped]
    elif "SPICE" in wanted and not spice_ready():
        _tell(SPICE_SKIPPED)
        wanted.remove("SPICE")
    if tokenize:
        preds, refs = _tokenize(preds, refs, java)
    gts, res = refs, {i: [preds[i]] for i in ids}

    summary, rows = {}, {"image_id": list(ids), "prediction": [predictions[i] or "" for i in ids]}
    for metric in wanted:
        result = _score_one(metric, gts, res)
        if result is not None:
            for name, (score, scores) in result.items():
                summary[name], rows[name] = float(score), [float(s) for s in scores]
    return (summary, pd.DataFrame(rows)) if per_image else summary


def _metric_names(metrics: Iterable[str]) -> list[str]:
    names = []
    for m in [metrics] if isinstance(metrics, str) else metrics:
        name = _METRIC_NAMES.get(str(m).lower())
        if name is None:
            raise ValueError(f"Unknown metric {m!r}: choose from {', '.join(METRICS)}.")
        if name not in names:
            names.append(name)
    return names


def _check_ids(predictions: dict, references: dict) -> list:
    """The ids to score, in prediction order; ValueError naming those only one side has."""
    def some(keys: list) -> str:
        more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
        return ", ".join(repr(k) for k in keys[:10]) + more

    no_refs = [i for i in predictions if not references.get(i)]
    no_pred = [i for i in references if i not in predictions]
    problems = []
    if no_refs:
        problems.append(f"{len(no_refs)} predicted image(s) have no reference captions: {some(no_refs)}")
    if no_pred:
        problems.append(f"{len(no_pred)} image(s) with references have no prediction: {some(no_pred)}")
    if problems:
        raise ValueError("predictions and references must cover the same images; " + "; ".join(problems) +
                         ". Check that both use the same image ids (same type: '1' is not 1).")
    if not predictions:
        raise ValueError("No predictions to score.")
    return list(predictions)


def _tokenize(preds: dict, refs: dict, java: bool) -> tuple[dict, dict]:
    if java:
        try:
            out = _ptb_tokenize({("ref", i): texts for i, texts in refs.items()} |
                                {("pred", i): [text] for i, text in preds.items()})
            return {i: out[("pred", i)][0] for i in preds}, {i: out[("ref", i)] for i in refs}
        except OSError as exc:  # it writes a temporary file in pycocoevalcap's own (maybe read-only) folder
            _tell(f"The PTB tokenizer could not run ({exc}); captions were tokenized by a close Python "
                  "stand-in, so BLEU, ROUGE-L and CIDEr can differ slightly from official COCO numbers.")
    return ({i: simple_tokenize(t) for i, t in preds.items()},
            {i: [simple_tokenize(t) for t in texts] for i, texts in refs.items()})


def _score_one(metric: str, gts: dict, res: dict) -> dict[str, tuple] | None:
    """{key: (corpus score, per-image scores in gts order)} for one metric; None when it could not run."""
    if metric == "BLEU":
        from pycocoevalcap.bleu.bleu import Bleu

        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"BLEU-{n + 1}": (score[n], scores[n]) for n in range(4)}
    if metric == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return {"ROUGE_L": Rouge().compute_score(gts, res)}
    if metric == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return {"CIDEr": Cider().compute_score(gts, res)}
    if metric == "METEOR":
        return _meteor(gts, res)
    return _spice(gts, res)


_METEOR: dict = {}  # the running METEOR scorer: its JVM takes ~15 s and ~1 GB to start, so it is reused


def _meteor(gts: dict, res: dict) -> dict[str, tuple] | None:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = _METEOR.get("scorer")
    if scorer is None or scorer.meteor_p.poll() is not None:
        scorer = _METEOR["scorer"] = Meteor()
    try:
        return {"METEOR": scorer.compute_score(gts, res)}
    except (OSError, ValueError):  # the JVM died: a broken pipe, or an empty line where a number should be
        close_meteor()
        reason = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-400:]
        _tell(f"METEOR could not run and was skipped; Java said: {reason or 'nothing'}. It needs about "
              "2 GB of free memory (java -Xmx2G).")
        return None


def close_meteor() -> None:
    """Stop the METEOR JVM kept between calls, freeing its ~1 GB (the next call starts a new one)."""
    scorer = _METEOR.pop("scorer", None)
    if scorer is None:
        return
    if scorer.lock.locked():  # a failed call left it held, and Meteor.__del__ would wait on it forever
        scorer.lock.release()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    with contextlib.suppress(OSError):  # a dead JVM's pipe: closed now, Meteor.__del__ has nothing to flush
        scorer.meteor_p.stdin.close()


def _spice(gts: dict, res: dict) -> dict[str, tuple] | None:
    from pycocoevalcap.spice.spice import Spice

    try:
        score, scores = Spice().compute_score(gts, res)
    except (OSError, subprocess.CalledProcessError) as exc:
        _tell(f"SPICE failed and was skipped ({exc}). SPICE 1.0 runs on Java 8 only; this is "
              f"{_java_version()}.")
        return None
    by_id = dict(zip(sorted(gts), (s["All"]["f"] for s in scores)))  # Spice reports in sorted id order
    return {"SPICE": (score, [by_id[i] for i in gts])}


def _tell_java_missing(skipped: list[str], tokenized: bool) -> None:
    said = []
    if skipped:
        said.append(f"{' and '.join(skipped)} {'was' if len(skipped) == 1 else 'were'} skipped")
    if tokenized:
        said.append("captions were tokenized by a close Python stand-in for the PTB tokenizer (BLEU, ROUGE-L "
                    "and CIDEr can differ slightly from official COCO numbers)")
    if said:
        _tell(f"Java was not found, so {', and '.join(said)}. {JAVA_HELP}")


_TOLD: set[str] = set()  # what _tell said already in this process: a notebook hears each once, not per call


def _tell(message: str) -> None:
    if message not in _TOLD:
        _TOLD.add(message)
        warnings.warn(message, MetricSkipped, stacklevel=2)
