#!/usr/bin/env bash
# The prepared GPU check (one GPU, a few minutes): BAdam on a Llama-3-8B-shaped bf16 model with gradient
# checkpointing, batch 2 x seq 728 (the paper's Table 2), next to LoRA r8; writes one JSON.
#   bash benchmarks/gpu_check.sh            # needs a CUDA GPU; refuses in one line without one
#   bash benchmarks/gpu_check.sh --tiny     # the same code on a small model on the CPU (CI runs this)
# Uses the checkout's .venv (make install) when there is one, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" benchmarks/gpu_check.py "$@"
