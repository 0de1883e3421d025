"""benchmarks/gpu_check.sh's logistics, proved on the CPU with --dry-run: what a remote call gets back (one
packed folder, however the check ends), the summary that always runs, and the device step that ends the
check at once, naming what is missing."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, pack: Path, steps: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(out), "--dry-run", "--pack", str(pack)],
        cwd=ROOT,
        env={**os.environ, "GPU_CHECK_STEPS": steps, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def packed(pack: Path) -> dict[str, str]:
    with tarfile.open(pack) as archive:
        return {Path(m.name).name: archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()}


@pytest.mark.slow
def test_the_check_packs_its_folder_and_its_device_step_fails_fast(tmp_path):
    done = run_check(tmp_path / "ok", tmp_path / "ok.tar.gz", "device summary")
    assert done.returncode == 0, done.stdout + done.stderr
    files = packed(tmp_path / "ok.tar.gz")
    assert {"steps.txt", "device.txt", "summary_table.txt"} <= set(files)
    assert "python: numpy" in files["device.txt"] and "ffcv" in files["device.txt"]
    steps = files["steps.txt"].splitlines()
    assert [line.split(":")[0] for line in steps] == ["device", "summary"] and all(" ok in " in s for s in steps)
    assert "device: ok in" in done.stderr and "packed" in done.stderr  # each step's end, as it ends

    broken = tmp_path / "site"
    (broken / "ffcv").mkdir(parents=True)
    (broken / "ffcv" / "__init__.py").write_text("raise ImportError('no wheel installed')\n")
    done = run_check(tmp_path / "bad", tmp_path / "bad.tar.gz", "device ceiling summary", PYTHONPATH=str(broken))
    assert done.returncode == 1
    files = packed(tmp_path / "bad.tar.gz")
    assert "missing: ffcv (ImportError: no wheel installed)" in files["device.txt"]
    assert files["steps.txt"].splitlines()[0].startswith("device: failed") and "ceiling" not in files["steps.txt"]
    assert "missing: ffcv" in done.stdout  # said at once, not after the other steps fail
