#!/usr/bin/env bash
# One entry point for a fresh Linux machine with Python 3.10+:
#   bash course.sh main [flags]   run the whole course pipeline (offline: embedded set + stand-in models)
#   bash course.sh test [pytest args]   run the test suite
#   bash course.sh lint   ruff check of the package and the tests (pyflakes, unused arguments, bugbear)
#   bash course.sh lab [jupyter lab args]   open the notebooks in JupyterLab, with this .venv as their kernel
# Both create (or reuse) .venv and install the pinned requirements into it first.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${CLIPCAP_VENV:-.venv}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "clipcap-course needs Python 3.10 or newer (found $("$PY" --version))" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PY" -m venv "$VENV"
fi
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$want" ]; then
  echo "installing pinned requirements into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$VENV/.installed"
fi
# Best effort, where we may: Java for METEOR and the PTB tokenizer of pycocoevalcap, Chromium for the web
# demo's browser test. Without them, METEOR and that test are skipped, saying so.
apt_missing=()
command -v java >/dev/null 2>&1 || apt_missing+=(default-jre-headless)
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
if [ ${#apt_missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${apt_missing[*]} (Java for the METEOR metric, Chromium for the web demo's browser test)"
  apt-get update -qq >/dev/null 2>&1 || true
  for pkg in "${apt_missing[@]}"; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
      || echo "could not install $pkg: what needs it will be skipped (apt-get install $pkg)" >&2
  done
fi

cmd=${1:-main}
shift || true
case "$cmd" in
  main) exec "$VENV/bin/python" -m utils course "$@" ;;
  test)
    # One worker process per CPU core, up to 4 (CLIPCAP_TEST_WORKERS=N sets it; 0 runs the tests in this
    # process): the tests compute on one thread each, so a second core otherwise idles. A file's tests stay
    # in one worker (--dist loadfile), so its module fixtures are made once.
    cores=$(nproc 2>/dev/null || echo 1)
    workers=${CLIPCAP_TEST_WORKERS:-$(( cores < 2 ? 0 : (cores > 4 ? 4 : cores) ))}
    exec "$VENV/bin/python" -m pytest -n "$workers" --dist loadfile "$@" ;;
  lint) exec "$VENV/bin/python" -m ruff check utils tests "$@" ;;
  lab)
    # The hook that refuses a notebook committed with its outputs (see .githooks/pre-commit); only in a git
    # checkout, and only where no other hooks folder is set.
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && [ -z "$(git config --get core.hooksPath || true)" ]; then
      git config core.hooksPath .githooks && echo "installed the pre-commit hook that keeps notebooks' outputs out of git"
    fi
    # The kernel "python3" of every notebook is this .venv's own python: the server runs from it.
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)  # a container's root user: Jupyter refuses it otherwise
    exec "$VENV/bin/python" -m jupyter lab --notebook-dir=notebooks "${root[@]}" "$@" ;;
  *) echo "usage: bash course.sh main|test|lint|lab [args]" >&2; exit 2 ;;
esac
