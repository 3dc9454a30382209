"""Atomic file writes: anything that took long to make appears whole under its name, or not at all.

A Kaggle or Colab session can be cut at any moment; writing to a temporary name in the same folder
and renaming it into place means a reader never sees half a cache chunk or half a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from .errors import CourseError


class DiskFull(CourseError, OSError):
    """The disk filled up while writing; what was there before is untouched."""


LOW_SPACE = 1 << 20  # a write that fails with less room than this left on its disk failed for want of room


def _out_of_space(folder: Path) -> bool:
    """Whether the filesystem holding `folder` is (next to) full. Some writers do not pass the kernel's ENOSPC
    on: numpy's fwrite says "N requested and M written", safetensors its own error, torch's zip writer
    "unexpected pos"; the room left says what they meant."""
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


@contextlib.contextmanager
def _disk_full_says_so(dest: Path):
    """Turn a full disk into one message: the writers below never replace anything before they finish."""
    try:
        yield
    except Exception as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and not _out_of_space(dest.parent):
            raise
        raise DiskFull(errno.ENOSPC if not full else exc.errno,
                       f"no space left on device while writing {dest}; nothing was replaced, so "
                       f"what was saved before is intact. Free some space (df -h {dest.parent}) and run the "
                       "same command again: finished work is reused (training: add --resume).") from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike):
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed onto `dest`."""
    dest = Path(os.path.abspath(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with _disk_full_says_so(dest):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike):
    """Yield a temporary folder beside `dest`; on success it replaces `dest` whole. Whatever fails, `dest`
    is either the old folder or the new one."""
    dest = Path(os.path.abspath(dest))  # "." has no name to put a temporary one beside
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moved = False
    try:
        with _disk_full_says_so(dest):
            yield tmp
            if dest.exists():
                dest.rename(old)
                moved = True
            tmp.rename(dest)
            moved = False
    finally:
        if moved:  # the new folder could not take its place: put the old one back
            old.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(dest: str | os.PathLike, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(dest: str | os.PathLike, obj) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def folder_bytes(folder: str | os.PathLike) -> int:
    """What the files under `folder` take (0 when it does not exist); links are not followed."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space on the disk `folder` is (or will be) on: the nearest folder of it that exists is asked."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free
