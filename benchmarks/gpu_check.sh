#!/usr/bin/env bash
# One call on a GPU machine without internet (CPython 3.12 with torch, numba, cupy; no ffcv): install the
# wheels in .whl/ (ffcv, fastargs, ... from ../shared/device), then, in order (the default steps):
#   device    versions and the GPU; imports ffcv and cupy too, and ends the check at once if any is missing
#   ceiling   bench_fusion.py at 160 px on batches already in device memory: one model eager and compiled
#             (per-model batch 1024, static shapes) and K=8 sequential with per-model queues: the GPU-only
#             rate every training result is divided by
#   paper     bench_train.py, the paper recipe as configured (BlurPool, per-model batch 1024 queued from
#             one shared loader, numba's OpenMP layer, 2 cores left to the training thread): K=16 first (the
#             case the goal depends on), then K=8, then the reference (one model, its own loader), timed at
#             160 px and 192 px (13 + 3 epochs), each epoch taken apart (start-up, waiting for data,
#             routing, launching, GPU busy)
#   ceiling64 the GPU-only rate at 64 px (one model; K=16 queued)
#   train64   bench_train.py at 64 px (raw source), the same epochs (16 + 15): K=16 queued
#   tests     the tests with CUDA cases (influence backends, AMP steps, grouped against sequential, routing
#             and queued steps under torch.cuda.set_sync_debug_mode("error"))
#   summary   one table: every case as a fraction of the ceiling, with its models per GPU-hour; always runs
#             (its time is kept out of the other steps' budget)
# Steps run only when named in $GPU_CHECK_STEPS (e.g. "device replica"), not by default:
#   replica   the Tiny-ImageNet -> CIFAR-10 replica at GPU scale (rs_configs/tinyimagenet_gpu.yaml, up to 512
#             models in 4 minutes, and the WordNet agreement of their rankings; benchmarks/gpu_replica.py, its
#             data prepared beforehand by `gpu_replica.py prepare` into benchmarks/gpu_data/replica and copied
#             to the GPU machine with the working tree)
#   loaders   bench_loaders.py on 400 px JPEGs cropped to 160 px: numba's workqueue against OpenMP
#   grouped   bench_train.py's grouped and compiled grouped cases at 160 px
#   influence bench_influence.py at paper size
#   bestk64   K beyond 16 (memory allowing), without the reference (the default steps measure it):
#   bestk     bench_train.py at 64 px with K=24 and K=32 queued (bestk64), the paper recipe with K=24 and
#             K=32 (bestk); the GPU configs' models_per_process is the best K of these and the default steps
# Each step runs under `timeout` with its own limit, cut to what is left of the budget ($GPU_CHECK_BUDGET
# seconds, default 560: the default steps' limits sum to 530, the wheels' install counts too, and a 600 s
# call keeps a margin); a step that does not fit is skipped, and every step leaves its files (JSON, logs,
# tables) in the folder given as $1 or $GPU_CHECK_OUT and prints how it ended and its seconds as it ends
# (also in steps.txt); the tables print last. Measured so far: docs/benchmarks.md.
#
#   usage: benchmarks/gpu_check.sh [OUT_DIR] [--dry-run] [--pack FILE]
#   --dry-run: small sizes on the CPU in the current environment (.venv when there is one; no wheel install),
#              with 8 times the limits.
#   --pack FILE: on exit, however the check ends, the whole folder as one .tar.gz (a remote call returns
#              a few files; the folder holds a dozen or more), e.g. --pack "$OUT/gpu-check.tar.gz"
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-gpu-check}
budget=${GPU_CHECK_BUDGET:-560}
summary_limit=20  # kept out of the other steps' budget: the summary always runs
pack=
scale=1  # the steps' limits are multiplied by this
device=cuda
default_steps="device ceiling paper ceiling64 train64 tests summary"
ceiling=(--size real160 --cases single single+queued+compile sequential+queued)
ceiling64=(--size real --cases single sequential+queued)
paper=(--size paper --ks 16 8 --reference-last --fusions sequential --per-model-batch --blurpool --threading omp
       --epochs 1)
train64=(--size real64 --ks 16 --fusions sequential --per-model-batch --epochs 1)
loaders=(--size jpeg160 --loaders ffcv ffcv+omp --epochs 2)
grouped=(--size real --ks 8 --fusions grouped grouped+compile --no-reference --epochs 2)
influence=(--sizes paper)
bestk64=(--size real64 --ks 24 32 --fusions sequential --per-model-batch --no-reference --epochs 1)
bestk=(--size paper --ks 24 32 --fusions sequential --per-model-batch --blurpool --threading omp --no-reference --epochs 1)
replica=(run --data benchmarks/gpu_data/replica --minutes 4)
tests=(-k "cuda or cupy or torch")
dry_run=0
modules="numpy numba torch ffcv cupy"
while (($#)); do
  arg=$1
  shift
  case $arg in
    --pack) pack=${1:?--pack needs a file}; shift ;;
    --dry-run) dry_run=1; device=cpu; budget=${GPU_CHECK_BUDGET:-2400}; scale=8; modules="numpy numba torch ffcv"
               ceiling=(--size tiny --cases single sequential+queued); ceiling64=(--size tiny --cases single)
               paper=(--size tiny --ks 2 --reference-last --fusions sequential --per-model-batch --blurpool --threading omp
               --loader-workers 1)
               train64=(--size tiny --ks 2 --fusions sequential --per-model-batch --loaders resident --no-reference)
               loaders=(--size tiny --loaders ffcv+omp resident --epochs 1)
               grouped=(--size tiny --ks 2 --fusions grouped+compile --no-reference)
               bestk64=(--size tiny --ks 3 --fusions sequential --per-model-batch --no-reference --loader-workers 1)
               bestk=(--size tiny --ks 3 --fusions sequential --per-model-batch --no-reference --loader-workers 1)
               influence=(--sizes small); replica=(run --data benchmarks/gpu_data/replica --models 4 --device cpu) ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out"
: > "$out/steps.txt"
if [ -n "$pack" ]; then
  pack=$(realpath -m "$pack")
  trap 'tar -czf "$pack" -C "$out" . && echo "gpu_check: packed $out into $pack" >&2' EXIT
fi
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
exec 3>&2  # the steps' own output is redirected to their files; how each ended goes to the check's stderr
# step NAME LIMIT COMMAND...: run COMMAND under timeout (LIMIT seconds, or what is left of the budget) and
# record how it ended in steps.txt
step() {
  local name=$1 limit=$(($2 * scale)) left=$((budget - summary_limit * scale - SECONDS)) started=$SECONDS rc line
  shift 2
  [[ " ${GPU_CHECK_STEPS:-$default_steps} " == *" $name "* ]] || return 0
  [ "$name" = summary ] && left=$limit  # its time was kept aside
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "$name: skipped, $left s of the budget left" | tee -a "$out/steps.txt" >&3; status=1; return
  fi
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  line="$name: $( ((rc == 0)) && echo ok || { ((rc == 124 || rc == 137)) && echo "cut at its limit" || echo "failed (exit $rc)"; }) in $((SECONDS - started)) s (limit $limit s)"
  echo "$line" | tee -a "$out/steps.txt" >&3
  ((rc == 0)) || status=1
}

step device 40 $python -c '
import importlib, sys
found, missing = {}, []
for name in sys.argv[1:]:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as error:  # a missing wheel, or one that does not load
        missing.append(f"{name} ({type(error).__name__}: {error})")
print("python: " + ", ".join(f"{name} {version}" for name, version in found.items()))
if missing:
    sys.exit("missing: " + "; ".join(missing))
import torch
from ffcv_transfer.findings.kernel import available_backends
print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
print(f"influence backends: {available_backends()}")' $modules > "$out/device.txt" 2>&1
if grep -q "^device: failed" "$out/steps.txt"; then  # nothing else can run: say what is missing, now
  cat "$out/device.txt" "$out/steps.txt"
  exit 1
fi
# bench NAME LIMIT SCRIPT ARGS...: a benchmark step, leaving NAME.json, NAME_table.txt and NAME.log
bench() {
  local name=$1 limit=$2 script=$3
  shift 3
  step "$name" "$limit" $python "benchmarks/$script" "$@" --out "$out/$name.json" > "$out/${name}_table.txt" \
    2> "$out/$name.log"
}
bench ceiling 90 bench_fusion.py "${ceiling[@]}" --device $device
bench paper 170 bench_train.py "${paper[@]}" --device $device
bench ceiling64 40 bench_fusion.py "${ceiling64[@]}" --device $device
bench train64 80 bench_train.py "${train64[@]}" --device $device
step tests 90 $python -m pytest -q -p no:cacheprovider -o addopts=-ra "${tests[@]}" tests/test_influence.py \
  tests/test_train.py tests/test_transfer.py tests/test_queues.py > "$out/tests.log" 2>&1
step replica 300 $python benchmarks/gpu_replica.py "${replica[@]}" --out "$out/replica" > "$out/replica_table.txt" \
  2> "$out/replica.log"
bench loaders 150 bench_loaders.py "${loaders[@]}" --device $device
bench grouped 200 bench_train.py "${grouped[@]}" --device $device
bench influence 120 bench_influence.py "${influence[@]}"
bench bestk64 120 bench_train.py "${bestk64[@]}" --device $device
bench bestk 240 bench_train.py "${bestk[@]}" --device $device
step summary $summary_limit $python benchmarks/gpu_summary.py "$out" > "$out/summary_table.txt" 2>&1

cat "$out/device.txt" 2>/dev/null; tail -3 "$out/tests.log" 2>/dev/null
for table in ceiling paper ceiling64 train64 replica loaders grouped influence bestk64 bestk summary; do cat "$out/${table}_table.txt" 2>/dev/null; done
cat "$out/steps.txt"
exit $status
