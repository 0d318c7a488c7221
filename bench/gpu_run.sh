#!/usr/bin/env bash
# Every GPU check and measurement in one run, for a short loan of a CUDA machine; results into $OUT (or /tmp/gpu_run):
#   log.txt (versions, device, every step's output and exit code), gpu_bench.json, qlora_gpu.json,
#   qlora_refs.tar.gz (tiny bases, adapters and CUDA's QLoRA merges), full_scale_30_layers_cuda.json.
# Steps, each under its own time limit, the next one run whatever the last one gave:
#   1. pytest -m gpu (tests/test_gpu.py): the merge on cuda:0 bitwise peft's on cuda:0 at fp32/fp16/bf16, within
#      one rounding of the CPU's; τ from cuda:0 bitwise the CPU's; compare and analyze on cuda:0 give the CPU's figures;
#   2. bench/qlora_gpu.py: bitsandbytes' NF4 quantization and peft's QLoRA merges on cuda:0 against the CPU;
#   3. bench/full_scale.py --device cuda:0: the README's four commands on the 30-layer StarCoder2-3B shape;
#   4. bench/gpu_bench.py: merge and extract on the 2-layer shape, cuda:0 against the CPU.
# Wheels in .whl/ (pip download, see docs/development.md) are installed to /tmp first: a GPU image without a
# registry gets the versions CI tests with (transformers, peft) and bitsandbytes that way.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
LOG=$OUT/log.txt
PY=${PY:-python3}
step() {  # step NAME SECONDS COMMAND...: run it with its output in the log, then log its exit code and time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s" >>"$LOG"
}
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_bnb .whl/bitsandbytes-*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/site_bnb
fi
others=$(ls .whl/*.whl 2>/dev/null | grep -v bitsandbytes)
if [ -n "$others" ]; then
  # shellcheck disable=SC2086
  if $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_hf $others >>"$LOG" 2>&1 &&
    PYTHONPATH=/tmp/site_hf:/tmp/site_bnb $PY -c "import transformers, peft" >>"$LOG" 2>&1; then
    export PYTHONPATH=/tmp/site_hf:/tmp/site_bnb
  else
    echo "=== the carried transformers/peft do not import here: the image's are used" >>"$LOG"
  fi
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import sys, torch, transformers, peft, safetensors; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, safetensors.__version__)"
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
  nproc; free -g | head -2; df -h /tmp | tail -1
} >>"$LOG" 2>&1
step pytest_gpu 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step qlora_gpu 90 $PY bench/qlora_gpu.py --out "$OUT/qlora_gpu.json" --refs /tmp/qlora_refs
[ -d /tmp/qlora_refs ] && tar czf "$OUT/qlora_refs.tar.gz" -C /tmp qlora_refs
step full_scale_cuda 240 $PY bench/full_scale.py --device cuda:0 --repeats 1 --work /tmp/sc2_full \
  --out "$OUT/full_scale_30_layers_cuda.json" --check_logits
step gpu_bench 80 $PY bench/gpu_bench.py --layers 2 --out "$OUT/gpu_bench.json"
echo "=== done" >>"$LOG"
