"""The record every caption reader yields, the split rule, and what a reader found while reading.

The feature cache, training and evaluation never care where captions came from: every format becomes a
list of `Record`s. Readers never crash on a bad row and never drop one silently: each skipped or repaired
row becomes a message for people in `Captions.problems`, naming the file and the line.
"""

from __future__ import annotations

import glob
import hashlib
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import CourseError


class DatasetError(CourseError, ValueError):
    """The captions cannot be read as asked; the message names the file and says what to do."""


@dataclass(frozen=True)
class Record:
    """One caption of one image; several records share an image_id (one per caption)."""

    image_path: str  # absolute path, or "<abs path to shard.tar>::<member name>"
    caption: str  # stripped, internal whitespace collapsed
    image_id: str  # stable id of the image: splits and the feature cache key on it
    split: str  # "train" | "val" | "test"


@dataclass
class Captions:
    """The records of a dataset and what went wrong while reading them."""

    records: list[Record]
    problems: list[str]  # each names the file and line/row
    source: str  # the file or folder read
    skipped: int  # rows that could not be used; each has a problem line
    repaired: int = 0  # rows fixed and kept; each has a problem line
    stamp: dict | None = None  # `file_stamp` of the source as it was read: caches made from it keep it
    images_dir: str | None = None  # the folder the images were looked for in (None: several, or tar shards)

    def images(self) -> list[tuple[str, str, str]]:
        """Unique (image_id, image_path, split), in first-seen order: what the feature cache encodes."""
        seen: dict[str, tuple[str, str, str]] = {}
        for r in self.records:
            seen.setdefault(r.image_id, (r.image_id, r.image_path, r.split))
        return list(seen.values())

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([(r.image_id, r.image_path, r.caption, r.split) for r in self.records],
                            columns=["image_id", "image_path", "caption", "split"])

    def summary(self) -> str:
        images = self.images()
        per_split = Counter(split for _, _, split in images)
        return (f"{len(self.records)} captions of {len(images)} images (train {per_split['train']} / "
                f"val {per_split['val']} / test {per_split['test']}), {self.skipped} rows skipped, "
                f"{self.repaired} repaired")


def split_for(image_id: str, val_fraction: float, test_fraction: float) -> str:
    """The split of an image from a hash of its id: the same whatever the file order or dataset size."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def file_stamp(path: str | Path) -> dict | None:
    """Path and content hash of a captions file (None for a folder), so a later edit is noticed."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path.resolve()), "sha256": h.hexdigest()}


TABLE_SUFFIXES = (".arrow", ".parquet", ".jsonl", ".json", ".csv", ".tsv")  # the files a table folder is made of


def table_files(spec: str | Path) -> list[Path]:
    """The files a table is read from: a file, the table files under a folder (a save_to_disk folder holds
    .arrow shards and its state.json / dataset_info.json), or a glob's matches; sorted, [] when none."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))


def table_stamp(spec: str | Path) -> dict | None:
    """Like `file_stamp`, for a table that is several files (a folder or a glob): one hash over each file's
    name and content, so a shard added, removed or edited is noticed. None when nothing is there."""
    files = table_files(spec)
    if not files:
        return None
    path = Path(spec).expanduser()
    base = path if path.is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(base).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        h.update((file_stamp(f) or {}).get("sha256", "").encode() + b"\n")
    return {"path": str(spec), "table_files": len(files), "sha256": h.hexdigest()}


def restamp(stamp: dict) -> dict | None:
    """The stamp of what `stamp` names as it is now, to compare with it: None when that cannot be told
    here (the file or table is gone, or it is a Hub set, whose revision this machine may not reach)."""
    if "table_files" in stamp:
        return table_stamp(stamp["path"])
    if "sha256" in stamp and Path(stamp["path"]).is_file():
        return file_stamp(stamp["path"])
    return None


def image_id_of(name: str) -> str:
    """An image's id: its name as written, without extension: stable, and unique where the names are."""
    return posixpath.splitext(name.replace("\\", "/"))[0]


@dataclass
class Parsed:
    """What a reader found, before splits and max_images are applied."""

    source: Path
    rows: list[tuple[str, str, str, str | None]] = field(default_factory=list)  # id, path, caption, split
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    repaired: int = 0
    local: bool = True  # image paths are files on disk (not tar members), so missing ones can be counted
    images_dir: Path | None = None  # the one folder the images were looked for in, when there is one
    notes: list[str] = field(default_factory=list)  # about the whole file (its encoding): shown first
    stamp: dict | None = None  # the source's stamp when it is not one file (a table's, a Hub set's)

    def add(self, where: str, image_id: str, image_path: str, caption: str, split: str | None = None) -> None:
        caption = " ".join(caption.split())
        if not caption:
            self.skip(f"{where}: empty caption")
            return
        self.rows.append((image_id, image_path, caption, split))

    def skip(self, message: str) -> None:
        self.problems.append(f"{message}; skipped")
        self.skipped += 1

    def repair(self, message: str) -> None:
        self.problems.append(f"{message}; repaired")
        self.repaired += 1
