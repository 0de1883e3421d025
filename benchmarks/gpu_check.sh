#!/usr/bin/env bash
# One call on a GPU machine without internet (CPython 3.12 with torch, numba, cupy; no ffcv): install the
# wheels in .whl/ (ffcv, fastargs, ... from ../shared/device), run the tests that have CUDA cases (cupy and
# torch influence backends against numpy, AMP channels-last training steps, grouped against sequential,
# eager and compiled), then the benchmarks, the open questions first:
#   fusion    bench_fusion.py at 64 px, K=16: the fusion backends on batches already on the GPU (why the
#             grouped network ran at 0.6x one model there)
#   train64   bench_train.py at 64 px (raw source): the reference against K=16, sequential and grouped
#   paper     bench_train.py at 160 px, images stored as the paper config writes ImageNet (256 px, half raw),
#             decoded on numba's OpenMP layer by 14 threads (2 cores left to the training loop: K=8 decoded
#             2.4k img/s where the loader alone gave 6.9k): the reference against K=8 sequential
#   loaders   bench_loaders.py on 400 px JPEGs cropped to 160 px: ffcv with numba's workqueue against its
#             OpenMP threading layer (the decode capped the 160 px runs at 2.7k img/s)
#   storage   the same crops from images stored as paper_ffcv_imagenet_cifar10.yaml writes ImageNet (256 px, half raw)
#   train     bench_train.py at 160 px (JPEG source): the reference against K=8 on one shared loader
#   compile   bench_train.py's compiled grouped case at 160 px (compilation in the warm-up epoch)
#   influence bench_influence.py at paper size
# Each step runs under `timeout` with its own limit, cut to what is left of the budget ($GPU_CHECK_BUDGET
# seconds, default 470: under 8 minutes in all); a step that does not fit is skipped, and every step leaves
# its files (JSON, logs, tables) in the folder given as $1 or $GPU_CHECK_OUT. steps.txt says how each step
# ended; the tables print last. $GPU_CHECK_STEPS (e.g. "device tests fusion") runs only the steps named.
# Measured so far: docs/benchmarks.md.
#
#   usage: benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]
#   --dry-run: small sizes on the CPU in the current environment (.venv when there is one; no wheel install),
#              with 8 times the limits.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-gpu-check}
budget=${GPU_CHECK_BUDGET:-470}
scale=1  # the steps' limits are multiplied by this
device=cuda
fusion=(--size real --cases single sequential grouped grouped+plainbn grouped+compile)
loaders=(--size jpeg160 --loaders ffcv ffcv+omp --epochs 2)
storage=(--size paper160 --loaders ffcv ffcv+omp --epochs 2)
train=(--size real --ks 8 --epochs 2)
train64=(--size real64 --ks 16 --epochs 2)
paper=(--size paper --ks 8 --backends sequential --threading omp --loader-workers 14 --epochs 2)
compiled=(--size real --ks 8 --backends grouped+compile --no-reference --epochs 2)
influence=(--sizes paper)
tests=(-k "cuda or cupy or torch")
dry_run=0
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1; device=cpu; budget=${GPU_CHECK_BUDGET:-2400}; scale=8
               fusion=(--size tiny --cases single grouped); loaders=(--size tiny --loaders ffcv+omp resident --epochs 1)
               storage=(--size tiny --loaders ffcv --epochs 1)
               train=(--size tiny --ks 2 --backends grouped); train64=(--size tiny --ks 2 --backends grouped
               --loaders resident); paper=(--size tiny --ks 2 --backends sequential --threading omp --loader-workers 1 --no-reference)
               compiled=(--size tiny --ks 2 --backends grouped+compile --no-reference)
               influence=(--sizes small) ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out"
: > "$out/steps.txt"
python=${PYTHON:-python3}
if [ $dry_run = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  python=.venv/bin/python  # the dry run checks this checkout's environment
fi

if [ $dry_run = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

status=0
# step NAME LIMIT COMMAND...: run COMMAND under timeout (LIMIT seconds, or what is left of the budget) and
# record how it ended in steps.txt
step() {
  local name=$1 limit=$(($2 * scale)) left=$((budget - SECONDS)) started=$SECONDS rc
  shift 2
  [[ -z ${GPU_CHECK_STEPS:-} || " $GPU_CHECK_STEPS " == *" $name "* ]] || return 0
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "$name: skipped, $left s of the budget left" >> "$out/steps.txt"; status=1; return
  fi
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "$name: $( ((rc == 0)) && echo ok || { ((rc == 124 || rc == 137)) && echo "cut at its limit" || echo "failed (exit $rc)"; })" \
       "in $((SECONDS - started)) s (limit $limit s)" >> "$out/steps.txt"
  ((rc == 0)) || status=1
}

step device 60 $python -c '
import numpy, numba, torch
from ffcv_transfer.influence import available_backends
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python OK: numpy {numpy.__version__}, numba {numba.__version__}, torch {torch.__version__}, GPU: {gpu}")
print(f"influence backends: {available_backends()}")' > "$out/device.txt" 2>&1
step tests 120 $python -m pytest -q -p no:cacheprovider -o addopts=-ra "${tests[@]}" tests/test_influence.py \
  tests/test_train.py tests/test_transfer.py > "$out/tests.log" 2>&1
# bench NAME LIMIT SCRIPT ARGS...: a benchmark step, leaving NAME.json, NAME_table.txt and NAME.log
bench() {
  local name=$1 limit=$2 script=$3
  shift 3
  step "$name" "$limit" $python "benchmarks/$script" "$@" --out "$out/$name.json" > "$out/${name}_table.txt" \
    2> "$out/$name.log"
}
bench fusion 170 bench_fusion.py "${fusion[@]}" --device $device
bench train64 200 bench_train.py "${train64[@]}" --device $device
bench paper 200 bench_train.py "${paper[@]}" --device $device
bench loaders 150 bench_loaders.py "${loaders[@]}" --device $device
bench storage 120 bench_loaders.py "${storage[@]}" --device $device
bench train 200 bench_train.py "${train[@]}" --device $device
bench compile 150 bench_train.py "${compiled[@]}" --device $device
bench influence 120 bench_influence.py "${influence[@]}"

cat "$out/device.txt" 2>/dev/null; tail -3 "$out/tests.log" 2>/dev/null
for table in fusion train64 paper loaders storage train compile influence; do cat "$out/${table}_table.txt" 2>/dev/null; done
cat "$out/steps.txt"
exit $status
