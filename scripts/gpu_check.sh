#!/usr/bin/env bash
# Issue 17's checks on a lent GPU, prepared so that a session with one spends its device time running, not
# writing: 15 minutes of device time in all (starts included), 10 minutes a command, 8 files back.
#
# The machine's image has torch (CUDA), typer, rich, pandas, matplotlib, safetensors, pytest, transformers
# (/work/.library/device/KINDS.md) but not pydantic. Here, in the repository's root, once per session:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#
# (versions as in a working venv here: `pip list | grep -i -E 'pydantic|annotated|inspection'`). Then two
# device calls, each with carry [".whl"] and timeout_s 590, the second at once while the machine is warm:
#
#   bash scripts/gpu_check.sh tests   # the suite on a CUDA machine, kv-evaluate --device cuda everywhere
#   bash scripts/gpu_check.sh bench   # benchmark --device cuda: defaults, --compile, bfloat16, batches to 64
#
# Everything lands in $OUT: logs, and each results directory as one .tgz (the 8-file limit), to unpack under
# results/ here and commit. Each step has its own time limit, so a slow one costs itself, not the rest.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "carry .whl (see the header)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
KV="python3 -m kvbench"

step() {  # step NAME SECONDS COMMAND...: its output to $OUT/NAME.log and the screen, its status remembered
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($limit s): $*" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/steps.log"
}

case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
    step suite 300 python3 -m pytest -q -p no:logging tests
    decoder=static,dynamic,sliding,quantized,paged
    for dtype in float32 bfloat16; do  # every strategy of each family, --compile adding static+compile
      step "kv-default-$dtype" 45 $KV kv-evaluate --config default --device cuda --dtype "$dtype" \
        --new-tokens 200 --strategies "$decoder" --compile
      step "kv-llama-$dtype" 45 $KV kv-evaluate --config llama --device cuda --dtype "$dtype" \
        --new-tokens 200 --strategies "$decoder" --compile
      step "kv-seq2seq-$dtype" 30 $KV kv-evaluate --config seq2seq --device cuda --dtype "$dtype" \
        --new-tokens 100 --strategies static,dynamic,sliding,quantized
    done
    ;;
  bench)
    step bench-default 150 $KV benchmark --device cuda --out results/cuda-default
    step bench-compile 120 $KV benchmark --device cuda --compile --lengths 100,1000 --strategies static \
      --out results/cuda-compile
    step bench-batches 150 $KV benchmark --device cuda --compile --batch-size 1,4,16,64 --lengths 1000 \
      --strategies static,quantized,sliding,paged --out results/cuda-batches
    step bench-bf16 90 $KV benchmark --device cuda --dtype bfloat16 --compile --batch-size 1,16 --lengths 1000 \
      --strategies static --out results/cuda-bf16
    tar czf "$OUT/results-cuda.tgz" results/cuda-* 2>/dev/null
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh tests|bench (see the header)"; exit 2 ;;
esac
