"""`write imagenet` from the official nested train tar against `write imagefolder` on the same images
(JSON + a table).

The archive is synthesized: --classes class tars of --per-class JPEGs (quality 90, 320-480 x 240-360 px,
smooth gradients plus noise) inside one plain tar laid out as ILSVRC2012_img_train.tar; the ImageFolder tree
holds the same JPEGs in class folders (what users had to make by hand before). Each storage preset is
written both ways, each write repeated (interleaved) and the fastest kept; write imagenet's one extra step,
reading the class tars' member lists, is also timed alone. Also timed: extracting every class tar to disk,
the staging that reading in place avoids. With the reference preset (smart without a threshold: every
image raw) both betons must hold the same pixels and labels, which is checked.

    python benchmarks/bench_archives.py --out benchmarks/results/archives-cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import machine, save_report  # noqa: E402


def synthesize(root: Path, classes: int, per_class: int, seed: int = 0) -> tuple[Path, Path]:
    """(the nested train tar, the same JPEGs as an ImageFolder tree)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    train, tree = root / "ILSVRC2012_img_train.tar", root / "imagefolder"
    with tarfile.open(train, "w") as outer:
        for c in range(classes):
            wnid = f"n{1440764 + c:08d}"
            (tree / wnid).mkdir(parents=True)
            for n in range(per_class):
                h, w = int(rng.integers(240, 360)), int(rng.integers(320, 480))
                y, x = np.mgrid[0:h, 0:w] / max(h, w)
                base = rng.uniform(0, 200, (1, 1, 3)) + 40 * np.sin(6 * x + rng.uniform(0, 6))[..., None]
                image = np.clip(base + 30 * y[..., None] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(tree / wnid / f"{wnid}_{n}.JPEG", quality=90)
            class_tar = root / f"{wnid}.tar"
            with tarfile.open(class_tar, "w") as inner:
                for file in sorted((tree / wnid).iterdir()):
                    inner.add(file, arcname=file.name)
            outer.add(class_tar, arcname=class_tar.name)
            class_tar.unlink()
    return train, tree


def extract_case(train: Path, scratch: Path) -> dict:
    """Extract each class tar in turn into a folder (the staging reading in place avoids)."""
    start = time.perf_counter()
    count = 0
    with tarfile.open(train, "r:") as outer:
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                inner.extractall(scratch / member.name[:-4], filter="data")
                count += len(inner.getnames())
    seconds = time.perf_counter() - start
    return {
        "case": "extract every class tar (the alternative)",
        "images": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds),
    }


def write_case(writer: str, train: Path, tree: Path, out: Path, preset: str, workers: int) -> dict:
    from dataclasses import replace

    from ffcv_transfer.writers.common import writer_progress
    from ffcv_transfer.writers.imagefolder import write_imagefolder
    from ffcv_transfer.writers.imagenet import PRESETS, index_train, write_imagenet

    shutil.rmtree(out, ignore_errors=True)
    options = replace(PRESETS[preset], num_workers=workers)
    row = {"case": f"write {writer} ({preset})"}
    if writer == "imagenet":  # its one extra step, timed alone: reading the class tars' member lists
        start = time.perf_counter()
        index_train(train, out / ".timing", progress=False)
        row["index_s"] = round(time.perf_counter() - start, 2)
        shutil.rmtree(out / ".timing")
    start = time.perf_counter()
    with writer_progress(False):
        if writer == "imagenet":
            meta = write_imagenet(out, train=train, options=options, progress=False)["train"]
        else:
            meta = write_imagefolder(tree, out / "imagenet_train.beton", options=options)
    seconds = time.perf_counter() - start
    return row | {
        "images": meta["num_examples"],
        "seconds": round(seconds, 2),
        "images_per_s": round(meta["num_examples"] / seconds),
        "beton_mb": round(meta["size_bytes"] / 2**20, 1),
    }


def same_betons(a: Path, b: Path) -> bool:
    from ffcv_transfer.store.betons import BetonRecords

    first, second = BetonRecords(a), BetonRecords(b)
    return (
        len(first) == len(second)
        and np.array_equal(first.labels, second.labels)
        and all(np.array_equal(first.image(i), second.image(i)) for i in range(len(first)))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="writes per case; the fastest is reported")
    parser.add_argument("--out", default="benchmarks/results/archives-cpu.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    importlib.import_module("ffcv_transfer.writers")  # first: it picks numba's threading layer (threading_layer.py)
    start = time.perf_counter()
    importlib.import_module("ffcv")  # timed: numba compiles at import

    report = {
        "machine": machine(),
        "commit": commit,
        "command": " ".join(["python", *sys.argv]),
        "import_ffcv_s": round(time.perf_counter() - start, 1),
        "workers": args.workers,
        "data": f"synthesized: {args.classes} class tars x {args.per_class} JPEGs (q90, 320-480 x 240-360 px)",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, tree = synthesize(root, args.classes, args.per_class)
        report["archive_mb"] = round(train.stat().st_size / 2**20, 1)
        report["results"].append(extract_case(train, root / "extracted"))
        shutil.rmtree(root / "extracted")
        for preset in ("reference", "ffcv-imagenet"):
            outs = {w: root / f"{w}-{preset}" for w in ("imagenet", "imagefolder")}
            best: dict[str, dict] = {}
            for _ in range(args.repeats):  # interleaved, so that a busy spell slows both writers alike
                for writer, out in outs.items():
                    row = write_case(writer, train, tree, out, preset, args.workers)
                    if writer not in best or row["seconds"] < best[writer]["seconds"]:
                        best[writer] = row
            report["results"] += [best[w] | {"repeats": args.repeats} for w in outs]
            save_report(args.out, report)
            if preset == "reference":
                report["reference_betons_identical"] = same_betons(*(o / "imagenet_train.beton" for o in outs.values()))
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min: others' work on the box
    save_report(args.out, report)

    print(f"\n{report['data']}; {report['machine']['cpus']} CPUs, {args.workers} workers, commit {commit}")
    print(f"{'case':44s} {'images/s':>9s} {'seconds':>8s} {'index s':>8s} {'beton MB':>9s}")
    for row in report["results"]:
        print(
            f"{row['case']:44s} {row['images_per_s']:>9,d} {row['seconds']:>8} {row.get('index_s', ''):>8} "
            f"{row.get('beton_mb', ''):>9}"
        )
    print(f"reference betons identical (imagenet vs imagefolder): {report['reference_betons_identical']}")


if __name__ == "__main__":
    main()
