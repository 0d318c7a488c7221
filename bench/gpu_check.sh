#!/usr/bin/env bash
# The GPU path end to end, for a machine with CUDA, in about 4 minutes:
#   1. the gpu-marked tests: CUDA merge bitwise equal to peft's merge on CUDA and within the rounding bound of the
#      exact delta, the QLoRA merge bitwise transformers + peft on CUDA, τ from cuda:0 bitwise equal to the CPU's,
#      compare, analyze and --check_logits on cuda:0 against the CPU;
#   2. bench/gpu_bench.py: merge (fp32, bf16) and extract on the 2-layer StarCoder2-3B shape, cuda:0 against
#      the CPU, timed, outputs compared (written to $OUT/gpu_bench.json, or /tmp).
# Uses .venv when there is one, else python3 (a GPU image with torch, transformers, peft, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
RESULTS=${OUT:-/tmp}
$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: CUDA is not available here')"
timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
timeout 120 $PY bench/gpu_bench.py --layers 2 --out "$RESULTS/gpu_bench.json"
echo "gpu_check: passed"
