"""Hugging Face `datasets` tables as a caption set: `--dataset hf --path NAME_OR_FOLDER`.

A Hub name (`nlphuji/flickr30k`, `jxie/flickr8k`), a `save_to_disk` folder, parquet / arrow / json / csv files
or a glob of them are opened with the real loaders (`datasets.load_dataset`, `datasets.load_from_disk`) and
read row by row, so a set larger than memory streams (`--streaming`). Each row gives:
- its image, from an `Image` feature (the bytes as stored), a path column (relative to --images-dir or the
  table's folder) or a URL column. Bytes and URLs become files once, under data_dir/hf-images/<source>/ (the
  bytes as stored, never re-encoded; URLs fetched in parallel, resumably, failures listed), so every later
  stage reads files as it does for any other set, and an image that cannot be decoded is skipped and counted
  by the feature cache as in every other reader;
- its captions, from a text column, a list column (`caption`: 5 texts; `sentences`: Karpathy's dicts with
  `raw`) or several columns (`caption_0,caption_1,...` or `caption_*`);
- its split, from a split column (Karpathy's `split` is kept), else from the table's own splits when it has
  train and test, else by image as for every set.
`datasets` is imported here only, inside the functions: `import utils` stays fast.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import os
import re
from pathlib import Path

from .config import DataConfig
from .download import fetch_all
from .files import atomic_path
from .images import IMAGE_SUFFIXES
from .paths import is_local, source_label
from .records import DatasetError, Parsed, image_id_of, table_stamp

HF_IMAGES = "hf-images"  # data_dir/hf-images/<source>/: the images a table holds as bytes or URLs, as files
BATCH_ROWS = 256  # rows read at a time
# Column names tables on the Hub use, most common first: tried when the default column is not there.
# (Karpathy's `filepath` is a folder, train2014, not an image: never taken for one.)
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_path", "path", "url", "image_url", "coco_url",
                 "flickr_url")
CAPTION_COLUMNS = ("caption", "captions", "sentences", "text", "raw", "description", "alt_text", "caption_0")
ID_COLUMNS = ("filename", "file_name", "image_id", "img_id", "cocoid", "imgid")
SPLITS = ("train", "val", "test")
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv",
             ".tsv": "csv"}


def split_map(text: str) -> dict[str, str]:
    """'train=train,validation=val' -> {'train': 'train', 'validation': 'val'} (keys lowercased)."""
    mapping = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        value, sep, split = pair.partition("=")
        if not sep or split.strip() not in SPLITS or not value.strip():
            raise DatasetError(f"--split-values {text!r}: {pair!r} is not value=split with split one of "
                               f"{', '.join(SPLITS)} (e.g. train=train,validation=val,test=test)")
        mapping[value.strip().lower()] = split.strip()
    return mapping


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """CLIPCAP_OFFLINE=1: `datasets` reads a Hub set from its cache only, without trying the network
    (five retries, half a minute) first."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    old = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = old


def _cache_dir(cfg: DataConfig) -> str | None:
    """Where `datasets` keeps what it downloads or converts: the user's own HF cache when set, else the data folder."""
    if os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME"):
        return None
    return str(Path(cfg.data_dir).expanduser() / "hf-cache")


def _pick_splits(tables: dict, wanted: str | None, where: str) -> dict:
    if not wanted:
        return tables
    names = [n.strip() for n in wanted.split("+")]
    missing = [n for n in names if n not in tables]
    if missing:
        raise DatasetError(f"{where} has no split {', '.join(map(repr, missing))}; its splits are "
                           f"{list(tables)}: choose with --hf-split (or leave it out to read all)")
    return {n: tables[n] for n in names}


def _open(cfg: DataConfig) -> tuple[dict, dict | None]:
    """{split name: table} of the source --path names, and its stamp (None: a Hub set not reached)."""
    import datasets

    spec = cfg.path
    where = source_label(cfg)
    common = dict(cache_dir=_cache_dir(cfg), streaming=cfg.streaming)
    try:
        if is_local(spec):
            path = Path(spec).expanduser()
            stamp = table_stamp(os.path.abspath(path))
            if stamp is None:
                raise DatasetError(f"no table files ({', '.join(_BUILDERS)}) at {spec}: --path names a save_to_disk "
                                   "folder, a folder of parquet files, a file or a glob such as 'data/*.parquet'")
            if path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
                loaded = datasets.load_from_disk(str(path))
                if cfg.streaming:
                    loaded = (loaded.to_iterable_dataset() if isinstance(loaded, datasets.Dataset) else
                              datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()}))
            elif path.is_dir():
                loaded = _load(str(path), cfg, hf_subset=cfg.hf_subset, **common)
            else:
                suffix = next((s for s in _BUILDERS if str(spec).lower().endswith(s)), None)
                if suffix is None:
                    raise DatasetError(f"{spec}: cannot tell the format of these files from their name; --path "
                                       f"names files ending in {', '.join(_BUILDERS)}, or their folder")
                loaded = _load(_BUILDERS[suffix], cfg, data_files=os.path.abspath(os.path.expanduser(spec)), **common)
        else:
            offline = os.environ.get("CLIPCAP_OFFLINE", "").strip().lower() in ("1", "true", "yes")
            with _hub_offline(offline):
                loaded = _load(spec, cfg, hf_subset=cfg.hf_subset, revision=cfg.revision, **common)
            stamp = {"path": f"hf://datasets/{spec}", "revision": _revision(spec, cfg.revision, offline)}
    except DatasetError:
        raise
    except ConnectionError as exc:
        raise DatasetError(f"cannot reach the Hugging Face Hub for {spec!r} ({exc}). Offline, a Hub set is read "
                           "from the Hugging Face cache only: load it once online, or save it where you are "
                           "online with ds.save_to_disk(FOLDER) (or ds.to_parquet) and pass --path FOLDER") from None
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:  # DatasetNotFoundError is a FileNotFoundError
        text = " ".join(str(exc).split())[:600]
        raise DatasetError(f"`datasets` cannot open {where}: {text}. --path names a Hub set (owner/name), a "
                           "save_to_disk folder, parquet files or a glob; a set with several configurations "
                           "needs --hf-subset NAME") from None
    if isinstance(loaded, (dict, datasets.DatasetDict, datasets.IterableDatasetDict)):
        tables = dict(loaded)
    else:
        tables = {"": loaded}
    if "" not in tables:
        tables = _pick_splits(tables, cfg.hf_split, where)
    elif cfg.hf_split:
        raise DatasetError(f"{where} is one table without named splits: leave --hf-split out")
    return tables, stamp


def _load(source: str, cfg: DataConfig, hf_subset: str | None = None, **kwargs):
    """`datasets.load_dataset`, for --hf-split one split at a time (only those are downloaded), keeping
    their names: {name: table}."""
    import datasets

    if not cfg.hf_split:
        return datasets.load_dataset(source, hf_subset, **kwargs)
    names = [n.strip() for n in cfg.hf_split.split("+") if n.strip()]
    return {n: datasets.load_dataset(source, hf_subset, split=n, **kwargs) for n in names}


def _revision(name: str, revision: str | None, offline: bool) -> str | None:
    """The commit of the Hub set read (so a cache records exactly what it came from); None when not reachable."""
    if offline:
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision, timeout=10).sha
    except Exception:  # noqa: BLE001 (any failure here only loses the commit, never the read)
        return revision


# ---------------------------------------------------------------------------------------------
# Columns


def _columns(table) -> list[str]:
    names = getattr(table, "column_names", None) or list(table.features or {})
    if not names:  # a stream whose features are only known once read (json files): its first row's keys
        names = list(next(iter(table), {}))
    return list(names)


def _missing(what: str, flag: str, asked: str, columns: list[str], where: str) -> DatasetError:
    return DatasetError(f"{where} has no {what} column {asked!r}; its columns are {columns}. Name the right one "
                        f"with {flag} COLUMN")


def _image_column(cfg: DataConfig, columns: list[str], features, where: str) -> str:
    if cfg.image_column in columns:
        return cfg.image_column
    if cfg.image_column == "image":  # the default: look for the usual names, then for an Image feature
        lowered = {c.lower(): c for c in columns}
        found = next((lowered[c] for c in IMAGE_COLUMNS if c in lowered), None)
        found = found or next((c for c in columns if type(features.get(c)).__name__ == "Image"), None)
        if found:
            return found
    raise _missing("image", "--image-column", cfg.image_column, columns, where)


def _caption_columns(cfg: DataConfig, columns: list[str], where: str) -> list[str]:
    """One column, several (`caption_0,caption_1`) or a pattern (`caption_*`), in the table's order."""
    asked = [c.strip() for c in cfg.caption_column.split(",") if c.strip()]
    found = []
    for name in asked:
        matches = [c for c in columns if fnmatch.fnmatchcase(c, name)] if glob.has_magic(name) else \
            [name] if name in columns else []
        if not matches:
            if cfg.caption_column == "caption":  # the default: the usual names, then caption_0..caption_N
                numbered = sorted((c for c in columns if re.fullmatch(r"captions?_?\d+", c)),
                                  key=lambda c: int(re.sub(r"\D", "", c)))
                lowered = {c.lower(): c for c in columns}
                usual = next((lowered[c] for c in CAPTION_COLUMNS[:-1] if c in lowered), None)
                if usual or numbered:
                    return [usual] if usual else numbered
            raise _missing("caption", "--caption-column", name, columns, where)
        found += [m for m in matches if m not in found]
    return found


def _split_column(cfg: DataConfig, columns: list[str], where: str) -> str | None:
    if cfg.split_column:
        if cfg.split_column not in columns:
            raise _missing("split", "--split-column", cfg.split_column, columns, where)
        return cfg.split_column
    return "split" if "split" in columns else None


def _texts(value, column: str) -> list[str]:
    """The captions a cell holds: a text, a list of texts, Karpathy's [{'raw': ...}] or {'raw': [...]}."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        inner = value.get("raw", value.get("text", value.get("caption")))
        return _texts(inner, column)
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _texts(v, column)]
    return [str(value)]


# ---------------------------------------------------------------------------------------------
# Images


def _suffix(data: bytes, name: str | None) -> str:
    ext = os.path.splitext(name or "")[1].lower()
    if ext in IMAGE_SUFFIXES:
        return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((s for magic, s in _SIGNATURES if data.startswith(magic)), ".img")


def _file_name(image_id: str) -> str:
    """A file name for an image id: its safe characters, with a short hash when any were changed."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[:80]
    if safe != image_id or not safe:
        safe = f"{safe}-{hashlib.sha1(image_id.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return safe


def _write_bytes(dest: Path, data: bytes) -> None:
    """The image's bytes as stored in the table, whole or not at all."""
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(data)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


class _Images:
    """Turns each row's image cell into (image id, path), writing table bytes to files and gathering URLs."""

    def __init__(self, cfg: DataConfig, folder: Path, base: Path):
        self.folder = folder
        self.images_dir = Path(os.path.abspath(Path(cfg.images_dir).expanduser())) if cfg.images_dir else base
        self.digests: dict[str, str] = {}  # image id -> digest of its bytes (two images never share an id)
        self.urls: dict[str, tuple[str, Path]] = {}  # url -> (name, file)
        self.kinds: set[str] = set()

    def __call__(self, cell, ident, write: bool) -> tuple[str, str] | str:
        """(image id, image path), or why the row has no image. `ident`: the row's id column, if any;
        `write`: the image is among those kept (--max-images), so its bytes are written, its URL fetched."""
        if hasattr(cell, "save") and hasattr(cell, "mode"):  # a PIL image (a table whose feature decodes)
            import io

            buf = io.BytesIO()
            cell.save(buf, format="PNG")
            cell = {"bytes": buf.getvalue(), "path": getattr(cell, "filename", None) or None}
        if isinstance(cell, dict):
            data, name = cell.get("bytes"), cell.get("path")
            if data:
                self.kinds.add("image bytes")
                digest = hashlib.sha1(data).hexdigest()
                image_id = image_id_of(str(ident)) if ident not in (None, "") else \
                    image_id_of(os.path.basename(name)) if name else digest[:16]
                if self.digests.setdefault(image_id, digest) != digest:  # another picture under the same name
                    image_id = f"{image_id}-{digest[:8]}"
                    self.digests.setdefault(image_id, digest)
                # the digest in the name: a table rewritten with other pictures under the same ids lists other
                # files, so a feature cache made from the old ones refuses them instead of serving stale features
                dest = self.folder / f"{_file_name(image_id)}.{digest[:10]}{_suffix(data, name)}"
                if write and not dest.is_file():
                    _write_bytes(dest, data)
                return image_id, str(dest)
            cell = name
        if not isinstance(cell, str) or not cell.strip():
            return "no image (an empty cell)"
        cell = cell.strip()
        image_id = image_id_of(str(ident)) if ident not in (None, "") else None
        if _is_url(cell):
            self.kinds.add("URLs")
            image_id = image_id or image_id_of(cell.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or cell)
            known = self.urls.get(cell)
            if known:
                return known[0], str(known[1])
            dest = self.folder / (_file_name(image_id) + _suffix(b"", cell.split("?")[0]))
            if write:
                self.urls[cell] = (image_id, dest)
            return image_id, str(dest)
        self.kinds.add("image paths")
        path = Path(cell).expanduser()
        path = path if path.is_absolute() else self.images_dir / path
        return image_id or image_id_of(cell), os.path.abspath(path)


def _fetch_urls(images: _Images, folder: Path, parsed: Parsed) -> dict[str, str]:
    """Fetch the URLs not already fetched (download.fetch_all: parallel, whole files only, failures listed
    in <folder>-failed.csv). Returns path -> why it failed."""

    todo = [(name, url, dest) for url, (name, dest) in images.urls.items() if not dest.is_file()]
    if not todo:
        return {}
    report = folder.parent / f"{folder.name}-failed.csv"
    print(f"{len(images.urls)} images named by URL, {len(images.urls) - len(todo)} already here, {len(todo)} to "
          f"download into {folder}")
    failed = fetch_all(todo, report)
    if failed:
        parsed.notes.append(f"{len(failed)} of {len(images.urls)} image URLs could not be fetched (listed in "
                            f"{report}; rerun to try them again)")
    by_url = {url: reason for _, url, reason in failed}
    return {str(dest): by_url[url] for url, (_, dest) in images.urls.items() if url in by_url}


# ---------------------------------------------------------------------------------------------
# The reader


def read_hf(cfg: DataConfig, _root: Path) -> Parsed:  # (the root of downloads: a table needs none)
    """The records of a `datasets` table (see the module's docstring); one message per bad row, counted."""
    if not cfg.path:
        raise DatasetError("--dataset hf needs --path: a Hub set (owner/name, e.g. nlphuji/flickr30k), a "
                           "save_to_disk folder, parquet files or a glob such as 'data/*.parquet'")
    mapping = split_map(cfg.split_values)
    label = source_label(cfg)
    tables, stamp = _open(cfg)
    local = is_local(cfg.path)
    spec = Path(cfg.path).expanduser()
    base = Path(os.path.abspath(spec if spec.is_dir() else spec.parent)) if local else Path(cfg.data_dir)
    key = hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", (spec.stem if local else cfg.path.rsplit("/", 1)[-1])).strip("-")[:40]
    folder = Path(cfg.data_dir).expanduser().resolve() / HF_IMAGES / f"{stem or 'table'}-{key}"
    parsed = Parsed(Path(label), stamp=stamp)
    names = [n for n in tables if n]
    by_table_split = len(names) >= 2 and all(n.lower() in mapping for n in names)
    kept: set[str] = set()  # the first max_images images: only theirs are written or fetched
    unknown: dict[str, int] = {}
    images = None
    pending: list[tuple[str, str, str, str, str | None]] = []  # URL rows wait for their fetch
    for name, table in tables.items():
        where_table = label + (f" [{name}]" if name else "")
        columns = _columns(table)
        features = dict(table.features or {})
        image_column = _image_column(cfg, columns, features, where_table)
        caption_columns = _caption_columns(cfg, columns, where_table)
        split_column = _split_column(cfg, columns, where_table)
        id_column = next((c for c in ID_COLUMNS if c in columns and c != image_column), None)
        if images is None:
            images = _Images(cfg, folder, base)
        if type(features.get(image_column)).__name__ == "Image":
            import datasets

            table = table.cast_column(image_column, datasets.Image(decode=False))  # the bytes as stored
        wanted = list(dict.fromkeys([image_column, *caption_columns, *filter(None, (split_column, id_column))]))
        table = table.select_columns(wanted)
        table_split = mapping.get(name.lower()) if by_table_split else None
        short = f"{spec.name if local else cfg.path}{f' [{name}]' if name else ''}"
        row, enough = 0, False
        for batch in table.iter(batch_size=BATCH_ROWS):
            for i in range(len(batch[image_column])):
                where = f"{short} row {row}"
                row += 1
                ident = batch[id_column][i] if id_column else None
                write = cfg.max_images is None or len(kept) < cfg.max_images
                got = images(batch[image_column][i], ident, write)
                if isinstance(got, str):
                    parsed.skip(f"{where}: {got} in column {image_column!r}")
                    continue
                image_id, path = got
                if write:
                    kept.add(image_id)
                elif cfg.streaming and image_id not in kept:  # the first image past --max-images: stop reading
                    enough = True
                    break
                split = table_split
                if split_column:
                    value = batch[split_column][i]
                    split = mapping.get(str(value).strip().lower()) if value is not None else None
                    if split is None:
                        unknown[f"{value!r} in column {split_column!r}"] = \
                            unknown.get(f"{value!r} in column {split_column!r}", 0) + 1
                texts = [t for c in caption_columns for t in _texts(batch[c][i], c)]
                if not texts:
                    parsed.skip(f"{where}: no caption in {', '.join(map(repr, caption_columns))}")
                    continue
                pending += [(where, image_id, path, text, split) for text in texts]
            if enough:
                break
        if enough:
            parsed.notes.append(f"--streaming with --max-images {cfg.max_images}: read the first {row - 1} rows "
                                f"of {where_table}, which hold the first {cfg.max_images} images")
            break
    failed = _fetch_urls(images, folder, parsed) if images is not None and images.urls else {}
    said = set()
    for where, image_id, path, text, split in pending:
        if path in failed:
            if where not in said:  # one line, one count, per row (not per caption of it)
                said.add(where)
                parsed.skip(f"{where}: its image could not be fetched ({failed[path]})")
            continue
        parsed.add(where, image_id, path, text, split)
    for value, count in unknown.items():
        parsed.notes.append(f"{count} rows of {label} have the split {value}, which --split-values does not "
                            f"map: their images were assigned by image id")
    if images is not None:
        parsed.images_dir = folder if images.kinds <= {"image bytes", "URLs"} else \
            images.images_dir if images.kinds == {"image paths"} else None
        parsed.local = True
    return parsed
