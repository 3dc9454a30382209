"""Sharing a trained captioner: one file, the Hugging Face Hub, Kaggle Models.

A bundle is a folder (config.json, mapper.safetensors, lm/). People who want one file get a `.clipcap`
archive of that folder (an uncompressed zip with a manifest of SHA-256 sums); people who want to share
publish the folder to the Hub or to Kaggle Models with the clients' own upload calls, and anyone loads
it back by its id. `resolve_bundle(source)` turns any of these into a local bundle folder:

| source                                   | where it comes from                                   |
|------------------------------------------|-------------------------------------------------------|
| `path/to/bundle/`                        | the folder itself                                     |
| `captioner.clipcap`                      | unpacked once into the user cache, by its SHA-256     |
| `hub:user/name` or `user/name`           | `huggingface_hub.snapshot_download` (its own cache)   |
| `kaggle:owner/model/framework/variation[/version]` | `kagglehub.model_download` (its own cache; attached inputs on Kaggle) |

Nothing here writes into a bundle: publishing uploads the folder as it is, plus a model card beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import CourseError
from .files import atomic_dir, atomic_path
from .paths import user_cache

ARCHIVE_SUFFIX = ".clipcap"
ARCHIVE_VERSION = 1
MANIFEST = "clipcap-manifest.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KAGGLE_ID = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")


class ShareError(CourseError, ValueError):
    """A bundle cannot be exported, published or found; the message says why and what to do."""


def user_cache_dir() -> Path:
    """The per-machine cache of the course (unpacked archives): CLIPCAP_CACHE, else XDG's, else ~/.cache."""
    return user_cache("CLIPCAP_CACHE")


def _is_bundle(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "mapper.safetensors").is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- one file -----------------------------------------------------------------------------------------

def export_file(bundle: str | Path, out: str | Path | None = None) -> Path:
    """Write the bundle folder as one `.clipcap` file (atomically); returns its path."""
    bundle = Path(bundle)
    if not _is_bundle(bundle):
        raise ShareError(f"{bundle} is not a captioner bundle (config.json and mapper.safetensors are missing): "
                         "export the `captioner` folder that training wrote.")
    out = Path(out) if out else bundle.with_name(bundle.name + ARCHIVE_SUFFIX)
    if out.is_dir():
        out = out / (bundle.name + ARCHIVE_SUFFIX)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    manifest = {"archive_version": ARCHIVE_VERSION,
                "files": {p.relative_to(bundle).as_posix(): _sha256(p) for p in files}}
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for p in files:  # weights do not compress: stored as they are, read back without inflating
            zf.write(p, p.relative_to(bundle).as_posix())
    return out


def import_file(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Unpack a `.clipcap` file into `dest` (default: the user cache, keyed by the file's SHA-256, so a second
    load of the same file unpacks nothing). Every member is checked against the manifest first."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ShareError(f"{archive} is not a .clipcap file ({exc}); make it with `python -m utils export`.") from None
    with zf:
        try:
            manifest = json.loads(zf.read(MANIFEST))
        except (KeyError, ValueError):
            raise ShareError(f"{archive} has no readable {MANIFEST}: it was not written by `python -m utils "
                             "export`, or it is damaged.") from None
        if manifest.get("archive_version") != ARCHIVE_VERSION:
            raise ShareError(f"{archive} is a version {manifest.get('archive_version')} archive; this course "
                             f"reads version {ARCHIVE_VERSION}.")
        names = manifest.get("files", {})
        for name in names:
            if name.startswith("/") or ".." in Path(name).parts:
                raise ShareError(f"{archive} names a file outside the bundle ({name!r}): refused, nothing unpacked.")
        dest = Path(dest) if dest else user_cache_dir() / "bundles" / _sha256(archive)[:16]
        if _is_bundle(dest):
            return dest
        with atomic_dir(dest) as tmp:
            for name, want in names.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except KeyError:
                    raise ShareError(f"{archive} lacks {name}, which its manifest lists: the file is damaged; "
                                     "export it again.") from None
                except zipfile.BadZipFile:
                    raise ShareError(f"{archive}: {name} is damaged (its checksum does not match: a broken "
                                     "download?); download or export it again.") from None
                if _sha256(target) != want:
                    raise ShareError(f"{archive}: {name} does not match its checksum: the file is damaged "
                                     "(a broken download?); download or export it again.")
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
    if _HUB_ID.match(source) and not source.startswith((".", "~")) and not path.parent.exists():
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

    if not _HUB_ID.match(repo_id):
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


def model_card(bundle: Path) -> str:
    meta = json.loads((bundle / "config.json").read_text())
    model, summary = meta.get("model", {}), meta.get("summary", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in {**{f"model.{k}": v for k, v in model.items()},
                                                    **{f"training.{k}": v for k, v in summary.items()}}.items())
    standin = "standin" in json.dumps(meta).lower()
    warning = ("\n**This bundle was trained offline on the course's stand-in models: it shows the mechanics, "
               "it does not caption real photos.**\n" if standin else "")
    return (f"---\ntags: [image-captioning, clipcap, clipcap-course]\n---\n# ClipCap captioner (clipcap-course)\n"
            f"{warning}\nLoad it with\n```python\nfrom utils.captioner import Captioner\n"
            f"captioner = Captioner.from_pretrained(\"<this id>\")\ncaptioner.caption([\"photo.jpg\"])\n```\n\n"
            f"| setting | value |\n|---|---|\n{rows}\n")


def publish(bundle: str | Path, to: str, offline: bool = False, private: bool = False) -> str:
    """Upload a bundle folder to `hub:NAME` (user/name) or `kaggle:OWNER/NAME`; returns where it went."""
    bundle = Path(bundle)
    if not _is_bundle(bundle):
        raise ShareError(f"{bundle} is not a captioner bundle: publish the `captioner` folder that training wrote.")
    kind, ident = (to.split(":", 1) + [""])[:2] if ":" in to else ("", to)
    if kind not in ("hub", "kaggle") or not _HUB_ID.match(ident):
        raise ShareError(f"--to {to!r}: write hub:USER/NAME (Hugging Face Hub) or kaggle:OWNER/NAME (Kaggle Models).")
    if offline:
        raise ShareError(f"cannot publish to {to}: this machine is offline (or --offline was given). Publishing "
                         "needs the network; export one file instead (`python -m utils export --model "
                         f"{bundle}`) and publish it from a machine with network.")
    with tempfile.TemporaryDirectory() as tmp:  # the bundle plus a model card, the bundle left untouched
        staged = Path(tmp) / bundle.name
        shutil.copytree(bundle, staged)
        (staged / "README.md").write_text(model_card(bundle))
        if kind == "hub":
            from huggingface_hub import HfApi

            api = HfApi()
            try:
                api.create_repo(ident, private=private, exist_ok=True)
                api.upload_folder(repo_id=ident, folder_path=str(staged), commit_message="clipcap-course captioner")
            except Exception as exc:
                raise ShareError(f"the Hub refused the upload to {ident} ({str(exc).splitlines()[0]}): log in with "
                                 "`huggingface-cli login` (or set HF_TOKEN) with a write token.") from None
            return f"https://huggingface.co/{ident}"
        import kagglehub

        handle = f"{ident}/pyTorch/default"
        try:
            kagglehub.model_upload(handle, str(staged), license_name="Apache 2.0",
                                   version_notes="clipcap-course captioner")
        except Exception as exc:
            raise ShareError(f"Kaggle refused the upload to {handle} ({str(exc).splitlines()[0]}): set "
                             "KAGGLE_API_TOKEN (kaggle.com -> Settings -> API -> Generate New Token).") from None
        return f"kaggle:{handle}"
