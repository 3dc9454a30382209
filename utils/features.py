"""The CLIP feature cache: every image is encoded once, then training reads embeddings, not pixels.

CLIP is frozen in ClipCap, so its image embeddings never change: computing them once turns each
training epoch from "decode and encode 31k images" into "read a 31k x 512 array". The cache is built
in chunks, each written atomically, so a dropped Kaggle/Colab session resumes where it stopped.

Layout of a cache folder:
    meta.json       backbone, width, resolution, dtype, clip_precision (the encoding's dtype rule: clip_encoder),
                    counts, fingerprints (the captions file's too), complete flag
    features.npy    (N, clip_dim) float16, one row per readable image, not normalised
    images.csv      feature_row, image_id, image_path, split
    captions.csv    feature_row, image_id, caption, split (one row per caption)
    skipped.csv     image_id, image_path, reason: images that could not be read
    chunks/         work in progress (removed once features.npy is written)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import __version__
from .bundle import find_training_cache
from .clip_encoder import STORED_DTYPE, encode_batches, precision
from .config import DataConfig, FeatureConfig, RuntimeConfig
from .errors import CourseError
from .records import Captions, restamp
from .files import atomic_path, read_json, write_json
from .paths import default_cache_dir, models_dir
from .runtime import is_offline, resolve_device
from .sources import load_clip

FORMAT_VERSION = 1
# Settings that decide what the numbers in features.npy mean: a cache that differs in any is refused.
_MUST_MATCH = ("format_version", "backbone", "clip_dim", "image_resolution", "dtype", "normalized",
               "images_fingerprint", "chunk_size")


class FeatureCacheError(CourseError, RuntimeError):
    """A cache that cannot be used as asked: made with other settings, or incomplete."""


@dataclass
class FeatureCache:
    """A finished cache, read back: what training and evaluation take."""

    path: Path
    meta: dict
    features: np.ndarray  # (N, clip_dim) float16, memory-mapped
    images: pd.DataFrame
    captions: pd.DataFrame
    skipped: pd.DataFrame

    def split(self, name: str) -> pd.DataFrame:
        """The caption rows of one split ('train', 'val', 'test')."""
        return self.captions[self.captions["split"] == name]


def _refuse_all_missing(captions: Captions, paths: list[str]) -> None:
    """Every image missing on disk: say so, and where they were looked for, before CLIP loads or any
    cache is opened (an existing cache would only be compared by opaque fingerprints)."""
    if not paths or any("::" in p for p in paths) or any(os.path.exists(p) for p in paths):
        return
    first = "; ".join(f"{p}: missing file" for p in paths[:2])
    where = captions.images_dir or os.path.dirname(paths[0])
    raise FeatureCacheError(f"none of the {len(paths)} images could be read: every one is missing on disk "
                            f"({first}). They were looked for in the folder {where}: is --images-dir right "
                            f"(the folder holding {os.path.basename(paths[0])})?")


def cache_features(captions: Captions, cfg: FeatureConfig, data: DataConfig,
                   runtime: RuntimeConfig | None = None) -> Path:
    """Encode every image of `captions` once into a resumable cache; returns the cache folder."""
    runtime = runtime or RuntimeConfig()
    images = captions.images()  # [(image_id, image_path, split)]
    paths = [p for _, p, _ in images]
    _refuse_all_missing(captions, paths)
    device = resolve_device(runtime.device)
    offline = is_offline(runtime.offline)
    model, preprocess, backbone = load_clip(cfg.backbone, device, offline, models_dir(data.data_dir))
    out = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(data, backbone)
    meta = {
        "format_version": FORMAT_VERSION, "backbone": backbone, "standin": offline,
        "clip_dim": int(model.visual.output_dim), "image_resolution": int(model.visual.input_resolution),
        "dtype": np.dtype(STORED_DTYPE).name, "normalized": False, "chunk_size": cfg.chunk_size,
        "clip_precision": precision(device, cfg.fp16),  # the encoding's dtype rule (clip_encoder.precision)
        "images_fingerprint": _fingerprint(f"{i}\t{p}" for i, p, _ in images),
        "dataset": data.dataset, "source": captions.source, "images_dir": captions.images_dir,
        "course_version": __version__, "num_images_listed": len(images), "complete": False,
    }
    if not _check_compatible(out, meta):
        write_json(out / "meta.json", meta)

    chunks_dir = out / "chunks"
    n_chunks = -(-len(images) // cfg.chunk_size)
    if not _finished(out, read_json(out / "meta.json")):  # anything short of the marker is done again
        todo = [k for k in range(n_chunks) if not (chunks_dir / f"{k:05d}.npz").is_file()]
        if todo:
            _fill_chunks(model, preprocess, paths, todo, cfg, device, chunks_dir, done=n_chunks - len(todo))
        _finalize(out, images, n_chunks)
    shutil.rmtree(chunks_dir, ignore_errors=True)  # joined into features.npy (left by a run cut after the marker)
    if read_json(out / "meta.json")["num_images"] == 0:
        _refuse_empty(out, len(images))
    _write_captions_index(out, captions)
    return out


def _refuse_empty(out: Path, listed: int) -> None:
    """A cache without one image only fails later, in training: remove what this run wrote (it holds
    nothing; the folder goes too if nothing else is in it) and say why now."""
    skipped = pd.read_csv(out / "skipped.csv")
    reasons = "; ".join(f"{p}: {r}" for p, r in skipped[["image_path", "reason"]].head(3).itertuples(index=False))
    for name in ("meta.json", "features.npy", "images.csv", "skipped.csv"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "chunks", ignore_errors=True)
    if not any(out.iterdir()):
        out.rmdir()
    raise FeatureCacheError(f"none of the {listed} images could be read ({reasons}). Are the images where the "
                            "captions say (--images-dir)?")


def _fill_chunks(model, preprocess, paths, todo, cfg, device, chunks_dir, done):
    chunk_rows = {k: range(k * cfg.chunk_size, min((k + 1) * cfg.chunk_size, len(paths))) for k in todo}
    batches = [list(rows[i:i + cfg.batch_size]) for rows in chunk_rows.values()
               for i in range(0, len(rows), cfg.batch_size)]
    total = sum(len(r) for r in chunk_rows.values())
    if done:
        print(f"resuming: {done} chunk(s) already cached, {total} image(s) to go")
    pending = {k: ([], [], []) for k in todo}  # chunk -> (positions, features, bad)
    skipped, start = 0, time.perf_counter()
    with tqdm(total=total, unit="img", desc="CLIP features") as bar:
        for positions, feats, bad in encode_batches(model, preprocess, paths, batches, device,
                                                    cfg.num_workers, cfg.fp16):
            first = positions[0] if len(positions) else bad[0][0]
            k = first // cfg.chunk_size
            rows, parts, bads = pending[k]
            rows.extend(positions.tolist())
            parts.append(feats.astype(STORED_DTYPE))
            bads.extend(bad)
            skipped += len(bad)
            bar.update(len(positions) + len(bad))
            bar.set_postfix(skipped=skipped, refresh=False)
            if len(rows) + len(bads) == len(chunk_rows[k]):
                _save_chunk(chunks_dir / f"{k:05d}.npz", rows, np.concatenate(parts), bads)
                del pending[k]
    rate = total / max(time.perf_counter() - start, 1e-9)
    print(f"encoded {total - skipped} image(s) at {rate:.1f} img/s; {skipped} unreadable")


def _save_chunk(path: Path, rows, feats, bad) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, rows=np.asarray(rows, np.int64), features=feats,
                     bad_rows=np.asarray([r for r, _ in bad], np.int64),
                     bad_reasons=np.asarray([why for _, why in bad], dtype=str))


def _finalize(out: Path, images, n_chunks: int) -> None:
    """Join the chunks into features.npy + images.csv + skipped.csv, then mark meta.json complete: the
    completion marker, written after everything it vouches for. The chunks stay until the marker is written,
    so a run cut anywhere before it (kill -9 included) is finished by the next run from the same chunks."""
    rows, feats, bad = [], [], []
    for k in range(n_chunks):
        with np.load(out / "chunks" / f"{k:05d}.npz", allow_pickle=False) as z:
            rows.append(z["rows"])
            feats.append(z["features"])
            bad.extend(zip(z["bad_rows"].tolist(), z["bad_reasons"].tolist()))
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    feats = np.concatenate(feats) if feats else np.zeros((0, 0), np.float16)
    order = np.argsort(rows, kind="stable")
    rows, feats = rows[order], feats[order]
    index = pd.DataFrame([images[r] for r in rows], columns=["image_id", "image_path", "split"])
    index.insert(0, "feature_row", np.arange(len(index)))
    skipped = pd.DataFrame([(images[r][0], images[r][1], why) for r, why in sorted(bad)],
                           columns=["image_id", "image_path", "reason"])
    _write_csv(out / "images.csv", index)
    _write_csv(out / "skipped.csv", skipped)
    with atomic_path(out / "features.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(_Writes(f), feats)
    meta = read_json(out / "meta.json")
    meta.update(complete=True, num_images=len(index), num_skipped=len(skipped))
    write_json(out / "meta.json", meta)


class _Writes:
    """A file numpy writes through `write()`: to a real file it writes with C's fwrite, whose short write on a
    full disk says only "N requested and M written"; through write() the disk's own error (ENOSPC) reaches
    files.atomic_path, which says what happened and that nothing was replaced."""

    def __init__(self, f):
        self.write = f.write


def _finished(out: Path, meta: dict) -> bool:
    """Whether `_finalize` completed: its marker (meta.json's "complete", with the counts) and the files it
    vouches for are all there."""
    return bool(meta.get("complete")) and "num_images" in meta and \
        all((out / name).is_file() for name in ("features.npy", "images.csv", "skipped.csv"))


def _write_captions_index(out: Path, captions: Captions) -> None:
    """Captions can be edited without touching images: their index is rewritten on every run."""
    index = pd.read_csv(out / "images.csv", dtype={"image_id": str})
    rows = dict(zip(index["image_id"], index["feature_row"]))
    frame = captions.to_frame()
    frame = frame[frame["image_id"].isin(rows)]
    frame.insert(0, "feature_row", frame["image_id"].map(rows).astype(np.int64))
    _write_csv(out / "captions.csv", frame[["feature_row", "image_id", "caption", "split"]])
    meta = read_json(out / "meta.json")
    meta.update(num_captions=len(frame), captions_fingerprint=_fingerprint(
        f"{i}\t{c}" for i, c in zip(frame["image_id"], frame["caption"])), captions_file=captions.stamp)
    write_json(out / "meta.json", meta)


def _check_captions_file(path: Path, meta: dict) -> None:
    """Refuse a cache whose captions file was edited after it was read (ClipCap reused a token cache keyed
    by file name after the data changed); a file no longer there is fine: the cache holds its captions."""
    stamp = meta.get("captions_file")
    now = restamp(stamp) if stamp else None
    if now is not None and now != stamp:
        raise FeatureCacheError(f"{stamp['path']} changed after the feature cache at {path} read its captions: "
                                "rerun `python -m utils features` with the flags that made the cache (or notebook "
                                "02) to read them again; no image is encoded again.")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _fingerprint(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:16]


def _check_compatible(out: Path, want: dict) -> bool:
    """True when a cache made with the same settings is already there; raises when one with others is."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return False
    have = read_json(meta_path)
    diffs = []
    for k in _MUST_MATCH:
        if have.get(k) != want[k]:
            diffs += _images_differ(have, want) if k == "images_fingerprint" else \
                [f"{k}: cache has {have.get(k)!r}, you asked for {want[k]!r}"]
    if diffs:
        raise FeatureCacheError(
            f"The feature cache at {out} was made from other images or with other settings:\n  " +
            "\n  ".join(diffs) + "\nIts features cannot be mixed with these, and it stays as it is (it is still "
            "valid for what made it). Give these their own folder with --cache-dir DIR.")
    return True


def _images_differ(have: dict, want: dict) -> list[str]:
    """In words, why the images of a cache are not the ones asked for: another captions file, another
    images folder, or the same file listing other images."""
    said = []
    if have.get("source") != want["source"]:
        said.append(f"captions file: the cache was made from {have.get('source')}, you asked for {want['source']}")
    if "images_dir" in have and have["images_dir"] != want["images_dir"]:
        said.append(f"images folder: the cache's images are in {have['images_dir'] or 'several folders'}, "
                    f"these captions name images in {want['images_dir'] or 'several folders'}")
    if not said:
        said.append(f"images: the cache holds the {have.get('num_images_listed')} images {have.get('source')} "
                    f"listed when it was made; now {want['num_images_listed']} images are asked for, not the "
                    "same ones (the file was edited, or --max-images differs)")
    return said


def load_cache(path: str | Path, backbone: str | None = None) -> FeatureCache:
    """Read a finished cache; refuses an incomplete one or one made with another backbone."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        others = sorted(p.parent.name for p in path.parent.glob("*/meta.json")) if path.parent.is_dir() else []
        raise FeatureCacheError(f"No feature cache at {path}: run `python -m utils features` with the same "
                                "--dataset, --path and --images-dir (or notebook 02) first" +
                                (f"; caches in {path.parent}: {', '.join(others)} (name one with --features DIR)."
                                 if others else "."))
    meta = read_json(path / "meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FeatureCacheError(f"{path} is a version {meta.get('format_version')} cache; this course reads "
                                f"version {FORMAT_VERSION}. Delete it and run `python -m utils features`.")
    if not _finished(path, meta) or "num_captions" not in meta or not (path / "captions.csv").is_file():
        raise FeatureCacheError(f"The feature cache at {path} is incomplete (interrupted?): rerun "
                                "`python -m utils features` with the same settings to finish it.")
    _check_captions_file(path, meta)
    if backbone is not None and meta["backbone"] != backbone:
        raise FeatureCacheError(f"The feature cache at {path} holds {meta['backbone']} features, not "
                                f"{backbone}: use a cache made with {backbone}, or train with --backbone "
                                f"{meta['backbone']}.")
    features = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
    images = pd.read_csv(path / "images.csv", dtype={"image_id": str})
    if len(images) != len(features):
        raise FeatureCacheError(f"{path}: images.csv lists {len(images)} images but features.npy has "
                                f"{len(features)} rows. Delete the folder and rebuild it.")
    return FeatureCache(path, meta, features, images,
                        pd.read_csv(path / "captions.csv", dtype={"image_id": str}, keep_default_na=False),
                        pd.read_csv(path / "skipped.csv", dtype={"image_id": str}))


def training_cache(captioner, data: str | Path | None = None) -> FeatureCache:
    """The feature cache a captioner was trained on (its bundle's summary names it), found on this machine even
    after its data folder moved (bundle.find_training_cache; CaptionerError says where it looked). Its images
    are read where they now are: an image path under the data folder it was made in that is not there any more
    is taken from the same place under the folder it is in now."""
    summary = getattr(captioner, "summary", {})
    path = find_training_cache(summary, getattr(captioner, "bundle_path", None), data)
    cache = load_cache(path)
    made_in, recorded = summary.get("data_dir"), Path(summary["features"])
    if made_in and not recorded.is_absolute():
        now_in = path.parents[len(recorded.parts) - 1]
        if Path(made_in) != now_in:
            cache.images["image_path"] = [_moved(p, made_in, now_in) for p in cache.images["image_path"]]
    return cache


def _moved(image: str, made_in: str, now_in: Path) -> str:
    """`image` (a path, or "<shard.tar>::<member>"), re-rooted from `made_in` to `now_in` when only the
    re-rooted one is there."""
    file, _, member = image.partition("::")
    if not file.startswith(made_in.rstrip("/") + "/") or Path(file).exists():
        return image
    moved = now_in / Path(file).relative_to(made_in)
    return (str(moved) + ("::" + member if member else "")) if moved.exists() else image
