"""The real replica at GPU scale (rs_configs/tinyimagenet_gpu.yaml): Tiny-ImageNet at 64 px -> CIFAR-10, many
models, and how far their rankings agree with WordNet.

    python benchmarks/gpu_replica.py prepare --data-dir ../shared/data --out benchmarks/gpu_data/replica
    python benchmarks/gpu_replica.py run --data benchmarks/gpu_data/replica --out OUT [--models N] [--minutes M]

`prepare` runs where the shared data is: it copies a subset of the two archives (the original JPEG bytes, in
the archives' own layout and names, so that demo.write_tiny_imagenet reads them unchanged), the WordNet
hierarchy and a manifest into one folder small enough to travel with the working tree (--max-mib, 50).
`run` runs on the GPU machine, which has neither the shared data nor the internet: it writes the betons from
that folder, draws the store's masks, trains K models at a time until all are done or --minutes is spent
(no round starts that the previous round's time says would overrun), then prints and writes OUT/replica.json:
the machine, the recipe, models, seconds, source and target accuracy, the WordNet agreement, the
reliability summary and the power curve (benchmarks/bench_replica.py). Rerunning with the same OUT resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import time
from collections import defaultdict
from pathlib import Path

from bench_common import machine
from bench_replica import brief, power_curve, print_curve

from ffcv_transfer.experiments import demo
from ffcv_transfer.findings.wordnet import HIERARCHY_FILE, load_hierarchy

CONFIG = Path(__file__).resolve().parent.parent / "rs_configs" / "tinyimagenet_gpu.yaml"
MANIFEST = "manifest.json"


def _subset(archive: Path, out: Path, keep, replace: dict[str, bytes] | None = None) -> dict[str, int]:
    """Copy into `out` (tar.gz) the files of `archive` that `keep` selects ({folder: sorted file names} ->
    {folder: names to copy}), the contents of those named in `replace` replaced; returns files per folder."""
    folders, data = defaultdict(list), {}
    with tarfile.open(archive, "r|*") as source:
        for member in source:
            if member.isfile():
                data[member.name] = source.extractfile(member).read()
                folders[member.name.rsplit("/", 1)[0]].append(member.name)
    data |= replace or {}
    chosen = keep({folder: sorted(names) for folder, names in folders.items()})
    with tarfile.open(out, "w:gz") as target:
        for name in sorted(n for names in chosen.values() for n in names):
            info = tarfile.TarInfo(name)
            info.size = len(data[name])
            target.addfile(info, io.BytesIO(data[name]))
    return {folder: len(names) for folder, names in chosen.items()}


def prepare(args: argparse.Namespace) -> None:
    data_dir, out = Path(args.data_dir), Path(args.out)
    (out / "imagenet-meta").mkdir(parents=True, exist_ok=True)
    hierarchy_file = data_dir / "imagenet-meta" / HIERARCHY_FILE
    (out / "imagenet-meta" / HIERARCHY_FILE).write_bytes(hierarchy_file.read_bytes())
    with tarfile.open(data_dir / demo.TINY_ARCHIVE, "r|*") as archive:
        member = next(m for m in archive if m.name.endswith("tiny-imagenet/wnids.txt"))
        all_wnids = archive.extractfile(member).read().decode().split()
    wnids = demo.replica_classes(all_wnids, args.classes, load_hierarchy(data_dir / "imagenet-meta"))

    def tiny(folders: dict) -> dict:
        kept = {"tiny-imagenet": ["tiny-imagenet/wnids.txt"]}
        for wnid in wnids:
            kept[f"tiny-imagenet/train/{wnid}"] = folders[f"tiny-imagenet/train/{wnid}"][: args.per_class]
            kept[f"tiny-imagenet/val/{wnid}"] = folders[f"tiny-imagenet/val/{wnid}"][: args.val_per_class]
        return kept

    def cifar(folders: dict) -> dict:
        counts = {"train": args.target_per_class, "test": max(args.target_per_class // 2, 1)}
        return {
            folder: names[: counts[folder.split("/")[1]]] for folder, names in folders.items() if folder.count("/") == 2
        }

    # wnids.txt lists the chosen classes only: demo.replica_classes then takes all of them
    counts = _subset(
        data_dir / demo.TINY_ARCHIVE,
        out / demo.TINY_ARCHIVE,
        tiny,
        {"tiny-imagenet/wnids.txt": ("\n".join(wnids) + "\n").encode()},
    )
    _subset(data_dir / demo.CIFAR_ARCHIVE, out / demo.CIFAR_ARCHIVE, cifar)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    total = sum(p.stat().st_size for p in files)
    manifest = {
        "classes": len(wnids),
        "per_class": args.per_class,
        "val_per_class": args.val_per_class,
        "target_per_class": args.target_per_class,
        "wnids": wnids,
        "train_images": sum(n for f, n in counts.items() if "/train/" in f),
        "val_images": sum(n for f, n in counts.items() if "/val/" in f),
        "bytes": total,
        "files": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "from": {
            name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest()[:16]
            for name in (demo.TINY_ARCHIVE, demo.CIFAR_ARCHIVE)
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(
        f"{out}: {len(wnids)} classes x {args.per_class} train + {args.val_per_class} val images, CIFAR-10 "
        f"{args.target_per_class} train + {max(args.target_per_class // 2, 1)} test per class; "
        f"{total / 2**20:.1f} MiB"
    )
    if total > args.max_mib * 2**20:
        raise SystemExit(f"{total / 2**20:.1f} MiB is over --max-mib {args.max_mib}: take fewer images")


def run(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import load_experiment
    from ffcv_transfer.engine.loader_cache import LoaderCache
    from ffcv_transfer.engine.worker import run_worker
    from ffcv_transfer.findings.names import DATA_ENV
    from ffcv_transfer.findings.report import gather
    from ffcv_transfer.store.experiment import create_class_store
    from ffcv_transfer.store.results import ResultStore

    data, out = Path(args.data).resolve(), Path(args.out)
    manifest = json.loads((data / MANIFEST).read_text())
    os.environ[DATA_ENV] = str(data)  # where gather's WordNet check finds the hierarchy
    overrides = {"data.root": str(out / "data"), **dict(item.split("=", 1) for item in args.set)}
    if args.models:
        overrides["masks.num_models"] = args.models
    if args.device:
        overrides["run.device"] = args.device
    experiment = load_experiment(args.config, overrides)
    started = time.monotonic()
    if not experiment.data.path("target_test").exists():
        demo.write_tiny_imagenet(
            out / "data", data, manifest["classes"], manifest["per_class"], manifest["target_per_class"]
        )
    data_seconds = time.monotonic() - started
    store_dir = out / "store"
    if not (store_dir / "spec.json").exists():
        create_class_store(store_dir, experiment)
    store, loaders, k = ResultStore(store_dir), LoaderCache(), experiment.run.models_per_process
    deadline = started + 60 * args.minutes if args.minutes else float("inf")
    longest = 0.0
    while rows := sorted(set(range(store.num_rows)) - set(store.completed_rows()) - set(store.failures()))[:k]:
        if time.monotonic() + longest > deadline:
            print(f"stopping with {store.status()['pending']} models pending: --minutes {args.minutes} spent")
            break
        begun = time.monotonic()
        run_worker(store_dir, experiment, rows=rows, progress=False, loaders=loaders)
        longest = max(longest, time.monotonic() - begun)
        print(f"{len(store.completed_rows())} models done, {time.monotonic() - started:.0f} s", flush=True)
    train_seconds = time.monotonic() - started - data_seconds
    found = gather(store_dir)
    _, values = store.read(["source_acc", "target_acc"])
    overall = found.reliability.to_json()["columns"]["overall"] if found.reliability else {}
    needed = overall.get("models_needed", {}).get("0.8")
    agreement = found.wordnet
    result = {
        "machine": machine(),
        "config": str(args.config),
        "overrides": overrides,
        "manifest": {
            key: manifest[key] for key in ("classes", "per_class", "val_per_class", "target_per_class", "bytes")
        },
        "models": int(len(values["source_acc"])),
        "requested": store.num_rows,
        "seconds": {"data": round(data_seconds, 1), "train": round(train_seconds, 1)},
        "source_acc": float(values["source_acc"].mean()),
        "target_acc": float(values["target_acc"].mean()),
        "wordnet": brief(agreement),
        "reliability": {"overall": overall.get("reliability"), "models_for_0.8": needed},
        "power_curve": power_curve(store_dir),
    }
    (out / "replica.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{result['models']} models ({result['seconds']['train']:.0f} s training, {data_seconds:.0f} s data): "
        f"source acc {result['source_acc']:.3f}, target acc {result['target_acc']:.3f}; WordNet mean AUC "
        f"{agreement['mean_auc']:.3f} (p {agreement['p_value']:.4f})"
    )
    print_curve(result["power_curve"])
    print(f"written {out / 'replica.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="write the GPU step's data folder from the shared data")
    p.add_argument("--data-dir", default=os.environ.get("FFCV_TRANSFER_DATA", "../shared/data"))
    p.add_argument("--out", default="benchmarks/gpu_data/replica")
    p.add_argument("--classes", type=int, default=200, help="Tiny-ImageNet classes (demo.replica_classes)")
    p.add_argument("--per-class", type=int, default=120, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=25, help="validation images per class")
    p.add_argument(
        "--target-per-class",
        type=int,
        default=1000,
        help="CIFAR-10 training images per class (half as many test images)",
    )
    p.add_argument("--max-mib", type=float, default=50)
    r = commands.add_parser("run", help="train the GPU recipe on a prepared folder and measure the agreement")
    r.add_argument("--data", default="benchmarks/gpu_data/replica")
    r.add_argument("--out", required=True)
    r.add_argument("--config", default=str(CONFIG))
    r.add_argument("--models", type=int, help="models in the store (default: the config's masks.num_models)")
    r.add_argument("--minutes", type=float, help="start no round that would end after this many minutes")
    r.add_argument("--device", help="run.device (default: the config's, cuda)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE", help="any other setting")
    args = parser.parse_args()
    (prepare if args.command == "prepare" else run)(args)


if __name__ == "__main__":
    main()
