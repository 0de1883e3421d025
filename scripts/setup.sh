#!/usr/bin/env bash
# One-time, idempotent set-up of ffcv-transfer on a Debian machine:
#   system libraries for ffcv -> .venv -> torch -> ffcv 1.0.2 -> this project (editable, with [engine,dev,slurm]).
# SLURM itself is not installed here: only its test does, as root (tests/slurm_cluster.py).
# Fast when already done: a stamp in .venv records the hash of the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${FFCV_TRANSFER_VENV:-$root/.venv}
python=${PYTHON:-python3}
apt_packages=(pkg-config libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev)
stamp=$venv/.setup-stamp
inputs_hash=$(cat scripts/setup.sh scripts/opencv-shim/opencv4.pc.in setup.py constraints.txt | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ]; then
  exit 0
fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing system libraries: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null
  else
    echo "setup: ffcv needs system libraries; as root run:  sudo sh -c '$cmd'" >&2
    exit 1
  fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip_install() {  # quiet, without the warnings about this machine's absent local package indexes
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip_install torch
else
  pip_install torch==2.13.0   # the CPU build; a plain `torch` would pull a multi-GB CUDA build
fi

# ffcv builds from source against OpenCV core+imgproc through a small pkg-config stand-in.
shim=$venv/opencv-shim
mkdir -p "$shim"
cp -r scripts/opencv-shim/opencv2 "$shim/"
sed "s#@SHIM@#$shim#" scripts/opencv-shim/opencv4.pc.in > "$shim/opencv4.pc"
pip_install -c constraints.txt numpy numba pillow setuptools wheel
PKG_CONFIG_PATH=$shim${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH} pip_install -c constraints.txt --no-build-isolation ffcv==1.0.2
pip_install -c constraints.txt -e ".[engine,dev,slurm]"

echo "$inputs_hash" > "$stamp"
echo "setup: ready ($venv)"
