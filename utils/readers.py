"""One small reader per caption format, all giving the same `Record` (utils/records.py).

Flickr30k, the Kaggle food set, COCO, Karpathy splits, any CSV, a folder of images with .txt files,
webdataset / img2dataset shards and the generated offline set: each is read as its download lays it out.
`load_records(cfg)` is the one call; it applies max_images and the splits, and lists what went wrong.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path

from .config import DataConfig
from .csvtext import (NOT_DECODED, Entry, caption_lines, csv_entries, decode_text, encoding_note, read_text,
                      replace_bad_bytes, repair_message, separator)
from .embedded import make_embedded
from .hub_datasets import read_hf
from .images import IMAGE_SUFFIXES
from .records import Captions, DatasetError, Parsed, Record, file_stamp, image_id_of, split_for
from .shards import read_webdataset


def _path_in(folder: Path | str, name: str) -> str:
    """The file `name` names in `folder`; a name without an image extension (the food set's "0") is the
    image of that name with one (0.jpg), when there is such a file."""
    path = os.path.join(os.path.abspath(folder), name.replace("\\", "/"))
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES or os.path.isfile(path):
        return path
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        if os.path.isfile(path + suffix):
            return path + suffix
    return path


def _add_entries(parsed: Parsed, entries: list[Entry], path_of: Callable[[str], str]) -> None:
    known: dict[str, tuple[str, str]] = {}  # name -> (id, path): most images have several captions
    for where, name, caption in entries:
        if name not in known:
            known[name] = (image_id_of(name), path_of(name))
        parsed.add(where, *known[name], caption)


def _in_folder(parsed: Parsed, folder: Path) -> Callable[[str], str]:
    parsed.images_dir = Path(os.path.abspath(folder))
    return lambda name: _path_in(folder, name)


def _pick_images_dir(candidates: list[Path], names: list[str]) -> Path:
    """The candidate folder holding most of the first images named: downloads unpack with varying nesting."""
    existing = [d for d in dict.fromkeys(candidates) if d.is_dir()]
    if not existing:
        return candidates[0]
    sample = names[:50]
    return max(existing, key=lambda d: sum(os.path.isfile(_path_in(d, n)) for n in sample))


def _images_dir(cfg: DataConfig, candidates: list[Path], names: list[str]) -> Path:
    if cfg.images_dir:
        return Path(cfg.images_dir).expanduser()
    return _pick_images_dir(candidates, names)


def _subfolders(folder: Path, depth: int = 2) -> list[Path]:
    """`folder` and the folders under it, `depth` levels down (a download's `dataset/` or `images/images/`)."""
    def folders_in(parent: Path) -> list[Path]:
        try:
            return sorted(d for d in parent.iterdir() if d.is_dir())
        except OSError:  # unreadable: not where the images are
            return []

    found, level = [folder], [folder]
    for _ in range(depth):
        level = [d for parent in level for d in folders_in(parent)][:100]
        found += level
    return found


def _input_path(cfg: DataConfig, root: Path, patterns: tuple[str, ...], what: str) -> Path:
    """cfg.path when it is a file (looked up under root too when relative); else the one file matching
    `patterns` in the folder cfg.path names (a copy downloaded by hand) or under root."""
    folder = root
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_absolute() and not path.exists() and (root / path).exists():
            path = root / path
        if not path.exists():
            raise DatasetError(f"{path} does not exist; pass --path naming your {what} (or the folder holding it)")
        if path.is_file() or not patterns:
            return path
        folder = path
    found = sorted({p for pattern in patterns for p in folder.rglob(pattern)}) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"no {what} ({', '.join(patterns)}) under {folder}; pass --path FILE")
    raise DatasetError(f"several {what}s under {folder}: {', '.join(map(str, found))}; "
                       f"choose one with --path FILE")


def _load_json(path: Path, parsed: Parsed, encoding: str | None):
    text = read_text(path, encoding)
    note = encoding_note(path, text, encoding)
    if note:
        parsed.notes.append(note)
        text = replace_bad_bytes([text])[0]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


# ---------------------------------------------------------------------------------------------
# CSV-like files


def _read_csv(cfg: DataConfig, root: Path) -> Parsed:
    path = _input_path(cfg, root, ("*.csv", "*.tsv"), "captions file")
    parsed = Parsed(path)
    entries = csv_entries(path, read_text(path, cfg.encoding), separator(path, cfg.separator), cfg.image_column,
                          cfg.caption_column, parsed, cfg.encoding)
    images_dir = _images_dir(cfg, _subfolders(path.parent), [name for _, name, _ in entries])
    _add_entries(parsed, entries, _in_folder(parsed, images_dir))
    return parsed


_FLICKR_NO_BAR = re.compile(r"\s*(\d+)\s+(\S.*)")


def _read_flickr30k(cfg: DataConfig, root: Path) -> Parsed:
    """Kaggle's results.csv: `image_name| comment_number| comment`, one known row missing its second '|'."""
    if cfg.path:
        path = _input_path(cfg, root, ("results.csv",), "results.csv")
    else:
        found = [p for p in (root / "flickr30k_images" / "results.csv", root / "results.csv") if p.is_file()]
        if not found:
            raise DatasetError(f"no results.csv in {root / 'flickr30k_images'} or {root}: download Flickr30k "
                               f"first, or pass --path naming its results.csv (or the folder of your copy)")
        path = found[0]
    parsed = Parsed(path)
    entries: list[Entry] = []
    text = read_text(path, cfg.encoding)
    note = encoding_note(path, text, cfg.encoding)
    if note:
        parsed.notes.append(note)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        where = f"{path.name} line {number}"
        if not line.strip():
            continue
        parts = line.split("|", 2)
        if number == 1 and parts[0].strip().lower() == "image_name":
            continue
        fixed = replace_bad_bytes(parts) if note else None
        if fixed:
            parts = fixed
            parsed.repair(repair_message(where, cfg.encoding))
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
    _add_entries(parsed, entries, _in_folder(parsed, images_dir))
    return parsed


def _read_flickr8k(cfg: DataConfig, root: Path) -> Parsed:
    """Kaggle's adityajn105/flickr8k: captions.txt (a CSV: header `image,caption`, 5 rows per image, captions
    holding a comma quoted) with the images in Images/ beside it."""
    path = _input_path(cfg, root, ("captions.txt",), "captions.txt")
    parsed = Parsed(path)
    entries = csv_entries(path, read_text(path, cfg.encoding), ",", "image", "caption", parsed, cfg.encoding)
    folder = path.parent
    images_dir = _images_dir(cfg, [folder / "Images", folder / "images", folder, folder / "Flicker8k_Dataset"],
                             [name for _, name, _ in entries])
    _add_entries(parsed, entries, _in_folder(parsed, images_dir))
    return parsed


# Column names Kaggle caption CSVs use, most specific first. An integer index column ("Index", as the
# food set of the course has) comes last: its values are image names without extension (0 -> 0.jpg).
_IMAGE_COLUMNS = ("image", "image_name", "image_path", "filename", "file_name", "file", "img", "path",
                  "image_id", "index", "id")
_CAPTION_COLUMNS = ("caption", "captions", "text", "description", "comment", "title")


def _pick_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _caption_columns(path: Path, encoding: str | None) -> tuple[list[str], str, str | None, str | None]:
    """Header, separator, image column and caption column of a CSV whose dialect we were not told.
    The separator is the first that yields both columns (csv.Sniffer guesses wrong on prose)."""
    with open(path, "rb") as f:
        first_line = decode_text(f.readline(), path, encoding)
    first_line = NOT_DECODED.sub("\ufffd", first_line)
    for sep in (",", "\t", ";", "|"):
        header = [c.strip() for c in next(csv.reader([first_line], delimiter=sep), [])]
        image_column, caption_column = _pick_column(header, _IMAGE_COLUMNS), _pick_column(header, _CAPTION_COLUMNS)
        if image_column and caption_column:
            return header, sep, image_column, caption_column
    return [c.strip() for c in first_line.split(",")], ",", None, None


def _locate_by_basename(root: Path, names: list[str]) -> tuple[Path, dict[str, str]]:
    """The folder under root holding most of the images named, and each name -> its path there, matched
    by basename or by stem (some Kaggle CSVs list names without their .jpg, or only a number)."""
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
    return Path(os.path.abspath(best)), {n: os.path.join(os.path.abspath(best), keys.get(w, w))
                                         for n, w in wanted.items()}


def _read_food(cfg: DataConfig, root: Path) -> Parsed:
    """A Kaggle CSV whose layout we do not know in advance: find the file and its columns by their names."""
    base = Path(cfg.path).expanduser() if cfg.path else root
    if base.is_file():
        csv_files = [base]
    else:
        csv_files = sorted(base.rglob("*.csv")) if base.is_dir() else []
    found, listing = [], []
    for path in csv_files:
        columns, sep, image_column, caption_column = _caption_columns(path, cfg.encoding)
        listing.append(f"{path}: {columns}")
        if image_column and caption_column:
            found.append((path, sep, image_column, caption_column))
    if len(found) != 1:
        what = "several CSV files look like captions" if found else "no CSV file with an image and a caption column"
        raise DatasetError(
            f"{what} under {base}:\n  " + "\n  ".join(listing or ["(no CSV files)"]) +
            "\nRead the right one with `--dataset csv --path FILE --image-column X --caption-column Y`.")
    path, sep, image_column, caption_column = found[0]
    parsed = Parsed(path)
    entries = csv_entries(path, read_text(path, cfg.encoding), sep, image_column, caption_column, parsed,
                          cfg.encoding)
    if cfg.images_dir:
        path_of = _in_folder(parsed, Path(cfg.images_dir).expanduser())
    else:
        search = base if base.is_dir() else root if root.is_dir() else path.parent
        parsed.images_dir, located = _locate_by_basename(search, [name for _, name, _ in entries])
        path_of = located.__getitem__
    _add_entries(parsed, entries, path_of)
    return parsed


# ---------------------------------------------------------------------------------------------
# JSON formats


def _read_coco(cfg: DataConfig, root: Path) -> Parsed:
    """COCO captions JSON: `images` give file names, `annotations` give one caption each."""
    path = _input_path(cfg, root, ("captions_*.json",), "COCO captions JSON")
    parsed = Parsed(path)
    data = _load_json(path, parsed, cfg.encoding)
    try:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = list(data["annotations"])
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a COCO captions file (no {exc}); expected "
                           f"{{'images': [{{'id', 'file_name'}}], 'annotations': [{{'image_id', 'caption'}}]}}. "
                           f"For Karpathy's dataset_*.json use --dataset karpathy.") from None
    split_folder = path.stem.split("_", 1)[-1]  # captions_train2017.json -> train2017
    folder = path.parent
    images_dir = _images_dir(cfg, [folder, folder / split_folder, folder.parent / split_folder,
                                   folder / "images", folder.parent / "images"], list(files.values()))
    path_of = _in_folder(parsed, images_dir)
    for i, ann in enumerate(annotations):
        where = f"{path.name} annotation {i}"
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            parsed.skip(f"{where}: its image_id is not among 'images'")
            continue
        parsed.add(where, str(ann["image_id"]), path_of(files[ann["image_id"]]), str(ann.get("caption") or ""))
    return parsed


_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _read_karpathy(cfg: DataConfig, root: Path) -> Parsed:
    """Karpathy's dataset_*.json: the split comes from the file, so results compare with published ones."""
    path = _input_path(cfg, root, ("dataset_*.json",), "Karpathy split JSON")
    parsed = Parsed(path)
    data = _load_json(path, parsed, cfg.encoding)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path} is not a Karpathy split file: expected {{'images': [...]}}")
    images = data["images"]
    relative = [posixpath.join(img.get("filepath", ""), img.get("filename", "")) for img in images
                if isinstance(img, dict)]
    folder = path.parent
    path_of = _in_folder(parsed, _images_dir(cfg, [folder, folder.parent, folder / "images",
                                                   folder.parent / "images"], relative))
    for i, img in enumerate(images):
        where = f"{path.name} image {i}"
        if not isinstance(img, dict) or not img.get("filename") or not img.get("sentences"):
            parsed.skip(f"{where}: needs 'filename' and 'sentences'")
            continue
        split = _KARPATHY_SPLITS.get(img.get("split"))
        if split is None:
            parsed.repair(f"{where}: unknown split {img.get('split')!r}, assigned by image id")
        image_id = str(img["cocoid"]) if "cocoid" in img else image_id_of(img["filename"])
        image_path = path_of(posixpath.join(img.get("filepath", ""), img["filename"]))
        for sentence in img["sentences"]:
            raw = sentence.get("raw", "") if isinstance(sentence, dict) else ""
            parsed.add(where, image_id, image_path, str(raw), split)
    return parsed


# ---------------------------------------------------------------------------------------------
# Folders and the embedded set


def _read_folder(cfg: DataConfig, root: Path) -> Parsed:
    """Images with a same-name .txt beside them, one caption per line (the layout many tools export)."""
    folder = Path(cfg.path).expanduser() if cfg.path else root
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; pass --path naming the folder of images and .txt files")
    parsed = Parsed(folder, images_dir=Path(os.path.abspath(folder)))
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        rel = image.relative_to(folder).as_posix()
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            parsed.skip(f"{rel}: no caption file {txt.name} beside it")
            continue
        txt_rel = txt.relative_to(folder).as_posix()
        try:
            lines = caption_lines(read_text(txt, cfg.encoding), txt_rel, parsed, cfg.encoding)
        except DatasetError as exc:
            parsed.skip(str(exc))
            continue
        if not lines:
            parsed.skip(f"{txt_rel}: no caption in it")
        for where, caption in lines:
            parsed.add(where, image_id_of(rel), str(image.absolute()), caption)
    return parsed


def _read_embedded(cfg: DataConfig, root: Path) -> Parsed:
    make_embedded(root, cfg.embedded_images)
    path = root / "captions.csv"
    parsed = Parsed(path)
    entries = csv_entries(path, read_text(path), ",", "image", "caption", parsed)
    _add_entries(parsed, entries, _in_folder(parsed, root / "images"))
    return parsed


READERS: dict[str, Callable[[DataConfig, Path], Parsed]] = {
    "embedded": _read_embedded,
    "flickr30k": _read_flickr30k,
    "flickr8k": _read_flickr8k,
    "food": _read_food,
    "coco": _read_coco,
    "karpathy": _read_karpathy,
    "csv": _read_csv,
    "folder": _read_folder,
    "webdataset": read_webdataset,
    "hf": read_hf,
}


def _missing_on_disk(parsed: Parsed, paths: list[str]) -> str | None:
    """One line saying how many local images are absent: the feature cache skips them, people should know."""
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return None
    first = ", ".join(os.path.basename(p) for p in missing[:3])
    return (f"{len(missing)} of {len(paths)} images named in {parsed.source.name} are missing on disk "
            f"(first: {first}); looked in {os.path.dirname(missing[0])}, is --images-dir right?")


def load_records(cfg: DataConfig, root: str | Path | None = None) -> Captions:
    """Read the captions `cfg` names. `root` is where a downloaded dataset lies (default: data_dir/<dataset>)."""
    reader = READERS.get(cfg.dataset)
    if reader is None:
        raise DatasetError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(READERS)}")
    root = Path(root).expanduser() if root is not None else Path(cfg.data_dir) / cfg.dataset
    parsed = reader(cfg, root)
    rows = parsed.rows
    if cfg.max_images is not None:
        keep = set(list(dict.fromkeys(image_id for image_id, _, _, _ in rows))[:cfg.max_images])
        rows = [row for row in rows if row[0] in keep]
    if not rows:
        hint = "; ".join((parsed.notes + parsed.problems)[:3]) or "the file holds no rows"
        raise DatasetError(f"no usable captions in {parsed.source} ({parsed.skipped} rows skipped: {hint}). "
                           f"Is --dataset {cfg.dataset} the right format for it?")
    splits: dict[str, str] = {}
    records = []
    for image_id, image_path, caption, split in rows:
        if image_id not in splits:
            splits[image_id] = split or split_for(image_id, cfg.val_fraction, cfg.test_fraction)
        records.append(Record(image_path, caption, image_id, splits[image_id]))
    problems = parsed.notes + parsed.problems
    if parsed.local:
        missing = _missing_on_disk(parsed, list(dict.fromkeys(r.image_path for r in records)))
        if missing:
            problems.append(missing)
    return Captions(records, problems, str(parsed.source), parsed.skipped, parsed.repaired,
                    parsed.stamp or file_stamp(parsed.source), str(parsed.images_dir) if parsed.images_dir else None)
