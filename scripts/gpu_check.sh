#!/usr/bin/env bash
# Issue 17's checks on a lent GPU, prepared so that a session with one spends its device time running, not
# writing. Device time is 15 minutes in all, the machine's start (minutes) included, and 10 minutes a command:
# up to three calls in order of importance, each step under its own limit (a call's limits and their 10 s grace
# add up to under its timeout); check `status` for the time left before each.
#
# The machine's image (/work/.library/device/KINDS.md) has torch 2.11 (CUDA), transformers 5.17 (too old for
# the hf-* strategies: they are refused there, and their tests skip), typer, rich, pandas, matplotlib,
# safetensors, pytest, pytest-xdist, but not pydantic. Here, in the repository's root, once per session:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#
# (versions as in a working venv here: `pip list | grep -i -E 'pydantic|annotated|inspection'`). Then device
# calls with carry [".whl"], each at once after the one before while the machine is warm:
#
#   bash scripts/gpu_check.sh first    # timeout_s 430: benchmark --device cuda with its defaults, --compile at
#                                      # batches 1 and 64, bfloat16
#   bash scripts/gpu_check.sh second   # timeout_s 290: the suite, kv-evaluate of every strategy (--compile;
#                                      # llama in bfloat16)
#   bash scripts/gpu_check.sh third    # timeout_s 140: kv-evaluate of seq2seq, ablate against generate()
#
# What comes back: $OUT/steps.log (each step's command and exit status) and $OUT/<mode>.tgz (every step's log
# and results directory), rewritten after each step, so a call cut off still returns what it finished. Unpack
# the .tgz here (`tar xzf ... -C .`: logs under gpu-logs/, results under results/) and commit the results.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
LOGS=gpu-logs
mkdir -p "$OUT" "$LOGS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "carry .whl (see the header)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
KV="python3 -m kvbench"
MODE=${1:-}

step() {  # step NAME SECONDS COMMAND...: its output to gpu-logs/NAME.log and the screen, its status remembered
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($limit s): $*" | tee -a "$OUT/steps.log"
  # SIGINT, as Ctrl-C: kvbench keeps what it finished (summary, plots, meta.json); KILL 10 s later if stuck
  timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | tail -n 25
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/steps.log"
  tar czf "$OUT/$MODE.tgz" "$LOGS" results/cuda-* 2>/dev/null || true  # no results yet: the logs alone
}

decoder=static,dynamic,sliding,quantized,paged
case "$MODE" in
  first)  # the numbers issue 17 asks for: ~7 minutes
    rm -rf results/cuda-*  # a rerun on the same warm machine: --out refuses a directory that holds results
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__,
                  torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"; } 2>&1 | tee -a "$OUT/steps.log"
    step bench-default 110 $KV benchmark --device cuda --out results/cuda-default
    step bench-compile 170 $KV benchmark --device cuda --compile --batch-size 1,64 --lengths 100,1000 \
      --strategies static,quantized,paged --out results/cuda-compile
    step bench-bf16 90 $KV benchmark --device cuda --dtype bfloat16 --compile --batch-size 1,64 --lengths 1000 \
      --strategies static --out results/cuda-bf16
    ;;
  second)  # correctness on CUDA: ~4.5 minutes
    if python3 -c "import xdist" 2>/dev/null; then parallel=(-n 8); else parallel=(); fi
    # -m "not slow": those tests build and install the package or start subprocesses; they run on CI
    step suite 120 python3 -m pytest -q -p no:logging -m "not slow" "${parallel[@]}" tests
    step kv-default-float32 70 $KV kv-evaluate --config default --device cuda --new-tokens 200 \
      --strategies "$decoder" --compile
    step kv-llama-bfloat16 45 $KV kv-evaluate --config llama --device cuda --dtype bfloat16 --new-tokens 200 \
      --strategies "$decoder"
    ;;
  third)  # if device time is left: ~2 minutes
    step kv-seq2seq-float32 40 $KV kv-evaluate --config seq2seq --device cuda --new-tokens 100 \
      --strategies static,dynamic,sliding,quantized
    step ablate 60 $KV ablate --device cuda --variants kvbench,compiled,hf-cache,hf-naive --new-tokens 200
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh first|second|third (see the header)"; exit 2 ;;
esac
