#!/usr/bin/env bash
# `make gpu-check`: the GPU correctness checks on one CUDA GPU, with the project's virtualenv and nothing installed
# (the GPU machine has no network). benchmarks/gpu_check.py lists the checks and runs each under a time limit;
# without a GPU it runs the CPU part and ends with `no GPU: N checks skipped`. Outputs: $GPU_CHECK_OUT (default
# benchmarks/results)/gpu_check_<cuda|cpu>/. Arguments go to it, e.g. `--only tiny-resume cuda-tests`.
set -euo pipefail
if [[ -n ${GPU_CHECK_OUT:-} ]]; then  # relative to where it was called from, not to the repository
    GPU_CHECK_OUT=$(realpath -m "$GPU_CHECK_OUT")
    export GPU_CHECK_OUT
fi
cd "$(dirname "$0")/.."
python=${GPU_CHECK_PYTHON:-.venv/bin/python}
if [[ ! -x $python ]]; then
    echo "gpu_check: no $python; run make install first, or set GPU_CHECK_PYTHON" >&2
    exit 2
fi
exec "$python" -m benchmarks.gpu_check "$@"
