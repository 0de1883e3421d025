"""Evidence about the rankings from outside them: a known truth they can be checked against (the planted
twins of synthetic data, WordNet's hierarchy for ImageNet-derived sources), each as a p-value under the
null that the rankings are noise. `reliability.Reliability.verdict` weighs it beside the rankings' own
statistics, so that the report, `rankings` and the demo state one verdict with its reason."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Evidence(NamedTuple):
    name: str  # what was checked, as a reader would name it
    p_value: float  # one-sided, under the null that the rankings are noise
    detail: str  # the observation behind the p-value, in words


def twins_on_top(by_class: np.ndarray, planted: dict) -> dict[str, bool]:
    """{target class index (as the planted truth keys it): whether its planted twin is its most positive
    source class} from the per-target-class influences `by_class` (C, targets)."""
    return {t: int(np.nanargmax(by_class[:, int(t)])) == twin for t, twin in planted["twin"].items()}


def planted_evidence(by_class: np.ndarray, planted: dict) -> Evidence:
    """How unlikely noise is to put as many planted twins on top of their target's ranking: with C source
    classes ranked at random, each target's top class is its twin with chance 1/C, so k of T twins on top
    has the binomial tail P(X >= k), X ~ Binomial(T, 1/C)."""
    on_top = twins_on_top(by_class, planted)
    hits, tries = sum(on_top.values()), len(on_top)
    chance = 1 / int(np.isfinite(by_class).all(1).sum())
    p = sum(math.comb(tries, i) * chance**i * (1 - chance) ** (tries - i) for i in range(hits, tries + 1))
    return Evidence("planted twins", float(p), f"{hits} of {tries} planted twins on top")


def wordnet_evidence(agreement: dict) -> Evidence | None:
    """The WordNet check (`wordnet.wordnet_agreement`) as evidence; None where it scored nothing."""
    if agreement.get("p_value") is None:
        return None
    return Evidence("WordNet agreement", float(agreement["p_value"]), f"mean AUC {agreement['mean_auc']:.3f}")
