"""Shared fixtures: one data folder per test session, where the stand-in models are built once by the
package's own code (as a user's first offline run builds them) and reused by every test."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Under `pytest -n N` (bash course.sh test), each worker computes on one thread, and so do the processes
    and notebook kernels it starts: N workers then share N cores instead of fighting over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session", autouse=True)
def models_dir(tmp_path_factory) -> Path:
    """The stand-in models' per-machine folder (utils.standins.standins_home), pointed at a temporary folder
    for the session through CLIPCAP_STANDINS, so tests never read or fill the user's cache (unless
    CLIPCAP_TEST_STANDINS names a folder to keep them in between sessions); subprocesses and
    notebook kernels inherit it. The stand-ins are built there once, by the first test that needs them."""
    from utils.standin_names import STANDINS_ENV
    from utils.standins import standins_home

    mp = pytest.MonkeyPatch()
    # CLIPCAP_TEST_STANDINS: a folder kept between sessions (a CI cache, a developer's machine) instead
    mp.setenv(STANDINS_ENV, os.environ.get("CLIPCAP_TEST_STANDINS") or str(tmp_path_factory.mktemp("standins")))
    yield standins_home()
    mp.undo()


@pytest.fixture(scope="session")
def tiny_captioner(models_dir):
    """The suite's tiny captioner, made by `tiny_captioner(freeze="full", **model_changes)`: the stand-in GPT-2
    under a one-layer transformer mapper from a 64-d CLIP embedding to 3 prefix positions (2 CLIP positions, 4
    heads), seeded 0. A new one per call, so a test may train or change it."""
    import torch

    from utils.captioner import Captioner
    from utils.config import ModelConfig
    from utils.sources import load_language_model

    def make(freeze: str = "full", **changes):
        lm, tokenizer, _ = load_language_model("gpt2", offline=True)
        torch.manual_seed(0)
        return Captioner(ModelConfig(clip_dim=64, prefix_length=3, clip_length=2, num_layers=1, num_heads=4,
                                     freeze=freeze, **changes), lm, tokenizer)
    return make


@pytest.fixture(scope="module")
def one_thread():
    """The stand-ins are so small that two threads spend their time waiting on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TouchWhenUnpickled:
    """Pickled code, as a malicious checkpoint carries it: unpickling it creates `marker`, so a test that
    finds no marker knows the file was refused, never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def quick_train_config(out: Path, **changes):
    """A TrainConfig for a few seconds of training on `small_cache`, with `changes` on top."""
    from utils.config import TrainConfig

    base = dict(epochs=2, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_every=4, log_every=2, out_dir=str(out))
    return TrainConfig(**(base | changes))


def embedded_set(folder: Path, n_images: int, seed: int) -> dict[str, list[str]]:
    """Generate an embedded set with `utils.embedded.make_embedded`; returns image file name -> captions."""
    import csv

    from utils.embedded import make_embedded

    make_embedded(folder, n_images=n_images, seed=seed)
    captions: dict[str, list[str]] = {}
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        for name, caption in list(csv.reader(f))[1:]:
            captions.setdefault(name, []).append(caption)
    return captions


def lm_without_dropout(dest: Path) -> Path:
    """The stand-in GPT-2 copied to `dest` with its dropout off: runs that must end with equal weights
    (two processes vs one with accumulation) cannot draw dropout masks in different orders."""
    import json
    import shutil

    from utils.standin_text import gpt2_dir

    lm = shutil.copytree(gpt2_dir(), dest)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}))
    return lm


def assert_same_weights_and_losses(a_dir: Path, b_dir: Path) -> None:
    """Two training runs' last checkpoints hold the same trainable weights and logged the same losses."""
    import torch

    a = torch.load(a_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(b_dir / "checkpoint.pt", weights_only=True)
    for name, tensor in b["trainable"].items():
        torch.testing.assert_close(a["trainable"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    loss = [r["loss"] for r in a["state"]["history"]["train"]]
    assert loss == pytest.approx([r["loss"] for r in b["state"]["history"]["train"]], rel=1e-5)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """End a server a test started: SIGTERM, then SIGKILL if it has not gone within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def cli_env(data_dir: Path) -> dict[str, str]:
    """The environment of every `python -m utils` a test starts: offline, data under `data_dir`, and one
    thread, as the in-process tests compute (`one_thread`): float sums then round the same way in every
    process, so runs compared with each other (killed and resumed, subprocess and in-process) agree."""
    return dict(os.environ, CLIPCAP_OFFLINE="1", CLIPCAP_DATA=str(data_dir), PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1")


def run_cli(*args: str, data_dir: Path, timeout: float = 300, check: bool = True, **popen):
    """Run `python -m utils ...` the way a user does, in `cli_env`."""
    proc = subprocess.run([sys.executable, "-m", "utils", *args], cwd=ROOT, env=cli_env(data_dir), capture_output=True,
                          text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m utils {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def cli_in_process(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m utils ...` as `run_cli` runs it, but in this process (no interpreter, torch or CLIP to start):
    for commands that need no process of their own (no signal, no stdin, no fresh import state). Its stdout and
    stderr are what the command printed through Python; the exit code is main()'s."""
    import contextlib
    import io

    from utils.__main__ import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = {k: os.environ.get(k) for k in ("CLIPCAP_OFFLINE", "CLIPCAP_DATA")}
    os.environ.update(CLIPCAP_OFFLINE="1", CLIPCAP_DATA=str(data_dir))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)  # sys.exit("error: ...") prints its message, as Python does
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    proc = subprocess.CompletedProcess(["python", "-m", "utils", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m utils {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def small_cache(data_dir) -> Path:
    """A feature cache of 240 embedded images, made by the real feature code with the stand-in CLIP."""
    from utils.config import DataConfig, FeatureConfig, RuntimeConfig
    from utils.readers import load_records
    from utils.features import cache_features

    data = DataConfig(dataset="embedded", data_dir=str(data_dir), max_images=240, val_fraction=0.1)
    return cache_features(load_records(data), FeatureConfig(num_workers=0, cache_dir=str(data_dir / "small-cache")),
                          data, RuntimeConfig(offline=True, device="cpu"))


def pytest_terminal_summary(terminalreporter):
    """The fault matrix's line: how many faults were tried and whether any lost data or a message."""
    outcomes = {}
    for status in ("failed", "error", "skipped", "passed"):  # a test's worst outcome counts
        for report in terminalreporter.stats.get(status, []):
            if "fault" in getattr(report, "keywords", ()) and (getattr(report, "when", "") == "call" or status != "passed"):
                outcomes.setdefault(report.nodeid, status)
    if outcomes:
        counts = {s: sum(v == s for v in outcomes.values()) for s in ("passed", "failed", "error", "skipped")}
        verdict = "none lost data" if counts["failed"] + counts["error"] == 0 else "SOME FAILED: see above"
        terminalreporter.write_line(
            f"fault matrix: {len(outcomes)} faults tried, {counts['passed']} handled as documented, "
            f"{counts['skipped']} skipped, {counts['failed'] + counts['error']} failed: {verdict}")


def post(client, upload: tuple[bytes, str] | None = None, **fields) -> tuple[int, dict]:
    """POST /caption to the web demo's test client: form `fields` and an optional upload (bytes, file name);
    returns (status, JSON reply)."""
    import io

    data = {k: str(v) for k, v in fields.items()}
    if upload is not None:
        data["image"] = (io.BytesIO(upload[0]), upload[1])
    reply = client.post("/caption", data=data, content_type="multipart/form-data")
    return reply.status_code, reply.get_json()


@contextlib.contextmanager
def serve_folder(served: Path):
    """http.server on 127.0.0.1 serving `served`, as a download host would: yields (base URL, the request
    lines it was asked, such as 'GET /a.png HTTP/1.1')."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_request(self, code="-", size="-"):
            requested.append(self.requestline)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
