"""Figures for the findings (matplotlib, no display needed): influence bar charts and scatter plots, image
grids and the counterfactual accuracy-versus-k plot. Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def influence_scatter(
    path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    label: int = 5,
) -> Path:
    """One point per class at (x, y), the `label` largest |x| + |y| named, with the diagonal: how far two
    influence vectors (e.g. of two transfer modes) agree."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    ax.scatter(x, y, s=14, color="#3366aa", alpha=0.8)
    low, high = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([low, high], [low, high], color="#999999", linewidth=0.8, linestyle="--")
    for i in np.argsort(-(np.abs(x) + np.abs(y)), kind="stable")[:label]:
        ax.annotate(names[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="#cccccc", linewidth=0.6)
    ax.axvline(0, color="#cccccc", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def reliability_curves(
    path: str | Path,
    columns: Sequence[str],
    reliability: Sequence[float],
    num_models: int,
    threshold: float,
    goal: float,
) -> Path:
    """Each ranking's reliability projected over numbers of models (Spearman-Brown from its value at
    `num_models`, marked), with the threshold and the goal: how many models each ranking needs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    models = np.geomspace(max(2, num_models / 4), num_models * 64, 200)
    for name, rho in zip(columns, reliability):
        if not np.isfinite(rho) or rho <= 0:
            continue
        factor = models / num_models
        overall = name == "overall"
        ax.plot(
            models,
            factor * rho / (1 + (factor - 1) * rho),
            linewidth=2.2 if overall else 1,
            color="#222222" if overall else None,
            label=name,
        )
        ax.plot([num_models], [rho], "o", color="#222222" if overall else ax.lines[-1].get_color(), markersize=4)
    ax.axhline(threshold, color="#b3261e", linewidth=0.8, linestyle="--")
    ax.axhline(goal, color="#1d7a37", linewidth=0.8, linestyle="--")
    ax.axvline(num_models, color="#999999", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("source models")
    ax.set_ylabel("split-half reliability (projected)")
    ax.set_title(f"dots: measured at {num_models} models; red: threshold {threshold}; green: goal {goal}", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _save(fig, path)


def influence_bars(
    path: str | Path, names: Sequence[str], values: np.ndarray, k: int, title: str, stderr: np.ndarray | None = None
) -> Path:
    """The k most positive and k most negative classes as horizontal bars, most positive on top, with
    error bars of one standard error when `stderr` is given."""
    values = np.asarray(values, float)
    order = np.argsort(-values, kind="stable")
    shown = order if len(order) <= 2 * k else np.concatenate([order[:k], order[-k:]])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.28 * len(shown)))
    y = np.arange(len(shown))[::-1]
    ax.barh(
        y,
        values[shown],
        color=["#2a9d4b" if v >= 0 else "#c8383c" for v in values[shown]],
        xerr=None if stderr is None else np.asarray(stderr, float)[shown],
        capsize=2,
    )
    ax.set_yticks(y, [names[i] for i in shown], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(
        "influence (mean target margin with the class minus without)"
        + ("; bars: ± 1 standard error" if stderr is not None else "")
    )
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def image_grid(
    path: str | Path, images: Sequence[np.ndarray], captions: Sequence[str], title: str, columns: int = 8
) -> Path:
    """Images (H x W x 3 uint8) in a grid with a caption under each."""
    if not len(images):
        raise ValueError(f"{path}: no images to show")
    rows = -(-len(images) // columns)
    columns = min(columns, len(images))
    plt = _pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def accuracy_versus_removed(
    path: str | Path,
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    baseline: Sequence[float],
    title: str,
    changes: Mapping[str, Mapping[int, Mapping]] | None = None,
) -> Path:
    """Target accuracy against the number of source classes removed, one line per way of choosing them
    (mean and standard error over seeds), the full source set as a dashed band; with `changes`
    (`counterfactual.changes_against_all`) a second panel: each arm's change against the full source set,
    seed by seed, where the spread across initial weights cancels."""
    plt = _pyplot()
    paired = bool(changes) and any(g["mean"] is not None for by_k in changes.values() for g in by_k.values())
    fig, axes = plt.subplots(1, 1 + paired, figsize=(6.0 * (1 + paired), 4.0), squeeze=False)
    ax = axes[0, 0]
    if len(baseline):
        mean, err = np.mean(baseline), _stderr(baseline)
        ax.axhline(mean, color="grey", linestyle="--", label=f"all classes ({len(baseline)} models)")
        ax.axhspan(mean - err, mean + err, color="grey", alpha=0.15)
    _lines(ax, {label: {k: (np.mean(v), _stderr(v)) for k, v in by_k.items()} for label, by_k in curves.items()})
    ax.set_ylabel("target test accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if paired:
        ax = axes[0, 1]
        ax.axhline(0, color="grey", linestyle="--", label="all classes")
        _lines(
            ax,
            {
                label: {k: (g["mean"], g["stderr"] or 0.0) for k, g in by_k.items() if g["mean"] is not None}
                for label, by_k in changes.items()
            },
        )
        ax.set_ylabel("change in target accuracy")
        ax.set_title("against all classes, seed by seed (same initial weights)", fontsize=10)
        fig.subplots_adjust(wspace=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _lines(ax, points: Mapping[str, Mapping[int, tuple[float, float]]]) -> None:
    """One errorbar line per way of removing classes: {label: {k: (mean, standard error)}}."""
    for offset, (label, by_k) in zip(np.linspace(-0.08, 0.08, max(len(points), 1)), points.items()):
        ks = sorted(by_k)
        ax.errorbar(
            np.add(ks, offset),
            [by_k[k][0] for k in ks],
            yerr=[by_k[k][1] for k in ks],
            marker="o",
            capsize=3,
            label=f"without the k {label.replace('_', ' ')}",
        )
    every_k = sorted({k for by_k in points.values() for k in by_k})
    if every_k:
        ax.set_xticks(every_k)
        ax.set_xlim(every_k[0] - 0.5, every_k[-1] + 0.5)
    ax.set_xlabel("source classes removed (k)")


def _stderr(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
