"""Influence kernel benchmark (JSON + a table).

Sizes: "paper" (N=7,540 models, C=1,000 classes, T=10,000 target outputs, in memory) and "large"
(N=50,000, streamed from a results store on disk); "small" (both ways) for quick checks; "examples"
(N=1,000 models, E=32,768 source examples, T=1,000 target outputs: example-level influence from bit-packed
masks). Cases, each in its own process so that its peak memory is its own:

  baseline   MadryLab/data-transfer's BatchInfluencesMeter algorithm, re-implemented: per chunk of 1,024
             models a batched mat-vec class_mask[C, n] @ outputs[T, n, 1] for included and for excluded
             models (torch). On CPU it is run on the first --baseline-outputs columns and scaled to T
             (it is linear in T), and the table says so.
  sgemm, dgemm   one numpy GEMM M^T Y in float32 / float64: the floor.
  <backend>      class_influence with that backend, from host arrays (transfers included);
  <backend>-resident   GPU backends with the data already on the device (compute only).
  store-<backend>      influence_from_store over the on-disk store, with the time to read the same
                       shard files as the disk floor (both with a warm page cache).
  packed-<backend>     ("examples" only) example_influence from np.packbits masks, as a store keeps them:
                       numpy unpacks each chunk and runs a GEMM, numba reads the bytes (its table kernel).

    python benchmarks/bench_influence.py --sizes paper large --out benchmarks/results/influence.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from bench_common import machine, run_in_subprocess, torch_cuda

SIZES = {
    "small": (2_000, 200, 1_000),
    "paper": (7_540, 1_000, 10_000),
    "large": (50_000, 1_000, 10_000),
    "examples": (1_000, 32_768, 1_000),
}


def make_data(size: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks at alpha = 0.5 and float16 margins-like outputs with a planted effect."""
    n, classes, width = SIZES[size]
    rng = np.random.default_rng(seed)
    masks = rng.random((n, classes), dtype=np.float32) < 0.5
    outputs = rng.standard_normal((n, width), dtype=np.float32) + 2.0
    outputs[:, : width // 10] += 0.2 * masks[:, :1]
    return masks, outputs.astype(np.float16)


def reference(masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    m, y = masks.astype(np.float64), outputs.astype(np.float64)
    n_in = m.sum(0)[:, None]
    sums = m.T @ y
    return sums / n_in - (y.sum(0) - sums) / (len(m) - n_in)


def baseline(masks: np.ndarray, outputs: np.ndarray, device: str, chunk: int = 1024) -> np.ndarray:
    import torch

    n, classes = masks.shape
    width = outputs.shape[1]
    inc_sum = torch.zeros(width, classes, 1, device=device)
    exc_sum = torch.zeros(width, classes, 1, device=device)
    inc_count = torch.zeros(classes, device=device)
    for start in range(0, n, chunk):
        mask = torch.from_numpy(masks[start : start + chunk]).to(device).float().T  # C x n
        out = torch.from_numpy(outputs[start : start + chunk]).to(device).float().T[:, :, None]  # T x n x 1
        inc_sum += mask @ out
        exc_sum += (1 - mask) @ out
        inc_count += mask.sum(1)
    inc_mean = inc_sum[:, :, 0].T / inc_count[:, None]
    exc_mean = exc_sum[:, :, 0].T / (n - inc_count)[:, None]
    result = (inc_mean - exc_mean).cpu().numpy()
    return result


def sync(backend: str) -> None:
    if backend == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()
    elif backend in ("torch", "baseline"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def gpu_peak_mb(backend: str) -> float | None:
    if backend == "cupy":
        import cupy

        return cupy.get_default_memory_pool().total_bytes() / 2**20
    if backend in ("torch", "baseline"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    return None


def timed(fn, backend: str, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up: compilation, cuBLAS handles, memory pools
    sync(backend)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync(backend)
        best = min(best, time.perf_counter() - start)
    return best, result


def run_case(case: str, size: str, args: argparse.Namespace) -> dict:
    from ffcv_transfer.findings.influence import influence_from_store
    from ffcv_transfer.findings.kernel import InfluenceAccumulator, class_influence, example_influence

    n, classes, width = SIZES[size]
    row = {"case": case, "size": size, "N": n, "C": classes, "T": width}
    if case.startswith("store-"):  # first, so that peak memory is the streaming pass's own
        backend = case.removeprefix("store-")
        store_dir = Path(args.store_dir) / size
        shards = sorted((store_dir / "shards").glob("*.rows"))
        start = time.perf_counter()
        nbytes = sum(len(np.fromfile(shard, np.uint8)) for shard in shards)
        read_s = time.perf_counter() - start
        tracemalloc.start()  # numpy reports its allocations: the streaming pass's own memory, not page cache
        seconds, result = timed(
            lambda: influence_from_store(store_dir, "margins", backend=backend, chunk=args.chunk), backend, 1
        )
        row.update(
            seconds=seconds,
            disk_bytes=nbytes,
            read_floor_s=read_s,
            gb_per_s=nbytes / seconds / 1e9,
            vs_read_floor=seconds / read_s,
            peak_alloc_mb=tracemalloc.get_traced_memory()[1] / 2**20,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
        tracemalloc.stop()
    masks, outputs = make_data(size)
    expected = reference(masks, outputs)
    if case == "baseline":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        cols = width if device == "cuda" else min(width, args.baseline_outputs)
        seconds, result = timed(lambda: baseline(masks, outputs[:, :cols], device), "baseline", 1)
        row.update(seconds=seconds * width / cols, scaled_from_outputs=cols, device=device)
        expected = expected[:, :cols]
    elif case in ("sgemm", "dgemm"):
        dtype = np.float32 if case == "sgemm" else np.float64
        m, y = masks.astype(dtype), outputs.astype(dtype)
        seconds, result = timed(lambda: m.T @ y, "numpy", args.repeats)
        row.update(seconds=seconds)
        result = None
    elif case.startswith("packed-"):
        backend, packed = case.removeprefix("packed-"), np.packbits(masks, axis=1)
        seconds, result = timed(
            lambda: example_influence(packed, outputs, classes, backend=backend), backend, args.repeats
        )
        row.update(seconds=seconds, gpu_peak_mb=gpu_peak_mb(backend))
    elif case.endswith("-resident"):
        backend = case.removesuffix("-resident")
        accumulator = InfluenceAccumulator(classes, width, backend=backend)
        dev_masks, dev_outputs = accumulator.backend.put_masks(masks), accumulator.backend.put(outputs)

        def compute():
            acc = InfluenceAccumulator(classes, width, backend=backend)
            for start in range(0, n, args.chunk):
                acc.update_device(dev_masks[start : start + args.chunk], dev_outputs[start : start + args.chunk])
            return acc

        seconds, acc = timed(compute, backend, args.repeats)
        row.update(seconds=seconds, gpu_peak_mb=gpu_peak_mb(backend))
        result = acc.result()
    elif not case.startswith("store-"):  # store cases were timed above
        seconds, result = timed(
            lambda: class_influence(masks, outputs, backend=case, chunk=args.chunk), case, args.repeats
        )
        row.update(seconds=seconds, gpu_peak_mb=gpu_peak_mb(case))
    row["gflop_s"] = 2 * n * classes * width / row["seconds"] / 1e9
    if result is not None:
        row["rel_error"] = float(np.linalg.norm(result - expected) / np.linalg.norm(expected))
    row.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def build_store(size: str, root: Path) -> None:
    from ffcv_transfer.store.results import ResultStore

    masks, outputs = make_data(size)
    store = ResultStore.create(
        root / size, len(masks), {"margins": ((outputs.shape[1],), np.float16)}, fixed={"masks": masks}
    )
    writers = [store.writer(f"worker{k}") for k in range(4)]  # rows interleaved over 4 shards
    for start in range(0, len(masks), 1000):
        rows = np.arange(start, min(start + 1000, len(masks)))
        writers[(start // 1000) % 4].write_many(rows, margins=outputs[rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["paper", "large"], choices=list(SIZES))
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    parser.add_argument("--chunk", type=int, default=8192, help="models per chunk (default: 8192)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline-outputs",
        type=int,
        default=200,
        help="on CPU, run the baseline on this many target columns and scale to T",
    )
    parser.add_argument("--out", default="benchmarks/results/influence.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--store-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        if args.case == "store-build":
            build_store(args.size, Path(args.store_dir))
            print(json.dumps({}))
        else:
            print(json.dumps(run_case(args.case, args.size, args)))
        return

    from ffcv_transfer.findings.kernel import available_backends

    backends = args.backends or available_backends()
    gpu = "cupy" in available_backends() or torch_cuda()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as store_dir:
        for size in args.sizes:
            plan = []
            if size == "examples":
                plan += [f"packed-{b}" for b in backends]
            elif size != "large":  # in memory
                plan += ["baseline", "sgemm", "dgemm", *backends]
                plan += [f"{b}-resident" for b in backends if b == "cupy" or (b == "torch" and gpu)]
            if size in ("small", "large"):  # streamed from a store on disk
                plan += ["store-build"] + [f"store-{b}" for b in backends if b != "numba"]
            for case in plan:
                result = run_in_subprocess(
                    __file__,
                    [
                        "--case",
                        case,
                        "--size",
                        size,
                        "--store-dir",
                        store_dir,
                        "--chunk",
                        str(args.chunk),
                        "--repeats",
                        str(args.repeats),
                        "--baseline-outputs",
                        str(args.baseline_outputs),
                    ],
                    f"{size} {case}",
                )
                if "error" in result:
                    rows.append({"case": case, "size": size, **result})
                elif result:
                    rows.append(result)
                    print(f"{size:6s} {case:16s} {result['seconds'] * 1e3:10.1f} ms", file=sys.stderr)

    for size in args.sizes:
        base = next(
            (r["seconds"] for r in rows if r["size"] == size and r["case"] == "baseline" and "seconds" in r), None
        )
        for r in rows:
            if r["size"] == size and "seconds" in r and base:
                r["speedup_vs_baseline"] = base / r["seconds"]
    report = {"machine": machine(), "chunk": args.chunk, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\nmachine: {report['machine']}")
    print(
        f"{'size':6s} {'case':16s} {'ms':>10s} {'x baseline':>10s} {'GFLOP/s':>9s} {'GB/s':>6s} "
        f"{'rel err':>9s} {'RSS MB':>7s} {'GPU MB':>7s}"
    )
    for r in report["results"]:
        if "seconds" not in r:
            print(f"{r['size']:6s} {r['case']:16s} failed: {r.get('error')}")
            continue
        note = (
            f"  (scaled from {r['scaled_from_outputs']} outputs)"
            if r.get("scaled_from_outputs", r["T"]) != r["T"]
            else ""
        )
        if "vs_read_floor" in r:
            note += (
                f"  ({r['vs_read_floor']:.2f}x the {r['read_floor_s'] * 1e3:.0f} ms read of the shards; "
                f"peak numpy allocations {r['peak_alloc_mb']:.0f} MB)"
            )
        fields = [
            f"{r['seconds'] * 1e3:10.1f}",
            f"{r.get('speedup_vs_baseline', float('nan')):10.1f}",
            f"{r['gflop_s']:9.1f}",
            f"{r.get('gb_per_s', float('nan')):6.2f}",
            f"{r.get('rel_error', float('nan')):9.1e}",
            f"{r['peak_rss_mb']:7.0f}",
            f"{r.get('gpu_peak_mb') or float('nan'):7.0f}",
        ]
        print(f"{r['size']:6s} {r['case']:16s} {' '.join(fields)}{note}")


if __name__ == "__main__":
    main()
