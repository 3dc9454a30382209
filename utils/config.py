"""The settings every stage takes, as dataclasses holding the course's defaults.

Notebooks set a few fields; the CLI turns each field into a flag of the same name
(`batch_size` -> `--batch-size`), so a notebook and a command line can never mean different things.
Each field carries its help text, and the values it may take (a `Literal` of choices, or a range), in
its metadata: `--help` prints them, and every dataclass checks them when it is made, so a typo or an
impossible number stops before any work with one message naming the setting, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

from .errors import CourseError
from .paths import default_data_dir

DATASETS = ("embedded", "flickr30k", "flickr8k", "food", "coco", "karpathy", "csv", "folder", "webdataset", "hf")
Dataset = Literal["embedded", "flickr30k", "flickr8k", "food", "coco", "karpathy", "csv", "folder", "webdataset", "hf"]
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


class ConfigError(CourseError, ValueError):
    """A setting with a value it cannot take; the message names the setting, the value and what it may be."""


def setting(default=dataclasses.MISSING, help: str = "", *, factory=None, min=None, above=None, max=None,
            pattern: str | None = None, allowed: str | None = None, read_by: tuple[str, ...] | None = None,
            refused_elsewhere: bool = True):
    """A dataclass field with its help text and allowed range: `min` <= value (<= `max`), `above` < value,
    or a string matching `pattern` (described to users as `allowed`). Choices are the field's `Literal` type.
    DecodeConfig's fields say which decoding methods read them (`read_by`, default: all), and whether one
    given with another method is refused (`refused_elsewhere`: see METHOD_ONLY)."""
    rules = {k: v for k, v in dict(min=min, above=above, max=max, pattern=pattern, allowed=allowed,
                                   read_by=read_by).items() if v is not None}
    if read_by is not None:
        rules["refused_elsewhere"] = refused_elsewhere
    metadata = {"help": help, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_of(hint) -> tuple | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) allows; None for any other type."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _problem(cls_name: str, f: dataclasses.Field, hint, value) -> str | None:
    """Why `value` does not fit the field `f` (None when it does), naming the field and its flag."""
    def bad(rule: str) -> str:
        return f"{f.name} must be {rule}, not {value!r} ({flag(f.name)}, {cls_name}.{f.name})"

    if value is None:
        return None if type(None) in typing.get_args(hint) else bad("given")
    choices = choices_of(hint)
    if choices is not None and not (bool in typing.get_args(hint) and isinstance(value, bool)):
        return None if value in choices else bad(f"one of {', '.join(map(str, choices))}")
    kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    kind = kinds[0] if kinds else hint
    rules = f.metadata
    if kind is bool:
        return None if isinstance(value, bool) else bad("True or False")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            return bad("a whole number" if kind is int else "a number")
        if "min" in rules and value < rules["min"] or "max" in rules and value > rules["max"] \
                or "above" in rules and value <= rules["above"]:
            low = f">= {rules['min']}" if "min" in rules else f"> {rules['above']}" if "above" in rules else ""
            return bad(" and ".join(x for x in (low, f"<= {rules['max']}" if "max" in rules else "") if x))
    if kind is str:
        if not isinstance(value, str):
            return bad("text")
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            return bad(rules.get("allowed", rules["pattern"]))
    return None


class Settings:
    """Base of every config dataclass: it checks its fields when made (and when `dataclasses.replace`d)."""

    error = ConfigError  # the exception a bad value raises

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        problems = [p for f in dataclasses.fields(self)
                    if (p := _problem(type(self).__name__, f, hints[f.name], getattr(self, f.name)))]
        problems += self.conflicts() if not problems else []
        if problems:
            raise self.error("; ".join(problems) + ".")

    def conflicts(self) -> list[str]:
        """Settings that are each fine but do not go together."""
        return []


@dataclass(frozen=True)
class RuntimeConfig(Settings):
    """Where the run happens and whether it may reach the model hubs."""

    offline: bool | None = setting(None, "use the tiny stand-in models, never the hubs (default: CLIPCAP_OFFLINE, "
                                         "else probe the network)")
    device: str = setting("auto", "auto (a GPU when torch can use it), cpu, cuda, cuda:1, mps",
                          pattern=DEVICE_PATTERN, allowed="auto, cpu, mps, cuda or cuda:N")
    seed: int = setting(0, "seed of the weights' initialisation and the data order", min=0)


@dataclass(frozen=True)
class DataConfig(Settings):
    """Which captions and images to read. Splits are made by image, never by caption."""

    dataset: Dataset = setting("embedded", "which captions to read")
    data_dir: str = setting(help="downloads, caches, runs and models live here (CLIPCAP_DATA)",
                            factory=default_data_dir)
    path: str | None = setting(None, "captions file, image folder or shard glob (found for downloads); hf: a Hub "
                                     "name (nlphuji/flickr30k), a save_to_disk folder, parquet files or a glob")
    images_dir: str | None = setting(None, "where the images named in --path are (default: beside it)")
    image_column: str = setting("image", "csv, hf: column holding the image (csv: its file name; hf: an Image "
                                         "feature, a path or a URL)")
    caption_column: str = setting("caption", "csv, hf: column holding the caption (hf: text or a list of texts; "
                                             "several columns as caption_0,caption_1 or caption_*)")
    split_column: str | None = setting(None, "hf: column holding each row's split (default: 'split' when the table "
                                             "has one; else the table's own splits, else by image)")
    split_values: str = setting("train=train,restval=train,val=val,validation=val,valid=val,dev=val,test=test",
                                "hf: how split values (the column's, or the table's split names) map onto "
                                "train / val / test, as value=split pairs")
    hf_subset: str | None = setting(None, "hf: the set's configuration (subset) name, for Hub sets that have several")
    hf_split: str | None = setting(None, "hf: read only this split of the set, e.g. train or train+test "
                                         "(default: all of them)")
    revision: str | None = setting(None, "hf: the Hub revision (branch, tag or commit) to read; pin it for "
                                         "results others can repeat")
    streaming: bool = setting(False, "hf: read the set row by row without storing the table (sets larger than "
                                     "memory or disk); images are still written once under data_dir/hf-images")
    separator: str = setting(",", "csv: field separator")
    encoding: str | None = setting(None, "text encoding of captions files (default: UTF-8, or what a byte-order "
                                   "mark says; a file that is not UTF-8 is named with the encoding that reads it)")
    val_fraction: float = setting(0.05, "share of images (not captions) held out for validation", min=0, max=0.9)
    test_fraction: float = setting(0.05, "share of images held out for the test split", min=0, max=0.9)
    max_images: int | None = setting(None, "keep only the first N images (quick runs)", min=1)
    embedded_images: int = setting(1200, "size of the generated offline dataset", min=10)

    def conflicts(self) -> list[str]:
        if self.val_fraction + self.test_fraction >= 1:
            return [f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction} leave no images "
                    "for training: together they must stay below 1"]
        return []


@dataclass(frozen=True)
class FeatureConfig(Settings):
    """How CLIP image embeddings are computed and cached (once per dataset and backbone)."""

    backbone: str = setting("ViT-B/32", "CLIP model: any clip.available_models() name, or a local .pt archive")
    batch_size: int = setting(64, "features: images per CLIP forward pass", min=1)
    num_workers: int = setting(2, "features: DataLoader processes that decode and resize images", min=0)
    chunk_size: int = setting(1024, "images per cache chunk: the most work an interruption can lose", min=1)
    fp16: bool = setting(True, "autocast CLIP to fp16 on a GPU (ignored on CPU)")
    cache_dir: str | None = setting(None, "feature cache folder (default: <data_dir>/features/<dataset>-<backbone>)")


Mapper = Literal["transformer", "mlp"]
Freeze = Literal["frozen", "full", "partial"]


@dataclass(frozen=True)
class ModelConfig(Settings):
    """The captioner's shape. Saved inside every checkpoint and bundle and read back on loading, so
    training and inference can never disagree on CLIP width, prefix length or normalisation."""

    mapper: Mapper = setting("transformer", "mapping network from the CLIP embedding to the prefix")
    lm: str = setting("gpt2", "language model: gpt2, distilgpt2, gpt2-medium, any causal LM name or folder")
    backbone: str = setting("ViT-B/32", "the CLIP the features came from (taken from the feature cache)")
    clip_dim: int = setting(512, "width of the CLIP embedding (taken from the feature cache)", min=1)
    prefix_length: int = setting(10, "prefix vectors handed to the LM: the soft prompt's length", min=1)
    clip_length: int = setting(10, "transformer mapper: tokens the CLIP embedding is projected to", min=1)
    num_layers: int = setting(6, "transformer mapper: encoder layers", min=1)
    num_heads: int = setting(8, "transformer mapper: attention heads (must divide the LM's width)", min=1)
    mlp_ratio: float = setting(2.0, "transformer mapper: MLP width / model width", above=0)
    dropout: float = setting(0.0, "dropout inside the mapper", min=0, max=0.9)
    normalize_prefix: bool = setting(False, "L2-normalise the CLIP embedding before the mapper (train and infer)")
    feature_noise: float = setting(0.0, "std of Gaussian noise added to CLIP embeddings while training", min=0)
    freeze: Freeze = setting("partial", "what of the LM learns: frozen: only the mapper (the LM stays in eval "
                                        "mode); full: all of the LM too; partial: the blocks below")
    train_first_blocks: int = setting(0, "partial: how many of the LM's first blocks learn", min=0)
    train_last_blocks: int = setting(2, "partial: how many of the LM's last blocks learn (with its final norm)", min=0)
    max_caption_tokens: int = setting(40, "captions are cut to this many tokens (EOS included)", min=2)
    stop_token: str | None = setting(None, "also end captions at this token ('.' for ClipCap's weights: they never "
                                           "learned EOS)")


Decay = Literal["linear", "cosine", "constant"]
Keep = Literal["all", "history"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class TrainConfig(Settings):
    """The training loop: AdamW under linear warm-up, then decay, as ClipCap trains."""

    epochs: int = setting(10, "passes over the training captions; with --lr-decay-steps unset, the LR decays "
                              "to --min-lr at the end of the last one", min=1)
    batch_size: int = setting(40, "train: captions per micro-batch (per process)", min=1)
    grad_accum: int = setting(1, "micro-batches whose gradients make one optimiser step", min=1)
    lr: float = setting(2e-5, "peak learning rate, reached at the end of the warm-up", min=0)
    min_lr: float = setting(0.0, "learning rate at the end of the decay", min=0)
    warmup_steps: int = setting(5000, "optimiser steps of linear warm-up from 0 to --lr; shortened, with a "
                                      "message, to a third of the decay when longer", min=0)
    lr_batch_size: int = setting(0, "the batch --lr and --warmup-steps are set for (e.g. 40, ClipCap's): at another "
                                    "effective batch (--batch-size x --grad-accum x processes) the warm-up keeps its "
                                    "number of captions and the LR (and --min-lr) scales by sqrt(batch / this); 0: "
                                    "use them as given (on the stand-ins the recipe made batch 128 worse, see README)",
                                 min=0)
    decay: Decay = setting("linear", "how the LR falls after the warm-up")
    lr_decay_steps: int | None = setting(None, "optimiser step where the decay reaches --min-lr (default: the end "
                                               "of --epochs); never changed by --max-steps", min=1)
    weight_decay: float = setting(0.01, "AdamW weight decay, on matrices only", min=0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)", min=0)
    precision: Precision = setting("auto", "auto: bf16 where the GPU has it, else fp16 on a GPU, fp32 on CPU")
    compile: bool = setting(False, "torch.compile the captioner: faster steps after a few minutes of compiling; "
                                   "GPUs of compute capability 7.0+ only (a T4, never a P100)")
    max_steps: int | None = setting(None, "stop after this many optimiser steps (the LR schedule stays that of the "
                                          "whole run, so --resume continues it exactly)", min=1)
    eval_every: int = setting(0, "validation every N steps (0: at the end of each epoch)", min=0)
    checkpoint_minutes: float = setting(10.0, "write a resumable checkpoint every N minutes (0: off); also at each "
                                              "epoch's end, at the end and on Ctrl-C / SIGTERM", min=0)
    checkpoint_every: int = setting(0, "also write one every N optimiser steps (0: off)", min=0)
    log_every: int = setting(10, "optimiser steps between history rows", min=1)
    out_dir: str | None = setting(None, "run folder (default: <data_dir>/runs/<dataset>-<mapper>)")
    resume: bool | Literal["auto"] = setting(False, "continue the run in --out-dir from its checkpoint.pt (refused "
                                                    "when there is none; in Python, resume='auto' continues one if "
                                                    "there is one, else starts)")
    keep: Keep = setting("all", "what a finished run keeps: all (checkpoint.pt to resume or extend it, best.pt, the "
                                "captioner bundle); history (history.json and summary.json only: for comparison "
                                "runs; checkpoints are written while it trains, so an interrupted run resumes)")
    watch_images: int = setting(8, "validation images captioned at every evaluation, to watch captions improve",
                                min=0)
    collapse_warning: float = setting(0.5, "after the warm-up, warn when the watched captions' distinct share stays "
                                           "below this share of their references' (0: never)", min=0, max=1)
    patience: int = setting(0, "stop after this many evaluations without a better validation loss (0: never)", min=0)

    def conflicts(self) -> list[str]:
        if self.min_lr > self.lr:
            return [f"--min-lr {self.min_lr} is above --lr {self.lr}: the decay would raise the learning rate"]
        return []


DECODE_METHODS = ("greedy", "beam", "sample")
Method = Literal["greedy", "beam", "sample"]


class DecodeConfigError(ConfigError):
    """Decoding settings that contradict each other; the message says which and what to change."""


@dataclass(frozen=True)
class DecodeConfig(Settings):
    """How a caption is read out of the LM; transformers' `generate()` does the decoding.

    greedy takes the likeliest token at each step; beam keeps the num_beams likeliest captions so far
    and returns the best; sample draws each token from the softmax at `temperature` (cut to top_k /
    top_p when set), so the same image can get different captions.
    """

    error = DecodeConfigError

    method: Method = setting("greedy", "greedy: the likeliest token each step; beam: the best of --num-beams "
                                       "captions; sample: draw each token")
    num_beams: int = setting(5, "beam: captions kept at each step", read_by=("beam",))
    length_penalty: float = setting(1.0, "beam: ranks by log-prob / length**length_penalty (>1 favours longer)",
                                    read_by=("beam",))
    temperature: float = setting(1.0, "sample: <1 sharpens the distribution (towards greedy), >1 flattens it",
                                 read_by=("sample",))
    top_k: int = setting(0, "sample: draw only from the k likeliest tokens (0: from all)", min=0, read_by=("sample",))
    top_p: float = setting(1.0, "sample: draw only from the likeliest tokens holding this much probability (1: all)",
                           above=0, max=1, read_by=("sample",))
    repetition_penalty: float = setting(1.0, ">1 makes tokens already in the caption less likely", above=0)
    no_repeat_ngram_size: int = setting(0, "never repeat an n-gram of this many tokens (0: allowed)", min=0)
    max_new_tokens: int | None = setting(None, "longest caption in tokens (default: the captioner's "
                                               "max_caption_tokens)", min=1)
    num_return_sequences: int = setting(1, "captions per image: sample draws N, beam returns its N best",
                                        read_by=("beam", "sample"), refused_elsewhere=False)  # greedy: conflicts()
    seed: int | None = setting(None, "sample: the same seed gives the same captions (default: a new draw each call)",
                               read_by=("sample",), refused_elsewhere=False)  # harmless elsewhere: --seed seeds runs
    stop_at_period: bool = setting(False, "also stop after the first '.' (EOS always stops a caption)")

    def conflicts(self) -> list[str]:
        problems = []
        if self.num_beams < 1 or self.num_return_sequences < 1:
            problems.append("num_beams and num_return_sequences must be at least 1")
        if self.method == "sample" and self.temperature <= 0:
            problems.append(f"temperature must be above 0, not {self.temperature} (method 'greedy' is the limit "
                            "of temperature -> 0)")
        if self.method == "greedy" and self.num_return_sequences > 1:
            problems.append("greedy decoding gives one caption per image: for several use method 'sample' (or "
                            "'beam' with num_return_sequences <= num_beams)")
        if self.method == "beam" and self.num_return_sequences > self.num_beams:
            problems.append(f"beam search returns at most num_beams ({self.num_beams}) captions, not "
                            f"num_return_sequences={self.num_return_sequences}")
        return problems


# Which decoding methods read a DecodeConfig field (a field not here: every method), stated once, on the fields.
READ_BY = {f.name: f.metadata["read_by"] for f in dataclasses.fields(DecodeConfig) if "read_by" in f.metadata}
# Settings that only one method reads: given to another, decode_config refuses them rather than leave them unused.
METHOD_ONLY = {f.name: f.metadata["read_by"][0] for f in dataclasses.fields(DecodeConfig)
               if f.metadata.get("refused_elsewhere")}
assert all(len(READ_BY[name]) == 1 for name in METHOD_ONLY), "a refused setting names one method"


def reads(method: str, field: str) -> bool:
    """Whether decoding with `method` reads the DecodeConfig field."""
    return method in READ_BY.get(field, DECODE_METHODS)


def decode_config(base: DecodeConfig | None = None, **given) -> DecodeConfig:
    """`base` (default: DecodeConfig()) with the settings `given`, refusing any the method would ignore:
    `temperature=0.5` with greedy decoding would change nothing, which is never what was meant."""
    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise DecodeConfigError(f"unknown decoding setting(s) {', '.join(unknown)}; DecodeConfig has "
                                f"{', '.join(sorted(names))}.")
    decode = dataclasses.replace(base or DecodeConfig(), **given)
    unused = [name for name in given if METHOD_ONLY.get(name, decode.method) != decode.method]
    if unused:
        name, method = unused[0], METHOD_ONLY[unused[0]]
        raise DecodeConfigError(f"{name} only applies to method '{method}', but the method is '{decode.method}': "
                                f"add method='{method}' (--method {method}), or leave {name} out.")
    return decode


def standin_preset() -> tuple[ModelConfig, TrainConfig]:
    """Settings that train the tiny offline stand-ins on the embedded set in a few CPU minutes.

    The stand-in GPT-2 is pre-fitted on caption text but tiny (width 64), so all of it trains (`full`: in
    notebook 03's comparison it reaches the lowest validation loss; `frozen` and `partial` learn too), at
    a learning rate fit for a model that small.
    """
    return (ModelConfig(freeze="full", num_heads=4),
            TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_steps=100, log_every=5))


def default_configs(offline: bool) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings the course starts from: offline, the stand-in preset."""
    return standin_preset() if offline else (ModelConfig(), TrainConfig())


def run_freeze(model: ModelConfig, offline: bool) -> str | None:
    """The freeze that names a run's folder (paths.run_dir): None at the course's own setting, so the main job,
    the notebooks and `train` share one run; another freeze trains in a folder of its own."""
    return None if model.freeze == default_configs(offline)[0].freeze else model.freeze


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None, base=None) -> None:
    """Give `parser` one `--flag` per field of the dataclass `cls` (or of `only` those fields), with the
    field's help text, its default (that of `base` where it differs: the offline preset) and its choices.

    The flags' own defaults are None, so `from_arguments` can tell a flag given from one left out."""
    hints = typing.get_type_hints(cls)
    doc = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".")  # the first sentence
    group = parser.add_argument_group(f"{cls.__name__}: {doc}" if doc else cls.__name__)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = getattr(defaults, f.name)
        shown = "unset" if default is None else default
        if f.name == "data_dir":
            shown = "CLIPCAP_DATA, else ./data"
        if base is not None and getattr(base, f.name) != default:
            shown = f"{shown}; offline: {getattr(base, f.name)}"
        text = f.metadata.get("help", "")
        if "(default" not in text or default is not None:
            text += f" (default: {shown})"
        text = text.replace("%", "%%")
        kind, choices = _base_type(hints[f.name]), choices_of(hints[f.name])
        if kind is bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(flag(f.name), dest=f.name, type=str if choices else kind, default=None,
                               choices=choices, help=text, metavar=_metavar(kind, choices))


def given_arguments(cls: type, args: argparse.Namespace) -> dict:
    """The fields of `cls` whose flags were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def from_arguments(cls: type, args: argparse.Namespace, base=None):
    """Build `cls` from parsed flags: a flag left out keeps the value of `base` (default: the defaults).
    The dataclass checks the result (ConfigError)."""
    return dataclasses.replace(base if base is not None else cls(), **given_arguments(cls, args))


def _metavar(kind: type, choices) -> str | None:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {int: "N", float: "X", str: None}.get(kind)


def _base_type(hint) -> type:
    """`int | None` -> int, so argparse can convert the flag's text."""
    if hint is bool or bool in typing.get_args(hint):
        return bool
    if choices_of(hint) is not None:
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
