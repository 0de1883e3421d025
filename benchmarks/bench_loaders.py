"""Loader benchmark: ffcv's pipeline against the device-resident loader in images/s, JSON + a table.

Images per second delivered as normalised device tensors by ffcv (`loader.kind: ffcv`) and by the
resident loader (`resident`), on one raw beton of square low-resolution images (the resident loader's
use case, e.g. 64 px ImageNet). Sizes jpeg160 and paper160 crop bench_train.py's natural-looking 400x300
images to 160 px: stored as they are in JPEG (~40 KB, bench_train's source), or as paper_ffcv_imagenet_cifar10.yaml
writes ImageNet (at most 256 px, half of them JPEG, half raw). `ffcv+omp` is ffcv with numba's OpenMP
threading layer (`loader.threading: omp`) instead of the default workqueue layer.

Each case runs in its own process: construction (the resident loader reads the beton into device memory
here), a first epoch (ffcv JIT-compiles its pipeline in it), then timed epochs. Training pipelines
(random-resized crop + flip) and evaluation pipelines (centre crop), at the stored resolution.

    python benchmarks/bench_loaders.py                                   # tiny, CPU, about a minute
    python benchmarks/bench_loaders.py --size real --device cuda         # on a GPU machine
    python benchmarks/bench_loaders.py --size jpeg160 --device cuda --loaders ffcv ffcv+omp
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import PAPER_STORAGE, case_parser, machine, parse_or_run_case, run_in_subprocess, save_report

SIZES = {  # source: how natural 400x300 images are stored (none: random raw pixels at the resolution)
    "tiny": dict(images=4096, res=64, batch=256, source=None),
    "real": dict(images=131072, res=64, batch=1024, source=None),
    "jpeg160": dict(images=8192, res=160, batch=1024, source=dict(write_mode="jpg", jpeg_quality=90)),
    "paper160": dict(images=8192, res=160, batch=1024, source=PAPER_STORAGE),
}


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from ffcv_transfer.engine.data import ImageLoader
    from ffcv_transfer.engine.resident import ResidentLoader
    from ffcv_transfer.settings import LoaderConfig

    size, device = SIZES[args.size], torch.device(args.device)
    kind = ResidentLoader if args.loader == "resident" else ImageLoader
    threading = "omp" if args.loader == "ffcv+omp" else "workqueue"
    config = (
        LoaderConfig(threading=threading)
        if args.train
        else LoaderConfig(order="sequential", drop_last=False, threading=threading)
    )

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def epoch() -> tuple[float, int]:
        started, count = time.perf_counter(), 0
        for images, *_ in loader:
            count += len(images)
        synchronise()
        return time.perf_counter() - started, count

    started = time.perf_counter()
    loader = kind(
        Path(args.data) / "images.beton",
        train=args.train,
        resolution=size["res"],
        batch_size=size["batch"],
        config=config,
        device=device,
        crop_ratio=1.0,
    )
    synchronise()
    construct_s = time.perf_counter() - started
    first_s, _ = epoch()
    timed = [epoch() for _ in range(args.epochs)]
    seconds, images = sum(t for t, _ in timed), sum(n for _, n in timed)
    return {
        "case": f"{args.loader} {'train' if args.train else 'eval'}",
        "device": str(device),
        "construct_s": construct_s,
        "first_epoch_s": first_s,
        "images_per_s": images / seconds,
    }


def main() -> None:
    parser = case_parser(__doc__, SIZES, "benchmarks/results/loaders-cpu.json")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the first")
    parser.add_argument("--loaders", nargs="+", default=["ffcv", "resident"], choices=["ffcv", "ffcv+omp", "resident"])
    parser.add_argument("--loader", help=argparse.SUPPRESS)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    args = parse_or_run_case(parser, run_case)
    if args is None:
        return

    from ffcv_transfer.writers.common import ImageOptions, write_arrays

    size = SIZES[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        if size["source"]:
            from bench_train import natural_images

            pixels, options = natural_images(size["images"], 400, 0), ImageOptions(**size["source"])
        else:
            pixels = rng.integers(0, 256, (size["images"], size["res"], size["res"], 3), dtype=np.uint8)
            options = ImageOptions(write_mode="raw")
        write_arrays(pixels, rng.integers(0, 100, size["images"]), Path(folder) / "images.beton", options=options)
        for loader in args.loaders:
            for train in (True, False):
                extra = ["--train"] if train else []
                result = run_in_subprocess(
                    __file__,
                    [
                        "--case",
                        "--size",
                        args.size,
                        "--device",
                        args.device,
                        "--data",
                        folder,
                        "--loader",
                        loader,
                        "--epochs",
                        str(args.epochs),
                        *extra,
                    ],
                    f"{loader} {train}",
                )
                rows.append({"loader": loader, "train": train, **result})
                report = {"machine": machine(), "size": args.size, "size_settings": size, "results": rows}
                save_report(args.out, report)
    print_table(report)


def print_table(report: dict) -> None:
    s = report["size_settings"]
    print(f"\nmachine: {report['machine']}")
    print(
        f"size {report['size']}: {s['images']} images (stored {s['source'] or 'raw'}) delivered at {s['res']} px, "
        f"batch {s['batch']}"
    )
    print(f"{'case':16s} {'construct s':>12s} {'first epoch s':>14s} {'img/s':>10s}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['loader']} {'train' if r['train'] else 'eval'}: failed: {r['error']}")
            continue
        print(f"{r['case']:16s} {r['construct_s']:12.1f} {r['first_epoch_s']:14.1f} {r['images_per_s']:10.0f}")


if __name__ == "__main__":
    sys.exit(main())
