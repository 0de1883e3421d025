#!/usr/bin/env bash
# One call on a GPU machine without internet (CPython 3.12 with torch, numba, cupy; no ffcv): install the
# wheels in .whl/ (ffcv, fastargs, ... from ../shared/device; pytest, pyyaml, tqdm), run the tests that have
# CUDA cases (influence backends against numpy, AMP channels-last training steps, grouped against
# sequential, eager and compiled), then bench_influence.py, bench_train.py and bench_loaders.py at real sizes,
# and bench_train.py's compiled grouped case last. Results (JSON, logs) go to the folder given as $1 or
# $GPU_CHECK_OUT, step by step (a call that runs out of time keeps the finished steps); the tables print last.
#
#   usage: benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]
#   --dry-run: small sizes and the current environment (.venv when there is one; no wheel install); runs on CPU too.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-gpu-check}
sizes=(paper large)
train=(--size real --device cuda --ks 2 8)
compile_ks=(--ks 8)
loaders=(--size real --device cuda)
dry_run=0
for arg in "$@"; do
  case $arg in
    --dry-run) sizes=(small); train=(--size tiny --device cpu --ks 2 --backends grouped); compile_ks=(--ks 2); loaders=(--size tiny --device cpu --epochs 1); dry_run=1 ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out"
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

$python - <<'PY' | tee "$out/device.txt"
import numpy, numba, torch
from ffcv_transfer.influence import available_backends
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python OK: numpy {numpy.__version__}, numba {numba.__version__}, torch {torch.__version__}, GPU: {gpu}")
print(f"influence backends: {available_backends()}")
PY

status=0
$python -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_influence.py tests/test_store.py \
  tests/test_train.py tests/test_transfer.py 2>&1 | tee "$out/tests.log" | tail -4
[ "${PIPESTATUS[0]}" = 0 ] || status=1

$python benchmarks/bench_influence.py --sizes "${sizes[@]}" --out "$out/influence.json" 2>"$out/bench_influence.log" \
  > "$out/influence_table.txt"
[ $? = 0 ] || status=1
$python benchmarks/bench_train.py "${train[@]}" --out "$out/train.json" 2>"$out/bench_train.log" \
  > "$out/train_table.txt"
[ $? = 0 ] || status=1
$python benchmarks/bench_loaders.py "${loaders[@]}" --out "$out/loaders.json" 2>"$out/bench_loaders.log" \
  > "$out/loaders_table.txt"
[ $? = 0 ] || status=1
# last, as it may not fit the call's time: the compiled grouped backend (compilation in the warm-up epoch)
$python benchmarks/bench_train.py "${train[@]}" "${compile_ks[@]}" --backends grouped+compile --out "$out/train_compile.json" \
  2>"$out/bench_train_compile.log" > "$out/train_compile_table.txt"
[ $? = 0 ] || status=1
cat "$out/influence_table.txt" "$out/train_table.txt" "$out/loaders_table.txt" "$out/train_compile_table.txt"
exit $status
