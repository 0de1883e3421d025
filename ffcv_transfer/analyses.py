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
