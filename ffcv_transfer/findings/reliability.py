"""How far the influence rankings can be trusted: split-half reliability, per-source-class significance, and
how many models (or counterfactual seeds) it would take to resolve them. docs/reliability.md has the formulas.

Noise model throughout: an influence estimated from N models is its true value plus noise of variance v/N
(the models are independent and the influence is a difference of means over about N/2 models each). The
correlation of a ranking between two independent N-model replicates is then rho(N) = s / (s + v/N), s the
variance of the true influences across source classes; Spearman-Brown and `models_needed` both follow from it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.findings.rankings import ranking_means

THRESHOLD = 0.5  # a ranking whose full-N split-half reliability is below this gets the banner
GOALS = (0.8, 0.9)  # reliabilities the models-needed estimates aim at
Q_LEVEL = 0.05  # Benjamini-Hochberg false-discovery rate


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K,): the Spearman correlation of a and b, both (C, K), column by column. Ranks by argsort twice:
    ties, rare in float influences, are broken by position."""
    ra, rb = (np.argsort(np.argsort(x, 0, kind="stable"), 0, kind="stable").astype(np.float64) for x in (a, b))
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    return (ra * rb).sum(0) / np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))


def spearman_brown(r: np.ndarray | float, factor: float) -> np.ndarray | float:
    """The reliability of `factor` times as many models as gave reliability r: factor r / (1 + (factor - 1) r)."""
    return factor * r / (1 + (factor - 1) * r)


class SplitHalf(NamedTuple):
    half: np.ndarray  # (K + 1,) Spearman correlation between two disjoint halves, mean over splits
    full: np.ndarray  # (K + 1,) projected to all the models by Spearman-Brown
    half_models: int  # models in each half


def split_half(
    masks: np.ndarray, outputs: np.ndarray, labels: np.ndarray, num_classes: int, splits: int = 20, seed: int = 0
) -> SplitHalf:
    """Split-half reliability of the influence ranking of each target class (and of the mean over all test
    examples, last): for `splits` random splits of the N models into two halves of N // 2, the Spearman
    correlation between the halves' influence vectors, averaged, and projected to N models by Spearman-Brown
    (factor N / (N // 2)). Source classes that a half includes in all or none of its models are left out of
    that split's correlation."""
    masks = np.asarray(masks, bool)
    if len(masks) < 4:
        raise ValueError(f"split-half reliability needs at least 4 models, got {len(masks)}")
    means = ranking_means(outputs, labels, num_classes)
    half = len(masks) // 2
    rng = np.random.default_rng(seed)
    total = np.zeros(means.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the kernel's warning for such classes; dropped below
        for _ in range(splits):
            order = rng.permutation(len(masks))
            a, b = (
                class_influence(masks[rows], means[rows], backend="numpy")
                for rows in (order[:half], order[half : 2 * half])
            )
            kept = np.isfinite(a).all(1) & np.isfinite(b).all(1)
            total += spearman(a[kept], b[kept])
    r = total / splits
    return SplitHalf(r, spearman_brown(r, len(masks) / half), half)


def models_needed(rho: float, num_models: int, goal: float) -> int | None:
    """The models at which reliability reaches `goal`, from reliability rho at num_models under
    rho(N) = s / (s + v/N): N goal (1 - rho) / (rho (1 - goal)). None when rho <= 0 (or NaN): no signal is
    measurable at num_models, so no extrapolation can be made."""
    if not rho > 0:
        return None
    if rho >= 1:
        return num_models
    return math.ceil(num_models * goal * (1 - rho) / (rho * (1 - goal)) - 1e-9)  # an exact integer stays itself


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of p-values down axis 0 (each column its own family); NaN p-values are
    not counted as tests and stay NaN. q_(i) = min over j >= i of p_(j) m / j, at most 1."""
    p = np.asarray(p, np.float64)
    order = np.argsort(p, axis=0)  # NaN last
    ranked = np.take_along_axis(p, order, 0)
    rank = np.arange(1, len(p) + 1).reshape(-1, *[1] * (p.ndim - 1))
    # fmin skips the NaNs that lead the reversed order
    adjusted = np.fmin.accumulate((ranked * np.isfinite(p).sum(0) / rank)[::-1], axis=0)[::-1]
    q = np.empty_like(p)
    np.put_along_axis(q, order, np.minimum(adjusted, 1), 0)
    return q


class Significance(NamedTuple):
    p: np.ndarray  # (C, K) two-sided z-test p-values
    q: np.ndarray  # (C, K) Benjamini-Hochberg q-values over the source classes of each column
    significant: np.ndarray  # (C, K) bool, q <= the level
    counts: np.ndarray  # (K,) significant source classes per column


def significance(by_class: np.ndarray, stderr: np.ndarray, q: float = Q_LEVEL) -> Significance:
    """Which source classes' influences differ from 0: z = influence / stderr, two-sided normal p-values
    (the difference of means is near normal with tens of models), Benjamini-Hochberg over the source classes
    of each column, significant at q. NaN influences (a class in every model or none) are not tested."""
    z = np.asarray(by_class, np.float64) / np.asarray(stderr, np.float64)
    p = np.vectorize(math.erfc, otypes=[np.float64])(np.abs(z) / math.sqrt(2))
    qvalues = benjamini_hochberg(p)
    significant = qvalues <= q
    return Significance(p, qvalues, significant, significant.sum(0))


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@dataclass(frozen=True)
class Reliability:
    """How far each ranking can be trusted: one entry per column, the target classes then "overall"."""

    columns: tuple[str, ...]
    num_models: int
    half_models: int
    splits: int
    split_half: tuple[float, ...]  # Spearman between halves of half_models
    reliability: tuple[float, ...]  # projected to num_models (Spearman-Brown)
    significant: tuple[tuple[int, ...], ...]  # source classes with BH q <= q_level, most significant first
    models_needed: dict[float, tuple[int | None, ...]]  # goal -> models per column (None: not measurable)
    q_level: float = Q_LEVEL
    threshold: float = THRESHOLD
    qvalues: np.ndarray | None = field(default=None, compare=False, repr=False)  # (C, columns)

    def flagged(self) -> list[int]:
        """Columns whose ranking is not yet reliable: reliability below the threshold (or not measurable)
        and no source class significant. Either alone supports reading a ranking: a reproducible order, or
        classes at its ends that differ from noise (with few true effects, as on planted data, the order of
        the null classes between them never reproduces, however many models)."""
        return [k for k, rho in enumerate(self.reliability) if not rho >= self.threshold and not self.significant[k]]

    def to_json(self) -> dict:
        """A JSON-able summary: settings, per-column statistics, whether all are reliable, the banner."""
        flagged = set(self.flagged())
        columns = {
            name: {
                "split_half": _number(self.split_half[k]),
                "reliability": _number(self.reliability[k]),
                "significant": len(self.significant[k]),
                "significant_sources": list(self.significant[k]),
                "models_needed": {str(goal): needed[k] for goal, needed in self.models_needed.items()},
                "reliable": k not in flagged,
            }
            for k, name in enumerate(self.columns)
        }
        return {
            "num_models": self.num_models,
            "half_models": self.half_models,
            "splits": self.splits,
            "threshold": self.threshold,
            "q_level": self.q_level,
            "reliable": not flagged,
            "columns": columns,
            "banner": self.banner(),
        }

    def banner(self) -> str | None:
        """None when every ranking is reliable; otherwise which are not, each with the models that would make
        it reliable (at the first goal)."""
        flagged = self.flagged()
        if not flagged:
            return None
        goal = min(self.models_needed)
        parts = []
        for k in flagged:
            needed = self.models_needed[goal][k]
            part = f"{self.columns[k]} {self.reliability[k]:.2f}, {len(self.significant[k])} significant"
            if needed is None:
                part += ", no signal measurable yet"
            elif needed > self.num_models:
                part += f", ~{needed} models for {goal}"
            parts.append(part)
        return (
            f"Rankings not yet reliable with {self.num_models} models (split-half reliability below "
            f"{self.threshold} and no source class significant at BH q <= {self.q_level}): {'; '.join(parts)}. "
            f"Noise falls as 1/sqrt(models); where no signal is measurable yet, train more models and check "
            f"again before reading those rankings."
        )


def describe_column(column: dict) -> str:
    """One ranking's entry of `Reliability.to_json()["columns"]`, in words."""
    needed = ", ".join(f"{'?' if n is None else n} models for {goal}" for goal, n in column["models_needed"].items())
    reliability = "n/a" if column["reliability"] is None else f"{column['reliability']:.2f}"
    return (
        f"reliability {reliability}, {column['significant']} source classes significant"
        f" ({needed}){'' if column['reliable'] else ' - not yet reliable'}"
    )


def assess(
    masks: np.ndarray,
    outputs: np.ndarray,
    labels: np.ndarray,
    target_names: Sequence[str],
    splits: int = 20,
    seed: int = 0,
    q: float = Q_LEVEL,
    threshold: float = THRESHOLD,
    goals: Sequence[float] = GOALS,
) -> Reliability:
    """The reliability of the ranking of every target class and of the overall one, from the models' masks
    (N, C) and outputs (N, T) with the test labels (T,): split-half reliability at N, significant source
    classes, models needed for each goal."""
    masks = np.asarray(masks, bool)
    halves = split_half(masks, outputs, labels, len(target_names), splits=splits, seed=seed)
    influence, stderr = class_influence(
        masks, ranking_means(outputs, labels, len(target_names)), backend="numpy", stderr=True
    )
    tests = significance(influence, stderr, q)
    significant = tuple(
        tuple(int(c) for c in np.argsort(tests.q[:, k], kind="stable")[: tests.counts[k]])
        for k in range(influence.shape[1])
    )
    full = tuple(float(x) for x in halves.full)
    return Reliability(
        columns=(*target_names, "overall"),
        num_models=len(masks),
        half_models=halves.half_models,
        splits=splits,
        split_half=tuple(float(x) for x in halves.half),
        reliability=full,
        significant=significant,
        q_level=q,
        threshold=threshold,
        qvalues=tests.q,
        models_needed={goal: tuple(models_needed(rho, len(masks), goal) for rho in full) for goal in goals},
    )


def seeds_to_resolve(differences: Sequence[float] | np.ndarray, effect: float | None = None, z: float = 2.0) -> int:
    """Seeds (paired differences, one per seed) in all for a mean difference of size `effect` (default: the
    measured mean) to be z standard errors from 0, taking the measured per-seed standard deviation sd as
    known: ceil((z sd / effect)^2), and at least 2 (a standard error needs two)."""
    differences = np.asarray(differences, np.float64)
    if differences.size < 2:
        raise ValueError(f"need at least 2 paired differences to measure their spread, got {differences.size}")
    effect = abs(differences.mean() if effect is None else effect)
    if effect == 0:
        raise ValueError("an effect of 0 cannot be resolved by any number of seeds")
    # the variance, not the squared sd: no square-root round-off to push an exact integer over
    return max(2, math.ceil(z * z * differences.var(ddof=1) / effect**2 - 1e-9))
