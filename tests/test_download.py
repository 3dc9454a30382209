"""utils.download without the real Kaggle: credentials, attached inputs, reuse, and the errors people see.

Network failures are produced by the real stack (kagglehub -> kagglesdk -> requests -> a failing DNS
lookup, or a local server answering as Kaggle does), so the messages are checked against what
kagglehub really raises, not against a hand-made imitation.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import threading
import zipfile

import pytest
import requests
from kagglehub.exceptions import KaggleApiHTTPError, handle_call
from kagglehub.handle import parse_dataset_handle

from conftest import serve_folder
from utils import download as dl

FLICKR = dl.KAGGLE_DATASETS["flickr30k"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real credentials, Kaggle notebook or input folder leaks in from the machine running the tests."""
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLEHUB_CACHE",
                 "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_API_ENVIRONMENT", "KAGGLE_DATA_PROXY_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLIPCAP_KAGGLE_INPUT", str(tmp_path / "input"))
    (tmp_path / "home").mkdir()
    return tmp_path


def write_kaggle_json(folder, text='{"username": "ada", "key": "abc"}', mode=0o600):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kaggle.json"
    path.write_text(text)
    path.chmod(mode)
    return path


# ---- find_credentials ---------------------------------------------------------------------------

@pytest.mark.fault
def test_no_credentials(isolated):
    assert dl.find_credentials() is None


def test_api_token_env_comes_first(isolated, monkeypatch):
    write_kaggle_json(isolated / "home" / ".kaggle")
    monkeypatch.setenv("KAGGLE_USERNAME", "ada")
    monkeypatch.setenv("KAGGLE_KEY", "abc")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_x")
    assert dl.find_credentials() == "KAGGLE_API_TOKEN"


def test_access_token_file(isolated):
    (isolated / "home" / ".kaggle").mkdir()
    (isolated / "home" / ".kaggle" / "access_token").write_text("KGAT_x\n")
    assert dl.find_credentials() == "~/.kaggle/access_token"


def test_username_key_env_before_kaggle_json(isolated, monkeypatch):
    write_kaggle_json(isolated / "home" / ".kaggle", text="not json")  # kagglehub never reads it then
    monkeypatch.setenv("KAGGLE_USERNAME", "ada")
    monkeypatch.setenv("KAGGLE_KEY", "abc")
    assert dl.find_credentials() == "KAGGLE_USERNAME/KAGGLE_KEY"


def test_kaggle_json_in_home(isolated):
    write_kaggle_json(isolated / "home" / ".kaggle")
    assert dl.find_credentials() == "~/.kaggle/kaggle.json"


def test_kaggle_config_dir_moves_kaggle_json(isolated, monkeypatch):
    path = write_kaggle_json(isolated / "elsewhere")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(isolated / "elsewhere"))
    assert dl.find_credentials() == str(path)


@pytest.mark.fault
@pytest.mark.parametrize("text", ["{not json", '{"username": "ada"}', "[]"])
def test_malformed_kaggle_json_names_the_file(isolated, text):
    path = write_kaggle_json(isolated / "home" / ".kaggle", text=text)
    with pytest.raises(dl.DownloadError, match="kaggle.json is not a valid Kaggle credentials file") as err:
        dl.find_credentials()
    assert str(path) in str(err.value)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_readable_kaggle_json_warns(isolated):
    write_kaggle_json(isolated / "home" / ".kaggle", mode=0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        assert dl.find_credentials() == "~/.kaggle/kaggle.json"


# ---- find_attached ------------------------------------------------------------------------------

def test_attached_older_layout(isolated):
    folder = isolated / "input" / "flickr-image-dataset"
    folder.mkdir(parents=True)
    assert dl.find_attached("flickr30k") == folder
    assert dl.find_attached(FLICKR, input_root=isolated / "input") == folder


def test_attached_newer_layout(isolated):
    folder = isolated / "input" / "datasets" / "zeynaloy" / "food-related-pictures-dataset-with-captions"
    folder.mkdir(parents=True)
    assert dl.find_attached("food") == folder


def test_attached_by_telltale_file(isolated):
    copy = isolated / "input" / "datasets" / "someone" / "flickr30k-copy"
    (copy / "flickr30k_images").mkdir(parents=True)
    (copy / "flickr30k_images" / "results.csv").write_text("image_name| comment_number| comment\n")
    assert dl.find_attached("flickr30k") == copy


def test_not_attached(isolated):
    (isolated / "input" / "some-other-dataset").mkdir(parents=True)
    assert dl.find_attached("flickr30k") is None
    assert dl.find_attached("food", input_root=isolated / "missing") is None


# ---- download: everything that needs no network -------------------------------------------------

def test_embedded_is_not_downloaded(isolated):
    assert dl.download("embedded", isolated / "data") == (isolated / "data" / "embedded").resolve()


@pytest.mark.parametrize("dataset", ["csv", "coco", "karpathy", "folder", "webdataset", "hf"])
def test_local_formats_have_nothing_to_download(isolated, dataset):
    with pytest.raises(dl.DownloadError, match="your own files given with --path"):
        dl.download(dataset, isolated / "data")


def test_unknown_dataset(isolated):
    with pytest.raises(dl.DownloadError, match="unknown dataset 'flickr'"):
        dl.download("flickr", isolated / "data")


def test_attached_input_is_used_in_place(isolated, capsys):
    folder = isolated / "input" / "datasets" / "hsankesara" / "flickr-image-dataset"
    folder.mkdir(parents=True)
    assert dl.download("flickr30k", isolated / "data", offline=True) == folder
    assert "using the attached Kaggle input at" in capsys.readouterr().out
    assert not (isolated / "data").exists()  # nothing copied, no marker


def test_earlier_download_is_reused(isolated, capsys):
    data = isolated / "data"
    files = data / "kaggle-cache" / "datasets" / "hsankesara" / "flickr-image-dataset" / "versions" / "1"
    files.mkdir(parents=True)
    marker = data / "kaggle" / FLICKR / ".complete"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"handle": FLICKR, "path": str(files.relative_to(data)), "completed": "x"}))
    assert dl.download("flickr30k", data, offline=True) == files.resolve()
    assert "using the earlier download" in capsys.readouterr().out


@pytest.mark.fault
def test_offline_without_input_says_what_to_do(isolated):
    with pytest.raises(dl.DownloadError, match=r"no network\): in a Kaggle notebook, attach the dataset .*"
                       r"--dataset flickr30k --path .*--dataset embedded"):
        dl.download("flickr30k", isolated / "data", offline=True)


def test_stale_marker_is_not_trusted(isolated):
    marker = isolated / "data" / "kaggle" / FLICKR / ".complete"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"handle": FLICKR, "path": "/gone/away"}))
    with pytest.raises(dl.DownloadError, match="no network"):
        dl.download("flickr30k", isolated / "data", offline=True)


# ---- download through the real kagglehub --------------------------------------------------------

@pytest.mark.fault
def test_no_dns_means_cannot_reach_kaggle(isolated, monkeypatch):
    """What kagglehub does on a machine without network: the name lookup of api.kaggle.com fails."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(dl.DownloadError, match="cannot reach Kaggle") as err:
        dl.download("flickr30k", isolated / "data")
    assert "Settings -> Internet on" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no kagglehub traceback
    assert "KAGGLEHUB_CACHE" not in os.environ  # put back as it was
    assert not (isolated / "data" / "kaggle").exists()  # no marker for a failed download


class FakeKaggle(http.server.BaseHTTPRequestHandler):
    """Answers the two calls kagglehub makes (GetDataset, DownloadDataset) as api.kaggle.com does."""

    status = 200
    calls: list[str] = []

    def do_POST(self):
        self.calls.append(self.path.rsplit("/", 1)[-1])
        if self.status != 200:
            self.answer(json.dumps({"code": self.status, "message": "refused"}).encode(), "application/json")
        elif self.path.endswith("/GetDataset"):
            self.answer(json.dumps({"currentVersionNumber": 3}).encode(), "application/json")
        else:
            archive = io.BytesIO()
            with zipfile.ZipFile(archive, "w") as z:
                z.writestr("flickr30k_images/results.csv", "image_name| comment_number| comment\n")
            self.answer(archive.getvalue(), "application/zip")

    def answer(self, body: bytes, content_type: str):
        self.send_response(self.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_kaggle(monkeypatch):
    """kagglesdk's TEST environment talks to localhost:7777; serve a fake Kaggle there."""
    FakeKaggle.status, FakeKaggle.calls = 200, []
    try:
        server = http.server.HTTPServer(("127.0.0.1", 7777), FakeKaggle)
    except OSError:
        pytest.skip("port 7777 is in use")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    yield FakeKaggle
    server.shutdown()
    server.server_close()


def test_download_records_and_reuses(isolated, fake_kaggle, capsys):
    data = isolated / "data"
    path = dl.download("flickr30k", data)
    assert path == (data / "kaggle-cache" / "datasets" / FLICKR / "versions" / "3").resolve()
    assert (path / "flickr30k_images" / "results.csv").is_file()
    record = json.loads((data / "kaggle" / FLICKR / ".complete").read_text())
    assert record["handle"] == FLICKR and record["path"] == f"kaggle-cache/datasets/{FLICKR}/versions/3"
    assert fake_kaggle.calls == ["GetDataset", "DownloadDataset"]
    assert dl.download("flickr30k", data, offline=True) == path  # no network needed the second time
    assert fake_kaggle.calls == ["GetDataset", "DownloadDataset"]
    assert "using the earlier download" in capsys.readouterr().out


@pytest.mark.parametrize("status, username, expected", [
    (401, None, "KAGGLE_USERNAME and KAGGLE_KEY"),
    (401, "ada", "were refused"),
    (403, "ada", "accept the dataset's terms"),
    (404, "ada", "not found on Kaggle"),
])
@pytest.mark.fault
def test_refusals_through_the_real_client(isolated, fake_kaggle, monkeypatch, status, username, expected):
    fake_kaggle.status = status
    if username:
        monkeypatch.setenv("KAGGLE_USERNAME", username)
        monkeypatch.setenv("KAGGLE_KEY", "abc")
    with pytest.raises(dl.DownloadError, match=expected):
        dl.download(FLICKR, isolated / "data")
    assert not (isolated / "data" / "kaggle").exists()


# ---- explain_failure with the exceptions kagglehub builds ---------------------------------------

def kaggle_http_error(status: int, handle: str = FLICKR) -> KaggleApiHTTPError:
    """Raise an HTTP error inside kagglehub's own handle_call, as its resolvers do, and return the result."""
    response = requests.Response()
    response.status_code = status
    response.reason = "Refused"
    response.url = "https://api.kaggle.com/v1/datasets.DatasetApiService/GetDataset"
    with pytest.raises(KaggleApiHTTPError) as err:
        handle_call(response.raise_for_status, parse_dataset_handle(handle))
    return err.value


@pytest.mark.parametrize("status, credentials, expected", [
    (401, None, "no Kaggle credentials were found"),
    (403, None, '"Generate New Token"'),
    (401, "~/.kaggle/kaggle.json", "credentials from ~/.kaggle/kaggle.json were refused: create a new one"),
    (403, "KAGGLE_API_TOKEN", "accept the dataset's terms / rules on its Kaggle page "
                              "https://www.kaggle.com/datasets/hsankesara/flickr-image-dataset"),
    (404, None, f"dataset {FLICKR} not found on Kaggle"),
    (500, "KAGGLE_API_TOKEN", "Kaggle answered 500"),
])
@pytest.mark.fault
def test_http_errors_are_explained(status, credentials, expected):
    error = dl.explain_failure(kaggle_http_error(status), FLICKR, credentials)
    assert isinstance(error, dl.DownloadError)
    assert expected in str(error)


def test_no_credentials_message_lists_the_three_ways():
    text = str(dl.explain_failure(kaggle_http_error(401), FLICKR, None))
    for way in ("chmod 600 ~/.kaggle/kaggle.json", "KAGGLE_USERNAME and KAGGLE_KEY", "KAGGLE_API_TOKEN",
                "~/.kaggle/access_token", '"Generate New Token"', '"Create Legacy API Key": save the kaggle.json',
                "https://www.kaggle.com/settings/api", "--path"):
        assert way in text


def test_unknown_failures_are_left_alone():
    assert dl.explain_failure(KeyError("x"), FLICKR, None) is None


# ---- COCO by URL, from a local server copying images.cocodataset.org's layout ----------------------

def _fake_coco(root, n=12, missing=(3, 7), broken=(5,)):
    """annotations/annotations_trainval2014.zip (with captions_train2014.json in COCO's structure) and
    train2014/COCO_train2014_<id>.jpg; images `missing` are absent (404), `broken` hold bytes that are no JPEG."""
    from PIL import Image

    images, annotations = [], []
    (root / "train2014").mkdir(parents=True)
    for k in range(n):
        image_id = 1000 + 17 * k
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2014/{name}",
                       "height": 24, "width": 32, "date_captured": "2013-11-14 16:28:13",
                       "flickr_url": f"http://farm4.staticflickr.com/{name}", "id": image_id})
        annotations += [{"image_id": image_id, "id": 10 * k + j, "caption": f"picture {k}, caption {j}."}
                        for j in range(5)]
        if k in missing:
            continue
        if k in broken:
            (root / "train2014" / name).write_bytes(b"<html>rate limited</html>")
        else:
            Image.new("RGB", (32, 24), (20 * k % 256, 90, 160)).save(root / "train2014" / name)
    data = {"info": {"description": "COCO 2014 Dataset"}, "licenses": [], "images": images,
            "annotations": annotations}
    (root / "annotations").mkdir()
    with zipfile.ZipFile(root / "annotations" / "annotations_trainval2014.zip", "w") as z:
        z.writestr("annotations/captions_train2014.json", json.dumps(data))
        z.writestr("annotations/instances_train2014.json", "{}")
    return images


@pytest.fixture()
def coco_server(tmp_path):
    """http.server on 127.0.0.1 serving the fake COCO; yields (base URL, served root, requested paths)."""
    served = tmp_path / "served"
    images = _fake_coco(served)
    with serve_folder(served) as (base, requested):
        yield base, served, images, requested


def test_coco_download_counts_failures_resumes_and_reads(coco_server, tmp_path, capsys):
    from utils.config import DataConfig
    from utils.readers import load_records

    base, served, images, requested = coco_server
    data = tmp_path / "data"
    path = dl.download_coco(data, "train2014", max_images=10, base_url=base, workers=4)
    out = capsys.readouterr().out
    assert "10 images asked for, 0 already here, 10 to download" in out
    assert "7 of 10 images on disk, 3 failed" in out  # 3 and 7 are missing (404), 5 is no JPEG
    assert "HTTP 404" in out and "not an image" in out
    failed = (data / "coco" / "train2014-failed.csv").read_text().splitlines()
    assert failed[0] == "file_name,url,reason" and len(failed) == 4
    assert {line.split(",")[0] for line in failed[1:]} == {images[k]["file_name"] for k in (3, 5, 7)}
    got = sorted(p.name for p in (data / "coco" / "train2014").iterdir())
    assert got == sorted(img["file_name"] for k, img in enumerate(images[:10]) if k not in (3, 5, 7))
    assert not list((data / "coco").rglob(".*tmp*")), "no partial file is left behind"

    caps = load_records(DataConfig(dataset="coco", data_dir=str(data), path=str(path)))
    assert len(caps.images()) == 10 and len(caps.records) == 50  # the 10 asked for, 5 captions each
    assert any("3 of 10 images named in captions_train2014.json are missing on disk" in p for p in caps.problems)

    # the rerun fetches only what is missing (annotations kept, good images skipped), and still loses nothing
    (served / "train2014" / images[3]["file_name"]).write_bytes((served / "train2014" / images[0]["file_name"])
                                                                .read_bytes())
    requested.clear()
    dl.download_coco(data, "train2014", max_images=10, base_url=base, workers=4)
    out = capsys.readouterr().out
    assert "10 images asked for, 7 already here, 3 to download" in out and "8 of 10 images on disk, 2 failed" in out
    assert sorted(requested) == sorted(f'GET /train2014/{images[k]["file_name"]} HTTP/1.1' for k in (3, 5, 7))
    assert (data / "coco" / "train2014" / images[3]["file_name"]).is_file()


def test_coco_download_offline_says_what_to_do(tmp_path):
    with pytest.raises(dl.DownloadError, match=r"offline .*--dataset coco --path .*captions_train2014.json"):
        dl.download_coco(tmp_path, "train2014", offline=True)
    with pytest.raises(dl.DownloadError, match="unknown COCO split 'train2015'"):
        dl.download_coco(tmp_path, "train2015")


def test_coco_download_cli_then_features(coco_server, tmp_path, data_dir):
    """`download --dataset coco` as a user runs it (the local server stands for images.cocodataset.org),
    then `features --offline` on what came; offline, the download stops with one clear message."""
    from conftest import run_cli

    base, _, _, _ = coco_server
    data = tmp_path / "data"
    args = ("download", "--dataset", "coco", "--split", "train2014", "--max-images", "6", "--base-url", base)
    proc = run_cli(*args, "--no-offline", data_dir=data)
    assert "4 of 6 images on disk, 2 failed" in proc.stdout and "30 captions of 6 images" in proc.stdout
    captions = data / "coco" / "annotations" / "captions_train2014.json"
    proc = run_cli("features", "--dataset", "coco", "--path", str(captions), "--num-workers", "0",
                   "--device", "cpu", data_dir=data_dir)  # the session's data folder: stand-ins built once
    assert "4 images, 20 captions" in proc.stdout and "2 unreadable image(s)" in proc.stdout

    proc = run_cli(*args, data_dir=tmp_path / "other", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: cannot download COCO train2014 offline (no network)" in proc.stderr
