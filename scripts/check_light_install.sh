#!/usr/bin/env bash
# The light core stands alone: `pip install` of this checkout with no extras, in a bare virtualenv, installs
# no training stack, runs the influence kernel (checked against a float64 numpy difference of means), and
# the `ffcv-transfer` command answers a command that needs the engine with one line and exit status 2.
# Needs git, python3 (>= 3.10) and PyPI (numpy, setuptools); leaves nothing behind, the checkout included.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The working tree's files (tracked and new, not ignored) in a copy, so that the build's egg-info and
# build/ folders land there rather than in the checkout.
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$tmp/src"

"$python" -m venv "$tmp/venv"
py=$tmp/venv/bin/python
"$py" -m pip install -q --disable-pip-version-check "$tmp/src"
echo "check-light: installed $("$py" -m pip list --format=freeze --disable-pip-version-check | tr '\n' ' ')"

cd "$tmp"  # away from the checkout: every import below comes from the installed package
"$py" -I - <<'EOF'
import importlib.util
import sys

import numpy as np

import ffcv_transfer
from ffcv_transfer.cli import ENGINE_MODULES
from ffcv_transfer.findings.kernel import available_backends, class_influence

assert ffcv_transfer.__file__.startswith(sys.prefix), f"imported from {ffcv_transfer.__file__}, not the venv"
engine = ENGINE_MODULES | {"torch", "ffcv", "cupy"}
present = sorted(name for name in engine if importlib.util.find_spec(name) is not None)
assert not present, f"the light core installed {present}"
assert available_backends() == ["numpy"], available_backends()

rng = np.random.default_rng(0)
masks = rng.random((300, 12)) < 0.5
outputs = rng.normal(size=(300, 40)).astype(np.float32) + masks[:, :1]  # class 0 moves every output by ~1
influence, stderr = class_influence(masks, outputs, chunk=64, stderr=True)  # several chunks: the streamed sums

values = outputs.astype(np.float64)
expected = np.stack([values[m].mean(0) - values[~m].mean(0) for m in masks.T])
expected_se = np.stack(
    [np.sqrt(values[m].var(0, ddof=1) / m.sum() + values[~m].var(0, ddof=1) / (~m).sum()) for m in masks.T]
)
for name, got, want in [("influence", influence, expected), ("stderr", stderr, expected_se)]:
    error = np.abs(got - want).max() / np.abs(want).max()
    assert got.shape == want.shape and error < 1e-5, f"{name}: relative error {error:.2e}"
    print(f"check-light: {name} {got.shape} matches float64 numpy, relative error {error:.1e}")

# the same models in a results store, streamed back (the store and influence_from_store need numpy alone)
from ffcv_transfer.findings.influence import influence_from_store
from ffcv_transfer.store.results import ResultStore

store = ResultStore.create("store", len(masks), {"margins": ((40,), np.float32)}, fixed={"masks": masks})
store.writer().write_many(range(len(masks)), margins=outputs)
error = np.abs(influence_from_store("store", "margins", chunk=64) - expected).max() / np.abs(expected).max()
assert error < 1e-5, f"influence_from_store: relative error {error:.2e}"
print(f"check-light: influence_from_store matches float64 numpy, relative error {error:.1e}")
EOF

"$tmp/venv/bin/ffcv-transfer" --help >/dev/null  # the parser needs numpy alone
"$tmp/venv/bin/ffcv-transfer" train --help >/dev/null

# A command that needs the training stack: one line naming the extra and the missing module, exit status 2.
expect_engine_error() {
  local code=0
  "$tmp/venv/bin/ffcv-transfer" "$@" >"$tmp/out" 2>"$tmp/err" || code=$?
  local pattern="^ffcv-transfer: error: $1 needs the engine extra: pip install \"ffcv-transfer\[engine\]\" \(missing: [A-Za-z]+\)$"
  if [ "$code" != 2 ] || [ -s "$tmp/out" ] || [ "$(wc -l <"$tmp/err")" != 1 ] || ! grep -Eq "$pattern" "$tmp/err"; then
    echo "check-light: \`ffcv-transfer $*\` exited $code, expected 2 and one line matching $pattern; it wrote:" >&2
    cat "$tmp/out" "$tmp/err" >&2
    exit 1
  fi
  echo "check-light: \`ffcv-transfer $1\` without the engine: exit 2, $(cat "$tmp/err")"
}
expect_engine_error settings
expect_engine_error train --store "$tmp/store"
expect_engine_error demo --out "$tmp/demo"
echo "check-light: ok"
