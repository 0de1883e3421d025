"""Removal experiments: retrain on the full source set minus chosen classes and see what the target gains.

The paper's test of the influences: drop the k most negative source classes (by mean influence over the
target test set) and target accuracy rises; drop the k most positive and it falls; k random classes are
the control. Each row of a removal store is one model with its removal recorded beside its mask (fixed
array `removal`: kind, k, seed), trained by the same worker as any experiment. The models of one seed
start from the same initial weights (the store's init seeds), so arms are compared in pairs
(`ffcv_transfer.findings.counterfactual` reads them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ffcv_transfer.config import ConfigError, Experiment
from ffcv_transfer.findings.counterfactual import KINDS
from ffcv_transfer.store.experiment import MASKS, REMOVAL, create_store, read_sidecars
from ffcv_transfer.store.results import ResultStore, StoreError


def removal_design(
    scores: np.ndarray,
    ks: Sequence[int],
    seeds: int,
    kinds: Sequence[str] = ("most_negative", "most_positive", "random"),
    chosen: Sequence[int] = (),
    baseline: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks (rows, C) and removals (rows, 3: kind index, k, seed): for each seed, one model on every class
    (unless `baseline` is False) and one per (kind, k) without its k classes, and with `chosen` one more
    without those classes (kind "chosen", e.g. a planted harmful class). `scores`: each source class's mean
    influence (only the most_negative and most_positive kinds read it). The random
    classes are dealt from shuffled decks (`balanced_draws`), so over the seeds every class is removed
    equally often, give or take one."""
    scores = np.asarray(scores, float)
    num_classes = len(scores)
    unknown = [kind for kind in kinds if kind not in KINDS[1:4]]
    if unknown:
        raise ValueError(f"unknown removal kinds {unknown}; choose from {list(KINDS[1:4])}")
    if not ks or min(ks) < 1 or max(ks) >= num_classes:
        raise ValueError(
            f"each k must lie in 1..{num_classes - 1} (the source set has {num_classes} classes), got {list(ks)}"
        )
    if seeds < 1:
        raise ValueError(f"need at least one seed, got {seeds}")
    ascending = np.argsort(scores, kind="stable")
    random = {k: balanced_draws(num_classes, k, seeds, np.random.default_rng([0, k])) for k in ks}
    masks, removals = [], []
    for seed in range(seeds):
        if baseline:
            masks.append(np.ones(num_classes, bool))
            removals.append((0, 0, seed))
        for kind in kinds:
            for k in ks:
                removed = {
                    "most_negative": ascending[:k],
                    "most_positive": ascending[::-1][:k],
                    "random": random[k][seed],
                }[kind]
                masks.append(~np.isin(np.arange(num_classes), removed))
                removals.append((KINDS.index(kind), k, seed))
        if len(chosen):
            masks.append(~np.isin(np.arange(num_classes), chosen))
            removals.append((KINDS.index("chosen"), len(chosen), seed))
    return np.stack(masks), np.array(removals, np.int64)


def balanced_draws(num_classes: int, k: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, k) classes, k distinct ones per draw, dealt in order from decks of all the classes, each deck
    shuffled anew and laid under what is left of the last: every class comes up equally often over the
    draws, give or take one. The random arm's mean over seeds then averages over the classes rather than
    over chance picks that may miss the harmful or the helpful ones (stratified sampling); the first
    draws do not depend on how many follow."""
    deck: list[int] = []
    dealt = []
    for _ in range(draws):
        hand: list[int] = []
        while len(hand) < k:
            usable = [c for c in deck if c not in hand]
            if not usable:
                deck += rng.permutation(num_classes).tolist()
                continue
            deck.remove(usable[0])
            hand.append(usable[0])
        dealt.append(hand)
    return np.array(dealt, np.int64).reshape(draws, k)


def without_class_design(num_classes: int, source_class: int, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """`repeats` models on every class and `repeats` without `source_class` (the debugging check)."""
    if not 0 <= source_class < num_classes:
        raise ValueError(f"source class {source_class} is not in 0..{num_classes - 1}")
    without = np.ones(num_classes, bool)
    without[source_class] = False
    masks = np.stack([np.ones(num_classes, bool)] * repeats + [without] * repeats)
    removals = np.array([(0, 0, r) for r in range(repeats)] + [(KINDS.index("chosen"), 1, r) for r in range(repeats)])
    return masks, removals


def run_removals(
    path: str | Path,
    experiment: Experiment,
    masks: np.ndarray,
    removals: np.ndarray,
    progress: bool = True,
    train: Callable[[Path, Experiment], None] | None = None,
    target: str | None = None,
    mode: str | None = None,
) -> ResultStore:
    """Create the removal store at `path` (kept when it exists: rerunning resumes) and train its rows with
    the experiment's recipe, transferred to `target` (default: the first) in `mode` (default: that target's
    first transfer mode), whose accuracy the arms compare, by `train(path, experiment)` when given (e.g.
    launched workers), else by a worker in this process (engine.worker.run_worker, on the one claim loop);
    returns the store."""
    from ffcv_transfer.engine.worker import run_worker

    chosen = experiment.target(target)
    if mode is not None and mode not in chosen.transfer.modes:
        raise ConfigError(f"--mode {mode}: target {chosen.name} is transferred {', '.join(chosen.transfer.modes)}")
    experiment = experiment.for_target(chosen.name, mode or chosen.transfer.modes[0])
    path = Path(path)
    if not (path / "spec.json").exists():
        num_test = read_sidecars(experiment)["target_test"]["num_examples"]
        create_store(
            path, masks, num_test, extra_fixed={REMOVAL: removals}, init_seeds=removals[:, 2], experiment=experiment
        )
    store = ResultStore(path)
    if not np.array_equal(store.fixed(MASKS), masks):
        raise StoreError(f"{path}: holds a different removal design; choose another folder")
    if train is None:
        run_worker(path, experiment, progress=progress)
    else:
        train(path, experiment)
    return store


def run_counterfactual(
    influence: np.ndarray,
    out: str | Path,
    experiment: Experiment,
    ks: Sequence[int],
    seeds: int,
    kinds: Sequence[str] = ("most_negative", "most_positive", "random"),
    progress: bool = True,
    target: str | None = None,
    mode: str | None = None,
) -> ResultStore:
    """The paper's counterfactual of an influence matrix (C, T) of `target`'s test set in `mode`:
    `removal_design` over each source class's mean influence, trained into OUT/counterfactual and scored
    on that target and mode (`run_removals`: a rerun resumes)."""
    masks, removals = removal_design(np.asarray(influence).mean(1), ks, seeds, kinds)
    path = Path(out) / "counterfactual"
    return run_removals(path, experiment, masks, removals, progress=progress, target=target, mode=mode)
