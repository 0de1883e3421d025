"""Findings from an influence matrix: source classes ranked for each target class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def influence_by_target_class(influence: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C_source, num_classes): each source class's mean influence over the test examples of each target
    class. influence: (C_source, T) per test example; labels: (T,) target class of each example."""
    influence, labels = np.asarray(influence), np.asarray(labels)
    if influence.shape[1] != len(labels):
        raise ValueError(f"influence has {influence.shape[1]} columns but there are {len(labels)} labels")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"target classes {np.flatnonzero(counts == 0).tolist()} have no test example")
    onehot = np.eye(num_classes)[labels]  # (T, K)
    return (influence @ onehot) / counts


def ranking_means(outputs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes + 1) float64: each model's mean output over each target class's test examples, then
    over all of them. The influence is linear in the outputs, so the influences on these columns are
    `influence_by_target_class`'s and the overall mean influence: what the rankings rank."""
    outputs = np.asarray(outputs, np.float64)
    return np.column_stack([influence_by_target_class(outputs, labels, num_classes), outputs.mean(1)])


def ranking_stderr(masks: np.ndarray, outputs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C_source, num_classes + 1): standard errors of `influence_by_target_class`'s columns, then of the
    mean influence over all test examples. masks: (N, C_source) of the models; outputs: (N, T) their
    outputs (margins). They are the kernel's difference-of-means errors on `ranking_means`,
    sqrt(var_in / n_in + var_out / n_out)."""
    from ffcv_transfer.findings.kernel import class_influence

    return class_influence(np.asarray(masks, bool), ranking_means(outputs, labels, num_classes), stderr=True)[1]


def _entry(names: Sequence[str], values: np.ndarray, stderr: np.ndarray | None, i: int) -> dict:
    entry = {"source": names[i], "index": int(i), "influence": float(values[i])}
    if stderr is not None:
        entry["stderr"] = float(stderr[i])
    return entry


def rank_sources(
    by_class: np.ndarray, source_names: Sequence[str], target_names: Sequence[str], stderr: np.ndarray | None = None
) -> dict[str, list[dict]]:
    """For each target class, every source class from most positive to most negative influence (with its
    standard error when `stderr`, shaped like by_class, is given)."""
    ranking = {}
    for k, target in enumerate(target_names):
        order = np.argsort(-by_class[:, k], kind="stable")
        column_stderr = None if stderr is None else stderr[:, k]
        ranking[target] = [_entry(source_names, by_class[:, k], column_stderr, i) for i in order]
    return ranking


def top_and_bottom(
    values: np.ndarray, names: Sequence[str], k: int, stderr: np.ndarray | None = None
) -> dict[str, list[dict]]:
    """The k most positive and the k most negative entries of `values` (one per source class), named, with
    their standard errors when given."""
    values = np.asarray(values, float)
    order = np.argsort(-values, kind="stable")
    return {
        "positive": [_entry(names, values, stderr, i) for i in order[:k]],
        "negative": [_entry(names, values, stderr, i) for i in order[::-1][:k]],
    }


def explain_example(influence: np.ndarray, example: int, k: int) -> np.ndarray:
    """The k source classes with the most negative influence on target test example `example`."""
    influence = np.asarray(influence)
    if not 0 <= example < influence.shape[1]:
        raise ValueError(f"target example {example} is not in 0..{influence.shape[1] - 1}")
    return np.argsort(influence[:, example], kind="stable")[:k]


def subpopulation(
    influence: np.ndarray, source_class: int, k: int, labels: np.ndarray | None = None, target_class: int | None = None
) -> np.ndarray:
    """The k target test examples that `source_class` influences most positively (optionally only those
    of `target_class`): a subpopulation found without annotations."""
    influence = np.asarray(influence)
    if not 0 <= source_class < influence.shape[0]:
        raise ValueError(f"source class {source_class} is not in 0..{influence.shape[0] - 1}")
    candidates = np.arange(influence.shape[1])
    if target_class is not None:
        candidates = candidates[np.asarray(labels) == target_class]
    return candidates[np.argsort(-influence[source_class, candidates], kind="stable")[:k]]
