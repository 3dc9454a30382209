"""JupyterLab, as `bash course.sh lab` starts it: the server runs from the course's environment, so every notebook's
kernel is that environment's python; and the pre-commit hook that keeps notebooks' outputs out of git."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, stop

CHROMIUM = Path("/usr/bin/chromium")
HOOK = ROOT / ".githooks" / "pre-commit"


def test_course_sh_lab_runs_jupyterlab_from_the_course_venv_and_installs_the_hook():
    script = (ROOT / "course.sh").read_text()
    assert '"$VENV/bin/python" -m jupyter lab --notebook-dir=notebooks' in script
    assert subprocess.run(["bash", "-n", str(ROOT / "course.sh")]).returncode == 0
    assert "git config core.hooksPath .githooks" in script
    pins = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("jupyterlab==") for line in pins), "jupyterlab is pinned with the course's install"
    assert ".ipynb_checkpoints/" in (ROOT / ".gitignore").read_text().splitlines()


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=check)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_pre_commit_hook_refuses_a_notebook_saved_with_outputs(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".githooks").mkdir(parents=True)
    shutil.copy2(HOOK, repo / ".githooks" / "pre-commit")
    _git(repo, "init", "-q")
    _git(repo, "config", "core.hooksPath", ".githooks")  # what course.sh lab does
    notebook = json.loads((ROOT / "notebooks" / "01_setup_and_data.ipynb").read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    code[1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    code[1]["execution_count"] = 3  # as JupyterLab saves a notebook after running a cell
    path = repo / "notebooks" / "01.ipynb"
    path.parent.mkdir()
    path.write_text(json.dumps(notebook), encoding="utf-8")
    _git(repo, "add", ".")
    refused = _git(repo, "commit", "-q", "-m", "with outputs", check=False)
    assert refused.returncode != 0
    assert "notebooks/01.ipynb: code cell(s) 1 hold outputs" in refused.stderr and "--clear" in refused.stderr
    subprocess.run([sys.executable, str(HOOK), "--clear", str(path)], check=True, capture_output=True)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "clean")  # now accepted
    assert json.loads(_git(repo, "show", "HEAD:notebooks/01.ipynb").stdout)["cells"][0] == notebook["cells"][0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jupyterlab_opens_a_notebook_with_the_course_kernel(tmp_path):
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("jupyterlab is not installed in this environment: bash course.sh installs it (requirements.txt)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see requirements.txt)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (course.sh does, where it may)")
    notebooks = tmp_path / "notebooks"  # a copy: opening may write .ipynb_checkpoints and workspaces
    shutil.copytree(ROOT / "notebooks", notebooks)
    port, token = _free_port(), "course-test"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "jdata"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    env.pop("JUPYTER_PATH", None)
    # The command of `bash course.sh lab`, with the python of this environment and the copy of the notebooks
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={notebooks}", "--no-browser",
                               f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
                               "--ServerApp.open_browser=False", *(["--allow-root"] if os.geteuid() == 0 else [])], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/kernelspecs?token={token}", timeout=5) as r:
                    specs = json.load(r)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    raise AssertionError(f"jupyter lab did not start:\n{server.stdout.read()}") from None
                time.sleep(1)
        python3 = specs["kernelspecs"]["python3"]["spec"]
        assert Path(python3["argv"][0]).resolve() == Path(sys.executable).resolve() or python3["argv"][0] == "python", \
            f"the notebooks' kernel is not this environment's python: {python3['argv']}"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], timeout=60_000)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 820})
                page.set_default_timeout(90_000)
                page.goto(f"{base}/lab/tree/01_setup_and_data.ipynb?token={token}")
                page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached")
                page.locator("h1", has_text="Set up, and look at the data").first.wait_for()
                page.get_by_text("Python 3 (ipykernel)").first.wait_for()  # the kernel, started for the notebook
            finally:
                browser.close()
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=10) as r:
            sessions = json.load(r)
        assert [s["kernel"]["name"] for s in sessions] == ["python3"]
        # the session names its notebook by path, or (newer jupyter_server, files by id) by name or notebook entry
        assert "01_setup_and_data.ipynb" in json.dumps(sessions[0]), sessions
    finally:
        stop(server, timeout=20)
