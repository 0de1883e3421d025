"""Random class subsets, one per source model, and the store that will hold every model's results."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .options import option
from .store import ResultStore

OUTPUT_SCHEMA = {"margins": "float16", "is_correct": "bool", "predictions": "int16"}


@dataclass(frozen=True)
class MaskConfig:
    num_models: int = option(64, "source models (rows of the store)")
    alpha: float = option(0.5, "fraction of the source classes in each model's training set")
    seed: int = option(0, "seed of the random subsets")

    def __post_init__(self) -> None:
        if self.num_models < 1:
            raise ValueError(f"masks.num_models must be >= 1, got {self.num_models}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"masks.alpha {self.alpha} must lie strictly between 0 and 1")


def random_class_masks(num_models: int, num_classes: int, alpha: float, seed: int) -> np.ndarray:
    """(N, C) bool: each model includes exactly round(alpha * C) classes drawn without replacement."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((num_models, num_classes)), axis=1)[:, : round(alpha * num_classes)]
    masks = np.zeros((num_models, num_classes), bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return masks


def create_store(path: str | Path, masks: np.ndarray, num_target_test: int) -> ResultStore:
    """A store with one row per model: its class mask (fixed), then per target test example its margin,
    correctness and prediction, plus source and target accuracy."""
    schema = {name: ((num_target_test,), dtype) for name, dtype in OUTPUT_SCHEMA.items()}
    schema |= {"source_acc": ((), "float32"), "target_acc": ((), "float32")}
    return ResultStore.create(path, len(masks), schema, fixed={"masks": masks})
