"""Beton write and read throughput on this machine (JSON + a table).

Measures: writing the CIFAR-10 train split (50,000 32x32 JPEGs) from its .tar.gz through the ImageFolder
writer in raw and JPEG mode; ffcv Loader read throughput of both betons (fixed-size decode) and of a
training pipeline (random-resized-crop + flip) on the JPEG beton; and each pipeline's JIT warm-up
(first epoch minus a steady epoch).

    python benchmarks/bench_writers.py --data-dir ../shared/data --out benchmarks/results/writers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def write_case(archive: Path, out: Path, mode: str, workers: int) -> dict:
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.imagefolder import write_imagefolder

    start = time.perf_counter()
    meta = write_imagefolder(
        archive,
        out,
        subdir="cifar10/train",
        options=ImageOptions(write_mode=mode, jpeg_quality=90, num_workers=workers),
    )
    seconds = time.perf_counter() - start
    return {
        "case": f"write cifar10 train ({mode})",
        "images": meta["num_examples"],
        "seconds": round(seconds, 2),
        "images_per_s": round(meta["num_examples"] / seconds),
        "beton_mb": round(meta["size_bytes"] / 2**20, 1),
    }


def read_case(beton: Path, name: str, pipeline: str, workers: int, epochs: int) -> dict:
    import numpy as np
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    image = (
        [SimpleRGBImageDecoder()]
        if pipeline == "decode"
        else [RandomResizedCropRGBImageDecoder((32, 32)), RandomHorizontalFlip()]
    )
    loader = Loader(
        str(beton),
        batch_size=512,
        num_workers=workers,
        order=OrderOption.RANDOM,
        drop_last=False,
        pipelines={"image": image, "label": [IntDecoder()]},
    )
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = sum(len(np.asarray(labels)) for _, labels in loader)
        times.append(time.perf_counter() - start)
    steady = min(times[1:])
    return {
        "case": f"read {name} ({pipeline})",
        "images": count,
        "first_epoch_s": round(times[0], 2),
        "steady_epoch_s": round(steady, 3),
        "images_per_s": round(count / steady),
        "jit_warmup_s": round(times[0] - steady, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FFCV_TRANSFER_DATA", "../shared/data"))
    parser.add_argument("--out", default="benchmarks/results/writers.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    archive = Path(args.data_dir) / "cifar10-jpg.tar.gz"
    if not archive.exists():
        raise SystemExit(f"{archive}: not found (pass --data-dir)")

    start = time.perf_counter()
    import ffcv  # noqa: F401 - timed: numba compiles at import

    import_s = time.perf_counter() - start
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        betons = {mode: Path(tmp) / f"cifar10_train_{mode}.beton" for mode in ("raw", "jpg")}
        for mode, beton in betons.items():
            rows.append(write_case(archive, beton, mode, args.workers))
        rows.append(read_case(betons["raw"], "raw 32px", "decode", args.workers, args.epochs))
        rows.append(read_case(betons["jpg"], "jpg 32px", "decode", args.workers, args.epochs))
        rows.append(read_case(betons["jpg"], "jpg 32px", "rrc+flip", args.workers, args.epochs))

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "import_ffcv_s": round(import_s, 1),
        "workers": args.workers,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nimport ffcv: {import_s:.1f} s   ({os.cpu_count()} CPUs, {args.workers} workers)")
    print(f"{'case':34s} {'images/s':>10s} {'first epoch s':>14s} {'JIT warm-up s':>14s}")
    for row in rows:
        print(
            f"{row['case']:34s} {row['images_per_s']:>10,d} {row.get('first_epoch_s', ''):>14} "
            f"{row.get('jit_warmup_s', ''):>14}"
        )


if __name__ == "__main__":
    main()
