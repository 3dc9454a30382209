#!/usr/bin/env bash
# Every GPU figure of the bench in one go, in at most about 6 minutes on one GPU, written to bench/results/:
# features, the training step at batch 40/128/256 against ClipCap's mechanics (samples/s, host CPU time,
# MFU on real tokens, peak memory), captioning, then the same step in fp16 with loss scaling (the T4/P100
# path), in fp32 (CUDA cores only, no tensor cores: the stand-in for a P100's speed) and under torch.compile.
#
#   bash bench/gpu.sh            on the GPU machine: needs python3 with torch and transformers; no internet
#   bash bench/gpu.sh --quick    the same code, small, on the CPU (the test suite runs it)
#   bash bench/gpu.sh --wheels   beforehand, on a machine with internet: fetch the wheels the GPU machine may
#                                lack into .whl/ (git-ignored), then carry .whl/ along with the working tree
#
# On the GPU machine, packages that do not import (openai-clip, ftfy, wcwidth; setuptools < 81, whose
# pkg_resources openai-clip imports) are installed from .whl/ with pip --no-index into .whl/site: nothing
# is fetched. PYTHON picks the interpreter (default python3); BENCH_OUT the results folder; BENCH_TAR, if
# set, a .tar.gz to pack the results folder into at the end (one file to bring back).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${BENCH_OUT:-bench/results}
WHEELS=(openai-clip==1.0.1 ftfy==6.3.1 wcwidth==0.9.4 setuptools==80.9.0)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CLIPCAP_OFFLINE=1 HF_HUB_OFFLINE=1

if [[ "${1:-}" == "--wheels" ]]; then
    # openai-clip comes as a source archive only: pip wheel builds its (pure-Python) wheel
    exec "$PY" -m pip wheel -q --no-deps -w .whl "${WHEELS[@]}"
fi

if ! "$PY" -c "import clip, ftfy" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "openai-clip does not import here and .whl/ holds no wheels: run 'bash bench/gpu.sh --wheels' on a" \
             "machine with internet and bring .whl/ along." >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="$PWD/.whl/site:$PYTHONPATH"
    "$PY" -c "import clip, ftfy" || { echo "openai-clip still does not import from .whl/site" >&2; exit 1; }
fi

status=0
run() {  # run LIMIT ARGS...: one part under its own time limit; a failure leaves the others' results standing
    local limit=$1; shift
    echo "== python -m utils bench gpu $* (at most ${limit}s)"
    timeout "$limit" "$PY" -m utils bench gpu "$@" --out "$OUT" || { echo "== failed or timed out: $*"; status=1; }
}

if [[ "${1:-}" == "--quick" ]]; then
    run 300 --quick --device cpu
    exit $status
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
run 150                      # features, training (auto precision), captioning
run 60 --precision fp16      # the T4/P100 code path: fp16 with loss scaling
run 60 --precision fp32      # no tensor cores (fp32, TF32 off: torch's default): the P100-speed stand-in
run 90 --compile             # torch.compile's step, opt-in
ls -l "$OUT"
if [[ -n "${BENCH_TAR:-}" ]]; then tar czf "$BENCH_TAR" -C "$OUT" . && echo "packed into $BENCH_TAR"; fi
exit $status
