"""The one way a file of this package appears on disk: whole or not at all.

Everything is written under a temporary name beside its final path (same folder, so same filesystem),
flushed to disk with fsync, then renamed over the final path: a reader (another worker, a rerun after a
crash) sees the old file or the complete new one, never a torn one. On an error the temporary file is
removed and the final path is left as it was.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(final: str | Path) -> Path:
    """A hidden name beside `final`, unique to this process and call. It does not end as `final` does, so a
    glob for the final names (`*.pt`, `*.json`) never takes one left by a crash; a writer that appends
    its suffix to a bare name (np.save) must be given an open file instead."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temporary path for the caller to write `final`'s content to (any writer: numpy, torch, ffcv);
    on leaving the block it is fsynced and renamed to `final`, or removed if the block raised."""
    final = Path(final)
    tmp = temporary_path(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(final: str | Path, data: bytes) -> None:
    """Write `data` to `final` whole or not at all (`atomic_path`)."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
