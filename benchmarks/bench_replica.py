"""The real replica on a CPU: one candidate recipe of `ffcv-transfer demo --data tiny-imagenet`, timed, and
how far its rankings agree with WordNet.

    FFCV_TRANSFER_DATA=../shared/data python benchmarks/bench_replica.py [--candidate NAME] [--work DIR]

runs demo.run_demo (no counterfactual) for the candidate (default: the demo's own defaults) in DIR/NAME and
appends to benchmarks/results/replica-cpu.json: the machine, the commit, the recipe (overrides + TinySize),
seconds per stage, source and target accuracy, the WordNet agreement (mean AUC over the CIFAR-10 classes
with members, one-sided permutation p, per-class AUCs), the reliability summary and a power curve (the
agreement of random subsets of n models for n = 8, 16, 32, ..., N). `--power-only` recomputes the power curve of a
finished store without training. Wall times are as measured on the machine given, which may be shared
(load_average: the 1, 5 and 15 minute load averages at the end; cpu_seconds: the CPU time of the run and its
worker processes, which on an idle 2-core box is about twice the wall time of training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
from pathlib import Path

import numpy as np
from bench_common import machine

from ffcv_transfer.experiments import demo
from ffcv_transfer.experiments.demo import TinySize

# name -> (config overrides, TinySize) on top of rs_configs/tinyimagenet_demo_cpu.yaml; "default": the demo's own
CANDIDATES: dict[str, tuple[dict, TinySize]] = {
    "default": ({}, TinySize()),
    "orth64": ({"masks.num_models": 64}, TinySize()),
    "orth64-e6": ({"masks.num_models": 64, "source.epochs": 6}, TinySize()),
    "shared": ({"source.per_model_batch": 0}, TinySize()),  # each model steps on its part of every shared batch
}
SETTINGS = (
    "masks.num_models",
    "masks.design",
    "model.width",
    "source.epochs",
    "source.min_res",
    "source.per_model_batch",
    "transfer.mode",
)
RESULTS = Path(__file__).resolve().parent / "results" / "replica-cpu.json"


def power_curve(store_dir: Path, hierarchy=None, start: int = 8, draws: int = 5) -> list[dict]:
    """The WordNet agreement of n of the store's models for n = start, 2 start, ..., and all N: for n < N,
    over `draws` random subsets of n models (not the first n rows: prefixes of an orthogonal design alias
    classes), the mean of their mean AUCs and the median of their p-values."""
    from ffcv_transfer.findings.kernel import class_influence
    from ffcv_transfer.findings.rankings import influence_by_target_class
    from ffcv_transfer.findings.wordnet import wordnet_agreement
    from ffcv_transfer.store.betons import read_labels
    from ffcv_transfer.store.experiment import MASKS, open_experiment, read_sidecars
    from ffcv_transfer.store.results import ResultStore

    experiment = open_experiment(store_dir)
    sidecars = read_sidecars(experiment)
    wnids, targets = sidecars["source_train"]["wnids"], sidecars["target_test"]["class_names"]
    labels = read_labels(experiment.data.path("target_test"))
    _, values = ResultStore(store_dir).read([MASKS, "margins"])
    masks, margins = values[MASKS].astype(bool), values["margins"].astype(np.float64)
    total, rng = len(masks), np.random.default_rng(0)
    curve = []
    for n in [n for n in (start * 2**i for i in range(20)) if n < total] + [total]:
        found = []
        for _ in range(draws if n < total else 1):
            rows = np.sort(rng.choice(total, n, replace=False))
            by_class = influence_by_target_class(
                class_influence(masks[rows], margins[rows], backend="numpy"), labels, len(targets)
            )
            found.append(wordnet_agreement(by_class, wnids, targets, hierarchy=hierarchy))
        curve.append(
            {
                "models": n,
                "draws": len(found),
                "mean_auc": float(np.mean([f["mean_auc"] for f in found])),
                "p_value": float(np.median([f["p_value"] for f in found])),
            }
        )
    return curve


def brief(agreement: dict) -> dict:
    """semantic.wordnet_agreement's result without the member names: mean AUC, p, and per scored class."""
    return {
        "mean_auc": agreement["mean_auc"],
        "p_value": agreement["p_value"],
        "classes": {
            name: {"members": c["members"], "auc": c["auc"], "p_value": c["p_value"]}
            for name, c in agreement["classes"].items()
            if c["auc"] is not None
        },
    }


def print_curve(curve: list[dict]) -> None:
    for point in curve:
        print(
            f"{point['models']:5d} models: mean AUC {point['mean_auc']:.3f}, median p {point['p_value']:.4f} "
            f"({point['draws']} draw{'s' if point['draws'] > 1 else ''})"
        )


def summary(out: Path, findings: dict) -> dict:
    """What the JSON records of a finished run in `out`."""
    from ffcv_transfer.store.experiment import open_experiment
    from ffcv_transfer.store.results import ResultStore

    settings = open_experiment(out / "store").to_dict()
    _, values = ResultStore(out / "store").read(["source_acc", "target_acc"])
    overall = findings["reliability"]["columns"]["overall"]
    return {
        "settings": {key: settings[section][name] for key in SETTINGS for section, name in [key.split(".")]},
        "models": findings["models"],
        "failed": findings["failed"],
        "seconds": findings["seconds"],
        "stage_seconds": findings["stage_seconds"],
        "source_acc": float(values["source_acc"].mean()),
        "target_acc": float(values["target_acc"].mean()),
        "wordnet": brief(findings["wordnet_agreement"]),
        "reliability": {
            "overall": overall["reliability"],
            "models_for_0.8": overall["models_needed"]["0.8"],
            "reliable": findings["reliability"]["reliable"],
        },
        "power_curve": power_curve(out / "store"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidate", choices=CANDIDATES, default="default")
    parser.add_argument("--work", default="out/bench-replica", help="the runs' folders: WORK/CANDIDATE")
    parser.add_argument("--data-dir", default=os.environ.get("FFCV_TRANSFER_DATA", "../shared/data"))
    parser.add_argument("--power-only", action="store_true", help="print the power curve of a finished run")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    overrides, size = CANDIDATES[args.candidate]
    out = Path(args.work) / args.candidate
    os.environ.setdefault("FFCV_TRANSFER_DATA", str(Path(args.data_dir).resolve()))
    if args.power_only:
        print_curve(power_curve(out / "store"))
        return
    findings = demo.run_demo(
        out,
        data="tiny-imagenet",
        overrides=overrides,
        tiny=size,
        counterfactual_seeds=0,
        data_dir=args.data_dir,
        progress=False,
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    record = {
        "candidate": args.candidate,
        "machine": machine(),
        "load_average": os.getloadavg(),
        "cpu_seconds": round(sum(u.ru_utime + u.ru_stime for u in used), 1),
        "commit": commit,
        "recipe": {"overrides": overrides, "tiny": vars(size)},
        **summary(out, findings),
    }
    results = Path(args.results)
    previous = json.loads(results.read_text()) if results.is_file() else []
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(previous + [record], indent=1) + "\n")
    w = record["wordnet"]
    print(
        f"{args.candidate}: {record['models']} models in {record['seconds'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f}' for k, v in record['stage_seconds'].items())} s); source acc "
        f"{record['source_acc']:.3f}, target acc {record['target_acc']:.3f}; WordNet mean AUC "
        f"{w['mean_auc']:.3f} (p {w['p_value']:.4f}); overall reliability {record['reliability']['overall']:.2f}"
    )
    print(" ".join(f"{name} {c['auc']:.2f}" for name, c in w["classes"].items()))
    print_curve(record["power_curve"])


if __name__ == "__main__":
    main()
