"""The planted-leak trial, in memory: can example-level influence find copies of target test images that were
planted in the source set? `run_trial` is the whole trial: `tests/test_leakage.py`
asserts it on one data draw; `benchmarks/bench_leaks.py` sweeps draws and training lengths and says how
often each kind of copy is found.

The leaked test images are atypical (their class motif removed), so a model places them in their class only
if it trained on their copy, labelled with the class's twin; without the copy it places them in the source
background class (no class motif either), not in the twin's by chance. Models are warm-started: one
backbone trained on the regular source images (no copy; the best of a few on validation, as a single short
run on 240 images sometimes fails to learn), then one copy of it per example mask, each trained further on
its own examples (example routing, the grouped backend), then cached-feature transfer. Images are drawn at
half resolution (`pixel_scale` 2): smooth, so that what a model memorises of a resampled copy also holds
for the original (docs/planted-data.md, docs/benchmarks.md#leak-detection)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch

from ffcv_transfer.engine.data import MEAN, STD
from ffcv_transfer.writers.synthetic import PlantedSpec

# copies: exact, downsampled to 3/4 and back, a 15/16 crop resized back (kinds in turn); 2 more mislabelled
LEAKY = PlantedSpec(
    num_targets=3,
    num_unrelated=0,
    num_misleading=0,
    resolution=32,
    source_train_per_class=60,
    source_val_per_class=5,
    target_train_per_class=50,
    target_test_per_class=10,
    motif_amplitude=1.2,
    noise=0.05,
    background_class=True,
    source_background=True,
    misleading_conflict="none",
    leaks=6,
    mislabelled_leaks=2,
    atypical_leaks=True,
    leak_downsample=0.75,
    leak_crop=0.9375,
    pixel_scale=2,
)


@dataclass(frozen=True)
class TrialRecipe:
    width: float = 0.125
    batch_size: int = 32
    pretrain_candidates: int = 3
    pretrain_epochs: int = 15
    epochs: int = 6  # of each model on its own examples


def normalised(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> normalised float (n, 3, H, W), in the CPU's layout (NCHW)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    return (
        (x - torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        / torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    ).contiguous()


class ShuffledBatches:
    """In-memory epochs: each iteration a new shuffle of (images, labels, example indices) batches with
    random left-right flips, drawn from `rng`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, size: int):
        self.x, self.y, self.rng, self.size = x, y, rng, size

    def __len__(self) -> int:
        return -(-len(self.y) // self.size)

    def __iter__(self):
        for pick in np.array_split(self.rng.permutation(len(self.y)), len(self)):
            keys = torch.as_tensor(pick)
            flip = torch.as_tensor(self.rng.random(len(pick)) < 0.5)[:, None, None, None]
            yield torch.where(flip, self.x[keys].flip(3), self.x[keys]), self.y[keys], keys


def train_and_transfer(
    data: dict, masks: np.ndarray, seed: int, recipe: TrialRecipe = TrialRecipe()
) -> tuple[np.ndarray, list[float]]:
    """Warm-started models, one per row of the (N, E) example `masks`, on `make_planted` data. Returns their
    (N, T) target test margins and their source validation accuracies."""
    from ffcv_transfer.engine.grouped import GroupedTrainer
    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.train import SequentialTrainer
    from ffcv_transfer.engine.transfer import transfer_cached_features
    from ffcv_transfer.settings import SourceConfig, TransferConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = data["source_train"]
    num_classes = int(labels.max()) + 1
    x, y = normalised(images), torch.as_tensor(labels)
    batches = ShuffledBatches(x, y, rng, recipe.batch_size)
    val = [(normalised(data["source_val"][0]), torch.as_tensor(data["source_val"][1]))]
    regular = np.zeros((recipe.pretrain_candidates, len(y)), bool)
    regular[:, : len(y) - len(data["design"]["leaks"])] = True
    candidates = [build_model(num_classes, stem="small", width=recipe.width) for _ in regular]
    pretrain = SequentialTrainer(
        candidates,
        regular,
        SourceConfig(
            batch_size=recipe.batch_size,
            epochs=recipe.pretrain_epochs,
            lr=0.1,
            lr_peak_epoch=2,
            weight_decay=5e-4,
            precision="fp32",
        ),
        len(batches),
        example_labels=labels,
    )
    pretrain.fit(batches, recipe.pretrain_epochs)
    base = candidates[int(np.argmax(pretrain.accuracy(val)))]
    models = [copy.deepcopy(base) for _ in masks]
    config = SourceConfig(
        batch_size=recipe.batch_size,
        epochs=recipe.epochs,
        lr=0.05,
        lr_peak_epoch=1,
        weight_decay=5e-4,
        precision="fp32",
    )
    trainer = GroupedTrainer(models, masks, config, len(batches), example_labels=labels)
    trainer.fit(batches, recipe.epochs)
    if trainer.failed:
        raise RuntimeError(f"models {sorted(trainer.failed)} diverged")
    target = [
        (normalised(data[split][0]), torch.as_tensor(data[split][1])) for split in ("target_train", "target_test")
    ]
    outputs = transfer_cached_features(
        models,
        [target[0]],
        [target[1]],
        int(target[0][1].max()) + 1,
        TransferConfig(mode="cached_features", precision="fp32"),
    )
    return np.stack([o.margins.numpy() for o in outputs]), trainer.accuracy(val)


def copy_ranks(influence: np.ndarray, leaks: list[dict]) -> list[dict]:
    """Each planted copy's rank among the source images of its target image's influence column: from the
    most positive for a leak (1 = most positive), from the most negative for a mislabelled copy."""
    ranks = []
    for leak in leaks:
        column = influence[:, leak["target_test"]]
        value = column[leak["source"]]
        beaten = (column > value) if leak["role"] == "leak" else (column < value)
        ranks.append(
            {
                "kind": leak["kind"],
                "role": leak["role"],
                "rank": int(beaten.sum()) + 1,
                "influence": round(float(value), 3),
            }
        )
    return ranks


@dataclass
class TrialOutcome:
    leaks: list[dict]  # the planted copies (make_planted's design["leaks"])
    influence: np.ndarray  # (E, T) example influence
    found: dict[str, list[dict]]  # leakage.flag_examples, without the unconfirmed "misleading" candidates
    val_accuracy: list[float]  # each model's source validation accuracy

    @property
    def ranks(self) -> list[dict]:
        return copy_ranks(self.influence, self.leaks)

    @property
    def false_flags(self) -> set[tuple[int, int]]:
        """Flagged (source, target) pairs that are not planted copies."""
        planted = {(leak["source"], leak["target_test"]) for leak in self.leaks}
        return {(f["source"], f["target"]) for f in self.found["leakage"] + self.found["mislabelled"]} - planted


def run_trial(
    seed: int,
    models: int = 32,
    recipe: TrialRecipe = TrialRecipe(),
    kinds: tuple[str, ...] | None = None,
    top: int | None = None,
) -> TrialOutcome:
    """The planted data of `seed` (copy kinds `kinds`, LEAKY's by default), `models` models on random halves
    of its source examples, their example influence, and the pairs `leakage.flag_examples` flags (`top`:
    its default unless given)."""
    from ffcv_transfer.findings import leakage
    from ffcv_transfer.findings.kernel import example_influence
    from ffcv_transfer.store.masks import random_example_masks
    from ffcv_transfer.writers.synthetic import make_planted

    data = make_planted(replace(LEAKY, leak_kinds=kinds) if kinds else LEAKY, seed=seed)
    (images, labels), (test_images, _) = data["source_train"], data["target_test"]
    masks = random_example_masks(models, len(labels), 0.5, seed=seed)
    margins, val_accuracy = train_and_transfer(data, masks, seed, recipe)
    influence = example_influence(np.packbits(masks, axis=1), margins.astype(np.float64), len(labels))
    found = leakage.flag_examples(
        influence, images.__getitem__, test_images.__getitem__, candidates=0, **({"top": top} if top else {})
    )
    return TrialOutcome(data["design"]["leaks"], influence, found, val_accuracy)
