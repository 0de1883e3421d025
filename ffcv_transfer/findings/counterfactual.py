"""Counterfactuals read: what a removal store's arms (`ffcv_transfer.experiments.removals` trains them) say.

Each row of a removal store is one model with its removal beside its mask (fixed array `removal`: kind,
k, seed). The models of one seed start from the same initial weights, so arms are compared in pairs: the
spread of per-model target accuracy across initialisations then cancels out of their differences.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.store.experiment import REMOVAL

KINDS = ("none", "most_negative", "most_positive", "random", "chosen")


Arms = dict[tuple[str, int], dict[int, float]]


def accuracy_by_arm(store) -> Arms:
    """{(kind, k): {seed: target accuracy}} over the completed rows; the full source set is ("none", 0).
    The functions below take it, so that one read of the store serves them all."""
    rows, values = store.read(["target_acc"])
    arms: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for (kind, k, seed), accuracy in zip(store.fixed(REMOVAL)[rows], values["target_acc"].tolist()):
        arms[KINDS[kind], int(k)][int(seed)] = accuracy
    return dict(arms)


def accuracy_by_removal(arms: Arms) -> tuple[list[float], dict[str, dict[int, list[float]]]]:
    """(target accuracy of the full-source models, {kind: {k: accuracies}}) from `accuracy_by_arm`."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for (kind, k), by_seed in arms.items():
        if kind != "none":
            curves[kind][k] = list(by_seed.values())
    return list(arms.get(("none", 0), {}).values()), dict(curves)


def paired_gain(arms: Arms, arm: tuple[str, int], versus: tuple[str, int]) -> dict[str, Any]:
    """Target accuracy of `arm` minus that of `versus` (each (kind, k)), seed by seed: the models of a
    seed start from the same weights, so the spread across initialisations cancels. {"per_seed":
    {seed: gain}, "mean", "stderr"} over the seeds both arms completed (mean None when none did)."""
    return _gain(arms.get(arm, {}), arms.get(versus, {}))


def changes_against_all(arms: Arms) -> dict[str, dict[int, dict[str, Any]]]:
    """{kind: {k: paired_gain of (kind, k) against the full source set}} for every removal arm."""
    changes: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for kind, k in sorted(arm for arm in arms if arm[0] != "none"):
        changes[kind][k] = _gain(arms[kind, k], arms.get(("none", 0), {}))
    return dict(changes)


def _gain(first: dict[int, float], second: dict[int, float]) -> dict[str, Any]:
    gains = {seed: first[seed] - second[seed] for seed in sorted(set(first) & set(second))}
    values = np.array(list(gains.values()))
    return {
        "per_seed": gains,
        "mean": float(values.mean()) if len(values) else None,
        "stderr": float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None,
    }


def format_gain(gain: dict[str, Any]) -> str:
    """A `paired_gain` as "+0.0880 ± 0.0170 (6 seeds)"; "" when no seed has both arms."""
    if gain["mean"] is None:
        return ""
    spread = "" if gain["stderr"] is None else f" ± {gain['stderr']:.4f}"
    return f"{gain['mean']:+.4f}{spread} ({len(gain['per_seed'])} seed{'s' * (len(gain['per_seed']) > 1)})"


def write_counterfactual(
    store, out: str | Path, title: str
) -> tuple[list[float], dict[str, dict[int, list[float]]], dict[str, dict[int, dict[str, Any]]], Path]:
    """Read a removal store's arms and write OUT/counterfactual.png (target accuracy against the classes
    removed, titled `title`) and OUT/counterfactual.json (baseline and curves). Returns (`accuracy_by_removal`'s
    baseline and curves, `changes_against_all`, the plot's path)."""
    from ffcv_transfer.findings.plots import accuracy_versus_removed

    out = Path(out)
    arms = accuracy_by_arm(store)
    baseline, curves = accuracy_by_removal(arms)
    changes = changes_against_all(arms)
    plot = accuracy_versus_removed(out / "counterfactual.png", curves, baseline, title, changes)
    (out / "counterfactual.json").write_text(json.dumps({"baseline": baseline, "curves": curves}, indent=1) + "\n")
    return baseline, curves, changes, plot


def correct_by_removal(store, example: int) -> dict[str, float]:
    """How often target test example `example` is predicted correctly, with and without the chosen class."""
    rows, values = store.read(["is_correct"])
    kinds = store.fixed(REMOVAL)[rows][:, 0]
    correct = values["is_correct"][:, example]
    return {
        "with": float(correct[kinds == 0].mean()),
        "without": float(correct[kinds == KINDS.index("chosen")].mean()),
        "models": int(len(rows)),
    }
