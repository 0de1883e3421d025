"""Random subsets of the source classes (or examples), one per source model."""

from __future__ import annotations

import numpy as np

from ffcv_transfer.settings import MaskConfig


def _rng(seed: int, first_row: int) -> np.random.Generator:
    """The draw of rows first_row, first_row + 1, ...: rows added to a store later get draws of their own."""
    return np.random.default_rng(seed if first_row == 0 else [seed, first_row])


def random_class_masks(num_models: int, num_classes: int, alpha: float, seed: int, first_row: int = 0) -> np.ndarray:
    """(N, C) bool: each model includes exactly round(alpha * C) classes drawn without replacement."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must lie strictly between 0 and 1")
    rng = _rng(seed, first_row)
    chosen = np.argsort(rng.random((num_models, num_classes)), axis=1)[:, : round(alpha * num_classes)]
    masks = np.zeros((num_models, num_classes), bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return masks


def orthogonal_class_masks(num_models: int, num_classes: int, seed: int) -> np.ndarray:
    """(N, C) bool, columns of a two-level orthogonal design: each class is in exactly N/2 models and,
    for any two classes, each of the four in/out combinations occurs in exactly N/4 models. So the
    included-minus-excluded mean of one class is not shifted by the additive effects of the others,
    which random subsets only achieve on average. With C <= N/2 the columns are the odd parities of
    log2(N) base factors (a resolution IV design): neither is it shifted by two-class interactions.

    Column j is the parity of (model index AND a bit pattern s_j); patterns of odd weight come first.
    Of several random choices of patterns and of which half holds each class (up to 256, fewer for big
    designs, whose subset sizes concentrate anyway), the one whose models' subset sizes stay closest to
    C/2 is kept, so that no model trains on no class or on all of them where that can be avoided."""
    bits = num_models.bit_length() - 1
    if num_models < 4 or num_models != 1 << bits:
        raise ValueError(f"an orthogonal design needs a power of two >= 4 models, got {num_models}")
    if num_classes > num_models - 1:
        raise ValueError(
            f"an orthogonal design of {num_models} models holds at most {num_models - 1} classes, "
            f"got {num_classes}; raise masks.num_models"
        )
    rng = np.random.default_rng(seed)
    patterns = np.arange(1, num_models)
    odd = np.bitwise_count(patterns) % 2 == 1
    best, spread = None, np.inf
    for _ in range(max(1, min(256, 2**22 // (num_models * num_classes)))):
        chosen = np.concatenate([rng.permutation(patterns[odd]), rng.permutation(patterns[~odd])])[:num_classes]
        masks = (np.bitwise_count(np.arange(num_models)[:, None] & chosen) % 2 == 1) ^ (rng.random(num_classes) < 0.5)
        deviation = np.abs(masks.sum(1) - num_classes / 2).max()
        if deviation < spread:
            best, spread = masks, deviation
    return best[rng.permutation(num_models)]


def class_masks(config: MaskConfig, num_classes: int) -> np.ndarray:
    if config.design == "orthogonal":
        return orthogonal_class_masks(config.num_models, num_classes, config.seed)
    return random_class_masks(config.num_models, num_classes, config.alpha, config.seed)


def random_example_masks(num_models: int, num_examples: int, alpha: float, seed: int, first_row: int = 0) -> np.ndarray:
    """(N, E) bool over source *examples* (example-level influence): each model includes exactly
    round(alpha * E) examples drawn without replacement. Store it packed: np.packbits(masks, axis=1)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must lie strictly between 0 and 1")
    rng = _rng(seed, first_row)
    masks = np.zeros((num_models, num_examples), bool)
    for row in masks:
        row[rng.choice(num_examples, round(alpha * num_examples), replace=False)] = True
    return masks
