"""Find or fetch a Kaggle dataset: attached notebook input first, then an earlier download, then kagglehub.

Downloads are the step most likely to fail for reasons outside the code (no internet, no token, terms
not accepted), so every known failure becomes a DownloadError that says what went wrong and what to do.
kagglehub and requests are imported only when a download really starts: they are slow to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .config import DATASETS
from .files import read_json, write_json

KAGGLE_DATASETS = {"flickr30k": "hsankesara/flickr-image-dataset",
                   "food": "zeynaloy/food-related-pictures-dataset-with-captions"}
# A file that identifies a dataset even when its folder was renamed (e.g. a re-uploaded copy).
TELLTALES = {"flickr30k": "results.csv"}
# Formats read from the user's own files (--path): there is nothing to fetch for them.
LOCAL_FORMATS = tuple(d for d in DATASETS if d != "embedded" and d not in KAGGLE_DATASETS)
HANDLE = re.compile(r"^[\w.-]+/[\w.-]+(/versions/\d+)?$")  # owner/slug or owner/slug/versions/N
MARKER = ".complete"

GET_TOKEN = "kaggle.com -> Settings -> API -> Create New Token, at https://www.kaggle.com/settings/api"
NO_NETWORK_HELP = "attach the dataset in the Kaggle notebook (Add input) or run with --dataset embedded"


class DownloadError(RuntimeError):
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
        raise DownloadError(f"cannot download {handle} offline (no network): {NO_NETWORK_HELP}.")
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
                f"Get a token ({GET_TOKEN}), then give it in one of three ways and rerun:\n"
                "  1. save the downloaded kaggle.json in ~/.kaggle/, then  chmod 600 ~/.kaggle/kaggle.json\n"
                "  2. set the environment variables KAGGLE_USERNAME and KAGGLE_KEY (from kaggle.json)\n"
                "  3. set the environment variable KAGGLE_API_TOKEN to the new API token\n"
                "(On Colab, 2 and 3 also work as notebook secrets of the same names.) "
                f"Or {NO_NETWORK_HELP}.")
        if status == 401:
            return DownloadError(f"your Kaggle credentials from {credentials} were refused: create a new token "
                                 f"({GET_TOKEN}) and replace the old one (Kaggle answered 401).")
        if status == 403:
            return DownloadError(f"Kaggle refused {handle} (403) with your credentials from {credentials}: "
                                 f"accept the dataset's terms / rules on its Kaggle page {page} then rerun.")
        if status == 404:
            return DownloadError(f"dataset {handle} not found on Kaggle (404): check the handle "
                                 f"(owner/slug, as in {page}).")
        return DownloadError(f"Kaggle answered {status} while sending {handle}: {exc}\n"
                             f"Try again later, or {NO_NETWORK_HELP}.")
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return DownloadError(f"cannot reach Kaggle to download {handle}: check internet is enabled in the "
                             "notebook settings (Kaggle: Settings -> Internet on) or attach the dataset "
                             "(Add input), or run with --dataset embedded.")
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
