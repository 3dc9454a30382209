"""Where a captioner bundle's files come from: a folder, a `.clipcap` file, a Hub id or a Kaggle handle.

`resolve_bundle(source)` turns any of these into a local bundle folder (bundle.py then checks and loads
what is in it; share.py writes `.clipcap` files and publishes):

| source                                   | where it comes from                                   |
|------------------------------------------|-------------------------------------------------------|
| `path/to/bundle/`                        | the folder itself                                     |
| `captioner.clipcap`                      | unpacked once into the user cache, by its SHA-256     |
| `hub:user/name` or `user/name`           | `huggingface_hub.snapshot_download` (its own cache)   |
| `kaggle:owner/model/framework/variation[/version]` | `kagglehub.model_download` (its own cache; attached inputs on Kaggle) |

A `.clipcap` file is an uncompressed zip holding a manifest of SHA-256 sums and the bundle's files. It is
checked whole before one byte is unpacked: its manifest (bounded in size before it is parsed), the count
and names of its members (each one listed, none outside the bundle), their sizes (stored, never
compressed: together no larger than the file itself) and every member's checksum. Only then is it
written into the cache, so a file that is damaged or crafted writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from .errors import CourseError
from .files import atomic_dir
from .paths import user_cache

ARCHIVE_SUFFIX = ".clipcap"
ARCHIVE_VERSION = 1
MANIFEST = "clipcap-manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a bundle's manifest names a few dozen files: ~100 bytes each
MAX_MEMBERS = 1000  # a bundle holds about ten files; a sharded 7B LM a few dozen
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KAGGLE_ID = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ShareError(CourseError, ValueError):
    """A bundle cannot be exported, published or found; the message says why and what to do."""


def user_cache_dir() -> Path:
    """The per-machine cache of the course (unpacked archives): CLIPCAP_CACHE, else XDG's, else ~/.cache."""
    return user_cache("CLIPCAP_CACHE")


def is_bundle(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "mapper.safetensors").is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- one file -----------------------------------------------------------------------------------------

def _damaged(archive: Path, why: str) -> ShareError:
    return ShareError(f"{archive}: {why}; nothing was unpacked. The file is damaged (a broken download?) or was "
                      "not written by `python -m utils export`: download or export it again.")


def _read_manifest(archive: Path, zf: zipfile.ZipFile) -> dict[str, str]:
    """The manifest's {member name: SHA-256}, its size bounded before it is read and parsed."""
    try:
        info = zf.getinfo(MANIFEST)
    except KeyError:
        raise ShareError(f"{archive} has no readable {MANIFEST}: it was not written by `python -m utils "
                         "export`, or it is damaged.") from None
    if info.file_size > MAX_MANIFEST_BYTES or info.compress_type != zipfile.ZIP_STORED:
        how = "" if info.compress_type == zipfile.ZIP_STORED else ", compressed"
        raise _damaged(archive, f"its {MANIFEST} is {info.file_size:,} bytes{how} (export stores it as it is, "
                       f"under {MAX_MANIFEST_BYTES:,} bytes)")
    try:
        with zf.open(info) as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except (ValueError, zipfile.BadZipFile, OSError):
        raise ShareError(f"{archive} has no readable {MANIFEST}: it was not written by `python -m utils "
                         "export`, or it is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("archive_version") != ARCHIVE_VERSION:
        version = manifest.get("archive_version") if isinstance(manifest, dict) else None
        raise ShareError(f"{archive} is a version {version} archive; this course reads version {ARCHIVE_VERSION}.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_MEMBERS:
        raise _damaged(archive, f"its {MANIFEST} does not list the bundle's files (\"files\": {{name: SHA-256}}, "
                       f"at most {MAX_MEMBERS} of them)")
    for name in files:
        parts = PurePosixPath(name).parts
        if name.startswith("/") or "\\" in name or ".." in parts or not parts or name.endswith("/") or \
                ":" in name or name == MANIFEST:
            raise ShareError(f"{archive} names a file outside the bundle ({name!r}): refused, nothing unpacked.")
    bad = next((name for name, digest in files.items() if not (isinstance(digest, str) and _SHA256.match(digest))),
               None)
    if bad is not None:
        raise _damaged(archive, f"its {MANIFEST} gives {bad} no SHA-256 sum")
    return files


def check_archive(archive: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The members a `.clipcap` file unpacks, each checked against its manifest (count, names, sizes,
    SHA-256) by reading, never writing; ShareError naming the first problem."""
    files = _read_manifest(archive, zf)
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS + 1:
        raise _damaged(archive, f"it holds {len(infos):,} members, more than a bundle ({MAX_MEMBERS} at most)")
    members = {}
    for info in infos:
        if info.filename == MANIFEST:
            continue
        if info.filename in members or info.filename not in files:
            why = "twice" if info.filename in members else "which its manifest does not list"
            raise _damaged(archive, f"it holds {info.filename!r} {why}")
        members[info.filename] = info
    missing = [name for name in files if name not in members]
    if missing:
        raise ShareError(f"{archive} lacks {missing[0]}, which its manifest lists: the file is damaged; "
                         "export it again.")
    size = archive.stat().st_size
    compressed = [i.filename for i in members.values() if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise _damaged(archive, f"{compressed[0]} is compressed (export stores every file as it is, so an "
                       "archive can never unpack to more than its own size)")
    total = sum(i.file_size for i in members.values())
    if total > size or any(i.file_size != i.compress_size for i in members.values()):
        raise _damaged(archive, f"its members claim {total:,} bytes, more than the {size:,} bytes of the file")
    for name, info in members.items():
        digest = hashlib.sha256()
        try:
            with zf.open(info) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise _damaged(archive, f"{name} cannot be read (its checksum does not match)") from None
        if digest.hexdigest() != files[name]:
            raise ShareError(f"{archive}: {name} does not match its checksum: the file is damaged "
                             "(a broken download?); download or export it again. Nothing was unpacked.")
    return members


def import_file(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Unpack a `.clipcap` file into `dest` (default: the user cache, keyed by the file's SHA-256, so a second
    load of the same file unpacks nothing). Every member is checked against the manifest before anything
    is written (`check_archive`)."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ShareError(f"{archive} is not a .clipcap file ({exc}); make it with `python -m utils export`.") from None
    with zf:
        dest = Path(dest) if dest else user_cache_dir() / "bundles" / sha256(archive)[:16]
        if is_bundle(dest):
            return dest
        members = check_archive(archive, zf)
        with atomic_dir(dest) as tmp:
            for name, info in members.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return dest


# ---- hubs ---------------------------------------------------------------------------------------------

def parse_source(source: str) -> tuple[str, str]:
    """('folder'|'file'|'hub'|'kaggle', id or path) for anything `resolve_bundle` takes."""
    if source.startswith("hub:"):
        return "hub", source[4:]
    if source.startswith("kaggle:"):
        return "kaggle", source[7:]
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        return "file", str(path)
    # user/name is a Hub id unless it reads as a local path: a folder "user" here means a mistyped local
    # bundle, which should be told it is not there rather than be looked up on the Hub
    if HUB_ID.match(source) and not source.startswith((".", "~")) and not path.parent.exists():
        return "hub", source
    return "folder", str(path)


def resolve_bundle(source: str | Path, offline: bool | None = None) -> Path:
    """A local bundle folder for a folder, a `.clipcap` file, a Hub id or a Kaggle model handle
    (offline None: CLIPCAP_OFFLINE, else whether a hub answers, asked only for a Hub id or handle)."""
    kind, ident = parse_source(str(source))
    if kind == "folder":
        return Path(ident)
    if kind == "file":
        return import_file(ident)
    from .runtime import is_offline

    offline = is_offline(offline)
    if kind == "hub":
        return _from_hub(ident, offline)
    return _from_kaggle(ident, offline)


def _from_hub(repo_id: str, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    if not HUB_ID.match(repo_id):
        raise ShareError(f"{repo_id!r} is not a Hugging Face Hub id: write it as user/name.")
    try:  # offline: only what the Hub's cache on this machine holds, never a request
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except Exception as exc:  # offline and not cached, no such repo, no network: one message for each
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = "this machine is offline and the Hub's cache on it does not hold it" if offline else \
            "the Hub did not give it"
        raise ShareError(f"cannot load the captioner hub:{repo_id}: {where} ({reason}). Check the id, or "
                         "download the bundle where there is network (`huggingface-cli download "
                         f"{repo_id} --local-dir captioner`) and pass that folder.") from None


def _from_kaggle(handle: str, offline: bool) -> Path:
    if not _KAGGLE_ID.match(handle):
        raise ShareError(f"{handle!r} is not a Kaggle model handle: write it as owner/model/framework/variation "
                         "(with /version to pin one), e.g. kaggle:you/clipcap-flickr30k/pyTorch/default/1.")
    import kagglehub

    try:
        return Path(kagglehub.model_download(handle))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = (" Offline, only a versioned handle (…/variation/N) already in kagglehub's cache can load."
                if offline else "")
        raise ShareError(f"cannot load the captioner kaggle:{handle} ({reason}).{hint} On Kaggle, attach the "
                         "model as an input; elsewhere set KAGGLE_API_TOKEN (kaggle.com -> Settings -> API -> "
                         "Generate New Token).") from None
