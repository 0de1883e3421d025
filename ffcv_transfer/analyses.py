"""Findings from an influence matrix: source classes ranked for each target class."""
from __future__ import annotations

from typing import Sequence

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


def rank_sources(by_class: np.ndarray, source_names: Sequence[str], target_names: Sequence[str]
                 ) -> dict[str, list[dict]]:
    """For each target class, every source class from most positive to most negative influence."""
    ranking = {}
    for k, target in enumerate(target_names):
        order = np.argsort(-by_class[:, k], kind="stable")
        ranking[target] = [{"source": source_names[i], "index": int(i), "influence": float(by_class[i, k])}
                           for i in order]
    return ranking


def top_and_bottom(values: np.ndarray, names: Sequence[str], k: int) -> dict[str, list[dict]]:
    """The k most positive and the k most negative entries of `values` (one per source class), named."""
    values = np.asarray(values, float)
    order = np.argsort(-values, kind="stable")

    def entries(indices: np.ndarray) -> list[dict]:
        return [{"source": names[i], "index": int(i), "influence": float(values[i])} for i in indices]

    return {"positive": entries(order[:k]), "negative": entries(order[::-1][:k])}


def explain_example(influence: np.ndarray, example: int, k: int) -> np.ndarray:
    """The k source classes with the most negative influence on target test example `example`."""
    influence = np.asarray(influence)
    if not 0 <= example < influence.shape[1]:
        raise ValueError(f"target example {example} is not in 0..{influence.shape[1] - 1}")
    return np.argsort(influence[:, example], kind="stable")[:k]


def subpopulation(influence: np.ndarray, source_class: int, k: int, labels: np.ndarray | None = None,
                  target_class: int | None = None) -> np.ndarray:
    """The k target test examples that `source_class` influences most positively (optionally only those
    of `target_class`): a subpopulation found without annotations."""
    influence = np.asarray(influence)
    if not 0 <= source_class < influence.shape[0]:
        raise ValueError(f"source class {source_class} is not in 0..{influence.shape[0] - 1}")
    candidates = np.arange(influence.shape[1])
    if target_class is not None:
        candidates = candidates[np.asarray(labels) == target_class]
    return candidates[np.argsort(-influence[source_class, candidates], kind="stable")[:k]]
