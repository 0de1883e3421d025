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

from ffcv_transfer.findings.evidence import Evidence
from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.findings.rankings import ranking_means

THRESHOLD = 0.5  # a ranking whose full-N split-half reliability is below this gets the banner
GOALS = (0.8, 0.9)  # reliabilities the models-needed estimates aim at
Q_LEVEL = 0.05  # Benjamini-Hochberg false-discovery rate
SIGNAL_P = 0.01  # evidence (the joint test, WordNet, planted twins) at or below this shows signal


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


def beta_sf(x: float, a: float, b: float) -> float:
    """1 - I_x(a, b), the upper tail of the Beta(a, b) distribution at x, by the continued fraction of the
    regularised incomplete beta function (modified Lentz), taken on the side where it converges fast."""
    if x <= 0:
        return 1.0
    if x >= 1:
        return 0.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - beta_sf(1.0 - x, b, a)
    log_front = (
        a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return max(0.0, 1.0 - math.exp(log_front) * fraction)


def f_sf(value: float, df1: int, df2: int) -> float:
    """P(F >= value) for F ~ F(df1, df2): the Beta(df2 / 2, df1 / 2) lower tail at df2 / (df2 + df1 value)."""
    if value <= 0:
        return 1.0
    return 1.0 - beta_sf(df2 / (df2 + df1 * value), df2 / 2, df1 / 2)


def joint_signal(masks: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(K,) p-values of the joint null "no source class affects the output" per column of `means` (N, K),
    each model's mean output over a ranking's examples: the F-test of the least-squares fit of the output
    on every class's inclusion (N x C masks, with an intercept) against the intercept alone. Under the null
    with independent models it is exact for normal noise, whatever the masks' overlap (a sum of squared
    per-class z-scores is not: random masks correlate the classes' estimates, and each z-score's own
    standard error shares the outputs with the others'). Many small effects, none significant alone, show
    here. NaN where there are not more models than the fit's parameters."""
    masks = np.asarray(masks, np.float64)
    means = np.asarray(means, np.float64)
    design = np.column_stack([np.ones(len(masks)), masks])
    coefficients, _, rank, _ = np.linalg.lstsq(design, means, rcond=None)
    residual_df, model_df = len(masks) - rank, rank - 1
    p = np.full(means.shape[1], np.nan)
    if residual_df < 1 or model_df < 1:
        return p
    fitted = design @ coefficients
    error = np.square(means - fitted).sum(0)
    explained = np.square(fitted - means.mean(0)).sum(0)
    for k in range(means.shape[1]):
        if error[k] > 0:
            p[k] = f_sf(float((explained[k] / model_df) / (error[k] / residual_df)), model_df, residual_df)
    return p


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
    joint_p: tuple[float, ...] = ()  # per column, `joint_signal`'s p-value (empty: not computed)
    q_level: float = Q_LEVEL
    threshold: float = THRESHOLD
    qvalues: np.ndarray | None = field(default=None, compare=False, repr=False)  # (C, columns)

    def flagged(self) -> list[int]:
        """Columns whose ranking is not yet reliable: reliability below the threshold (or not measurable)
        and no source class significant. Either alone supports reading a ranking: a reproducible order, or
        classes at its ends that differ from noise (with few true effects, as on planted data, the order of
        the null classes between them never reproduces, however many models)."""
        return [k for k, rho in enumerate(self.reliability) if not rho >= self.threshold and not self.significant[k]]

    def to_json(self, evidence: Sequence[Evidence] = ()) -> dict:
        """A JSON-able summary: settings, per-column statistics, whether all are reliable, and the verdict
        (with the banner, its text when some ranking is not reliable) given `evidence`."""
        flagged = set(self.flagged())
        columns = {
            name: {
                "split_half": _number(self.split_half[k]),
                "reliability": _number(self.reliability[k]),
                "significant": len(self.significant[k]),
                "significant_sources": list(self.significant[k]),
                "joint_p": _number(self.joint_p[k]) if self.joint_p else None,
                "models_needed": {str(goal): needed[k] for goal, needed in self.models_needed.items()},
                "reliable": k not in flagged,
            }
            for k, name in enumerate(self.columns)
        }
        verdict = self.verdict(evidence)
        return {
            "num_models": self.num_models,
            "half_models": self.half_models,
            "splits": self.splits,
            "threshold": self.threshold,
            "q_level": self.q_level,
            "reliable": not flagged,
            "columns": columns,
            "verdict": verdict._asdict() | {"evidence": [e._asdict() for e in evidence]},
            "banner": verdict.banner,
        }

    def signals(self, evidence: Sequence[Evidence] = ()) -> list[str]:
        """What shows that the influences are more than noise, in words: each piece of `evidence` at p <=
        SIGNAL_P, and the smallest joint-test p-value (`joint_signal`) once multiplied by the number of
        rankings tested (Bonferroni) at or below SIGNAL_P."""
        shown = [f"{e.name}: {e.detail}, p = {e.p_value:.2g}" for e in evidence if e.p_value <= SIGNAL_P]
        tested = [(p, k) for k, p in enumerate(self.joint_p) if np.isfinite(p)]
        if tested:
            p, k = min(tested)
            if (adjusted := min(1.0, p * len(tested))) <= SIGNAL_P:
                shown.append(
                    f"joint test of every class on the {self.columns[k]} ranking: p = {adjusted:.2g}, Bonferroni over "
                    f"{len(tested)} rankings"
                )
        return shown

    def verdict(self, evidence: Sequence[Evidence] = ()) -> Verdict:
        """One verdict on the rankings, with its reason. "reliable": every ranking reproduces between halves
        of the models or names a significant class. "signal": some do not, but the influences are shown to
        be more than noise (`signals`): those rankings' ends are tendencies, not yet findings class by class.
        "no signal": some do not, and nothing shows signal yet."""
        flagged = self.flagged()
        if not flagged:
            return Verdict(
                "reliable",
                f"Rankings reliable with {self.num_models} models: each reproduces between halves of the models "
                f"(split-half reliability >= {self.threshold}) or names a source class significant at BH q <= "
                f"{self.q_level}.",
            )
        goal = min(self.models_needed)
        parts = []
        for k in flagged:
            needed = self.models_needed[goal][k]
            part = f"{self.columns[k]} {self.reliability[k]:.2f}, {len(self.significant[k])} significant"
            if needed is None:
                part += ", its order not reproducible yet"
            elif needed > self.num_models:
                part += f", ~{needed} models for {goal}"
            parts.append(part)
        unsettled = (
            f"with {self.num_models} models these rankings neither reproduce between halves of the models "
            f"(split-half reliability below {self.threshold}) nor name a source class significant at BH q <= "
            f"{self.q_level}: {'; '.join(parts)}"
        )
        if shown := self.signals(evidence):
            return Verdict(
                "signal",
                f"The influences carry signal ({'; '.join(shown)}), but {unsettled}. Read their ends as "
                f"tendencies, not class-by-class findings; noise falls as 1/sqrt(models).",
            )
        return Verdict(
            "no signal",
            f"No signal shown yet: {unsettled}, and no test shows the influences differ from noise. Train more "
            f"models and check again before reading those rankings.",
        )

    def banner(self, evidence: Sequence[Evidence] = ()) -> str | None:
        """The verdict's text when some ranking is not reliable, else None."""
        return self.verdict(evidence).banner


class Verdict(NamedTuple):
    level: str  # "reliable", "signal" or "no signal" (Reliability.verdict)
    text: str  # the verdict and its reason, in one paragraph

    @property
    def banner(self) -> str | None:
        """What to show above the rankings: the text, unless every ranking is reliable."""
        return None if self.level == "reliable" else self.text


def describe_column(column: dict) -> str:
    """One ranking's entry of `Reliability.to_json()["columns"]`, in words."""
    needed = ", ".join(f"{'?' if n is None else n} models for {goal}" for goal, n in column["models_needed"].items())
    reliability = "n/a" if column["reliability"] is None else f"{column['reliability']:.2f}"
    joint = "" if column.get("joint_p") is None else f", joint p = {column['joint_p']:.2g}"
    return (
        f"reliability {reliability}, {column['significant']} source classes significant{joint}"
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
    means = ranking_means(outputs, labels, len(target_names))
    influence, stderr = class_influence(masks, means, backend="numpy", stderr=True)
    tests = significance(influence, stderr, q)
    joint = joint_signal(masks, means)
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
        joint_p=tuple(float(x) for x in joint),
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
