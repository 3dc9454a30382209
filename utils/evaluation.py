"""Caption metrics: the COCO ones (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) and CLIPScore / RefCLIPScore.

The COCO numbers come from pycocoevalcap, called the way its COCO evaluation calls it (captions first
tokenized by Stanford's PTBTokenizer, every reference of an image used), so ours can sit beside
published ones. Three of its parts are Java programs: the PTB tokenizer, METEOR and SPICE. Without
Java the course still scores BLEU, ROUGE-L and CIDEr (with a close Python tokenizer) and says once
what it skipped and how to install Java. SPICE also needs Stanford CoreNLP models that pycocoevalcap
downloads on first use (a large download) and Java 8; it runs only where both are already there.

CLIPScore (Hessel et al. 2021, arXiv:2104.08718; clipscore.py) needs no reference captions: it asks CLIP
how well a caption matches the image, which catches good captions worded unlike the references.

`evaluate_split` puts it together for a trained captioner: captions from a cache's features, every
metric, one JSON of results; `temperature_table` shows what decoding settings do to the captions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .clipscore import clip_score, clip_scores, ref_clip_score  # noqa: F401 (here too, beside the COCO metrics)
from .clip_encoder import draft_size
from .config import DecodeConfig
from .embedded import EMBEDDED_ATTRIBUTES, embedded_attributes
from .errors import CourseError
from .images import UnreadableImage, image_name, open_image
from .files import write_json

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_METRIC_NAMES = {"bleu": "BLEU", "meteor": "METEOR", "rouge_l": "ROUGE_L", "rouge-l": "ROUGE_L",
                 "rouge": "ROUGE_L", "cider": "CIDEr", "spice": "SPICE"}

# Published numbers to show beside ours (already x100, as printed). Source: Mokady, Hertz, Bermano,
# "ClipCap: CLIP Prefix for Image Captioning", arXiv:2111.09734, Table 1, COCO Karpathy test split.
# They are comparable to ours only on that split, with the real CLIP ViT-B/32 and GPT-2.
PAPER_REFERENCE = {
    "ClipCap paper: MLP + GPT-2 tuning": {"BLEU-4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12},
    "ClipCap paper: Transformer, frozen GPT-2": {"BLEU-4": 33.53, "METEOR": 27.45, "CIDEr": 113.08,
                                                 "SPICE": 21.05},
}

JAVA_HELP = ("Install Java and rerun: `apt-get install -y default-jre-headless` (Debian/Ubuntu, as root) "
             "or `conda install openjdk`; Kaggle and Colab already have it.")
SPICE_SKIPPED = ("SPICE needs to download Stanford CoreNLP models at run time: skipped. To score it, run "
                 "`python -m pycocoevalcap.spice.get_stanford_models` once with network, and use Java 8.")


class MetricSkipped(UserWarning):
    """A metric could not be computed here; the message says why and what to install."""


class EvaluationError(CourseError, RuntimeError):
    """A split that cannot be evaluated as asked; the message says why and what to do."""


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
        for (key, i), (tokens,) in PTBTokenizer().tokenize(send).items():
            out[key][i] = tokens
    return out


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


def _tell(message: str) -> None:
    warnings.warn(message, MetricSkipped, stacklevel=2)


# ------------------------------------------------------------------------------------- results


def references_by_image(captions: pd.DataFrame) -> dict[str, list[str]]:
    """image id -> its captions, from a frame with image_id and caption columns (a cache split)."""
    return {str(i): list(group) for i, group in captions.groupby("image_id", sort=False)["caption"]}


def results_table(scores: dict, compare: dict[str, dict[str, float]] | None = None,
                  name: str = "ours", calibration: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """One row per metric, x100 and rounded to 1 decimal as papers print them.

    calibration: more columns of scores computed here (as `scores`, not yet x100), e.g. from
    `calibration_scores`: what a reference caption, shuffled references and the most frequent caption score
    on the same images, so that ours can be read between them. compare: extra columns of published numbers
    (already x100), e.g. PAPER_REFERENCE; a metric one column lacks shows as NaN there (a metric we skipped
    stays visible beside the paper's number).
    """
    def x100(column: dict) -> dict:
        return {metric: round(100 * float(v), 1) for metric, v in column.items()}

    columns = {name: x100(scores), **{label: x100(c) for label, c in (calibration or {}).items()}, **(compare or {})}
    rows = list(dict.fromkeys(metric for column in columns.values() for metric in column))  # ours first
    table = pd.DataFrame({label: pd.Series(column, dtype=float) for label, column in columns.items()},
                         index=pd.Index(rows, name="metric"))
    return table


# ---------------------------------------------------------------------- facts of the embedded set

def facts_right(caption: str, truth: dict) -> float:
    """Share of the embedded set's five facts (shape, colour, position, size, background) that `caption`
    states as `truth` (an `embedded_attributes` dict) has them; a fact not stated counts as wrong."""
    said = embedded_attributes(caption)
    return float(np.mean([said[a] == truth[a] for a in EMBEDDED_ATTRIBUTES]))


def embedded_truth(references: list[str]) -> dict:
    """An embedded image's true facts, read from its references (they all state the same five)."""
    return embedded_attributes(references[0])


def write_results(path_json: str | Path, scores: dict, per_image_captions: list[dict],
                  info: dict | None = None) -> Path:
    """Scores, the captions they were computed from and `info` (how), in one JSON written atomically."""
    def plain(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} cannot be written to JSON")

    data = json.loads(json.dumps({"scores": scores, "captions": per_image_captions, "info": info or {}},
                                 default=plain))
    return write_json(path_json, data)


# -------------------------------------------------------------------------- evaluating a captioner


def evaluate_split(captioner, cache, split: str = "test", decode: DecodeConfig | None = None,
                   clip_score: bool = True, out: str | Path | None = None, metrics: Iterable[str] = METRICS,
                   batch_size: int = 64) -> tuple[dict[str, float], pd.DataFrame]:
    """Caption every image of a feature cache's split and score it against ALL its references.

    Captions come from the cached CLIP features (no image is re-encoded for them). With clip_score,
    CLIPScore and RefCLIPScore read the images again with the captioner's own CLIP; an image that can
    no longer be read is left out of those two (NaN in its row), and named in a printed note and in the
    JSON's info.clip_score_unreadable.
    Returns (scores as score_captions gives them, plus CLIPScore/RefCLIPScore; a per-image frame:
    image_id, image_path, prediction, references and each metric). `out`: write both to this JSON.
    """
    decode = decode or DecodeConfig()
    if decode.num_return_sequences != 1:
        raise EvaluationError(f"evaluation scores one caption per image, not num_return_sequences="
                              f"{decode.num_return_sequences}: leave it at 1.")
    _check_cache_fits(captioner, cache)
    frame = cache.split(split)
    if frame.empty:
        present = ", ".join(sorted(cache.captions["split"].unique()))
        raise EvaluationError(f"the feature cache at {cache.path} has no '{split}' images (it has: {present}); "
                              "choose one of those splits.")
    references = references_by_image(frame)
    images = cache.images.set_index("image_id").loc[list(references)]
    captions = captioner.generate(cache.features[images["feature_row"].to_numpy()], decode, batch_size)
    scores, per_image = score_captions(dict(zip(references, captions)), references, metrics, per_image=True)
    per_image.insert(1, "image_path", images["image_path"].to_list())
    per_image.insert(3, "references", list(references.values()))
    unreadable = []
    if clip_score:
        per_image["CLIPScore"], per_image["RefCLIPScore"], unreadable = clip_scores_of_files(
            captioner, per_image["image_path"].to_list(), captions, list(references.values()), batch_size)
        if len(unreadable) < len(per_image):
            scores.update(CLIPScore=float(per_image["CLIPScore"].mean()),
                          RefCLIPScore=float(per_image["RefCLIPScore"].mean()))
        if unreadable:
            print(f"{len(unreadable)} of {len(per_image)} image(s) could not be read again and are left out of "
                  f"CLIPScore (their captions came from the cache): {', '.join(unreadable[:5])}"
                  + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""))
    if out is not None:
        info = {"split": split, "images": len(per_image), "features": str(cache.path),
                "backbone": cache.meta["backbone"], "standin": bool(cache.meta.get("standin")),
                "decode": dataclasses.asdict(decode), "clip_score_unreadable": unreadable}
        records = per_image.astype(object).where(per_image.notna(), None).to_dict("records")  # NaN -> null
        write_results(out, scores, records, info)
    return scores, per_image


def _check_cache_fits(captioner, cache) -> None:
    cfg = captioner.config
    have = (cache.meta["backbone"], int(cache.meta["clip_dim"]))
    if have != (cfg.backbone, cfg.clip_dim):
        raise EvaluationError(f"the feature cache at {cache.path} holds {have[1]}-d {have[0]} features, but the "
                              f"captioner was trained on {cfg.clip_dim}-d {cfg.backbone} ones: evaluate on a cache "
                              f"made with `python -m utils features --backbone {cfg.backbone}`.")


def clip_scores_of_files(captioner, paths: list[str], captions: list[str], references: list[list[str]],
                          batch_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CLIP-S and RefCLIP-S per image file (NaN where unreadable), `batch_size` images in memory at a time;
    and 'path (why)' for each unreadable one."""
    model, preprocess = captioner.image_encoder()
    clip_s, ref_s, unreadable = np.full(len(paths), np.nan), np.full(len(paths), np.nan), []
    for start in range(0, len(paths), batch_size):
        ok, images = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(open_image(paths[i], draft=draft_size(model)))
                ok.append(i)
            except UnreadableImage as exc:
                unreadable.append(f"{paths[i]} ({exc})")
        if ok:
            clip_s[ok], ref_s[ok] = clip_scores(model, preprocess, images, [captions[i] for i in ok],
                                                [references[i] for i in ok], next(model.parameters()).device,
                                                batch_size=batch_size)
    return clip_s, ref_s, unreadable


def temperature_table(captioner, images, temperatures: Iterable[float] = (0.3, 0.7, 1.0, 1.5), samples: int = 3,
                      methods: Iterable[str] = ("greedy", "beam"), seed: int = 0,
                      names: list[str] | None = None, top_ps: Iterable[float] = (),
                      top_p_temperature: float | None = None) -> pd.DataFrame:
    """The same images captioned by each deterministic method and by sampling at each temperature.

    images: CLIP embeddings (N, clip_dim) (e.g. rows of a feature cache), or PIL images / image paths,
    which the captioner encodes. Sampling draws `samples` captions per image and setting; greedy and beam
    give one (sample 0, temperature NaN). `top_ps`: more sampling settings, each top-p at
    `top_p_temperature` (default: the highest of `temperatures`). Every sampling setting has its own seed
    (`seed` + its position), so two settings never share their random draws, and the table is the same on
    every run.
    Returns one row per image x setting x sample: image, method, temperature, top_p, sample, caption.
    `names` labels the images (default: their file names, or positions for embeddings).
    """
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        embeds, names = images, names or [str(i) for i in range(len(images))]
    else:
        embeds, names = captioner.embed(images), names or [image_name(im, i) for i, im in enumerate(images)]
    temperatures = list(temperatures)
    rows = []
    for method in methods:
        captions = captioner.generate(embeds, DecodeConfig(method=method))
        rows += [(names[i], method, np.nan, np.nan, 0, c) for i, c in enumerate(captions)]
    hot = top_p_temperature if top_p_temperature is not None else max(temperatures, default=1.0)
    settings = [(t, 1.0) for t in temperatures] + [(hot, p) for p in top_ps]
    for k, (t, p) in enumerate(settings):
        drawn = captioner.generate(embeds, DecodeConfig(method="sample", temperature=t, top_p=p,
                                                        num_return_sequences=samples, seed=seed + k))
        drawn = [d if samples > 1 else [d] for d in drawn]  # one sample comes back as a plain caption
        rows += [(names[i], "sample", t, p, j, c) for i, per_image in enumerate(drawn) for j, c in enumerate(per_image)]
    return pd.DataFrame(rows, columns=["image", "method", "temperature", "top_p", "sample", "caption"])


def temperature_summary(table: pd.DataFrame, truth: dict[str, dict] | None = None) -> pd.DataFrame:
    """Per setting of a temperature_table: how varied its captions are, how far from greedy, and (with
    `truth`, image name -> its true facts, embedded set) how many facts they state right.

    distinct_share: distinct captions / captions, per image, averaged (sampling: from 1/samples, every
    draw alike, up to 1, every draw different); same_as_greedy: share of captions equal to the greedy
    one of their image (NaN without greedy rows); mean_words: caption length; facts_right: share of the
    five facts stated right (`facts_right`), averaged over captions.
    """
    if "top_p" not in table:
        table = table.assign(top_p=np.where(table["method"] == "sample", 1.0, np.nan))
    keys = ["method", "temperature", "top_p"]
    greedy = table[table["method"] == "greedy"].set_index("image")["caption"]
    table = table.assign(words=table["caption"].str.split().str.len(),
                         same=(table["caption"] == table["image"].map(greedy)) if len(greedy) else np.nan)
    per_image = table.groupby([*keys, "image"], dropna=False).agg(distinct=("caption", "nunique"), n=("caption", "size"))
    aggregate = dict(captions=("caption", "size"), same_as_greedy=("same", "mean"), mean_words=("words", "mean"))
    if truth is not None:
        table = table.assign(facts=[facts_right(c, truth[i]) for c, i in zip(table["caption"], table["image"])])
        aggregate["facts_right"] = ("facts", "mean")
    summary = table.groupby(keys, dropna=False, sort=False).agg(**aggregate)
    summary.insert(1, "distinct_share", (per_image["distinct"] / per_image["n"]).groupby(keys, dropna=False).mean())
    return summary.reset_index()
