"""Find or fetch a dataset: Kaggle (attached notebook input first, then an earlier download, then kagglehub),
and COCO (its captions annotations, then each image by its URL).

Downloads are the step most likely to fail for reasons outside the code (no internet, no token, terms
not accepted), so every known failure becomes a DownloadError that says what went wrong and what to do.
kagglehub and requests are imported only when a download really starts: they are slow to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import urllib.parse
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .config import DATASETS
from .errors import CourseError
from .files import atomic_path, read_json, write_json, write_text

KAGGLE_DATASETS = {"flickr30k": "hsankesara/flickr-image-dataset", "flickr8k": "adityajn105/flickr8k",
                   "food": "zeynaloy/food-related-pictures-dataset-with-captions"}
# A file that identifies a dataset even when its folder was renamed (e.g. a re-uploaded copy).
TELLTALES = {"flickr30k": "results.csv", "flickr8k": "captions.txt"}
# Formats read from the user's own files (--path): there is nothing to fetch for them.
LOCAL_FORMATS = tuple(d for d in DATASETS if d != "embedded" and d not in KAGGLE_DATASETS)
HANDLE = re.compile(r"^[\w.-]+/[\w.-]+(/versions/\d+)?$")  # owner/slug or owner/slug/versions/N
MARKER = ".complete"

API_PAGE = "https://www.kaggle.com/settings/api"
GET_TOKEN = (f'on {API_PAGE} (kaggle.com -> Settings -> API), "Generate New Token" gives an API token for '
             'KAGGLE_API_TOKEN or ~/.kaggle/access_token; "Create Legacy API Key" downloads kaggle.json')
CREDENTIAL_WAYS = (
    f"On {API_PAGE} (kaggle.com -> Settings -> API), then rerun:\n"
    '  1. "Generate New Token": set the environment variable KAGGLE_API_TOKEN to the token it shows, or save '
    "the token alone in ~/.kaggle/access_token, then  chmod 600 ~/.kaggle/access_token\n"
    '  2. or "Create Legacy API Key": save the kaggle.json it downloads in ~/.kaggle/, then  chmod 600 '
    "~/.kaggle/kaggle.json (or set the environment variables KAGGLE_USERNAME and KAGGLE_KEY from it)\n"
    "(On Colab, KAGGLE_API_TOKEN, KAGGLE_USERNAME and KAGGLE_KEY also work as notebook secrets.)")


def offline_help(dataset: str) -> str:
    """What to do instead of a download: attach it on Kaggle, read a copy already on disk, or the embedded set."""
    name = next((key for key, handle in KAGGLE_DATASETS.items() if dataset in (key, handle)), None)
    return (f"in a Kaggle notebook, attach the dataset (Add input); with a copy already on disk (downloaded by "
            f"hand from https://www.kaggle.com/datasets/{_handle(dataset)}), pass --dataset {name or 'csv'} "
            "--path naming its folder or captions file (and --images-dir if the images are elsewhere); or run "
            "with --dataset embedded")


class DownloadError(CourseError, RuntimeError):
    """A download that cannot go on; the message says what failed and what to do."""


def find_credentials() -> str | None:
    """Name the credential source kagglehub will use (same order as kagglehub 1.0), or None.

    Raises DownloadError for a kaggle.json that kagglehub would reject, naming the file; warns when
    other users of the machine can read it. The access token is looked up in ~/.kaggle only:
    kagglesdk ignores KAGGLE_CONFIG_DIR for it, which moves kaggle.json alone. Colab secrets and
    kagglehub.login() are not seen here (kagglehub reads them itself while downloading).
    """
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    kaggle_home = Path.home() / ".kaggle"
    if any(_has_text(kaggle_home / name) for name in ("access_token", "access_token.txt")):
        return "~/.kaggle/access_token"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR")
    path = Path(config_dir or kaggle_home) / "kaggle.json"
    if not path.exists():
        return None
    try:
        creds = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8
        creds = None
    if not (isinstance(creds, dict) and creds.get("username") and creds.get("key")):
        raise DownloadError(f'{path} is not a valid Kaggle credentials file: it must be JSON like '
                            f'{{"username": "...", "key": "..."}}. Replace it with a fresh one ({GET_TOKEN}).')
    if os.name != "nt" and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"{path} holds your Kaggle key and other users of this machine can read it: "
                      f"run  chmod 600 {path}", stacklevel=2)
    return str(path) if config_dir else "~/.kaggle/kaggle.json"


def find_attached(dataset: str, input_root: str | Path | None = None) -> Path | None:
    """The read-only folder of `dataset` attached to this Kaggle notebook, or None.

    input_root defaults to CLIPCAP_KAGGLE_INPUT, else /kaggle/input. Kaggle mounts inputs at
    <root>/<slug> (older notebooks) or <root>/datasets/<owner>/<slug> (newer ones).
    """
    root = Path(input_root or os.environ.get("CLIPCAP_KAGGLE_INPUT") or "/kaggle/input")
    if not root.is_dir():
        return None
    owner, slug = _handle(dataset).split("/")[:2]
    for folder in (root / slug, root / "datasets" / owner / slug, *sorted(root.glob(f"datasets/*/{slug}"))):
        if folder.is_dir():
            return folder
    name = next((key for key, handle in KAGGLE_DATASETS.items() if dataset in (key, handle)), None)
    telltale = TELLTALES.get(name)
    if telltale:
        for folder in sorted([*root.glob("*"), *root.glob("datasets/*/*")]):
            if folder.is_dir() and (any(folder.glob(telltale)) or any(folder.glob(f"*/{telltale}"))):
                return folder
    return None


def downloadable(dataset: str) -> bool:
    """Whether the course fetches `dataset` itself (the rest are read from the user's own files)."""
    return dataset == "embedded" or dataset in KAGGLE_DATASETS


def dataset_root(data, offline: bool) -> Path | None:
    """The folder a downloadable dataset lies in (found or fetched), or None when it is read from the
    user's own files: a format that has no download, or --path naming a copy already on disk (then
    nothing is downloaded, online or not)."""
    if not downloadable(data.dataset) or (data.dataset != "embedded" and data.path):
        return None
    return download(data.dataset, data.data_dir, offline=offline)


def download(dataset: str, data_dir: str | Path, *, offline: bool = False, force: bool = False) -> Path:
    """Return the folder `dataset` lies in, downloading it with kagglehub only when nothing local has it.

    Order: the embedded set (generated elsewhere), a Kaggle input attached to the notebook (used in
    place), an earlier completed download under data_dir (skipped with force=True), then kagglehub,
    whose cache lives in data_dir/kaggle-cache so a rerun resumes an interrupted download.
    """
    data_dir = Path(data_dir).resolve()
    if dataset == "embedded":
        return data_dir / "embedded"
    if dataset in LOCAL_FORMATS:
        raise DownloadError(f"dataset {dataset!r} is read from your own files given with --path "
                            "(DataConfig.path): there is nothing to download.")
    handle = _handle(dataset)
    attached = find_attached(dataset)
    if attached:
        print(f"using the attached Kaggle input at {attached}")
        return attached
    marker = data_dir / "kaggle" / handle / MARKER
    earlier = None if force else _completed(marker, data_dir)
    if earlier:
        print(f"using the earlier download of {handle} at {earlier}")
        return earlier
    if offline:
        raise DownloadError(f"cannot download {handle} offline (no network): {offline_help(dataset)}.")
    credentials = find_credentials()
    cache = data_dir / "kaggle-cache"
    print(f"downloading {handle} from Kaggle into {cache} "
          f"(credentials: {credentials or 'none found'}; rerun to resume if interrupted)")
    import kagglehub

    try:
        with _environ("KAGGLEHUB_CACHE", str(cache)):
            path = Path(kagglehub.dataset_download(handle, force_download=force))
    except Exception as exc:
        error = explain_failure(exc, handle, credentials)
        if error is None:
            raise
        raise error from None
    stored = path.relative_to(data_dir) if path.is_relative_to(data_dir) else path  # data_dir may move
    write_json(marker, {"handle": handle, "path": str(stored),
                        "completed": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    print(f"{handle} is ready at {path}")
    return path


def explain_failure(exc: BaseException, handle: str, credentials: str | None) -> DownloadError | None:
    """Turn an exception from kagglehub into a DownloadError that says what to do; None if unknown."""
    import requests
    from kagglehub.exceptions import DataCorruptionError

    owner, slug = handle.split("/")[:2]
    page = f"https://www.kaggle.com/datasets/{owner}/{slug}"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403) and credentials is None:
            return DownloadError(
                f"Kaggle refused to send {handle} ({status}) because no Kaggle credentials were found. "
                f"{CREDENTIAL_WAYS}\nOr {offline_help(handle)}.")
        if status == 401:
            return DownloadError(f"your Kaggle credentials from {credentials} were refused: create a new one "
                                 f"({GET_TOKEN}) and replace the old one (Kaggle answered 401).")
        if status == 403:
            return DownloadError(f"Kaggle refused {handle} (403) with your credentials from {credentials}: "
                                 f"accept the dataset's terms / rules on its Kaggle page {page} then rerun.")
        if status == 404:
            return DownloadError(f"dataset {handle} not found on Kaggle (404): check the handle "
                                 f"(owner/slug, as in {page}).")
        return DownloadError(f"Kaggle answered {status} while sending {handle}: {exc}\n"
                             f"Try again later, or {offline_help(handle)}.")
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return DownloadError(f"cannot reach Kaggle to download {handle}: check internet is enabled in the "
                             "notebook settings (Kaggle: Settings -> Internet on); or "
                             f"{offline_help(handle)}.")
    if isinstance(exc, DataCorruptionError):
        return DownloadError(f"the download of {handle} arrived corrupted (checksum mismatch) and was "
                             "deleted: rerun to download it again.")
    return None


def _handle(dataset: str) -> str:
    """The Kaggle handle (owner/slug) for a course dataset name or a handle given as is."""
    handle = KAGGLE_DATASETS.get(dataset, dataset)
    if not HANDLE.match(handle):
        raise DownloadError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)} "
                            "or a Kaggle handle 'owner/slug' (from the dataset's URL).")
    return handle


def _completed(marker: Path, data_dir: Path) -> Path | None:
    """The folder an earlier download finished in, if its marker is readable and the folder still exists."""
    try:
        path = data_dir / read_json(marker)["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_dir() else None


def _has_text(path: Path) -> bool:
    return path.is_file() and bool(path.read_text(encoding="utf-8", errors="replace").strip())


@contextlib.contextmanager
def _environ(name: str, value: str):
    """Set one environment variable for the duration of a block, then put the old value back."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ---------------------------------------------------------------------------------------------
# COCO: the captions annotations, then each image by its URL


COCO_SPLITS = ("train2014", "val2014", "train2017", "val2017")
COCO_BASE_URL = "http://images.cocodataset.org"  # CLIPCAP_COCO_URL (or --base-url) points elsewhere, e.g. a mirror
COCO_WORKERS = 16  # images are small and the server far: threads wait on the network, not the CPU


def coco_base_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get("CLIPCAP_COCO_URL") or COCO_BASE_URL).rstrip("/")


def _fetch(url: str, dest: Path, check=None, timeout: float = 60) -> None:
    """Download `url` into `dest` whole or not at all: bytes go to a temporary name, are checked, then
    renamed into place. Raises DownloadError saying what went wrong."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            if check is not None:
                check(tmp)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise DownloadError(f"cannot reach the server ({getattr(exc, 'reason', None) or exc!r})") from None


def _check_image(path: Path) -> None:
    from .images import UnreadableImage, open_image

    try:
        open_image(path, draft=64)
    except UnreadableImage as exc:
        raise DownloadError(f"the bytes received are not an image ({exc})") from None


def _check_zip(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad:
        raise DownloadError(f"{bad} in the archive is damaged")


def _coco_annotations(split: str, root: Path, base: str) -> dict:
    """The captions JSON of `split`, from annotations_trainval<year>.zip (downloaded once, kept)."""
    import zipfile

    year = split[-4:]
    archive = root / f"annotations_trainval{year}.zip"
    if not archive.is_file():
        url = f"{base}/annotations/annotations_trainval{year}.zip"
        print(f"downloading the COCO {year} annotations from {url}")
        try:
            _fetch(url, archive, check=_check_zip, timeout=300)
        except (DownloadError, zipfile.BadZipFile) as exc:
            raise DownloadError(f"cannot download the COCO annotations {url}: {exc}. Rerun to try again, or "
                                f"put annotations_trainval{year}.zip (from cocodataset.org) in {root}.") from None
    member = f"annotations/captions_{split}.json"
    try:
        with zipfile.ZipFile(archive) as z:
            return json.loads(z.read(member).decode("utf-8"))
    except (KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise DownloadError(f"{archive} does not hold a readable {member} ({exc}): delete it and rerun "
                            "to download it again.") from None


def download_coco(data_dir: str | Path, split: str = "train2014", max_images: int | None = None, *,
                  offline: bool = False, base_url: str | None = None, workers: int = COCO_WORKERS) -> Path:
    """COCO captions and images into data_dir/coco: annotations first, then each image by its URL, in
    parallel threads. Resumable: every file is written whole under a temporary name, and what is already
    there is skipped. Each failed image is counted and listed in data_dir/coco/<split>-failed.csv; a rerun
    tries those again. Returns the captions JSON the COCO reader takes (only the images asked for)."""
    if split not in COCO_SPLITS:
        raise DownloadError(f"unknown COCO split {split!r}: use one of {', '.join(COCO_SPLITS)}")
    root = Path(data_dir) / "coco"
    captions_path = root / "annotations" / f"captions_{split}.json"
    images_dir = root / split
    if offline:
        raise DownloadError(
            f"cannot download COCO {split} offline (no network). With a copy already on disk, read it with "
            f"--dataset coco --path .../annotations/captions_{split}.json --images-dir .../{split}; "
            "or run with --dataset embedded.")
    base = coco_base_url(base_url)
    data = _coco_annotations(split, root, base)
    images = sorted(data["images"], key=lambda img: img["id"])[:max_images]
    wanted = {img["id"] for img in images}
    subset = {**{k: v for k, v in data.items() if k not in ("images", "annotations")}, "images": images,
              "annotations": [a for a in data["annotations"] if a["image_id"] in wanted]}
    write_json(captions_path, subset)

    def url_of(img: dict) -> str:
        url = img.get("coco_url") or f"{COCO_BASE_URL}/{split}/{img['file_name']}"
        return base + urllib.parse.urlsplit(url).path if base != COCO_BASE_URL else url

    todo = [img for img in images if not (images_dir / img["file_name"]).is_file()]
    print(f"COCO {split}: {len(images)} images asked for, {len(images) - len(todo)} already here, "
          f"{len(todo)} to download into {images_dir} ({workers} at a time)")

    report = root / f"{split}-failed.csv"
    failed = fetch_all([(img["file_name"], url_of(img), images_dir / img["file_name"]) for img in todo], report,
                       workers)
    print(f"COCO {split}: {len(images) - len(failed)} of {len(images)} images on disk, {len(failed)} failed"
          + (f" (listed in {report}; rerun to try them again)" if failed else "") +
          f"\nread it with: python -m utils features --dataset coco --path {captions_path}")
    return captions_path


def fetch_all(todo: list[tuple[str, str, Path]], report: Path, workers: int = COCO_WORKERS,
              check=_check_image) -> list[tuple[str, str, str]]:
    """Fetch each (name, url, dest) in parallel threads, every file whole or not at all (`_fetch`). Returns
    the failures as (name, url, reason); they are printed (the first 10) and listed in the CSV `report`
    (removed when none failed), so a rerun, which skips what is there, tries them again."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[str, str, Path]) -> tuple[tuple[str, str, Path], str | None]:
        try:
            _fetch(item[1], item[2], check=check)
            return item, None
        except DownloadError as exc:
            return item, str(exc)

    failed: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, ((name, url, _), error) in enumerate(pool.map(one, todo), start=1):
            if error:
                failed.append((name, url, error))
            if done % 500 == 0 or done == len(todo):
                print(f"  {done}/{len(todo)} tried, {len(failed)} failed", flush=True)
    if failed:
        import csv
        import io

        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([("file_name", "url", "reason"), *failed])
        write_text(report, out.getvalue())
        for name, url, reason in failed[:10]:
            print(f"  failed {name} ({url}): {reason}")
        if len(failed) > 10:
            print(f"  ... and {len(failed) - 10} more")
    else:
        report.unlink(missing_ok=True)
    return failed
