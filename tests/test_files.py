"""store.files: the one atomic write every file of the package goes through."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ffcv_transfer.store import files
from ffcv_transfer.store.files import atomic_path, atomic_write


def test_atomic_write_replaces_the_file_whole_after_an_fsync_and_leaves_nothing_beside_it(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    final = tmp_path / "spec.json"
    atomic_write(final, b"first")
    atomic_write(final, b"second, longer")
    assert final.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]
    assert len(synced) == 2 and all(p != str(final) and p.startswith(str(tmp_path / ".spec.json.tmp-")) for p in synced)


def test_a_block_that_raises_leaves_the_old_file_and_no_temporary_one(tmp_path):
    final = tmp_path / "masks.npy"
    np.save(final, np.arange(3))
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(final) as tmp, open(tmp, "wb") as out:
            np.save(out, np.arange(5))
            assert tmp.parent == final.parent and tmp.exists() and tmp != final
            raise RuntimeError("killed mid-write")
    np.testing.assert_array_equal(np.load(final), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["masks.npy"]


def test_any_writer_may_fill_the_temporary_path(tmp_path):
    final = tmp_path / "grown.npy"
    with atomic_path(final) as tmp:
        grown = np.lib.format.open_memmap(tmp, "w+", np.int64, (4,))
        grown[:] = [4, 3, 2, 1]
        grown.flush()
        del grown
        assert not final.exists()  # nothing under the final name until the block ends
    np.testing.assert_array_equal(np.load(final), [4, 3, 2, 1])
    names = {files.temporary_path(final).name for _ in range(20)}
    assert len(names) == 20 and all(name.startswith(f".grown.npy.tmp-{os.getpid()}-") for name in names)
    files.temporary_path(tmp_path / "7.pt").write_bytes(b"torn")  # left by a writer killed mid-write
    assert [p.name for p in tmp_path.glob("*.pt")] == []  # a glob for checkpoints does not take it
