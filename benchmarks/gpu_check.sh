#!/usr/bin/env bash
# GPU check: install what training on a GPU needs, train the example model on 10^6 synthetic patches and on
# the real plate on the GPU, and print throughput and the GPU/CPU ratio as one JSON document (stdout).
#
#   bash benchmarks/gpu_check.sh                       # full check (a few minutes on a GPU machine)
#   bash benchmarks/gpu_check.sh --n-synthetic 2000 --cpu-n 1000 --plate none   # small
#   PHENOCODER_FORCE_CPU=1 bash benchmarks/gpu_check.sh ...                     # the CPU fallback
#
# Options after the script name go to benchmarks/gpu_bench.py (see its docstring). Without a GPU (no working
# nvidia-smi, or PHENOCODER_FORCE_CPU=1) every figure is measured on the CPU and the JSON says
# "fallback": true. The project is installed into a virtual environment when phenocoder_lib cannot be
# imported; on a GPU machine the CPU-only TensorFlow wheel is swapped for tensorflow[and-cuda] of the same
# version. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
log() { echo "[gpu_check] $*" >&2; }

if ! "$PY" -c "import phenocoder_lib, tensorflow" >/dev/null 2>&1; then
  VENV="${PHENOCODER_GPU_VENV:-${TMPDIR:-/tmp}/phenocoder-gpu-venv}"
  log "installing the project into $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip >&2
  "$PY" -m pip install -q -e . >&2
fi

gpu=0
if [ "${PHENOCODER_FORCE_CPU:-0}" != "1" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  nvidia-smi -L >&2
fi

if [ "$gpu" = 1 ]; then
  if ! "$PY" -c "import sys, tensorflow as tf; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" \
      >/dev/null 2>&1; then
    TFV="$("$PY" -c "import importlib.metadata as m, tensorflow as tf; print(tf.__version__)")"
    log "swapping tensorflow-cpu for tensorflow[and-cuda]==$TFV"
    "$PY" -m pip uninstall -q -y tensorflow-cpu >&2 || true
    "$PY" -m pip install -q "tensorflow[and-cuda]==$TFV" >&2
  fi
else
  log "no GPU: CPU fallback"
  export CUDA_VISIBLE_DEVICES=""
fi

exec "$PY" benchmarks/gpu_bench.py "$@"
