"""How much one model's accuracy depends on its initial weights, on the demo's planted data and recipe.

    .venv/bin/python benchmarks/bench_model_spread.py [--seeds 16] [--masks fixed demo all harmless]
        [--mask-row 0] [--variant NAME SETTING=VALUE ...] [--data-seed 0] [--spec FIELD=VALUE ...]
        [--work out/model-spread]
        [--out benchmarks/results/model-spread-cpu.json]

What it measures: for each recipe variant (the demo's recipe, `rs_configs/demo_cpu.yaml`, with the
variant's settings over it) and each mask set, per model the source accuracy (on its own classes) and the
target accuracy of the demo's first transfer mode, overall and per target class (where the spread lives),
trained as the demo trains them (the worker, K models in
lockstep on one shared loader, in this process). Mask sets: `fixed`, `--seeds` models on one mask of the
demo's orthogonal design (row `--mask-row`), initial seeds 0.. (the spread is the initial weights' alone);
`demo`, the demo's own 32 masks and initial seeds (the spread across masks that its rankings read); `all`,
`--seeds` models on every source class (the counterfactual's baseline arm); `harmless`, `--seeds` models on
every source class but the planted harmful (misleading) ones, initial seeds 0.. as `all`'s: with both, the
JSON records, init seed by init seed, what removing the planted harmful classes changes (overall and per
target class): the effect the demo's counterfactual sets out to find. The data is the demo's planted data
(`ffcv_transfer.experiments.demo`, with `--spec` fields over it), written once under --work. Variants run
one after another in one process, sharing its loaders; the JSON is rewritten after each and a table
printed at the end. Only the first transfer mode is run (what the demo's analyses read), unless a variant
sets transfer.mode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import accuracy_spread, machine  # noqa: E402

from ffcv_transfer.config import load_experiment  # noqa: E402
from ffcv_transfer.experiments.demo import DEMO_CONFIG, demo_spec  # noqa: E402


def parse_variants(entries: list[list[str]] | None) -> dict[str, dict]:
    """--variant NAME KEY=VALUE ... -> {NAME: {KEY: VALUE}} (values read as YAML); the recipe itself first."""
    variants = {"recipe": {}}
    for name, *settings in entries or []:
        pairs = (setting.partition("=") for setting in settings)
        variants[name] = {key: yaml.safe_load(value) for key, _, value in pairs}
    return variants


def mask_set(
    kind: str, experiment, num_classes: int, seeds: int, row: int, harmful: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(masks, init seeds) of the mask set `kind` (see the module's docstring); `harmful`: the planted
    harmful source classes."""
    from ffcv_transfer.store.masks import class_masks

    if kind == "demo":
        masks = class_masks(experiment.masks, num_classes)
        return masks, np.arange(len(masks))
    mask = class_masks(experiment.masks, num_classes)[row] if kind == "fixed" else np.ones(num_classes, bool)
    if kind == "harmless":
        mask[harmful] = False
    return np.repeat(mask[None], seeds, axis=0), np.arange(seeds)


def removal_gain(cases: list[dict]) -> dict | None:
    """Target accuracy without the planted harmful classes minus with every class, paired by initial seed
    (the `harmless` and `all` cases share them; `counterfactual.paired_gain`), overall and per target class,
    with the s.d. of the per-seed differences; None unless both ran."""
    from ffcv_transfer.findings.counterfactual import paired_gain

    by_kind = {case["masks"]: case for case in cases}
    if not {"all", "harmless"} <= set(by_kind):
        return None
    with_all, without = by_kind["all"], by_kind["harmless"]

    removed, every = ("chosen", len(without["removed"])), ("none", 0)  # the counterfactual's arm names

    def paired(first: list[float], second: list[float]) -> dict:
        """`paired_gain` of `first` (without) over `second` (every class) with the per-seed s.d. beside it."""
        arms = {removed: dict(zip(without["init_seeds"], first)), every: dict(zip(with_all["init_seeds"], second))}
        gain = paired_gain(arms, removed, every)
        sd = None if gain["stderr"] is None else gain["stderr"] * np.sqrt(len(gain["per_seed"]))
        return {"mean": gain["mean"], "stderr": gain["stderr"], "sd": sd, "per_seed": list(gain["per_seed"].values())}

    overall = paired(without["target_acc"], with_all["target_acc"])
    by_class = {
        name: paired(without["target_acc_by_class"][name], values)
        for name, values in with_all["target_acc_by_class"].items()
    }
    return {
        "removed": without["removed"],
        "per_seed": [round(gain, 4) for gain in overall.pop("per_seed")],
        "target": overall,
        "by_class": {name: {k: v for k, v in gain.items() if k != "per_seed"} for name, gain in by_class.items()},
    }


def run_case(work: Path, experiment, kind: str, seeds: int, row: int, loaders) -> dict:
    """Train the mask set `kind` under `experiment` in a fresh store under `work`; per-model accuracies."""
    from ffcv_transfer.engine.worker import run_worker
    from ffcv_transfer.store.betons import read_labels, read_sidecar
    from ffcv_transfer.store.experiment import create_store, read_sidecars, target_test_counts, transfer_field
    from ffcv_transfer.store.results import ResultStore

    sidecars = read_sidecars(experiment)
    source_classes = sidecars["source_train"]
    harmful = sorted({entry["source"] for entry in source_classes["extra"]["planted"]["misleading"]})
    masks, init_seeds = mask_set(kind, experiment, source_classes["num_classes"], seeds, row, harmful)
    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    create_store(store_dir, masks, target_test_counts(experiment), init_seeds=init_seeds, experiment=experiment)
    started = time.monotonic()
    run_worker(store_dir, experiment, progress=False, loaders=loaders)
    seconds = time.monotonic() - started
    store = ResultStore(store_dir)
    target, mode = experiment.transfers[0]
    field = transfer_field("target_acc", experiment, target, mode)
    correct = transfer_field("is_correct", experiment, target, mode)
    rows, values = store.read(["source_acc", field, correct])  # the completed rows
    source, target_acc = values["source_acc"].tolist(), values[field].tolist()
    labels = read_labels(experiment.target(target).path(experiment.data.root, "target_test"))
    names = read_sidecar(experiment.target(target).path(experiment.data.root, "target_test"))["class_names"]
    is_correct = np.asarray(values[correct], np.float64)
    per_class = {  # where the spread lives: each target class's test accuracy, model by model
        name: is_correct[:, labels == k].mean(1).round(4).tolist() for k, name in enumerate(names)
    }
    return {
        "masks": kind,
        "models": len(masks),
        "classes_per_model": sorted({int(m.sum()) for m in masks}),
        "mask_row": row if kind == "fixed" else None,
        "removed": [source_classes["class_names"][c] for c in harmful] if kind == "harmless" else [],
        "init_seeds": init_seeds[rows].tolist(),  # of the completed rows, what `removal_gain` pairs by
        "failed": store.status()["failed"],
        "seconds": round(seconds, 1),
        "source_acc": source,
        "target_acc": target_acc,
        "source": accuracy_spread(source),
        "target": accuracy_spread(target_acc),
        "target_by_class": {name: accuracy_spread(values) for name, values in per_class.items()},
        "target_acc_by_class": per_class,
    }


def print_table(report: dict) -> None:
    print(
        f"{'variant':22s} {'masks':6s} {'K':>3s} {'source min/med/max':>20s} {'min/med':>7s} "
        f"{'target mean':>11s} {'target sd':>9s} {'target min-max':>14s} {'s':>6s}"
    )
    for name, cases in report["variants"].items():
        for case in cases:
            s, t = case["source"], case["target"]
            print(
                f"{name:22s} {case['masks']:6s} {case['models']:3d} "
                f"{s['min']:6.3f}/{s['median']:5.3f}/{s['max']:5.3f}   {s['min_over_median']:7.3f} "
                f"{t['mean']:11.3f} {t['sd']:9.3f} {t['min']:6.3f}-{t['max']:5.3f} {case['seconds']:6.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=16, help="models (initial seeds 0..) per fixed or all mask")
    parser.add_argument("--masks", nargs="+", choices=("fixed", "demo", "all", "harmless"), default=["fixed"])
    parser.add_argument("--mask-row", type=int, default=0, help="the demo design's row used as the fixed mask")
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME SETTING=VALUE", help="repeatable")
    parser.add_argument("--no-recipe", action="store_true", help="run only the --variant recipes")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument(
        "--spec", nargs="+", default=[], metavar="FIELD=VALUE", help="PlantedSpec fields over the demo's data"
    )
    parser.add_argument("--work", default="out/model-spread")
    parser.add_argument("--out", default="benchmarks/results/model-spread-cpu.json")
    args = parser.parse_args()

    from ffcv_transfer.engine.loader_cache import LoaderCache
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.synthetic import write_synthetic

    work = Path(args.work)
    spec_fields = parse_variants([["spec", *args.spec]])["spec"]
    spec = replace(demo_spec(), **spec_fields)
    data = work / "-".join([f"data-seed{args.data_seed}", *(f"{k}{v}" for k, v in spec_fields.items())])
    if not (data / "target_test.beton").exists():
        write_synthetic(data, seed=args.data_seed, spec=spec, options=ImageOptions(write_mode="raw"))
    variants = parse_variants(args.variant)
    if args.no_recipe:
        variants.pop("recipe")
    base = yaml.safe_load(DEMO_CONFIG.read_text())
    first_mode = base["transfer"]["mode"].split(",")[0]
    report = {
        "machine": machine(),
        "config": str(DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])),
        "data_seed": args.data_seed,
        "spec": spec_fields,
        "command": " ".join(sys.argv),
        "settings": {},
        "variants": {},
    }
    loaders = LoaderCache()
    for name, settings in variants.items():
        overrides = {"data.root": str(data), "transfer.mode": first_mode, **settings}
        experiment = load_experiment(DEMO_CONFIG, overrides)
        report["settings"][name] = settings
        report["variants"][name] = []
        for kind in args.masks:
            case = run_case(work, experiment, kind, args.seeds, args.mask_row, loaders)
            report["variants"][name].append(case)
            print(
                f"{name} {kind}: source {case['source']['min']:.3f}-{case['source']['max']:.3f}, target "
                f"{case['target']['mean']:.3f} ± {case['target']['sd']:.3f} (s.d.), {case['seconds']:.0f} s",
                flush=True,
            )
            if gain := removal_gain(report["variants"][name]):
                report.setdefault("removal_gain", {})[name] = gain
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    for name, gain in report.get("removal_gain", {}).items():
        overall = gain["target"]
        by_class = ", ".join(f"{c} {v['mean']:+.2f}" for c, v in gain["by_class"].items())
        print(
            f"{name}: removing {', '.join(gain['removed'])} changes target accuracy by {overall['mean']:+.3f} "
            f"± {overall['stderr']:.3f} (s.e., paired by init seed; s.d. {overall['sd']:.3f}); by class {by_class}"
        )
    print("\ntarget accuracy by class, mean +- s.d. over the models")
    for name, cases in report["variants"].items():
        for case in cases:
            by_class = ", ".join(f"{c} {v['mean']:.2f}+-{v['sd']:.2f}" for c, v in case["target_by_class"].items())
            print(f"{name:22s} {case['masks']:6s} {by_class}")


if __name__ == "__main__":
    main()
