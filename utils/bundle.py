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

import copy
import dataclasses
import json
import re
import struct
import zipfile
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .files import atomic_dir, read_json, write_json
from .mapper import build_mapper
from .model import CaptionerError
from .paths import FEATURES, RUNS, data_dir, in_data, relative_to_data
from .sources import NO_REMOTE_CODE, lm_class, load_tokenizer
from .standin_names import is_standin

BUNDLE_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a bundle's or an LM's config.json: a few KB
# The most a bundle may ask for, checked before anything is built or allocated: generous for any LM a course
# could caption with (Llama 3 405B: 126 layers, width 16,384, vocabulary 128,256), far below what would
# exhaust a machine (a config with 5,000 layers took over 5 minutes to build).
LM_LIMITS = {"layers": 256, "width": 65_536, "heads": 1_024, "vocabulary": 1 << 20, "positions": 1 << 20}
_LM_KEYS = {"layers": ("n_layer", "num_hidden_layers", "num_layers", "num_decoder_layers", "n_layers",
                       "encoder_layers", "decoder_layers"),
            "width": ("n_embd", "hidden_size", "d_model", "n_inner", "intermediate_size", "d_ff", "d_kv", "ffn_dim",
                      "encoder_ffn_dim", "decoder_ffn_dim"),
            "heads": ("n_head", "num_attention_heads", "num_heads", "num_key_value_heads",
                      "encoder_attention_heads", "decoder_attention_heads"),
            "vocabulary": ("vocab_size",),
            "positions": ("n_positions", "n_ctx", "max_position_embeddings")}
MAPPER_LIMITS = {"clip_dim": 16_384, "prefix_length": 1_024, "clip_length": 1_024, "num_layers": 64,
                 "num_heads": 1_024, "mlp_ratio": 64, "max_caption_tokens": 4_096}
MAX_BUFFER_BYTES = 1 << 30  # what an LM may allocate beyond its weights (position tables, masks)
# what config.json's "summary" may hold: these keys with these types, any other key a plain value
_SUMMARY_TYPES = {"steps": int, "epochs": int, "best_val_loss": (int, float, type(None)), "features": (str, type(None)),
                  "dataset": (str, type(None)), "standin": bool, "data_dir": (str, type(None)),
                  "features_fingerprint": (str, type(None)), "clip_precision": (str, type(None)),
                  "imported_from": str, "clipcap": bool}
_SCALAR = (str, int, float, bool, type(None))
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a file's header


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
    if problem := summary_problem(summary):  # what load would refuse is never written
        raise CaptionerError(f"cannot save the bundle {path}: its {' '.join(problem)} (nothing was written).")
    with atomic_dir(path) as tmp:
        model.lm.save_pretrained(tmp / "lm")
        model.tokenizer.save_pretrained(tmp / "lm")
        save_file({k: v.contiguous() for k, v in model.mapper.state_dict().items()}, str(tmp / "mapper.safetensors"))
        write_json(tmp / "config.json", {"bundle_version": BUNDLE_VERSION, "summary": summary,
                                         "model": dataclasses.asdict(model.config)})
    return path


def load(cls, path: str | Path, device: str | torch.device = "cpu"):
    """A `cls` (CaptionModel or a subclass) from the bundle at `path`, with `.summary` and `.bundle_path`;
    CaptionerError saying what to do when the folder is not a bundle, or a damaged one.

    Everything is checked before anything is built: config.json against its schema, the LM's config for code
    it asks to run (refused: nothing in a bundle is executed) and for sizes within LM_LIMITS, and the tensors
    each safetensors file declares (names, shapes, sizes) against those the model has, so missing or extra
    weights are refused instead of being initialised at random."""
    from safetensors.torch import load_file

    from .bundle_files import resolve_bundle

    path = resolve_bundle(path)  # a folder as it is; a .clipcap file, a Hub id or a Kaggle handle fetched first
    if not (path / "config.json").is_file():
        raise CaptionerError(f"{path} is not a captioner bundle (no config.json): train one with "
                             "`python -m utils train` or export one from a checkpoint.")
    config, summary = read_bundle_config(path / "config.json")
    check_lm_folder(path / "lm")
    try:  # safetensors holds tensors only: a file carrying pickled code fails here, unexecuted
        cls_lm, lm_config = lm_class(path / "lm")  # a causal LM, or an encoder-decoder (T5)
        check_weights(path, config, cls_lm, lm_config)
        lm = cls_lm.from_pretrained(path / "lm", config=lm_config, **NO_REMOTE_CODE)
        model = cls(config, lm, load_tokenizer(path / "lm"))
        model.mapper.load_state_dict(load_file(str(path / "mapper.safetensors")))
    except CaptionerError:
        raise
    except Exception as exc:  # JSON, config, transformers and safetensors each fail in their own way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CaptionerError(f"{path} is damaged or its parts do not fit its config.json ({reason}); copy or "
                             "make the bundle again.") from None
    model.summary, model.bundle_path = summary, path
    return model.to(device).eval()


# ---- what a bundle may hold, checked before anything is built -------------------------------------------

def _small_json(file: Path) -> dict:
    """A config file's JSON object, its size bounded before it is read; CaptionerError naming the file."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CaptionerError(f"{file} is {size:,} bytes, over the {MAX_CONFIG_BYTES:,} a config file may "
                                 "have: it is damaged or not a captioner's; copy or make the bundle again.")
        obj = json.loads(file.read_bytes())
    except CaptionerError:
        raise
    except OSError as exc:
        raise CaptionerError(f"{file} cannot be read ({exc.strerror or exc}): check it, or copy the bundle "
                             "again.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"{file} is not valid JSON ({exc}): the bundle is damaged; copy or make it "
                             "again.") from None
    if not isinstance(obj, dict):
        raise CaptionerError(f"{file} holds a JSON {_json_kind(obj)}, not an object: the bundle is damaged; "
                             "copy or make it again.")
    return obj


def _json_kind(value) -> str:
    return {list: "array", str: "string", dict: "object", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_bundle_config(file: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, summary) of a bundle's config.json, each field checked by type and range;
    CaptionerError naming the file and the field that does not fit."""
    meta = _small_json(file)

    def refuse(field: str, why: str) -> CaptionerError:
        return CaptionerError(f"{file}: {field} {why}; the bundle is damaged or was not made by this course: "
                              "copy or make it again.")

    if meta.get("bundle_version") != BUNDLE_VERSION:
        raise CaptionerError(f"{file.parent} is a version {meta.get('bundle_version')!r} bundle; this course reads "
                             f"version {BUNDLE_VERSION}.")
    for key in meta:
        if key not in ("bundle_version", "summary", "model"):
            raise refuse(key, "is not a field of a bundle's config.json (bundle_version, summary, model)")
    summary, model = meta.get("summary", {}), meta.get("model")
    if not isinstance(summary, dict):
        raise refuse("summary", f"is a JSON {_json_kind(summary)}, not an object")
    if problem := summary_problem(summary):
        raise refuse(*problem)
    if not isinstance(model, dict):
        raise refuse("model", f"is {'missing' if model is None else 'a JSON ' + _json_kind(model)}, not an "
                              "object of the captioner's settings")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in model:
        if key not in fields:
            raise refuse(f"model.{key}", "is not a setting of this course's captioner")
    try:
        config = ModelConfig(**model)
    except ConfigError as exc:
        raise refuse("model", f"does not hold settings this course takes ({exc})") from None
    for key, limit in MAPPER_LIMITS.items():
        if getattr(config, key) > limit:
            raise refuse(f"model.{key}", f"is {getattr(config, key):,}, over the limit of {limit:,} this course loads")
    backbone = Path(config.backbone).expanduser()
    if not is_standin(config.backbone) and backbone.exists() and not (backbone.is_file()
                                                                      and zipfile.is_zipfile(backbone)):
        raise refuse("model.backbone", f"names {backbone}, a local {'file' if backbone.is_file() else 'folder'} "
                                       "that is not a CLIP archive (clip.load reads a .pt archive, a zip file)")
    return config, summary


def summary_problem(summary: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for a summary that is not the known keys with their types and any other key
    a plain value; None when it fits."""
    for key, value in summary.items():
        want = _SUMMARY_TYPES.get(key, _SCALAR)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            shown = json.dumps(value, default=repr)[:60]
            return f"summary.{key}", f"is {shown}, not {'a plain value' if want is _SCALAR else _type_names(want)}"
    return None


def _type_names(types) -> str:
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


def check_lm_folder(lm: Path) -> None:
    """Refuse an LM folder whose config asks to run code it ships (`auto_map`), or whose sizes are past
    LM_LIMITS, before transformers reads it."""
    if not (lm / "config.json").is_file():
        raise CaptionerError(f"{lm} holds no config.json: the bundle is damaged; copy or make it again.")
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        file = lm / name
        if file.is_file():
            asks = _small_json(file).get("auto_map")
            if asks is not None:
                raise CaptionerError(f"{file} asks to run Python code shipped with the bundle (its \"auto_map\": "
                                     f"{json.dumps(asks)[:100]}): refused, nothing in it was run. This course loads "
                                     "only language models transformers itself defines; do not use this bundle.")
    config = _small_json(lm / "config.json")
    for part in (config, *(v for v in config.values() if isinstance(v, dict))):  # text_config, encoder, ...
        for what, keys in _LM_KEYS.items():
            for key in keys:
                value = part.get(key)
                if value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise CaptionerError(f"{lm / 'config.json'}: {key} is {json.dumps(value)[:40]}, not a whole "
                                         "number: the bundle is damaged; copy or make it again.")
                if value > LM_LIMITS[what]:
                    raise CaptionerError(f"{lm / 'config.json'}: {key} is {value:,}, over the limit of "
                                         f"{LM_LIMITS[what]:,} {what} this course loads: refused before anything "
                                         "was built. The bundle is damaged or not a captioner's.")


def safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} a safetensors file declares, read from its header alone and checked
    against the file's size (every tensor's bytes inside the file, as many as its shape needs)."""
    def damaged(why: str) -> CaptionerError:
        return CaptionerError(f"{file} is not a complete safetensors file ({why}): the bundle is damaged; copy "
                              "or make it again.")

    if not file.is_file():
        raise CaptionerError(f"{file} is missing: the bundle is damaged or incomplete; copy or make it again.")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise damaged(f"{size} bytes")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise damaged(f"a header of {length:,} bytes in a file of {size:,}")
            header = json.loads(f.read(length))
    except CaptionerError:
        raise
    except OSError as exc:
        raise CaptionerError(f"{file} cannot be read ({exc.strerror or exc}): check it, or copy the bundle "
                             "again.") from None
    except (ValueError, UnicodeDecodeError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    data = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in _DTYPE_BYTES and all(isinstance(n, int) and n >= 0 for n in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise damaged(f"{name} is declared as {json.dumps(entry)[:80]}")
        numel = 1
        for n in shape:
            numel *= n
        if not start <= end <= data or end - start != numel * _DTYPE_BYTES[dtype]:
            raise damaged(f"{name} {list(shape)} {dtype} needs {numel * _DTYPE_BYTES[dtype]:,} bytes, the file holds "
                          f"{max(0, min(end, data) - start):,} of them")
        tensors[name] = (dtype, shape)
    return tensors


def _weight_files(lm: Path) -> list[Path]:
    """The safetensors files of an LM folder: model.safetensors, or the shards its index names."""
    index = lm / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _small_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and re.fullmatch(r"[\w.-]+\.safetensors", v)
                                                       for v in weight_map.values()):
            raise CaptionerError(f"{index} does not map tensor names to shard files beside it: the bundle is "
                                 "damaged; copy or make it again.")
        return [lm / name for name in sorted(set(weight_map.values()))]
    if not (lm / "model.safetensors").is_file():
        raise CaptionerError(f"{lm} holds no model.safetensors: a bundle's LM weights are safetensors files "
                             "(never pickles); copy or make the bundle again.")
    return [lm / "model.safetensors"]


def _compare(where: str, have: dict[str, tuple], module: torch.nn.Module, ignore_extra=(), ignore_missing=()) -> None:
    """Refuse when the tensors a file declares (`have`: name -> (dtype, shape)) are not those `module` holds:
    one missing (a tied copy counts once), one it has no place for, or one of another shape."""
    groups: dict[int, list[str]] = {}  # tied weights are one tensor under several names: the file holds one
    shapes = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        shapes[name] = tuple(tensor.shape)
    problems = [f"it lacks {names[0]} {list(shapes[names[0]])}" for names in groups.values()
                if not any(n in have for n in names) and not any(re.search(p, names[0]) for p in ignore_missing)]
    problems += [f"{name} is {list(shape)} in the file, {list(shapes[name])} in the model" for name, (_, shape)
                 in have.items() if name in shapes and shape != shapes[name]]
    problems += [f"it holds {name}, which the model has no place for" for name in have
                 if name not in shapes and not any(re.search(p, name) for p in ignore_extra)]
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CaptionerError(f"{where} does not hold the weights its config.json describes: {'; '.join(problems[:2])}"
                             f"{more}. Refused rather than filled with random weights: the bundle is damaged; "
                             "copy or make it again.")


def check_weights(path: Path, config: ModelConfig, cls_lm, lm_config) -> int:
    """Check the LM's and the mapper's safetensors files against the model the configs describe, built on
    PyTorch's meta device (shapes only, no memory); returns the LM's width."""
    with torch.device("meta"):
        lm = cls_lm.from_config(copy.deepcopy(lm_config))
        buffers = sum(b.numel() * b.element_size() for b in lm.buffers())
        if buffers > MAX_BUFFER_BYTES:
            raise CaptionerError(f"{path / 'lm' / 'config.json'} describes an LM that would allocate "
                                 f"{buffers / 2**30:.1f} GiB beside its weights, over the limit of "
                                 f"{MAX_BUFFER_BYTES / 2**30:g} GiB: refused before anything was built.")
        lm_dim = lm.get_input_embeddings().embedding_dim
        mapper = build_mapper(config.mapper, config.clip_dim, lm_dim, config.prefix_length, config.clip_length,
                              config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
    have = {}
    for file in _weight_files(path / "lm"):
        have |= safetensors_header(file)
    _compare(str(path / "lm"), have, lm, getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or (),
             getattr(lm, "_keys_to_ignore_on_load_missing", None) or ())
    _compare(str(path / "mapper.safetensors"), safetensors_header(path / "mapper.safetensors"), mapper)
    return lm_dim


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

