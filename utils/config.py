"""The settings every stage takes, as dataclasses holding the course's defaults.

Notebooks set a few fields; the CLI turns each field into a flag of the same name
(`batch_size` -> `--batch-size`), so a notebook and a command line can never mean different things.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from .paths import default_data_dir
from .controls import METHOD_ONLY  # settings only one method reads: the table of decoding controls

DATASETS = ("embedded", "flickr30k", "food", "coco", "karpathy", "csv", "folder", "webdataset")


@dataclass
class RuntimeConfig:
    """Where the run happens and whether it may reach the model hubs."""

    offline: bool | None = None  # None: CLIPCAP_OFFLINE, else probe the network; True: stand-in models
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    seed: int = 0


@dataclass
class DataConfig:
    """Which captions and images to read. Splits are made by image, never by caption."""

    dataset: str = "embedded"  # one of DATASETS
    data_dir: str = field(default_factory=default_data_dir)  # downloads and caches live here
    path: str | None = None  # captions file, image folder or shard glob; found for downloads
    images_dir: str | None = None  # where the images named in `path` are (default: beside it)
    image_column: str = "image"  # csv: column holding the image file name
    caption_column: str = "caption"  # csv: column holding the caption
    separator: str = ","  # csv: field separator
    encoding: str | None = None  # text encoding of captions files (None: UTF-8, or what a byte-order mark says)
    val_fraction: float = 0.05  # share of images (not captions) held out for validation
    test_fraction: float = 0.05  # share of images held out for the test split
    max_images: int | None = None  # keep only the first N images (quick runs)
    embedded_images: int = 1200  # size of the generated offline dataset


@dataclass
class FeatureConfig:
    """How CLIP image embeddings are computed and cached (once per dataset and backbone)."""

    backbone: str = "ViT-B/32"  # any clip.available_models() name, or a local .pt archive
    batch_size: int = 64  # images per forward pass
    num_workers: int = 2  # DataLoader processes that decode and resize images
    chunk_size: int = 1024  # images per cache chunk: the most work an interruption can lose
    fp16: bool = True  # autocast to fp16 on a GPU (ignored on CPU)
    cache_dir: str | None = None  # default: <data_dir>/features/<dataset>-<backbone>


@dataclass
class ModelConfig:
    """The captioner's shape. Saved inside every checkpoint and bundle and read back on loading, so
    training and inference can never disagree on CLIP width, prefix length or normalisation."""

    mapper: str = "transformer"  # transformer | mlp
    lm: str = "gpt2"  # gpt2 | distilgpt2 | gpt2-medium | any causal LM name or folder
    backbone: str = "ViT-B/32"  # the CLIP the features came from (taken from the feature cache)
    clip_dim: int = 512  # width of the CLIP embedding (taken from the feature cache)
    prefix_length: int = 10  # prefix vectors handed to the LM: the soft prompt's length
    clip_length: int = 10  # transformer mapper: tokens the CLIP embedding is projected to
    num_layers: int = 6  # transformer mapper: encoder layers
    num_heads: int = 8  # transformer mapper: attention heads (must divide the LM's width)
    mlp_ratio: float = 2.0  # transformer mapper: MLP width / model width
    dropout: float = 0.0  # dropout inside the mapper
    normalize_prefix: bool = False  # L2-normalise the CLIP embedding before the mapper (train and infer)
    feature_noise: float = 0.0  # std of Gaussian noise added to CLIP embeddings while training
    freeze: str = "partial"  # frozen: only the mapper learns | full: all of the LM too | partial: blocks below
    train_first_blocks: int = 0  # partial: how many of the LM's first blocks learn
    train_last_blocks: int = 2  # partial: how many of the LM's last blocks learn (with its final norm)
    max_caption_tokens: int = 40  # captions are cut to this many tokens (EOS included)
    stop_token: str | None = None  # also end captions at this token ("." for ClipCap's weights: they never learned EOS)


@dataclass
class TrainConfig:
    """The training loop: AdamW under linear warm-up, then decay, as ClipCap trains."""

    epochs: int = 10
    batch_size: int = 40  # captions per optimiser step (before accumulation)
    grad_accum: int = 1  # batches whose gradients are summed per optimiser step
    lr: float = 2e-5  # peak learning rate, reached after warmup_steps
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_steps: int = 5000  # optimiser steps of linear warm-up from 0 to lr
    decay: str = "linear"  # linear | cosine | constant (after the warm-up)
    weight_decay: float = 0.01  # AdamW weight decay, on matrices only
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    precision: str = "auto"  # auto (bf16 where supported, else fp16 on a GPU; fp32 on CPU) | fp32 | fp16 | bf16
    max_steps: int | None = None  # stop after this many optimiser steps (quick runs)
    eval_every: int = 0  # validation every N steps; 0: at the end of each epoch
    checkpoint_every: int = 1000  # write a resumable checkpoint every N steps (and at each epoch end)
    log_every: int = 10  # steps between history rows
    out_dir: str | None = None  # default: <data_dir>/runs/<dataset>-<mapper>
    resume: bool = False  # continue from out_dir/checkpoint.pt
    num_workers: int = 0  # batches are gathered from an in-memory cache: no workers needed
    watch_images: int = 8  # validation images captioned at every evaluation, to watch captions improve
    collapse_warning: float = 0.5  # warn when fewer than this share of watched captions are distinct
    patience: int = 0  # stop after this many evaluations without a better validation loss (0: never)


DECODE_METHODS = ("greedy", "beam", "sample")


class DecodeConfigError(ValueError):
    """Decoding settings that contradict each other; the message says which and what to change."""


@dataclass
class DecodeConfig:
    """How a caption is read out of the LM; transformers' `generate()` does the decoding.

    greedy takes the likeliest token at each step; beam keeps the num_beams likeliest captions so far
    and returns the best; sample draws each token from the softmax at `temperature` (cut to top_k /
    top_p when set), so the same image can get different captions.
    """

    method: str = "greedy"  # greedy | beam | sample
    num_beams: int = 5  # beam: captions kept at each step
    length_penalty: float = 1.0  # beam: ranks by log-prob / length**length_penalty (>1 favours longer)
    temperature: float = 1.0  # sample: <1 sharpens the distribution (towards greedy), >1 flattens it
    top_k: int = 0  # sample: draw only from the k likeliest tokens (0: from all)
    top_p: float = 1.0  # sample: draw only from the likeliest tokens holding this much probability (1: all)
    repetition_penalty: float = 1.0  # >1 makes tokens already in the caption less likely
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this many tokens (0: allowed)
    max_new_tokens: int | None = None  # default: the captioner's max_caption_tokens
    num_return_sequences: int = 1  # captions per image: sample draws N, beam returns its N best
    seed: int | None = None  # sample: the same seed gives the same captions (None: a new draw each call)
    stop_at_period: bool = False  # also stop after the first "." (EOS always stops a caption)

    def __post_init__(self):
        problems = []
        if self.method not in DECODE_METHODS:
            problems.append(f"method must be one of {', '.join(DECODE_METHODS)}, not {self.method!r}")
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
        if problems:
            raise DecodeConfigError("; ".join(problems) + ".")


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

    The stand-in GPT-2 starts from random weights, so unlike the real one it must learn language as
    well as images: all of it trains, at a learning rate fit for a model that small.
    """
    return (ModelConfig(freeze="full", num_heads=4),
            TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_steps=100, checkpoint_every=200, log_every=5))


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None) -> None:
    """Give `parser` one `--flag` per field of the dataclass `cls` (or of `only` those fields)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            choices = {"dataset": DATASETS, "method": DECODE_METHODS}.get(f.name)
            group.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices)


def given_arguments(cls: type, args: argparse.Namespace) -> dict:
    """The fields of `cls` whose flags were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def from_arguments(cls: type, args: argparse.Namespace, base=None):
    """Build `cls` from parsed flags: a flag left out keeps the value of `base` (default: the defaults)."""
    return dataclasses.replace(base if base is not None else cls(), **given_arguments(cls, args))


def _base_type(hint) -> type:
    """`int | None` -> int, so argparse can convert the flag's text."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
