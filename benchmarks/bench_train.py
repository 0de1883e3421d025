"""Training-engine benchmark: source models per hour, end to end (source training + transfer + eval),
JSON + a table.

Data: a synthetic ImageNet-shaped source beton whose JPEG decode cost is realistic (smooth multi-scale
"natural-looking" images, 400 px on the long side, JPEG quality 90, not noise; size paper: the same
images stored as paper_ffcv_imagenet_cifar10.yaml writes ImageNet, at most 256 px, half raw; size real64: 64 px raw
squares, as the 64 px recipe stores ImageNet) and a CIFAR-shaped target (32 px, raw). Cases, each in its
own process (own loader, own JIT warm-up):

  reference     one model with its own loader over its own classes (MadryLab/data-transfer's way: one
                model per process)
  K=<k> <fusion>    k models with random class halves on ONE shared loader over the union of their
                classes, fused by the `sequential` or `grouped` fusion (`grouped+compile`: torch.compile'd,
                its compilation in the warm-up epoch); with `--loaders resident` also each case on
                the device-resident loader (pixels read once into device memory, crops on the device)

The shared loader's batch is sized so that each model's sub-batch averages the reference's batch (the
size's `batch`, about twice it for the union of K >= 4 random halves): the one-model recipe's batch size,
kept; with `--per-model-batch` every model steps on exactly that batch from its own queue (the sequential
fusion). `--blurpool` builds the models as the ffcv-flavour config does. Each timed source epoch is also
taken apart (the sequential fusion): waiting for the loader, routing, launching the steps (host time),
GPU busy (CUDA events around each step) and the start-up (until the first batch): `breakdown` in the JSON.
Each case times `--epochs` source epochs after a warm-up epoch (JIT compilation excluded), then
fixed-feature transfer epochs on the target for the same k models and one evaluation pass. From the
measured rates it extrapolates to the full recipe (16 source epochs over ImageNet's 1.28M images at
alpha 0.5, 15 transfer epochs over CIFAR-10's 50k, 10k evaluated): an extrapolation at the benchmark's
resolution, reported as such.

    python benchmarks/bench_train.py                                   # tiny, CPU, a few minutes
    python benchmarks/bench_train.py --size real --device cuda         # on a GPU machine
    python benchmarks/bench_train.py --size real64 --device cuda --loaders ffcv resident
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from bench_common import (
    PAPER_STORAGE,
    case_parser,
    machine,
    parse_or_run_case,
    run_in_subprocess,
    save_report,
    shared_batch,
)

from ffcv_transfer.settings import THREADING_LAYERS

SIZES = {  # source: classes x images per class, generated long side, how it is stored; train and target res
    "tiny": dict(
        classes=8,
        per_class=40,
        long_side=400,
        source=dict(write_mode="jpg", jpeg_quality=90),
        res=64,
        target_res=64,
        batch=64,
        width=0.25,
        ks=[1, 2, 4],
        target_per_class=40,
    ),
    "real": dict(
        classes=64,
        per_class=160,
        long_side=400,
        source=dict(write_mode="jpg", jpeg_quality=90),
        res=160,
        target_res=224,
        batch=1024,
        width=1.0,
        ks=[1, 2, 4, 8],
        target_per_class=500,
    ),
    # as "real", the images stored as paper_ffcv_imagenet_cifar10.yaml writes ImageNet (at most 256 px, half raw)
    # and timed at 192 px too: the recipe's last 3 epochs (160 -> 192 px, rounded down: epochs 13-15)
    "paper": dict(
        classes=64,
        per_class=160,
        long_side=400,
        source=PAPER_STORAGE,
        res=160,
        target_res=224,
        batch=1024,
        width=1.0,
        ks=[8],
        target_per_class=500,
        high_res=192,
        high_epochs=3,
    ),
    # the 64 px recipe: 64 px raw squares (as imagenet64_cheap.yaml stores them), transfer at 64 px
    "real64": dict(
        classes=64,
        per_class=640,
        long_side=86,
        source=dict(write_mode="raw", square=True, max_resolution=64),
        res=64,
        target_res=64,
        batch=1024,
        width=1.0,
        ks=[8, 16],
        target_per_class=500,
    ),
}
RECIPE = dict(
    source_images=1_281_167, alpha=0.5, source_epochs=16, target_train=50_000, target_epochs=15, target_test=10_000
)


def natural_images(count: int, long_side: int, seed: int, unique: int = 1024) -> np.ndarray:
    """(count, 3/4 long_side, long_side, 3) uint8: sums of smooth random fields at 8 scales (2 to 256 cells),
    amplitudes falling as scale^-0.7, so that JPEG sizes resemble ImageNet photographs resized to 400 px
    (~40 KB at quality 90). Past the first `unique` (generating one costs ~75 ms of CPU at 400 px), each image
    is one of those rolled by a random offset and maybe mirrored: other bytes, the same decode cost."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    height = long_side * 3 // 4
    out = np.empty((count, height, long_side, 3), np.uint8)
    for start in range(0, min(count, unique), 64):
        n = min(64, count - start, unique - start)
        image = torch.zeros(n, 3, height, long_side)
        for octave in range(1, 9):
            cells = 2**octave
            coarse = torch.randn(n, 3, cells * 3 // 4 + 1, cells + 1, generator=generator)
            image += F.interpolate(coarse, size=(height, long_side), mode="bicubic", align_corners=False) / octave**0.7
        image = (image - image.mean((1, 2, 3), keepdim=True)) / image.std((1, 2, 3), keepdim=True)
        out[start : start + n] = (image * 45 + 128).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(seed)
    for i in range(unique, count):
        copy = np.roll(out[rng.integers(unique)], (rng.integers(height), rng.integers(long_side)), axis=(0, 1))
        out[i] = copy[:, ::-1] if rng.random() < 0.5 else copy
    return out


def write_data(folder: Path, size: dict) -> dict:
    from ffcv_transfer.store.betons import BetonRecords
    from ffcv_transfer.writers.common import ImageOptions, write_arrays

    folder.mkdir(parents=True, exist_ok=True)
    c, per = size["classes"], size["per_class"]
    started = time.perf_counter()
    write_arrays(
        natural_images(c * per, size["long_side"], 0),
        np.repeat(np.arange(c), per),
        folder / "source.beton",
        options=ImageOptions(**size["source"]),
    )
    target_labels = np.repeat(np.arange(10), size["target_per_class"])
    for split, seed in (("target_train", 1), ("target_test", 2)):
        small = natural_images(len(target_labels), 32, seed)[:, :32, :32]
        write_arrays(np.ascontiguousarray(small), target_labels, folder / f"{split}.beton")
    return {
        "source_bytes_per_image": float(BetonRecords(folder / "source.beton").sizes.mean()),
        "write_s": time.perf_counter() - started,
    }


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from ffcv_transfer.engine.data import ImageLoader
    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.resident import ResidentLoader
    from ffcv_transfer.engine.transfer import transfer_by_training
    from ffcv_transfer.engine.worker import TRAINERS
    from ffcv_transfer.settings import LoaderConfig, OptimConfig, TransferConfig
    from ffcv_transfer.store.masks import random_class_masks

    size, folder, k = SIZES[args.size], Path(args.data), args.k
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    masks = random_class_masks(k, size["classes"], 0.5, seed=k)
    labels = np.load(folder / "source.labels.npy")
    batch = shared_batch(size["batch"], masks, labels)
    Loader = ResidentLoader if args.loader == "resident" else ImageLoader
    loader_config = LoaderConfig(threading=args.threading, num_workers=args.loader_workers)
    loader = Loader(
        folder / "source.beton",
        train=True,
        resolution=size["res"],
        batch_size=batch,
        config=loader_config,
        device=device,
        indices=np.flatnonzero(masks.any(0)[labels]),  # the union of the K models' classes
    )
    models = [
        build_model(size["classes"], width=size["width"], blurpool=args.blurpool, device=device) for _ in range(k)
    ]
    queued = size["batch"] if args.per_model_batch and not args.fusion.startswith("grouped") else 0
    optim = OptimConfig(
        epochs=args.epochs + 2, lr=0.1, lr_peak_epoch=1, precision=precision, batch_size=batch, per_model_batch=queued
    )
    fusion, _, compiled = args.fusion.partition("+")
    options = {"compile": "default"} if compiled else {}
    if fusion == "sequential":
        options["examples_per_epoch"] = masks.astype(np.int64) @ np.bincount(labels, minlength=size["classes"])
    trainer = TRAINERS[fusion](models, masks, optim, steps_per_epoch=len(loader), device=device, **options)

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup = timed(lambda: trainer.train_epoch(loader, 0))
    clock = StepClock(trainer, device) if fusion == "sequential" else None  # the timed epochs only
    source_s = (
        sum(
            timed(partial(trainer.train_epoch, clock.batches(loader) if clock else loader, e + 1))
            for e in range(args.epochs)
        )
        / args.epochs
    )
    decoded = len(loader) * batch
    high_s = None
    if "high_res" in size:  # one more epoch at the ramp's end resolution (its first steps compile for it)
        loader.set_resolution(size["high_res"])
        high_s = timed(lambda: trainer.train_epoch(loader, args.epochs + 1))

    target = TransferConfig(
        mode="fixed_feature",
        resolution=size["target_res"],
        batch_size=size["batch"],
        epochs=args.epochs + 1,
        lr_peak_epoch=1,
        precision=precision,
    )
    train = Loader(
        folder / "target_train.beton",
        train=True,
        resolution=size["target_res"],
        batch_size=size["batch"],
        config=loader_config,
        device=device,
    )
    test = Loader(
        folder / "target_test.beton",
        train=False,
        resolution=size["target_res"],
        batch_size=size["batch"],
        crop_ratio=1.0,
        device=device,
        config=replace(loader_config, order="sequential", drop_last=False),
    )
    passes = _PassTimer(train, device)
    transfer_by_training(models, passes, test, 10, target, steps_per_epoch=len(train), device=device)
    target_epoch_s = float(np.mean(passes.seconds[1:]))  # the first pass includes JIT compilation
    target_images = len(train) * size["batch"]

    per_image_source = source_s / decoded  # seconds per decoded source image, all k models served
    per_image_target = target_epoch_s / target_images
    recipe_union = RECIPE["source_images"] * (1 - (1 - RECIPE["alpha"]) ** k)
    high = size.get("high_epochs", 0) if high_s else 0
    recipe_s = (
        (RECIPE["source_epochs"] - high) * recipe_union * per_image_source
        + high * recipe_union * (high_s or 0) / decoded
        + (RECIPE["target_epochs"] * RECIPE["target_train"] + RECIPE["target_test"]) * per_image_target
    )
    case = (
        "reference"
        if args.reference
        else (f"K={k} {args.fusion}" + (" queued" * bool(queued)) + (" resident" * (args.loader == "resident")))
    )
    return {
        "case": case,
        "k": k,
        "fusion": args.fusion,
        "loader": args.loader,
        "device": str(device),
        "precision": precision,
        "source_batch": batch,
        "warmup_epoch_s": warmup,
        "source_epoch_s": source_s,
        "decoded_images_per_epoch": decoded,
        "source_images_per_s": decoded / source_s,
        "high_res_epoch_s": high_s,
        "model_images_per_s": float(masks[:, np.load(folder / "source.labels.npy")].sum()) / source_s,
        "target_epoch_s": target_epoch_s,
        "target_images_per_s": target_images / target_epoch_s,
        "recipe_models_per_hour": 3600 * k / recipe_s,
        "per_model_batch": queued,
        "breakdown": clock.per_epoch(args.epochs) if clock else None,
    }


class StepClock:
    """Where the sequential fusion's source epochs go, accumulated over the epochs timed: seconds blocked
    waiting for the loader's next batch (the first of each epoch counted as start-up), in routing, in the
    steps on the host (launching their kernels), and the GPU's time inside the steps (CUDA events, read
    after the run: no sync added while it runs)."""

    def __init__(self, trainer, device):
        import torch

        self.device, self.seconds, self.events = device, dict(startup=0.0, wait=0.0, routing=0.0, launch=0.0), []
        route, step = trainer.routes, trainer.step_model

        def timed_route(batch):
            started = time.perf_counter()
            routes = route(batch)
            self.seconds["routing"] += time.perf_counter() - started
            return routes

        def timed_step(*args):
            pair = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else None
            started = time.perf_counter()
            if pair:
                pair[0].record()
            step(*args)
            if pair:
                pair[1].record()
                self.events.append(pair)
            self.seconds["launch"] += time.perf_counter() - started

        trainer.routes, trainer.step_model = timed_route, timed_step

    def batches(self, loader):
        """The loader's batches, timing the wait for each."""
        iterator, first = iter(loader), True
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.seconds["startup" if first else "wait"] += time.perf_counter() - started
            first = False
            yield batch

    def per_epoch(self, epochs: int) -> dict:
        busy = sum(start.elapsed_time(end) for start, end in self.events) / 1000 if self.events else None
        return {
            **{f"{name}_s": value / epochs for name, value in self.seconds.items()},
            "gpu_busy_s": None if busy is None else busy / epochs,
        }


class _PassTimer:
    """Wraps a loader and records the duration of each full pass."""

    def __init__(self, loader, device):
        self.loader, self.device, self.seconds = loader, device, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import torch

        started = time.perf_counter()
        yield from self.loader
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - started)


def main() -> None:
    parser = case_parser(__doc__, SIZES, "benchmarks/results/train-cpu.json")
    parser.add_argument(
        "--fusions", nargs="+", default=["sequential", "grouped"], help="the fusions to time (run.fusion; +compile)"
    )
    parser.add_argument("--ks", type=int, nargs="+", help="models per loader (default: the size's)")
    parser.add_argument(
        "--loaders",
        nargs="+",
        default=["ffcv"],
        choices=["ffcv", "resident"],
        help="source and target loaders of the K-model cases (the reference always uses ffcv)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up epoch")
    parser.add_argument(
        "--threading",
        default="workqueue",
        choices=THREADING_LAYERS,
        help="numba threading layer of the ffcv loaders (loader.threading)",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="decoding threads of each ffcv loader (loader.num_workers; default 0: one per core); "
        "fewer leave cores to the training loop",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference case (one model, own loader)")
    parser.add_argument(
        "--reference-last",
        action="store_true",
        help="run the reference after the K-model cases (in --ks order), so that a run cut short keeps them",
    )
    parser.add_argument(
        "--per-model-batch",
        action="store_true",
        help="the sequential K-model cases step each model on exactly the size's batch (queues)",
    )
    parser.add_argument("--blurpool", action="store_true", help="BlurPool models (the ffcv-flavour config)")
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fusion", help=argparse.SUPPRESS)
    parser.add_argument("--loader", default="ffcv", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parse_or_run_case(parser, run_case)
    if args is None:
        return

    size = SIZES[args.size]
    reference = [(1, "sequential", "ffcv", True)] * (not args.no_reference)
    cases = [
        (k, b, loader, False)
        for b in args.fusions
        for loader in args.loaders
        for k in (args.ks or size["ks"])
        if k > 1 or b.startswith("grouped")
    ]
    plan = cases + reference if args.reference_last else reference + cases
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder), size)
        print(
            f"data: {data['source_bytes_per_image'] / 1e3:.1f} KB per source image, written in {data['write_s']:.0f} s",
            file=sys.stderr,
        )
        for k, fusion, loader, reference in plan:
            extra = ["--reference"] if reference else []
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
                    "--k",
                    str(k),
                    "--fusion",
                    fusion,
                    "--loader",
                    loader,
                    "--epochs",
                    str(args.epochs),
                    "--threading",
                    args.threading,
                    "--loader-workers",
                    str(args.loader_workers),
                    *extra,
                    *["--per-model-batch"] * args.per_model_batch,
                    *["--blurpool"] * args.blurpool,
                ],
                f"K={k} {fusion} {loader}",
            )
            rows.append({"k": k, "fusion": fusion, "loader": loader, **result})
            if "error" not in result:
                print(
                    f"{result['case']:24s} {result['recipe_models_per_hour']:8.2f} models/h (recipe, extrapolated)",
                    file=sys.stderr,
                )
            report = {
                "machine": machine(),
                "size": args.size,
                "size_settings": size,
                "threading": args.threading,
                "loader_workers": args.loader_workers,
                "recipe": RECIPE,
                "data": data,
                "results": with_ratios(rows),
            }
            save_report(args.out, report)
    print_table(report)


def with_ratios(rows: list[dict]) -> list[dict]:
    """The rows, each with its models per hour over the reference case's (`vs_reference`)."""
    base = next((r["recipe_models_per_hour"] for r in rows if r.get("case") == "reference"), None)
    return [
        {**r, "vs_reference": r["recipe_models_per_hour"] / base} if base and "recipe_models_per_hour" in r else r
        for r in rows
    ]


def print_table(report: dict) -> None:
    s = report["size_settings"]
    print(f"\nmachine: {report['machine']}")
    print(
        f"size {report['size']}: {s['classes']} classes x {s['per_class']} {s['source']['write_mode']} images "
        f"({report['data']['source_bytes_per_image'] / 1e3:.0f} KB) trained at "
        f"{s['res']} px, width {s['width']}, batch {s['batch']} per model; transfer at {s['target_res']} px"
    )
    print(
        f"{'case':24s} {'src img/s':>10s} {'model-img/s':>12s} {'tgt img/s':>10s} {'models/h*':>10s} "
        f"{'x reference':>11s}  epoch s: start-up, wait, routing, launch, GPU busy"
    )
    for r in report["results"]:
        if "error" in r:
            print(f"K={r['k']} {r['fusion']} {r['loader']}: failed: {r['error']}")
            continue
        parts = r.get("breakdown") or {}
        split = (
            ", ".join(
                "-" if parts.get(f"{n}_s") is None else f"{parts[f'{n}_s']:.2f}"
                for n in ("startup", "wait", "routing", "launch", "gpu_busy")
            )
            if parts
            else ""
        )
        print(
            f"{r['case']:24s} {r['source_images_per_s']:10.0f} {r['model_images_per_s']:12.0f} "
            f"{r['target_images_per_s']:10.0f} {r['recipe_models_per_hour']:10.2f} "
            f"{r.get('vs_reference', float('nan')):11.2f}  {r['source_epoch_s']:.2f}: {split}"
        )
    print(
        "* extrapolated to the full recipe (16 epochs over 1.28M images at alpha 0.5, 15 transfer epochs over "
        "50k, 10k evaluated) from the per-image rates measured here, at this size's resolutions"
    )


if __name__ == "__main__":
    main()
