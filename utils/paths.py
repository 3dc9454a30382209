"""Where things live, decided once: the data folder and the folders inside it.

    <data folder>/              CLIPCAP_DATA, else /kaggle/working/data on Kaggle, else data/ of the checkout
        models/                 downloaded CLIP weights and the built stand-ins
        features/<name>/        feature caches (the name: see default_cache_dir)
        runs/<dataset>-<mapper>/  a training run at the course's own settings: checkpoints, history, results
        runs/<dataset>-<mapper>-<freeze>/  one whose freeze was chosen (a notebook's `freeze`, the main job's
                                  --freeze other than its default), so the two never resume each other
            captioner/          the run's captioner bundle

Every module and notebook asks here (`course_paths()` for all of them at once) rather than joining the
names itself, so moving the data folder is one setting (CLIPCAP_DATA), and a bundle can name its feature
cache relative to the data folder (`relative_to_data`) and find it again after the folder moved.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .runtime import detect_platform
from .standin_names import clip_standin_name

MODELS, FEATURES, RUNS, BUNDLE = "models", "features", "runs", "captioner"


def default_data_dir() -> str:
    """CLIPCAP_DATA, else Kaggle's writable /kaggle/working, else `data/` of the checkout we run from."""
    if os.environ.get("CLIPCAP_DATA"):
        return os.environ["CLIPCAP_DATA"]
    if detect_platform() == "kaggle":
        return "/kaggle/working/data"
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return str(checkout / "data")
    return str(Path.cwd() / "data")


def user_cache(override_env: str) -> Path:
    """The course's per-machine folder outside any data folder (the stand-ins, unpacked .clipcap files):
    `$override_env`, else `$XDG_CACHE_HOME/clipcap-course`, else `~/.cache/clipcap-course`."""
    base = os.environ.get(override_env) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipcap-course"
    return Path(base).expanduser()


def data_dir(given: str | Path | None = None) -> Path:
    """The data folder: `given`, else the default one."""
    return Path(given or default_data_dir())


def models_dir(data: str | Path | None = None) -> Path:
    """CLIP downloads and the stand-in models."""
    return data_dir(data) / MODELS


def features_dir(data: str | Path | None = None) -> Path:
    """The folder holding the feature caches."""
    return data_dir(data) / FEATURES


def run_dir(data: str | Path | None, dataset: str, mapper: str, freeze: str | None = None) -> Path:
    """The default folder of a training run: one per dataset and mapper at the course's own settings, and one
    more per `freeze` chosen apart from them (`<dataset>-<mapper>-<freeze>`): a run trained with other
    settings never lands in, and fails to resume, the folder of another."""
    return data_dir(data) / RUNS / (f"{dataset}-{mapper}" + (f"-{freeze}" if freeze else ""))


def bundle_dir(run: str | Path) -> Path:
    """The captioner bundle a training run exports."""
    return Path(run) / BUNDLE


@dataclass(frozen=True)
class CoursePaths:
    """The folders of one run of the course, as the notebooks' paths cell prints them."""

    data: Path
    models: Path
    cache: Path  # the feature cache notebook 02 makes
    run: Path  # the training run notebook 03 makes
    bundle: Path  # the captioner bundle the run exports, read by notebooks 04 and 05


class DataPlace(Protocol):
    """What the folder rules read of a `config.DataConfig` (config.py is the layer above: it asks here for
    the data folder, so this module does not import it)."""

    dataset: str
    data_dir: str
    path: str | None
    images_dir: str | None
    hf_subset: str | None
    hf_split: str | None
    revision: str | None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def is_local(spec: str) -> bool:
    """--path names files on this machine (a folder, a file, a glob), not a Hub set."""
    return Path(spec).expanduser().exists() or glob.has_magic(spec)


def source_label(data: DataPlace) -> str:
    """A `datasets` source as one line: the absolute path of local files, else hf://datasets/<name>, with the
    subset, split and revision asked for; the feature cache's folder name and image folder come from it."""
    spec = data.path or ""
    label = os.path.abspath(os.path.expanduser(spec)) if is_local(spec) else f"hf://datasets/{spec}"
    extras = [f"{k}={v}" for k, v in (("subset", data.hf_subset), ("split", data.hf_split),
                                       ("revision", data.revision)) if v]
    return label + (f" ({', '.join(extras)})" if extras else "")


def source_key(data: DataPlace) -> str | None:
    """A short hash of the captions file and images folder a set is read from (None for a download or the
    embedded set, which have one place in a data folder): two sets never share a cache folder."""
    given = [os.path.abspath(os.path.expanduser(p)) for p in (data.path, data.images_dir) if p]
    if data.dataset == "hf" and data.path:  # a Hub name is no path; the subset, split and revision matter too
        given[0] = source_label(data)
    if not given:
        return None
    return hashlib.sha256("\n".join([data.dataset, *given]).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def default_cache_dir(data: DataPlace, backbone: str, offline: bool = False) -> Path:
    """data_dir/features/<dataset>-<backbone> for a download or the embedded set; for a set read from
    --path, <dataset>-<file name>-<hash of file and images folder>-<backbone>. Offline the stand-in's
    name stands for the backbone, so real and stand-in features never mix."""
    slug = _slug(clip_standin_name(backbone) if offline else backbone)
    key = source_key(data)
    if key is None:
        return features_dir(data.data_dir) / f"{data.dataset}-{slug}"
    stem = _slug(Path(data.path.rstrip("/")).stem if data.path else "images")[:40] or "table"
    return features_dir(data.data_dir) / f"{data.dataset}-{stem}-{key}-{slug}"


def course_paths(data: DataPlace, backbone: str = "ViT-B/32", mapper: str = "transformer",
                 offline: bool = False, freeze: str | None = None) -> CoursePaths:
    """Every folder a run of the course uses, from the settings the notebooks share: the DataConfig
    (dataset, data folder, ...) and the backbone, mapper and offline setting; `freeze` None is the course's
    own (the main job's), a named one gets its own run folder (see run_dir)."""
    run = run_dir(data.data_dir, data.dataset, mapper, freeze)
    return CoursePaths(Path(data.data_dir), models_dir(data.data_dir), default_cache_dir(data, backbone, offline),
                       run, bundle_dir(run))


def relative_to_data(path: str | Path, data: str | Path | None = None) -> str:
    """`path` relative to the data folder when it lies inside it (so it survives moving the folder),
    else absolute; always with '/' separators."""
    path, root = Path(path).resolve(), data_dir(data).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def in_data(recorded: str | Path, data: str | Path | None = None) -> Path:
    """A path `relative_to_data` recorded, read back against this data folder (absolute ones unchanged)."""
    recorded = Path(recorded)
    return recorded if recorded.is_absolute() else data_dir(data) / recorded
