"""Which output and which estimator give the most reliable influence rankings, on the same models.

    .venv/bin/python benchmarks/bench_estimators.py STORE [STORE ...] [--splits 50]
        [--out benchmarks/results/estimators-cpu.json]

For each store (a class store with its target test outputs: the demo's `out/demo/store`, the replica's)
and each recorded output (margins, p_correct, correct_logit, is_correct) and estimator, it measures what a
reader of the rankings relies on, over `--splits` random halves of the models (the same halves for every
combination):
- split-half: the Spearman correlation between the two halves' rankings, mean over the per-target-class
  rankings and the overall one;
- top / bottom: how often the two halves name the same most positive / most negative source class;
- on planted data (the sidecar's ground truth), with half the models and with all: each target's twin on
  top of its ranking, the misleading class negative on its target and the most negative overall;
- on ImageNet-derived sources with CIFAR-10 targets (the replica), with all the models: the WordNet
  check's mean AUC and p-value (`findings.wordnet`; needs $FFCV_TRANSFER_DATA/imagenet-meta).
Estimators (the package's kernel, `class_influence(..., estimator=...)`, numpy backend):
- difference: mean output of the models that include a class minus that of the models that do not (the
  reference's estimator, the package's default);
- least_squares: the coefficient of a class's inclusion in the least-squares fit of each output on every
  class's inclusion with an intercept (equal to `difference` on an orthogonal design; it needs more models
  than classes + 1, so a half with fewer is recorded as not fitted);
- standardised: `difference` on outputs standardised per model over the test examples (a model's overall
  scale and offset removed).
Prints a table; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine  # noqa: E402

from ffcv_transfer.findings.evidence import twins_on_top  # noqa: E402
from ffcv_transfer.findings.kernel import InfluenceError, class_influence  # noqa: E402
from ffcv_transfer.findings.rankings import ranking_means  # noqa: E402
from ffcv_transfer.findings.reliability import spearman  # noqa: E402
from ffcv_transfer.findings.wordnet import CIFAR10_CONCEPTS, load_hierarchy, wordnet_agreement  # noqa: E402
from ffcv_transfer.store.experiment import MASKS, OUTPUTS, pooled_experiment, read_sidecars, transfer_field  # noqa: E402
from ffcv_transfer.store.results import ResultStore  # noqa: E402

ESTIMATORS = ("difference", "least_squares", "standardised")


def rankings(estimator: str, masks: np.ndarray, outputs: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(C, classes + 1): the per-target-class rankings, then the overall one, by `estimator` (an
    InfluenceError where least squares cannot be fitted)."""
    if estimator == "standardised":
        outputs = (outputs - outputs.mean(1, keepdims=True)) / outputs.std(1, keepdims=True).clip(1e-12)
    means = ranking_means(outputs, labels, classes)
    kernel_estimator = "difference" if estimator == "standardised" else estimator
    return class_influence(masks, means, backend="numpy", estimator=kernel_estimator).astype(np.float64)


def planted_checks(by_class: np.ndarray, planted: dict) -> dict[str, float]:
    """Fractions of the planted checks that hold: twins on top; misleading negative on its target; the
    misleading class the most negative overall (last column)."""
    misleading = planted["misleading"]
    return {
        "twins_on_top": float(np.mean(list(twins_on_top(by_class[:, :-1], planted).values()))),
        "misleading_negative": float(np.mean([by_class[m["source"], m["target"]] < 0 for m in misleading])),
        "misleading_most_negative": float(
            np.mean([int(np.argmin(by_class[:, -1])) == m["source"] for m in misleading])
        ),
    }


def measure(store_dir: Path, splits: int) -> dict:
    experiment = pooled_experiment([store_dir])
    sidecars = read_sidecars(experiment)
    from ffcv_transfer.store.betons import read_labels

    target = experiment.target(None)
    labels = read_labels(target.path(experiment.data.root, "target_test"))
    classes = int(labels.max()) + 1
    planted = sidecars["target_test"].get("extra", {}).get("planted")
    wnids, target_names = sidecars["source_train"].get("wnids"), sidecars["target_test"]["class_names"]
    hierarchy = None
    if wnids and any(CIFAR10_CONCEPTS.get(name) for name in target_names):
        try:
            hierarchy = load_hierarchy()
        except ValueError:
            print(f"{store_dir}: no WordNet hierarchy ($FFCV_TRANSFER_DATA/imagenet-meta): no WordNet check")
    store = ResultStore(store_dir)
    present = [o for o in OUTPUTS if transfer_field(o, experiment) in store.schema]
    _, values = store.read([MASKS] + [transfer_field(o, experiment) for o in present])
    masks = np.asarray(values[MASKS], bool)
    n = len(masks)
    rng = np.random.default_rng(0)
    halves = [rng.permutation(n) for _ in range(splits)]
    result = {"store": str(store_dir), "models": n, "source_classes": int(masks.shape[1]), "cases": {}}
    for output in present:
        outputs = np.asarray(values[transfer_field(output, experiment)], np.float64)
        for estimator in ESTIMATORS:
            started = time.perf_counter()
            try:
                pairs = [
                    tuple(
                        rankings(estimator, masks[part], outputs[part], labels, classes)
                        for part in (order[: n // 2], order[n // 2 : 2 * (n // 2)])
                    )
                    for order in halves
                ]
            except InfluenceError:  # least squares on halves of fewer models than classes + 1: not fitted
                pairs = []
            agreements = {
                "split_half_spearman": lambda a, b: np.nanmean(spearman(a, b)),
                "top_agreement": lambda a, b: np.mean(a.argmax(0) == b.argmax(0)),
                "bottom_agreement": lambda a, b: np.mean(a.argmin(0) == b.argmin(0)),
            }
            case = {
                name: float(np.mean([agree(a, b) for a, b in pairs])) if pairs else None
                for name, agree in agreements.items()
            }
            if planted and pairs:
                half_checks = [planted_checks(ranking, planted) for pair in pairs for ranking in pair]
                case["planted_at_half"] = {k: float(np.mean([c[k] for c in half_checks])) for k in half_checks[0]}
            everything = rankings(estimator, masks, outputs, labels, classes)
            if planted:
                case["planted_at_all"] = planted_checks(everything, planted)
            if hierarchy is not None:
                agreement = wordnet_agreement(everything[:, :-1], wnids, target_names, hierarchy=hierarchy)
                case["wordnet_at_all"] = {"mean_auc": agreement["mean_auc"], "p_value": agreement["p_value"]}
            case["seconds"] = round(time.perf_counter() - started, 2)
            result["cases"][f"{output}/{estimator}"] = case
    return result


def print_table(report: dict) -> None:
    for result in report["stores"]:
        print(f"\n{result['store']}: {result['models']} models, {result['source_classes']} source classes")
        print(
            f"{'output/estimator':28s} {'split-half':>10s} {'top':>5s} {'bottom':>6s} "
            f"{'twins@half':>10s} {'misl-@half':>10s} {'misl-min@half':>13s} {'all (tw/neg/min)':>16s}"
        )
        for name, case in result["cases"].items():
            half, full = case.get("planted_at_half"), case.get("planted_at_all")
            planted = (
                f"{half['twins_on_top']:10.2f} {half['misleading_negative']:10.2f} "
                f"{half['misleading_most_negative']:13.2f} "
                f"{full['twins_on_top']:6.2f}/{full['misleading_negative']:.0f}/{full['misleading_most_negative']:.0f}"
                if half
                else ""
            )
            wordnet = case.get("wordnet_at_all")
            wordnet = f" WordNet AUC {wordnet['mean_auc']:.3f} (p {wordnet['p_value']:.4f})" if wordnet else ""
            halves = (
                f"{case['split_half_spearman']:10.3f} {case['top_agreement']:5.2f} {case['bottom_agreement']:6.2f}"
                if case["split_half_spearman"] is not None
                else f"{'not fitted':>10s} {'':5s} {'':6s}"
            )
            print(f"{name:28s} {halves} {planted}{wordnet}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--splits", type=int, default=50, help="random halves of the models")
    parser.add_argument("--out", default="benchmarks/results/estimators-cpu.json")
    args = parser.parse_args()
    report = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "splits": args.splits,
        "stores": [measure(store, args.splits) for store in args.stores],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)


if __name__ == "__main__":
    main()
