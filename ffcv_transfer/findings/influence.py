"""Class influence streamed from results stores: the kernel (`ffcv_transfer.findings.kernel`) fed chunk by
chunk from disk, with the next chunk read while the current one is computed; `write_influence` streams it
into .npy files."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ffcv_transfer.findings.kernel import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_BYTES,
    InfluenceAccumulator,
    InfluenceBackend,
    InfluenceError,
    check_least_squares,
    column_blocks,
    make_backend,
    plan_blocks,
    working_budget,
)
from ffcv_transfer.store.files import atomic_path
from ffcv_transfer.store.results import READ_BYTES, open_stores, reserve_space


def influence_from_store(
    store_dir: str | Path | Sequence[str | Path],
    key: str = "margins",
    *,
    mask_key: str = "masks",
    backend: str | InfluenceBackend = "auto",
    chunk: int = DEFAULT_CHUNK,
    stderr: bool = False,
    progress: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: np.ndarray | None = None,
    out_stderr: np.ndarray | None = None,
    estimator: str = "difference",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Class influence on `key` by `estimator` (kernel.class_influence) over the completed, non-failed rows
    of a results store (or of several read as one, `store.open_stores`), streamed: at most
    `chunk` rows at a time and, when the (C, T) accumulators would not fit `max_bytes`, one block of target
    columns per pass over the store. The next chunk is read from disk while the current one is computed.
    `out` (and `out_stderr`) may be (C, T) float32 memmaps, filled block by block; a block's pages leave
    this process's resident memory once written (they stay in the file and the page cache)."""
    from concurrent.futures import ThreadPoolExecutor

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
    if estimator == "least_squares":  # before the pass, not after it
        try:
            check_least_squares(total, num_classes)
        except InfluenceError as error:
            raise InfluenceError(f"{store_dir}: {error}") from None
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
    backend = make_backend(backend)  # once: "auto" looks for a GPU, which each block need not repeat
    out = np.empty((num_classes, num_outputs), np.float32) if out is None else out
    if stderr and out_stderr is None:
        out_stderr = np.empty((num_classes, num_outputs), np.float32)
    with (
        ThreadPoolExecutor(1) as reader,
        progress_bar(total * len(blocks), progress) as bar,
    ):
        for columns in blocks:
            chunks = store.iter_chunks([mask_key, key], chunk=chunk)
            accumulator = InfluenceAccumulator(
                num_classes, columns.stop - columns.start, backend=backend, stderr=stderr, estimator=estimator
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
            for array in (out, out_stderr):
                drop_resident_pages(array)
    return (out, out_stderr) if stderr else out


def drop_resident_pages(array: np.ndarray | None) -> None:
    """Unmap the pages of a file-backed memmap from this process (a shared mapping: its writes stay in the
    page cache and the file), so that a result written block by block does not grow the process's resident
    memory by its whole size; anything else is left as it is."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap):
        array.base.madvise(mmap.MADV_DONTNEED)


def transfer_outputs(
    store_dirs: Sequence[str | Path], key: str, target: str | None = None, mode: str | None = None
) -> tuple[list[Path], str]:
    """(stores, field) holding output `key` of the transfer to `target` in `mode`: a transfer made later by
    `ffcv-transfer transfer` is its own store per source store (STORE/transfers/TARGET/MODE) under the
    bare name; one of the experiment's own transfers is a field of the stores (`transfer_field`)."""
    from ffcv_transfer.store.experiment import later_transfer_stores, open_experiment, transfer_field

    stores = [Path(path) for path in store_dirs]
    if target is None and mode is None:
        return stores, key
    if later := later_transfer_stores(stores, target, mode):
        return later, key
    return stores, transfer_field(key, open_experiment(stores[0]), target, mode)


def stderr_path(out: str | Path) -> Path:
    """Where `write_influence` puts the standard errors beside OUT.npy: OUT.stderr.npy."""
    return Path(str(out).removesuffix(".npy") + ".stderr.npy")


def write_influence(
    store_dirs: Sequence[str | Path],
    out: str | Path,
    key: str = "margins",
    *,
    target: str | None = None,
    mode: str | None = None,
    mask_key: str = "masks",
    backend: str | InfluenceBackend = "auto",
    chunk: int = DEFAULT_CHUNK,
    stderr: bool = False,
    progress: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    process_budget: bool = False,
    estimator: str = "difference",
) -> list[Path]:
    """Write the class influence of the stores (read as one) on output `key` of a transfer
    (`transfer_outputs`) to `out`, a (C, T) float32 .npy, and with `stderr` its standard errors to
    `stderr_path(out)`; returns the paths written. The arrays are memmaps filled block by block
    (`influence_from_store`), so the result never has to fit in memory; each file appears whole or not
    at all (`store.files.atomic_path`): an error leaves what was there before. `max_bytes` bounds the
    kernel's working set or, with `process_budget`, the whole process's resident memory: what the process
    holds when the computation starts and the store's read buffer are counted against it
    (`kernel.working_budget`)."""
    from ffcv_transfer.store.experiment import EXPERIMENT_FILE, pooled_experiment

    if len(store_dirs) > 1 and all((Path(path) / EXPERIMENT_FILE).exists() for path in store_dirs):
        pooled_experiment(store_dirs)  # the recipe checks of every analysis that reads stores as one
    stores, key = transfer_outputs(store_dirs, key, target, mode)
    store = open_stores(stores)
    store.require([mask_key, key])
    if key not in store.schema:
        raise InfluenceError(f"{stores[0]}: {key!r} is a fixed array, not a per-model output")
    shape = (store.fixed(mask_key).shape[1], int(np.prod(store.schema[key][0])))
    finals = [Path(out), stderr_path(out)][: 1 + stderr]
    with ExitStack() as files:
        temporary = [files.enter_context(atomic_path(final)) for final in finals]
        arrays = [np.lib.format.open_memmap(path, "w+", np.float32, shape) for path in temporary]
        for path, final in zip(temporary, finals):  # a full disk: an error now, not a SIGBUS at the end
            with open(path, "r+b") as f:
                reserve_space(f, path.stat().st_size, final)
        influence_from_store(
            stores,
            key,
            mask_key=mask_key,
            backend=backend,
            chunk=chunk,
            stderr=stderr,
            progress=progress,
            max_bytes=working_budget(max_bytes, reserved=READ_BYTES) if process_budget else max_bytes,
            out=arrays[0],
            out_stderr=arrays[1] if stderr else None,
            estimator=estimator,
        )
        for array in arrays:
            array.flush()
        del arrays  # the maps are closed before their files are renamed
    return finals


def progress_bar(total: int, enabled: bool) -> Any:
    """tqdm's bar over `total` models when `enabled`, else a silent stand-in: tqdm comes with the engine
    extra, and the light core streams stores without it."""
    if not enabled:
        return nullcontext(SimpleNamespace(update=lambda count: None))
    from tqdm import tqdm

    return tqdm(total=total, desc="influence", unit=" models")
