"""Class influence streamed from results stores: the kernel (`ffcv_transfer.findings.kernel`) fed chunk by
chunk from disk, with the next chunk read while the current one is computed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ffcv_transfer.findings.kernel import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_BYTES,
    InfluenceAccumulator,
    InfluenceError,
    column_blocks,
    plan_blocks,
)
from ffcv_transfer.store.results import open_stores


def influence_from_store(
    store_dir: str | Path | Sequence[str | Path],
    key: str = "margins",
    *,
    mask_key: str = "masks",
    backend: str = "auto",
    chunk: int = DEFAULT_CHUNK,
    stderr: bool = False,
    progress: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: np.ndarray | None = None,
    out_stderr: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Class influence on `key` over the completed, non-failed rows of a results store (or of several
    read as one, `store.open_stores`), streamed: at most
    `chunk` rows at a time and, when the (C, T) accumulators would not fit `max_bytes`, one block of target
    columns per pass over the store. The next chunk is read from disk while the current one is computed.
    `out` (and `out_stderr`) may be (C, T) float32 memmaps, filled block by block."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    store = open_stores(store_dir)
    store_dir = store_dir if isinstance(store_dir, (str, Path)) else " + ".join(map(str, store_dir))
    store.require([mask_key, key])
    completed = store.completed_rows()
    if len(completed) == 0:
        raise InfluenceError(f"{store_dir}: no completed rows yet")
    total = len(np.setdiff1d(completed, list(store.failures())))
    if total == 0:
        raise InfluenceError(f"{store_dir}: every completed row is marked failed")
    if key not in store.schema:
        raise InfluenceError(f"{store_dir}: {key!r} is a fixed array, not a per-model output")
    shape, dtype = store.schema[key]
    num_classes, num_outputs = store.fixed(mask_key).shape[1], int(np.prod(shape))
    chunk, width = plan_blocks(
        num_classes,
        num_outputs,
        total,
        max_bytes=max_bytes,
        stderr=stderr,
        row_bytes=num_outputs * np.dtype(dtype).itemsize,
        chunk=chunk,
    )
    blocks = column_blocks(num_outputs, width)
    out = np.empty((num_classes, num_outputs), np.float32) if out is None else out
    if stderr and out_stderr is None:
        out_stderr = np.empty((num_classes, num_outputs), np.float32)
    with (
        ThreadPoolExecutor(1) as reader,
        tqdm(total=total * len(blocks), desc="influence", unit=" models", disable=not progress) as bar,
    ):
        for columns in blocks:
            chunks = store.iter_chunks([mask_key, key], chunk=chunk)
            accumulator = InfluenceAccumulator(
                num_classes, columns.stop - columns.start, backend=backend, stderr=stderr
            )
            pending = reader.submit(next, chunks, None)
            while (item := pending.result()) is not None:
                pending = reader.submit(next, chunks, None)
                part, values = item
                accumulator.update(values[mask_key], values[key].reshape(len(part), -1)[:, columns], rows=part)
                bar.update(len(part))
            if stderr:
                out[:, columns], out_stderr[:, columns] = accumulator.result()
            else:
                out[:, columns] = accumulator.result()
    return (out, out_stderr) if stderr else out
