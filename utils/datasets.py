"""Caption datasets: one small reader per format, all giving the same `Record`; plus the embedded set.

The feature cache, training and evaluation never care where captions came from, so every format
(Flickr30k, the Kaggle food set, COCO, Karpathy splits, any CSV, a folder of images with .txt files,
webdataset shards, the generated offline set) becomes a list of `Record`s. Readers never crash on a
bad row and never drop one silently: each skipped or repaired row becomes a message for people in
`Captions.problems`, naming the file and the line.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import json
import math
import os
import posixpath
import re
import tarfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, UnidentifiedImageError

from .config import DataConfig
from .files import read_json, write_json, write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that. Its default (89 MP) would refuse
# a 10000x10000 photo; with 200 MP, anything up to 400 MP loads and larger files get a clear reason.
_MAX_PIXELS = 200_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS


class DatasetError(ValueError):
    """The captions cannot be read as asked; the message names the file and says what to do."""


class UnreadableImage(Exception):
    """An image that cannot be decoded; str() is the reason ("zero bytes", "truncated JPEG", ...)."""


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


# ---------------------------------------------------------------------------------------------
# What a reader finds, before splits and max_images are applied


@dataclass
class _Parsed:
    source: Path
    rows: list[tuple[str, str, str, str | None]] = field(default_factory=list)  # id, path, caption, split
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    repaired: int = 0
    local: bool = True  # image paths are files on disk (not tar members), so missing ones can be counted

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


_Entry = tuple[str, str, str]  # (where, image name as written in the file, caption)
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _read_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 survive as surrogates so each row can be repaired alone."""
    try:
        return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None


def _replace_bad_bytes(values: list[str]) -> list[str] | None:
    """`values` with non-UTF-8 bytes turned into U+FFFD, or None when they were clean."""
    if not any(_NOT_UTF8.search(v) for v in values):
        return None
    return [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in values]


def _image_id(name: str) -> str:
    """The image's name as written, without extension: stable, and unique where the names are."""
    return posixpath.splitext(name.replace("\\", "/"))[0]


def _add_entries(parsed: _Parsed, entries: list[_Entry], path_of: Callable[[str], str]) -> None:
    known: dict[str, tuple[str, str]] = {}  # name -> (id, path): most images have several captions
    for where, name, caption in entries:
        if name not in known:
            known[name] = (_image_id(name), path_of(name))
        parsed.add(where, *known[name], caption)


def _in_folder(folder: Path) -> Callable[[str], str]:
    base = os.path.abspath(folder)
    return lambda name: os.path.join(base, name.replace("\\", "/"))


def _pick_images_dir(candidates: list[Path], names: list[str]) -> Path:
    """The candidate folder holding most of the first images named: downloads unpack with varying nesting."""
    existing = [d for d in dict.fromkeys(candidates) if d.is_dir()]
    if not existing:
        return candidates[0]
    sample = [n.replace("\\", "/") for n in names[:50]]
    return max(existing, key=lambda d: sum((d / n).is_file() for n in sample))


def _images_dir(cfg: DataConfig, candidates: list[Path], names: list[str]) -> Path:
    if cfg.images_dir:
        return Path(cfg.images_dir).expanduser()
    return _pick_images_dir(candidates, names)


def _input_path(cfg: DataConfig, root: Path, patterns: tuple[str, ...], what: str) -> Path:
    """cfg.path when given (looked up under root too when relative), else the one file under root matching."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_absolute() and not path.exists() and (root / path).exists():
            path = root / path
        if not path.exists():
            raise DatasetError(f"{path} does not exist; pass --path naming your {what}")
        return path
    found = sorted({p for pattern in patterns for p in root.rglob(pattern)}) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"no {what} ({', '.join(patterns)}) under {root}; pass --path FILE")
    raise DatasetError(f"several {what}s under {root}: {', '.join(map(str, found))}; "
                       f"choose one with --path FILE")


def _load_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


# ---------------------------------------------------------------------------------------------
# CSV-like files


def _separator(path: Path, separator: str) -> str:
    """`--separator '\\t'` arrives as backslash-t from a shell; a .tsv file means tab unless told otherwise."""
    if separator in ("\\t", "tab"):
        return "\t"
    if separator == "," and path.suffix.lower() == ".tsv":
        return "\t"
    return separator


def _csv_entries(path: Path, sep: str, image_column: str, caption_column: str,
                 parsed: _Parsed) -> list[_Entry]:
    """The (where, image, caption) of each usable row; bad rows become problem lines, never exceptions."""
    lines = re.split(r"\r\n|\r|\n", _read_text(path))  # Windows, old Mac ("CSV (Macintosh)") and Unix ends
    any_bad_bytes = any(_NOT_UTF8.search(line) for line in lines)
    try:
        header = next(csv.reader(lines[:1], delimiter=sep, strict=True), None)
    except csv.Error as exc:
        raise DatasetError(f"{path} line 1, the header: {exc}; it should name the columns, such as "
                           f"image{sep}caption") from None
    if not header:
        raise DatasetError(f"{path} is empty")
    columns = [c.strip() for c in header]
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise DatasetError(
            f"{path} has no column {', '.join(map(repr, missing))}; its columns (split on {sep!r}) are "
            f"{columns}. Name the right ones with --image-column / --caption-column, or fix --separator.")
    i_image, i_caption = columns.index(image_column), columns.index(caption_column)
    entries: list[_Entry] = []
    # One row per line, parsed strictly: a quote opened and never closed would otherwise swallow every
    # row after it into one caption, silently.
    for number, line in enumerate(lines[1:], start=2):
        where = f"{path.name} line {number}"
        try:
            row = next(csv.reader([line], delimiter=sep, strict=True), [])
        except csv.Error as exc:
            parsed.skip(f"{where}: {exc} (a quote opened and not closed? a caption must fit on one line)")
            continue
        if not row:
            continue  # a blank line is not a row
        if len(row) != len(columns):
            parsed.skip(f"{where}: {len(row)} fields where the header has {len(columns)} "
                        f"(quote captions that contain {sep!r})")
            continue
        fixed = _replace_bad_bytes(row) if any_bad_bytes else None
        if fixed:
            row = fixed
            parsed.repair(f"{where}: bytes that are not UTF-8 replaced by '\ufffd'")
        image = row[i_image].strip()
        if not image:
            parsed.skip(f"{where}: no image name in column {image_column!r}")
            continue
        entries.append((where, image, row[i_caption]))
    return entries


def _read_csv(cfg: DataConfig, root: Path) -> _Parsed:
    path = _input_path(cfg, root, ("*.csv", "*.tsv"), "captions file")
    parsed = _Parsed(path)
    entries = _csv_entries(path, _separator(path, cfg.separator), cfg.image_column, cfg.caption_column, parsed)
    images_dir = Path(cfg.images_dir).expanduser() if cfg.images_dir else path.parent
    _add_entries(parsed, entries, _in_folder(images_dir))
    return parsed


_FLICKR_NO_BAR = re.compile(r"\s*(\d+)\s+(\S.*)")


def _read_flickr30k(cfg: DataConfig, root: Path) -> _Parsed:
    """Kaggle's results.csv: `image_name| comment_number| comment`, one known row missing its second '|'."""
    if cfg.path:
        path = _input_path(cfg, root, (), "results.csv")
    else:
        found = [p for p in (root / "flickr30k_images" / "results.csv", root / "results.csv") if p.is_file()]
        if not found:
            raise DatasetError(f"no results.csv in {root / 'flickr30k_images'} or {root}: download Flickr30k "
                               f"first, or pass --path naming its results.csv")
        path = found[0]
    parsed = _Parsed(path)
    entries: list[_Entry] = []
    text = _read_text(path)
    any_bad_bytes = _NOT_UTF8.search(text) is not None
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        where = f"{path.name} line {number}"
        if not line.strip():
            continue
        parts = line.split("|", 2)
        if number == 1 and parts[0].strip().lower() == "image_name":
            continue
        fixed = _replace_bad_bytes(parts) if any_bad_bytes else None
        if fixed:
            parts = fixed
            parsed.repair(f"{where}: bytes that are not UTF-8 replaced by '\ufffd'")
        if len(parts) == 2 and (m := _FLICKR_NO_BAR.fullmatch(parts[1])):
            parts = [parts[0], m.group(1), m.group(2)]
            parsed.repair(f"{where}: missing '|' between comment number and caption")
        if len(parts) != 3 or not parts[0].strip():
            parsed.skip(f"{where}: expected 'image_name| comment_number| comment', got {line[:60]!r}")
            continue
        entries.append((where, parts[0].strip(), parts[2]))
    folder = path.parent
    images_dir = _images_dir(cfg, [folder / "flickr30k_images", folder, folder / "flickr30k-images"],
                             [name for _, name, _ in entries])
    _add_entries(parsed, entries, _in_folder(images_dir))
    return parsed


# Column names the Kaggle food set (and similar Kaggle CSVs) use, most specific first.
_IMAGE_COLUMNS = ("image", "image_name", "image_path", "filename", "file_name", "file", "img", "path")
_CAPTION_COLUMNS = ("caption", "captions", "text", "description", "comment", "title")


def _pick_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _caption_columns(path: Path) -> tuple[list[str], str, str | None, str | None]:
    """Header, separator, image column and caption column of a CSV whose dialect we were not told.
    The separator is the first that yields both columns (csv.Sniffer guesses wrong on prose)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        first_line = f.readline()
    for sep in (",", "\t", ";", "|"):
        header = [c.strip() for c in next(csv.reader([first_line], delimiter=sep), [])]
        image_column, caption_column = _pick_column(header, _IMAGE_COLUMNS), _pick_column(header, _CAPTION_COLUMNS)
        if image_column and caption_column:
            return header, sep, image_column, caption_column
    return [c.strip() for c in first_line.split(",")], ",", None, None


def _locate_by_basename(root: Path, names: list[str]) -> dict[str, str]:
    """Each image name -> a path in the folder under root holding most of them, matched by basename
    (or by stem: some Kaggle CSVs list names without their .jpg)."""
    folders: dict[str, dict[str, str]] = {}  # folder -> {basename or stem: file name}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        keys: dict[str, str] = {}
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_SUFFIXES):
                keys[f] = f
                keys.setdefault(os.path.splitext(f)[0], f)
        if keys:
            folders[dirpath] = keys
    wanted = {n: posixpath.basename(n.replace("\\", "/")) for n in names}
    if not folders:
        raise DatasetError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}; pass --images-dir")
    best = max(folders, key=lambda d: sum(w in folders[d] for w in wanted.values()))
    keys = folders[best]
    return {n: os.path.join(os.path.abspath(best), keys.get(w, w)) for n, w in wanted.items()}


def _read_food(cfg: DataConfig, root: Path) -> _Parsed:
    """A Kaggle CSV whose layout we do not know in advance: find the file and its columns by their names."""
    base = Path(cfg.path).expanduser() if cfg.path else root
    if base.is_file():
        csv_files = [base]
    else:
        csv_files = sorted(base.rglob("*.csv")) if base.is_dir() else []
    found, listing = [], []
    for path in csv_files:
        columns, sep, image_column, caption_column = _caption_columns(path)
        listing.append(f"{path}: {columns}")
        if image_column and caption_column:
            found.append((path, sep, image_column, caption_column))
    if len(found) != 1:
        what = "several CSV files look like captions" if found else "no CSV file with an image and a caption column"
        raise DatasetError(
            f"{what} under {base}:\n  " + "\n  ".join(listing or ["(no CSV files)"]) +
            "\nRead the right one with `--dataset csv --path FILE --image-column X --caption-column Y`.")
    path, sep, image_column, caption_column = found[0]
    parsed = _Parsed(path)
    entries = _csv_entries(path, sep, image_column, caption_column, parsed)
    if cfg.images_dir:
        path_of = _in_folder(Path(cfg.images_dir).expanduser())
    else:
        search = base if base.is_dir() else root if root.is_dir() else path.parent
        located = _locate_by_basename(search, [name for _, name, _ in entries])
        path_of = located.__getitem__
    _add_entries(parsed, entries, path_of)
    return parsed


# ---------------------------------------------------------------------------------------------
# JSON formats


def _read_coco(cfg: DataConfig, root: Path) -> _Parsed:
    """COCO captions JSON: `images` give file names, `annotations` give one caption each."""
    path = _input_path(cfg, root, ("captions_*.json",), "COCO captions JSON")
    data = _load_json(path)
    try:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = list(data["annotations"])
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a COCO captions file (no {exc}); expected "
                           f"{{'images': [{{'id', 'file_name'}}], 'annotations': [{{'image_id', 'caption'}}]}}. "
                           f"For Karpathy's dataset_*.json use --dataset karpathy.") from None
    parsed = _Parsed(path)
    split_folder = path.stem.split("_", 1)[-1]  # captions_train2017.json -> train2017
    folder = path.parent
    images_dir = _images_dir(cfg, [folder, folder / split_folder, folder.parent / split_folder,
                                   folder / "images", folder.parent / "images"], list(files.values()))
    path_of = _in_folder(images_dir)
    for i, ann in enumerate(annotations):
        where = f"{path.name} annotation {i}"
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            parsed.skip(f"{where}: its image_id is not among 'images'")
            continue
        parsed.add(where, str(ann["image_id"]), path_of(files[ann["image_id"]]), str(ann.get("caption") or ""))
    return parsed


_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _read_karpathy(cfg: DataConfig, root: Path) -> _Parsed:
    """Karpathy's dataset_*.json: the split comes from the file, so results compare with published ones."""
    path = _input_path(cfg, root, ("dataset_*.json",), "Karpathy split JSON")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path} is not a Karpathy split file: expected {{'images': [...]}}")
    images = data["images"]
    relative = [posixpath.join(img.get("filepath", ""), img.get("filename", "")) for img in images
                if isinstance(img, dict)]
    folder = path.parent
    path_of = _in_folder(_images_dir(cfg, [folder, folder.parent, folder / "images", folder.parent / "images"],
                                     relative))
    parsed = _Parsed(path)
    for i, img in enumerate(images):
        where = f"{path.name} image {i}"
        if not isinstance(img, dict) or not img.get("filename") or not img.get("sentences"):
            parsed.skip(f"{where}: needs 'filename' and 'sentences'")
            continue
        split = _KARPATHY_SPLITS.get(img.get("split"))
        if split is None:
            parsed.repair(f"{where}: unknown split {img.get('split')!r}, assigned by image id")
        image_id = str(img["cocoid"]) if "cocoid" in img else _image_id(img["filename"])
        image_path = path_of(posixpath.join(img.get("filepath", ""), img["filename"]))
        for sentence in img["sentences"]:
            raw = sentence.get("raw", "") if isinstance(sentence, dict) else ""
            parsed.add(where, image_id, image_path, str(raw), split)
    return parsed


# ---------------------------------------------------------------------------------------------
# Folders and shards


def _caption_lines(text: str, where: str, parsed: _Parsed) -> list[tuple[str, str]]:
    """(where, caption) for each non-empty line of a caption file."""
    out = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): \f or \u2028 end no line
        fixed = _replace_bad_bytes([line])
        if fixed:
            line = fixed[0]
            parsed.repair(f"{where} line {number}: bytes that are not UTF-8 replaced by '\ufffd'")
        if line.strip():
            out.append((f"{where} line {number}", line))
    return out


def _read_folder(cfg: DataConfig, root: Path) -> _Parsed:
    """Images with a same-name .txt beside them, one caption per line (the layout many tools export)."""
    folder = Path(cfg.path).expanduser() if cfg.path else root
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; pass --path naming the folder of images and .txt files")
    parsed = _Parsed(folder)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        rel = image.relative_to(folder).as_posix()
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            parsed.skip(f"{rel}: no caption file {txt.name} beside it")
            continue
        txt_rel = txt.relative_to(folder).as_posix()
        try:
            lines = _caption_lines(_read_text(txt), txt_rel, parsed)
        except DatasetError as exc:
            parsed.skip(str(exc))
            continue
        if not lines:
            parsed.skip(f"{txt_rel}: no caption in it")
        for where, caption in lines:
            parsed.add(where, _image_id(rel), str(image.absolute()), caption)
    return parsed


def _shards(cfg: DataConfig, root: Path) -> list[Path]:
    spec = Path(cfg.path).expanduser() if cfg.path else root
    if spec.is_file():
        return [spec]
    if spec.is_dir():
        return sorted(spec.glob("*.tar"))
    return sorted(Path(p) for p in glob.glob(str(spec)))


def _shard_captions(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], where: str,
                    parsed: _Parsed) -> list[tuple[str, str]]:
    """Captions of one sample: the lines of its .txt, else "caption"/"captions" of its .json."""
    if "txt" in parts:
        text = tar.extractfile(parts["txt"]).read().decode("utf-8", "surrogateescape")
        return _caption_lines(text, f"{where}.txt", parsed)
    try:
        obj = json.loads(tar.extractfile(parts["json"]).read().decode("utf-8", "replace"))
    except json.JSONDecodeError as exc:
        parsed.skip(f"{where}.json: not valid JSON ({exc.msg})")
        return []
    captions = (obj.get("captions") or obj.get("caption")) if isinstance(obj, dict) else None
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        parsed.skip(f"{where}.json: no 'caption' text or 'captions' list")
        return []
    return [(f"{where}.json", str(c)) for c in captions]


def _read_shard(shard: Path, parsed: _Parsed) -> None:
    """One tar shard: members sharing a key (name up to the first dot, folder included) form one sample."""
    with tarfile.open(shard) as tar:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar:
            if member.isfile():
                folder, base = posixpath.split(member.name)
                key, _, ext = base.partition(".")
                samples.setdefault(posixpath.join(folder, key), {})[ext.lower()] = member
        for key, parts in samples.items():
            where = f"{shard.name} {key}"
            image = next((parts[e] for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
            if image is None:
                parsed.skip(f"{where}: no image member ({', '.join(SHARD_IMAGE_EXTENSIONS)})")
                continue
            if "txt" not in parts and "json" not in parts:
                parsed.skip(f"{where}: no .txt or .json caption member")
                continue
            image_id = f"{shard.stem}/{key}"  # some shard writers restart keys: the shard name keeps ids unique
            for line_where, caption in _shard_captions(tar, parts, where, parsed):
                parsed.add(line_where, image_id, f"{shard.absolute()}::{image.name}", caption)


def _read_webdataset(cfg: DataConfig, root: Path) -> _Parsed:
    """Tar shards named by cfg.path: one shard, a folder of them, or a glob."""
    shards = _shards(cfg, root)
    source = Path(cfg.path).expanduser() if cfg.path else root
    if not shards:
        raise DatasetError(f"no .tar shards at {source}; pass --path naming a shard, a folder of shards or a glob")
    parsed = _Parsed(source, local=False)
    for shard in shards:
        try:
            _read_shard(shard, parsed)
        except (tarfile.TarError, OSError) as exc:
            parsed.skip(f"{shard}: unreadable tar shard ({exc})")
    return parsed


def _read_embedded(cfg: DataConfig, root: Path) -> _Parsed:
    make_embedded(root, cfg.embedded_images)
    path = root / "captions.csv"
    parsed = _Parsed(path)
    entries = _csv_entries(path, ",", "image", "caption", parsed)
    _add_entries(parsed, entries, _in_folder(root / "images"))
    return parsed


_READERS: dict[str, Callable[[DataConfig, Path], _Parsed]] = {
    "embedded": _read_embedded,
    "flickr30k": _read_flickr30k,
    "food": _read_food,
    "coco": _read_coco,
    "karpathy": _read_karpathy,
    "csv": _read_csv,
    "folder": _read_folder,
    "webdataset": _read_webdataset,
}


def _missing_on_disk(parsed: _Parsed, paths: list[str]) -> str | None:
    """One line saying how many local images are absent: the feature cache skips them, people should know."""
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return None
    first = ", ".join(os.path.basename(p) for p in missing[:3])
    return (f"{len(missing)} of {len(paths)} images named in {parsed.source.name} are missing on disk "
            f"(first: {first}); looked in {os.path.dirname(missing[0])}, is --images-dir right?")


def load_records(cfg: DataConfig, root: str | Path | None = None) -> Captions:
    """Read the captions `cfg` names. `root` is where a downloaded dataset lies (default: data_dir/<dataset>)."""
    reader = _READERS.get(cfg.dataset)
    if reader is None:
        raise DatasetError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(_READERS)}")
    root = Path(root).expanduser() if root is not None else Path(cfg.data_dir) / cfg.dataset
    parsed = reader(cfg, root)
    rows = parsed.rows
    if cfg.max_images is not None:
        keep = set(list(dict.fromkeys(image_id for image_id, _, _, _ in rows))[:cfg.max_images])
        rows = [row for row in rows if row[0] in keep]
    if not rows:
        hint = "; ".join(parsed.problems[:3]) or "the file holds no rows"
        raise DatasetError(f"no usable captions in {parsed.source} ({parsed.skipped} rows skipped: {hint}). "
                           f"Is --dataset {cfg.dataset} the right format for it?")
    splits: dict[str, str] = {}
    records = []
    for image_id, image_path, caption, split in rows:
        if image_id not in splits:
            splits[image_id] = split or split_for(image_id, cfg.val_fraction, cfg.test_fraction)
        records.append(Record(image_path, caption, image_id, splits[image_id]))
    problems = list(parsed.problems)
    if parsed.local:
        missing = _missing_on_disk(parsed, list(dict.fromkeys(r.image_path for r in records)))
        if missing:
            problems.append(missing)
    return Captions(records, problems, str(parsed.source), parsed.skipped, parsed.repaired, file_stamp(parsed.source))


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


# ---------------------------------------------------------------------------------------------
# Images


_TAR_LOCK = threading.Lock()  # one TarFile has one file position: threads take turns


@functools.lru_cache(maxsize=8)
def _open_shard(tar_path: str, pid: int) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """A shard opened once per process: the pid is in the key so a forked DataLoader worker opens its own
    file instead of sharing (and moving) its parent's file position."""
    tar = tarfile.open(tar_path)
    return tar, {m.name: m for m in tar.getmembers()}


def _read_bytes(path: str) -> bytes:
    tar_path, sep, member = path.partition("::")
    try:
        if not sep:
            with open(path, "rb") as f:
                return f.read()
        with _TAR_LOCK:
            tar, members = _open_shard(os.path.abspath(tar_path), os.getpid())
            if member not in members:
                raise UnreadableImage("missing file")
            return tar.extractfile(members[member]).read()
    except FileNotFoundError:
        raise UnreadableImage("missing file") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except IsADirectoryError:
        raise UnreadableImage("a folder, not an image file") from None
    except (OSError, tarfile.TarError) as exc:
        raise UnreadableImage(f"cannot read ({exc})") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled by its real range: most such files use a small part of 0..65535."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float32))
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:  # flat image: keep it dark or bright without dividing by zero
        lo, hi = min(lo, 0.0), max(hi, 1.0)
    return Image.fromarray(((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # transparent parts go on white, as a viewer shows them
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# The first bytes of the formats photos come in: a file that starts like one but cannot be opened was cut short.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF"}


def open_image(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """A fully loaded RGB image, or UnreadableImage saying why not.

    `draft` (for JPEG) decodes at a reduced scale no smaller than draft x draft: a 10000x10000 photo
    then costs milliseconds instead of a second. `path` may be "<shard.tar>::<member>".
    """
    return decode_image(_read_bytes(os.fspath(path)), draft)


@functools.lru_cache(maxsize=1)
def _decodable_formats() -> tuple[str, ...]:
    """Every format Pillow reads but EPS, which it hands to Ghostscript: an upload to the web demo must
    never run a PostScript program."""
    Image.init()
    return tuple(f for f in Image.ID if f != "EPS")


def decode_image(data: bytes, draft: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """`open_image` for bytes already in memory (an upload in a widget or the web demo).

    `max_pixels` refuses an image that would decode to more pixels than that, before decoding it: a
    server's memory stays bounded whatever is uploaded.
    """
    if not data:
        raise UnreadableImage("zero bytes")
    fmt = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
    try:
        img = Image.open(io.BytesIO(data), formats=_decodable_formats())
        fmt = img.format or fmt
        if draft and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft, draft))
        if max_pixels and img.width * img.height > max_pixels:
            raise UnreadableImage(f"too large: {img.width}x{img.height} pixels, over the limit of "
                                  f"{max_pixels / 1e6:g} megapixels; shrink it first")
        img.load()
        return to_rgb(img)
    except UnidentifiedImageError:
        reason = f"truncated {fmt}" if fmt else "not an image (cannot identify image file)"
        raise UnreadableImage(reason) from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what Pillow raises on broken data
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message:
            raise UnreadableImage(f"truncated {fmt or 'image'}") from None
        raise UnreadableImage(f"cannot decode {fmt or 'image'} ({message})") from None


def preview_png(image: Image.Image, side: int) -> bytes:
    """The picture as PNG bytes `side` pixels on its long edge, for a widget or a web page: small images
    scaled up without blur, large ones down."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    buf = io.BytesIO()
    image.convert("RGB").resize(size, resample).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The embedded dataset: generated, so the course runs with no download at all


EMBEDDED_ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "cross"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange"],
    "position": ["left", "right", "top", "bottom", "centre"],
    "size": ["small", "large"],
    "background": ["light", "dark"],
}
_EMBEDDED_VERSION = 1  # bump when the drawing or the captions change, so old copies are regenerated
_SIDE, _SCALE = 64, 4  # drawn at 4x and reduced: smooth edges
_COLOUR_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
               "yellow": (240, 205, 30), "purple": (145, 60, 190), "orange": (250, 135, 20)}
_BACKGROUND_RGB = {"light": (236, 236, 230), "dark": (30, 30, 38)}
_CENTRE = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "centre": (32, 32)}
_RADIUS = {"small": 7, "large": 13}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_WHERE_WORDS = {
    "left": ("on the left", "at the left of the picture", "on the left side"),
    "right": ("on the right", "at the right of the picture", "on the right side"),
    "top": ("at the top", "at the top of the picture", "near the top edge"),
    "bottom": ("at the bottom", "at the bottom of the picture", "near the bottom edge"),
    "centre": ("in the centre", "in the middle of the picture", "right in the middle"),
}
_BACKGROUND_WORDS = {"light": ("on a light background", "against a pale background"),
                     "dark": ("on a dark background", "against a black background")}
_TEMPLATES = (
    "a {size} {colour} {shape} {where} {background}.",
    "A {colour} {shape}, {size}, sits {where} {background}.",
    "There is a {size} {colour} {shape} {where} {background}.",
    "A picture of a {size} {colour} {shape} {where}, {background}.",
    "The {shape} is {colour} and {size}; it is {where} {background}.",
    "One {size} {colour} {shape} {where} {background}.",
)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.42 * r) * math.cos(math.pi * (k / 5 - 0.5)),
                 cy + (r if k % 2 == 0 else 0.42 * r) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
    w = 0.33 * r  # cross: half the width of an arm
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def _draw_embedded(attrs: dict[str, str], dx: int, dy: int, dr: int) -> bytes:
    big = Image.new("RGB", (_SIDE * _SCALE,) * 2, _BACKGROUND_RGB[attrs["background"]])
    draw = ImageDraw.Draw(big)
    cx, cy = ((c + d) * _SCALE for c, d in zip(_CENTRE[attrs["position"]], (dx, dy)))
    r = (_RADIUS[attrs["size"]] + dr) * _SCALE
    fill = _COLOUR_RGB[attrs["colour"]]
    if attrs["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs["shape"] == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon(_shape_points(attrs["shape"], cx, cy, r), fill=fill)
    out = io.BytesIO()
    big.resize((_SIDE, _SIDE), Image.Resampling.BOX).save(out, format="PNG")
    return out.getvalue()


def _embedded_caption(template: str, attrs: dict[str, str], rng: np.random.Generator) -> str:
    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    text = template.format(size=pick(_SIZE_WORDS[attrs["size"]]), colour=attrs["colour"], shape=attrs["shape"],
                           where=pick(_WHERE_WORDS[attrs["position"]]),
                           background=pick(_BACKGROUND_WORDS[attrs["background"]]))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def make_embedded(dest: str | Path, n_images: int = 1200, seed: int = 0) -> Path:
    """Generate the offline teaching set in `dest` (images/*.png, captions.csv, README.txt, meta.json).

    Each 64x64 image shows one shape whose shape, colour, position, size and background its three
    captions state, so a model can be seen to learn them. Deterministic in (n_images, seed); returns at
    once when `dest` already holds that set. meta.json is written last: it marks the set complete.
    """
    dest = Path(dest)
    meta = {"n_images": n_images, "seed": seed, "version": _EMBEDDED_VERSION}
    meta_path = dest / "meta.json"
    if (dest / "captions.csv").is_file() and meta_path.is_file() and read_json(meta_path) == meta:
        return dest
    meta_path.unlink(missing_ok=True)  # an interrupted regeneration must not look complete
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["image", "caption"])
    for i in range(n_images):
        attrs = {name: values[int(rng.integers(len(values)))] for name, values in EMBEDDED_ATTRIBUTES.items()}
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))  # jitter: no two images alike
        dr = int(rng.integers(-1, 2))
        name = f"{i:05d}.png"
        tmp = images / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(_draw_embedded(attrs, dx, dy, dr))
        os.replace(tmp, images / name)  # whole files only, even when two processes generate at once
        for t in rng.choice(len(_TEMPLATES), size=3, replace=False):
            writer.writerow([name, _embedded_caption(_TEMPLATES[t], attrs, rng)])
    write_text(dest / "README.txt",
               "A synthetic teaching set generated by utils.datasets.make_embedded: 64x64 images of one coloured\n"
               "shape, each with three captions naming its shape, colour, position, size and background.\n"
               "It lets the course run with no download; it is not a benchmark. Delete this folder to regenerate.\n")
    write_text(dest / "captions.csv", rows.getvalue())
    write_json(meta_path, meta)
    return dest


def embedded_attributes(caption: str) -> dict[str, str | None]:
    """Read back which shape, colour, position, size and background a caption of the embedded set states.

    The course uses it to score captions of the embedded set by meaning rather than wording: any of the
    templates and synonyms counts, a missing or wrong attribute does not.
    """
    text = " " + " ".join(re.sub(r"([,.;:!?])", r" \1 ", caption.lower()).split()) + " "
    phrases = {
        "shape": {v: (v,) for v in EMBEDDED_ATTRIBUTES["shape"]},
        "colour": {v: (v,) for v in EMBEDDED_ATTRIBUTES["colour"]},
        "size": _SIZE_WORDS,
        "position": _WHERE_WORDS,
        "background": {k: tuple(p.split(" ", 1)[1] for p in v) for k, v in _BACKGROUND_WORDS.items()},
    }
    found: dict[str, str | None] = {}
    for attribute, options in phrases.items():
        # longest phrase first: "right in the middle" is the centre, not the right
        candidates = sorted(((p, value) for value, ps in options.items() for p in ps), key=lambda x: -len(x[0]))
        found[attribute] = next((value for p, value in candidates if f" {p} " in text), None)
    return found
