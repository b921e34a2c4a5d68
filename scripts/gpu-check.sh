#!/usr/bin/env bash
# The checks that need a CUDA GPU (gpu tests, real-size memory, the tiny recipe on CUDA with bf16,
# the ONNX export on the CUDA EP), with the figures as a Markdown table in OUT/gpu-check.md.
#   scripts/gpu-check.sh [OUT]      (default OUT: runs/gpu-check; PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" scripts/gpu_check.py "$@"
