"""Captioner bundles: one self-contained folder a captioner is saved to and loaded from in one call.

    config.json          bundle_version, the ModelConfig, and a summary of how it was made
    mapper.safetensors   the mapper's weights (tensors only: nothing in the file is ever run)
    lm/                  the language model and its tokenizer (their save_pretrained files)

The summary names the feature cache the captioner was trained on RELATIVE to the data folder
("features/embedded-standin-ViT"), with the cache's fingerprint and the dtype rule its features were
encoded with, so a bundle carried to another machine with its data folder still finds its cache
(`training_cache`), and says plainly where it looked when the cache is not there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ModelConfig
from .files import atomic_dir, read_json, write_json
from .model import CaptionerError
from .paths import FEATURES, RUNS, data_dir, in_data, relative_to_data
from .sources import NO_REMOTE_CODE, lm_class, load_tokenizer

BUNDLE_VERSION = 1


def save(model, path: str | Path, summary: dict | None = None) -> Path:
    """Write `model` (a CaptionModel) as a bundle at `path`, replacing an older bundle there whole.

    A `summary["features"]` naming a feature cache is recorded relative to the data folder, with the
    cache's fingerprint (see `cache_reference`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not (path / "config.json").is_file() and any(path.iterdir()):
        raise CaptionerError(f"{path} exists and is not a captioner bundle: a bundle replaces its folder "
                             "whole, so choose a new folder for it (nothing was written).")
    summary = dict(summary or {})
    if summary.get("features") and "features_fingerprint" not in summary:  # a path, not yet a reference
        summary.update(cache_reference(summary["features"]))
    with atomic_dir(path) as tmp:
        model.lm.save_pretrained(tmp / "lm")
        model.tokenizer.save_pretrained(tmp / "lm")
        save_file({k: v.contiguous() for k, v in model.mapper.state_dict().items()}, str(tmp / "mapper.safetensors"))
        write_json(tmp / "config.json", {"bundle_version": BUNDLE_VERSION, "summary": summary,
                                         "model": dataclasses.asdict(model.config)})
    return path


def load(cls, path: str | Path, device: str | torch.device = "cpu"):
    """A `cls` (CaptionModel or a subclass) from the bundle at `path`, with `.summary` and `.bundle_path`;
    CaptionerError saying what to do when the folder is not a bundle, or a damaged one."""
    from safetensors.torch import load_file

    from .share import resolve_bundle

    path = resolve_bundle(path)  # a folder as it is; a .clipcap file, a Hub id or a Kaggle handle fetched first
    if not (path / "config.json").is_file():
        raise CaptionerError(f"{path} is not a captioner bundle (no config.json): train one with "
                             "`python -m utils train` or export one from a checkpoint.")
    try:  # safetensors holds tensors only: a file carrying pickled code fails here, unexecuted
        meta = read_json(path / "config.json")
        if meta.get("bundle_version") != BUNDLE_VERSION:
            raise CaptionerError(f"{path} is a version {meta.get('bundle_version')} bundle; this course reads "
                                 f"version {BUNDLE_VERSION}.")
        config = ModelConfig(**meta["model"])
        cls_lm, lm_config = lm_class(path / "lm")  # a causal LM, or an encoder-decoder (T5)
        lm = cls_lm.from_pretrained(path / "lm", config=lm_config, **NO_REMOTE_CODE)
        model = cls(config, lm, load_tokenizer(path / "lm"))
        model.mapper.load_state_dict(load_file(str(path / "mapper.safetensors")))
    except CaptionerError:
        raise
    except Exception as exc:  # JSON, config, transformers and safetensors each fail in their own way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CaptionerError(f"{path} is damaged or its parts do not fit its config.json ({reason}); copy or "
                             "make the bundle again.") from None
    model.summary, model.bundle_path = meta.get("summary", {}), path
    return model.to(device).eval()


# ---- the training cache a bundle names ----------------------------------------------------------------

def cache_data_dir(cache: str | Path) -> Path:
    """The data folder a feature cache belongs to: the current one when the cache lies in it, else the
    folder holding its `features/` folder (the layout paths.py decides), else the cache's own folder."""
    cache = Path(cache).resolve()
    current = data_dir().resolve()
    if cache.is_relative_to(current):
        return current
    return cache.parent.parent if cache.parent.name == FEATURES else cache.parent


def cache_reference(cache: str | Path) -> dict:
    """What a bundle records about its training cache: the path relative to its data folder, the data
    folder it was in, the images' fingerprint and the dtype rule its features were encoded with."""
    root = cache_data_dir(cache)
    meta_path = Path(cache) / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    return {"features": relative_to_data(cache, root), "data_dir": root.as_posix(),
            "features_fingerprint": meta.get("images_fingerprint"), "clip_precision": meta.get("clip_precision")}


def find_training_cache(summary: dict, bundle_path: str | Path | None = None,
                        data: str | Path | None = None) -> Path:
    """The folder of the feature cache a bundle was trained on, on this machine; CaptionerError saying where it
    looked and what to do when it is not here, or when the cache found there holds other images.

    Looked for, in order: the data folder `data` (default: CLIPCAP_DATA or the usual one); the data folder
    it was trained in; the data folder the bundle sits in (<data>/runs/<run>/captioner); an absolute path
    as older bundles recorded it.
    """
    recorded = summary.get("features")
    if not recorded:
        which = f"the bundle {bundle_path}" if bundle_path else "this bundle"
        raise CaptionerError(f"{which} does not name the feature cache it was trained on: pass --features "
                             "CACHE_DIR.")
    tried, other = [], None
    for candidate in _candidates(recorded, summary.get("data_dir"), bundle_path, data):
        if candidate in tried:
            continue
        tried.append(candidate)
        if not (candidate / "meta.json").is_file():
            continue
        want = summary.get("features_fingerprint")
        have = read_json(candidate / "meta.json").get("images_fingerprint")
        if want and have != want:
            other = other or candidate
            continue
        return candidate
    if other is not None:
        raise CaptionerError(f"the feature cache at {other} is not the one this captioner was trained on: it "
                             "holds other images (its fingerprint differs). Pass --features "
                             f"{other} to use it anyway, or --features with the cache it was trained on.")
    raise CaptionerError(f"the feature cache this captioner was trained on ({recorded}) is not on this machine: "
                         f"looked in {', '.join(map(str, tried))}. Copy that folder into your data folder "
                         f"({data_dir(data)}; CLIPCAP_DATA sets it), or pass --features CACHE_DIR.")


def _candidates(recorded: str, made_in: str | None, bundle_path, data) -> list[Path]:
    folders = [data_dir(data)]
    if made_in:  # the data folder the captioner was trained in, if this machine still has it
        folders.append(Path(made_in))
    if bundle_path is not None:  # <data>/runs/<run>/captioner: the data folder came along with the bundle
        bundle = Path(bundle_path).resolve()
        if bundle.parent.parent.name == RUNS:
            folders.append(bundle.parent.parent.parent)
    recorded_path = Path(recorded)
    if not recorded_path.is_absolute():
        return [in_data(recorded_path, folder) for folder in folders]
    found = [recorded_path]
    if recorded_path.parent.name == FEATURES:  # an old bundle's absolute path: the same name in these folders
        found += [folder / FEATURES / recorded_path.name for folder in folders]
    return found

