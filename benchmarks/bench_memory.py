"""Paper scale, simulated: peak memory and time of the streamed influence kernels on scaled-down sizes,
extrapolated to the paper's (JSON + a table).

Paper sizes: class level 7,540 models x 1,000 classes x 10,000 target outputs; example level 50,000 models
x 1.28M source examples x 10,000 target examples. Scaled cases, each in its own process so that its peak
resident memory (VmHWM) is its own:

  class     `influence_from_store` over an on-disk store (margins float16) into a .npy memmap, as
            `ffcv-transfer influence` runs it; N grows at fixed C and T, then T grows past one column block.
  example   `example_influence_blocks` over memmapped packed masks into `leakage.ExtremeExamples` (each
            target's 80 most positive and most negative source examples, z-scale from 4,096 of them), as
            `ffcv-transfer leakage` runs it; E and T grow.

Memory model, checked against every case: what the kernel allocates = `max_bytes` x a measured factor
+ what its result keeps in memory (nothing for the class level, whose result goes to a .npy memmap; the
z-sample and the extremes for the example level). Inputs stay on disk (store shards, packed masks), read
through the page cache. Time is extrapolated from the multiply-adds per second (N x C x T, N x E x T) of
the case with the most models, where the GEMM dominates as it does at the paper's sizes.

    python benchmarks/bench_memory.py --out benchmarks/results/memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from bench_common import machine, run_in_subprocess, save_report

PAPER = {"class": (7_540, 1_000, 10_000), "example": (50_000, 1_280_000, 10_000)}
QUICK = {
    "class": [(1_000, 1_000, 10_000), (4_000, 1_000, 10_000), (2_000, 1_000, 40_000)],
    "example": [(128, 16_384, 2_000), (128, 65_536, 2_000), (128, 65_536, 8_000), (2_048, 32_768, 2_000)],
}
KEEP = 80  # leakage's default: max(top 10, 4 x 20 candidates)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(kind: str, n: int, width: int, height: int, root: Path) -> None:
    """The case's inputs on disk: a store (class) or packed masks and outputs (example)."""
    rng = np.random.default_rng(0)
    if kind == "class":
        from ffcv_transfer.store.results import ResultStore

        store = ResultStore.create(
            root / "store", n, {"margins": ((height,), np.float16)}, fixed={"masks": rng.random((n, width)) < 0.5}
        )
        writer = store.writer()
        for start in range(0, n, 500):
            rows = np.arange(start, min(start + 500, n))
            writer.write_many(rows, margins=rng.standard_normal((len(rows), height)).astype(np.float16))
    else:
        masks = np.lib.format.open_memmap(root / "packed.npy", "w+", np.uint8, (n, width // 8))
        for start in range(0, n, 16):
            masks[start : start + 16] = np.packbits(rng.random((min(16, n - start), width)) < 0.5, axis=1)
        masks.flush()
        np.save(root / "outputs.npy", rng.standard_normal((n, height)).astype(np.float16))


def run_case(kind: str, n: int, width: int, height: int, max_bytes: int, root: Path) -> dict:
    """One kernel run; `allocated_mb` is the peak of what it allocated (numpy reports to tracemalloc), the
    process's own memory: VmHWM also counts the store's and the result's file pages, which the OS can drop."""
    from ffcv_transfer.findings.influence import influence_from_store
    from ffcv_transfer.findings.kernel import example_influence_blocks, plan_blocks
    from ffcv_transfer.findings.leakage import Z_SAMPLE, ExtremeExamples

    if kind == "class":
        out = np.lib.format.open_memmap(root / "influence.npy", "w+", np.float32, (width, height))
        chunk, block = plan_blocks(width, height, n, max_bytes=max_bytes, row_bytes=2 * height)
        kept = 0.0  # the result goes to its file
        began = time.perf_counter()
        tracemalloc.start()
        influence_from_store(root / "store", "margins", backend="numpy", max_bytes=max_bytes, out=out)
    else:
        packed, outputs = np.load(root / "packed.npy", mmap_mode="r"), np.load(root / "outputs.npy")
        chunk, block = plan_blocks(min(8192, width), height, n, max_bytes=max_bytes, row_bytes=1024 + 2 * height)
        kept = (min(width, Z_SAMPLE) * height * 4 + 2 * height * KEEP * 12) / 2**20  # z-sample, extremes
        began = time.perf_counter()
        tracemalloc.start()
        blocks = example_influence_blocks(packed, outputs, width, backend="numpy", max_bytes=max_bytes)
        ExtremeExamples.from_blocks(blocks, width, height, KEEP)
    allocated = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    seconds = time.perf_counter() - began
    return {
        "kind": kind,
        "N": n,
        "C_or_E": width,
        "T": height,
        "max_mb": max_bytes / 2**20,
        "seconds": seconds,
        "madds_per_s": n * width * height / seconds,
        "chunk": chunk,
        "column_block": block,
        "passes": -(-height // block),
        "allocated_mb": allocated,
        "kept_mb": kept,
        "working_factor": (allocated - kept) / (max_bytes / 2**20),
        "vm_hwm_mb": peak_mb(),
    }


def paper_row(kind: str, rows: list[dict], max_mb: float) -> dict:
    """The paper size's time at the rate of its kind's many-model case (where the GEMM dominates, as it does
    at the paper's sizes), and its allocations from the memory model: the largest measured working factor
    x the budget + what the result keeps in memory."""
    from ffcv_transfer.findings.leakage import Z_SAMPLE

    n, width, height = PAPER[kind]
    factor = max(r["working_factor"] for r in rows)
    kept = 0.0 if kind == "class" else (Z_SAMPLE * height * 4 + 2 * height * KEEP * 12) / 2**20
    seconds = n * width * height / max(rows, key=lambda r: r["N"])["madds_per_s"]  # the most GEMM-bound case
    return {
        "kind": kind,
        "N": n,
        "C_or_E": width,
        "T": height,
        "max_mb": max_mb,
        "extrapolated": True,
        "seconds": seconds,
        "allocated_mb": factor * max_mb + kept,
        "kept_mb": kept,
        "working_factor": factor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-mb", type=float, default=256, help="the kernels' memory budget (default: 256)")
    parser.add_argument("--out", default="benchmarks/results/memory-cpu.json")
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)  # build|run KIND N WIDTH HEIGHT
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        step, kind, *sizes = args.case
        n, width, height = map(int, sizes)
        if step == "build":
            build(kind, n, width, height, Path(args.dir))
            print(json.dumps({}))
        else:
            print(json.dumps(run_case(kind, n, width, height, int(args.max_mb * 2**20), Path(args.dir))))
        return
    report = {"machine": machine(), "max_mb": args.max_mb, "results": []}
    for kind, sizes in QUICK.items():
        measured = []
        for n, width, height in sizes:
            with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as root:
                shape = [str(n), str(width), str(height)]
                run_in_subprocess(__file__, ["--case", "build", kind, *shape, "--dir", root], f"{kind} build")
                row = run_in_subprocess(
                    __file__, ["--case", "run", kind, *shape, "--dir", root, "--max-mb", str(args.max_mb)], kind
                )
            if "error" in row:
                sys.exit(1)
            measured.append(row)
            report["results"].append(row)
            save_report(args.out, report)
        report["results"].append(paper_row(kind, measured, args.max_mb))
        save_report(args.out, report)
    print(
        f"{'kind':8} {'N':>7} {'C or E':>10} {'T':>7} {'passes':>6} {'seconds':>11} {'allocated MB':>12} "
        f"{'kept MB':>8} {'dense result MB':>15}"
    )
    for r in report["results"]:
        dense = r["C_or_E"] * r["T"] * 4 / 2**20
        label = r["kind"] + ("*" if r.get("extrapolated") else "")
        print(
            f"{label:8} {r['N']:>7} {r['C_or_E']:>10} {r['T']:>7} {r.get('passes', ''):>6} {r['seconds']:>11.1f} "
            f"{r['allocated_mb']:>12.0f} {r['kept_mb']:>8.0f} {dense:>15.0f}"
        )
    print(
        f"* extrapolated: time from the measured rates on this machine, allocations from the memory model "
        f"(budget {args.max_mb:.0f} MB)"
    )


if __name__ == "__main__":
    main()
