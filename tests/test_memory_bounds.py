"""The streamed kernels hold to their memory budget: each case runs in a child process whose address space
is capped (RLIMIT_AS) a few hundred MB above what Python and numpy take at start, on sizes whose dense
(whole-matrix) computation needs several times that; the same child shows the dense path failing under
the cap, and the parent checks the streamed numbers against a float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ffcv_transfer.store.results import ResultStore

from .conftest import influence_reference

HEADROOM_MB = 384  # the cap above the child's start; the streamed kernels get a sixth of it

CHILD_PREAMBLE = """
import json, resource, sys
import numpy as np
import ffcv_transfer.findings.influence, ffcv_transfer.findings.leakage, ffcv_transfer.store.results, ffcv_transfer.cli
start = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
cap = start + {headroom} * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
budget = {headroom} * 2**20 // 6

def dense_fails(compute):
    try:
        compute()
    except MemoryError:
        return True
    return False
"""


def run_capped(body: str, tmp_path: Path) -> dict:
    """Run `body` after the preamble in a capped child; it prints one JSON line."""
    script = textwrap.dedent(CHILD_PREAMBLE.format(headroom=HEADROOM_MB)) + textwrap.dedent(body)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}  # each extra malloc arena reserves 64 MB of address space
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_class_influence_streams_target_columns_under_a_memory_cap(tmp_path):
    """1,000 classes x 30,000 outputs: the float64 accumulators alone take 240 MB and the dense result
    about four times that; `ffcv-transfer influence` under the cap writes every block into its file."""
    rng = np.random.default_rng(0)
    models, classes, width = 96, 1000, 30_000
    masks = rng.random((models, classes)) < 0.5
    outputs = (rng.standard_normal((models, width)) + 3 * masks[:, :1]).astype(np.float16)
    store = ResultStore.create(tmp_path / "store", models, {"margins": ((width,), np.float16)}, fixed={"masks": masks})
    store.writer().write_many(range(models), margins=outputs)
    found = run_capped(
        """
        from ffcv_transfer.cli import main
        from ffcv_transfer.findings.influence import influence_from_store
        from ffcv_transfer.findings.kernel import resident_bytes
        held = resident_bytes()  # --max-memory bounds the whole process: the kernel gets `budget` beyond it
        code = main(["influence", "store", "--backend", "numpy", "--out", "infl.npy",
                     "--max-memory", str((held + budget) / 2**30)])
        dense = dense_fails(lambda: influence_from_store("store", "margins", backend="numpy", max_bytes=2**40))
        print(json.dumps({"code": code, "dense_fails": dense}))
    """,
        tmp_path,
    )
    assert found == {"code": 0, "dense_fails": True}
    result = np.load(tmp_path / "infl.npy")
    expected = influence_reference(masks, outputs)
    assert np.abs(result - expected).max() / np.abs(expected).max() < 1e-6
    assert np.argmax(result.mean(1)) == 0  # the planted class
    assert not list(tmp_path.glob("*.partial"))


def test_leak_extremes_stream_example_blocks_under_a_memory_cap(tmp_path):
    """60,000 source x 2,000 target examples: the dense (E, T) float32 influence is 480 MB; the streamed
    path keeps each target's 20 most positive and most negative source examples. Planted pairs (a target
    output raised by one source example's presence) come out on top; every kept value and index matches
    the float64 reference's ranking of its column."""
    rng = np.random.default_rng(1)
    models, examples, width, keep = 64, 60_000, 2_000, 20
    masks = rng.random((models, examples)) < 0.5
    outputs = rng.standard_normal((models, width))
    planted = {int(j): int(rng.integers(examples)) for j in rng.choice(width, 25, replace=False)}
    for j, e in planted.items():
        outputs[:, j] += 4 * masks[:, e]
    np.save(tmp_path / "packed.npy", np.packbits(masks, axis=1))
    np.save(tmp_path / "outputs.npy", outputs.astype(np.float32))
    found = run_capped(
        f"""
        from ffcv_transfer.findings.kernel import example_influence, example_influence_blocks
        from ffcv_transfer.findings.leakage import ExtremeExamples
        packed, outputs = np.load("packed.npy", mmap_mode="r"), np.load("outputs.npy")
        blocks = example_influence_blocks(packed, outputs, {examples}, backend="numpy", max_bytes=budget)
        extremes = ExtremeExamples.from_blocks(blocks, {examples}, {width}, {keep})
        np.savez("extremes.npz", positive=extremes.positive, positive_values=extremes.positive_values,
                 negative=extremes.negative, negative_values=extremes.negative_values)
        dense = dense_fails(lambda: example_influence(packed, outputs, {examples}, backend="numpy"))
        print(json.dumps({{"dense_fails": dense}}))
    """,
        tmp_path,
    )
    assert found == {"dense_fails": True}
    saved = np.load(tmp_path / "extremes.npz")
    for j, e in planted.items():
        assert saved["positive"][j, 0] == e
    checked = [*planted, *rng.choice(width, 15, replace=False).tolist()]
    expected = influence_reference(masks, outputs.astype(np.float32)[:, checked])  # (E, len(checked))
    for k, j in enumerate(checked):
        order = np.argsort(-expected[:, k], kind="stable")[:keep]
        np.testing.assert_allclose(saved["positive_values"][j], expected[order, k], rtol=1e-5, atol=1e-6)
        gaps = np.diff(expected[order, k])  # indices agree wherever neighbouring values are not near-ties
        clear = np.concatenate([[True], np.abs(gaps) > 1e-5]) & np.concatenate([np.abs(gaps) > 1e-5, [True]])
        np.testing.assert_array_equal(saved["positive"][j][clear], order[clear])
        order = np.argsort(expected[:, k], kind="stable")[:keep]
        np.testing.assert_allclose(saved["negative_values"][j], expected[order, k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_influence_max_memory_bounds_the_process_resident_memory(tmp_path, backend):
    """`ffcv-transfer influence --max-memory` bounds the whole process: the peak resident memory of a child
    that runs the command (Python, numpy and the package counted) stays within 10% of the budget, on a
    store whose outputs (32 MB) read twice or mapped would exceed it; "auto" without a GPU does not import
    torch."""
    rng = np.random.default_rng(2)
    models, classes, width, budget_mib = 800, 200, 20_000, 80
    masks = rng.random((models, classes)) < 0.5
    outputs = (rng.standard_normal((models, width)) + 2 * masks[:, :1]).astype(np.float16)
    store = ResultStore.create(tmp_path / "store", models, {"margins": ((width,), np.float16)}, fixed={"masks": masks})
    store.writer().write_many(range(models), margins=outputs)
    script = f"""
import json, sys
from ffcv_transfer.cli import main
code = main(["influence", "store", "--backend", "{backend}", "--out", "infl.npy",
             "--max-memory", str({budget_mib} / 1024)])
# VmHWM: this process image's peak; getrusage's ru_maxrss keeps the parent's peak across fork and exec
peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({{"code": code, "peak": peak, "torch": "torch" in sys.modules}}))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU: "auto" is numpy's BLAS
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["code"] == 0 and not found["torch"]
    assert found["peak"] <= 1.10 * budget_mib * 2**20, f"peak {found['peak'] / 2**20:.1f} MiB, budget {budget_mib} MiB"
    result = np.load(tmp_path / "infl.npy")
    expected = influence_reference(masks, outputs)
    assert np.abs(result - expected).max() / np.abs(expected).max() < 1e-6
