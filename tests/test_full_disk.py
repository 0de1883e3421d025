"""A full disk is one line `ffcv-transfer: error: PATH: no space left on device ...` with exit status 2, and
leaves nothing half-made: `masks` makes its store whole or not at all, `influence --out` claims the space of
its file before any work and leaves an earlier file byte-identical. Each case runs on a real full file
system (a 1 MiB tmpfs, where this process may mount one) and with the failure injected."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ffcv_transfer.store.results as results_module
from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.store.results import ResultStore

from .conftest import DEMO_CONFIG


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs (skipped where it cannot be mounted: not root, or no mount permission)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def small_store(path: Path, classes: int = 500, outputs: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(0)
    masks = rng.random((8, classes)) < 0.5
    store = ResultStore.create(path, 8, {"margins": ((outputs,), np.float16)}, fixed={"masks": masks})
    store.writer().write_many(range(8), margins=rng.standard_normal((8, outputs)).astype(np.float16))
    return masks


def test_store_creation_on_a_full_disk_leaves_nothing(full_disk):
    """2 MB of masks on a 1 MiB file system: an OSError naming the store, and the file system as it was."""
    with pytest.raises(OSError) as raised:
        ResultStore.create(
            full_disk / "store", 4, {"x": ((), np.float32)}, fixed={"masks": np.ones((4, 500_000), bool)}
        )
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(full_disk / "store")
    assert list(full_disk.iterdir()) == []


def test_store_creation_fails_whole_or_not_at_all(tmp_path, monkeypatch):
    """The spec write (the last step) refused: no store folder and no build folder remain; a retry makes
    the store; a store made into an existing empty folder is whole too."""
    monkeypatch.setattr(results_module, "atomic_write", fail_with_enospc)
    with pytest.raises(OSError):
        ResultStore.create(tmp_path / "store", 4, {"x": ((), np.float32)}, fixed={"masks": np.ones((4, 3), bool)})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    store = ResultStore.create(tmp_path / "store", 4, {"x": ((), np.float32)}, fixed={"masks": np.ones((4, 3), bool)})
    assert store.fixed("masks").shape == (4, 3)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["store"]
    (tmp_path / "empty").mkdir()
    ResultStore.create(tmp_path / "empty", 2, {"x": ((), np.float32)})
    assert sorted(entry.name for entry in (tmp_path / "empty").iterdir()) == [
        "claims",
        "failed",
        "fixed",
        "shards",
        "spec.json",
    ]


def test_masks_on_a_full_disk_is_one_line_and_leaves_no_store(tiny_data, tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("out/demo/data", str(tiny_data)))
    out = tmp_path / "runs"
    out.mkdir()
    monkeypatch.setattr(results_module, "atomic_write", fail_with_enospc)
    assert cli_main(["masks", "--config", str(config), "--store", str(out / "store")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"ffcv-transfer: error: {out / 'store'}: no space left on device"), line
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    assert cli_main(["masks", "--config", str(config), "--store", str(out / "store")]) == 0  # the retry
    assert (out / "store" / "experiment.yaml").exists()


@pytest.mark.parametrize("stderr", [False, True])
def test_influence_out_on_a_full_disk_is_one_line_before_any_work(full_disk, tmp_path, capsys, stderr):
    """A (500, 1000) float32 influence (2 MB) into 1 MiB, over an earlier file: refused before the
    computation, naming the file; the earlier file is byte-identical and nothing else is left."""
    small_store(tmp_path / "store")
    earlier = full_disk / "infl.npy"
    np.save(earlier, np.arange(6.0))
    before = earlier.read_bytes()
    argv = ["influence", str(tmp_path / "store"), "--backend", "numpy", "--out", str(earlier)]
    assert cli_main(argv + ["--stderr"] * stderr) == 2
    line = one_error_line(capsys)
    assert line.startswith("ffcv-transfer: error: ") and ": no space left on device: " in line, line
    assert str(full_disk) in line
    assert earlier.read_bytes() == before
    assert sorted(entry.name for entry in full_disk.iterdir()) == ["infl.npy"]


def test_influence_out_with_an_injected_full_disk(tmp_path, monkeypatch, capsys):
    masks = small_store(tmp_path / "store", classes=6, outputs=10)
    earlier = tmp_path / "infl.npy"
    np.save(earlier, np.arange(6.0))
    before = earlier.read_bytes()
    monkeypatch.setattr(results_module.os, "posix_fallocate", fail_with_enospc)
    argv = ["influence", str(tmp_path / "store"), "--backend", "numpy", "--out", str(earlier)]
    assert cli_main(argv) == 2
    assert one_error_line(capsys) == (
        f"ffcv-transfer: error: {earlier}: no space left on device: free some space and run the command again"
    )
    assert earlier.read_bytes() == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["infl.npy", "store"]
    monkeypatch.undo()
    assert cli_main(argv) == 0
    assert np.load(earlier).shape == (masks.shape[1], 10)
