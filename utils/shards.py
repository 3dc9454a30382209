"""webdataset / img2dataset tar shards: members sharing a key form one sample (an image and its caption).

img2dataset writes `00000.tar`, `00001.tar`, ... each holding `000000000.jpg`, `000000000.txt` (the whole
caption, which may hold a newline) and `000000000.json`; shards are named by brace patterns such as
`{00000..00099}.tar`, which are expanded here as webdataset expands them.
"""

from __future__ import annotations

import glob
import json
import posixpath
import re
import tarfile
from pathlib import Path

from .config import DataConfig
from .csvtext import decode_text, repair_message, replace_bad_bytes
from .records import DatasetError, Parsed

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_CAPTION_BYTES = 1 << 20  # a caption member (.txt, .json) is read whole: a few hundred bytes, never megabytes
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..002}.tar` -> shard-000.tar, shard-001.tar, shard-002.tar (zero padding kept);
    `{a,b}.tar` -> a.tar, b.tar. Patterns nest left to right, as in a shell or webdataset."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    if r := _RANGE.fullmatch(body):
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _shards(spec: Path, parsed: Parsed) -> list[Path]:
    if spec.is_file():
        return [spec]
    if spec.is_dir():
        return sorted(spec.glob("*.tar"))
    shards, missing = [], []
    for pattern in expand_braces(str(spec)):
        if glob.has_magic(pattern):
            shards += sorted(Path(p) for p in glob.glob(pattern))
        elif Path(pattern).is_file():
            shards.append(Path(pattern))
        else:
            missing.append(pattern)
    if missing and shards:
        parsed.skip(f"{len(missing)} of {len(missing) + len(shards)} shards named by {spec.name} are not there "
                    f"(first: {Path(missing[0]).name})")
    return shards


def _shard_captions(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], where: str, parsed: Parsed,
                    encoding: str | None) -> list[tuple[str, str]]:
    """Captions of one sample: its .txt as one caption (newlines inside it included), else the
    "caption" text or "captions" list of its .json."""
    if "txt" in parts:
        text = decode_text(tar.extractfile(parts["txt"]).read(), Path(where), encoding)
        fixed = replace_bad_bytes([text])
        if fixed:
            text = fixed[0]
            parsed.repair(repair_message(f"{where}.txt", encoding))
        return [(f"{where}.txt", text)]
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


def _too_large(member: tarfile.TarInfo, shard_size: int) -> str | None:
    """Why a member is refused by its size before one byte of it is read, or None: a sparse member (its holes
    would be read as zeros: 10 KB of shard, gigabytes of memory), one claiming more bytes than its shard
    holds, or a caption member past MAX_CAPTION_BYTES."""
    if member.issparse() or member.size > shard_size:
        return f"{member.name} claims {member.size:,} bytes in a shard of {shard_size:,} (a sparse or damaged member)"
    if member.name.lower().endswith((".txt", ".json")) and member.size > MAX_CAPTION_BYTES:
        return f"{member.name} is {member.size:,} bytes, over the {MAX_CAPTION_BYTES:,} a caption may have"
    return None


def _read_shard(shard: Path, parsed: Parsed, encoding: str | None) -> None:
    """One tar shard: members sharing a key (name up to the first dot, folder included) form one sample; a
    sample with a member too large to read (`_too_large`) is skipped, unread."""
    shard_size = shard.stat().st_size
    with tarfile.open(shard) as tar:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        too_large: dict[str, str] = {}
        for member in tar:
            if member.isfile():
                folder, base = posixpath.split(member.name)
                key, _, ext = base.partition(".")
                samples.setdefault(posixpath.join(folder, key), {})[ext.lower()] = member
                if (why := _too_large(member, shard_size)) and posixpath.join(folder, key) not in too_large:
                    too_large[posixpath.join(folder, key)] = why
        for key, parts in samples.items():
            where = f"{shard.name} {key}"
            if key in too_large:
                parsed.skip(f"{where}: {too_large[key]}, not read")
                continue
            image = next((parts[e] for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
            if image is None:
                parsed.skip(f"{where}: no image member ({', '.join(SHARD_IMAGE_EXTENSIONS)})")
                continue
            if "txt" not in parts and "json" not in parts:
                parsed.skip(f"{where}: no .txt or .json caption member")
                continue
            image_id = f"{shard.stem}/{key}"  # some shard writers restart keys: the shard name keeps ids unique
            for caption_where, caption in _shard_captions(tar, parts, where, parsed, encoding):
                parsed.add(caption_where, image_id, f"{shard.absolute()}::{image.name}", caption)


def read_webdataset(cfg: DataConfig, root: Path) -> Parsed:
    """Tar shards named by cfg.path: one shard, a folder of them, a glob or a brace pattern."""
    source = Path(cfg.path).expanduser() if cfg.path else root
    parsed = Parsed(source, local=False)
    shards = _shards(source, parsed)
    if not shards:
        raise DatasetError(f"no .tar shards at {source}; pass --path naming a shard, a folder of shards, a glob "
                           "or a brace pattern such as 'shards/{00000..00099}.tar'")
    for shard in shards:
        try:
            _read_shard(shard, parsed, cfg.encoding)
        except (tarfile.TarError, OSError) as exc:
            parsed.skip(f"{shard}: unreadable tar shard ({exc})")
    return parsed
