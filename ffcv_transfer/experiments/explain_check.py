"""The check behind `ffcv-transfer explain --check`: retrain with every source class and without the one
that most hurts a target test example, and see how often that example is then predicted correctly."""

from __future__ import annotations

from pathlib import Path

from ffcv_transfer.experiments.removals import run_removals, without_class_design
from ffcv_transfer.findings.counterfactual import correct_by_removal


def check_without_class(
    out_dir: str | Path,
    experiment,
    num_classes: int,
    example: int,
    source_class: int,
    repeats: int,
    progress: bool = True,
    target: str | None = None,
    mode: str | None = None,
) -> dict[str, float]:
    """Train `repeats` models on all `num_classes` source classes and `repeats` without `source_class`, into
    the removal store OUT_DIR/check_EXAMPLE_without_CLASS (rerunning resumes), transferred to `target` in
    `mode` (defaults: the first), and return how often each kind predicts that target's test example
    `example` correctly (`correct_by_removal`: with, without, models)."""
    masks, removals = without_class_design(num_classes, source_class, repeats)
    path = Path(out_dir) / f"check_{example}_without_{source_class}"
    store = run_removals(path, experiment, masks, removals, progress=progress, target=target, mode=mode)
    return correct_by_removal(store, example)
