"""The worker: claim pending rows of a store, train their source models K at a time on one shared
loader, transfer each to the target (cached features), and write the outputs; rows whose model
diverged are marked failed with the reason. Run it any number of times, in any number of processes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import ImageLoader, LoaderConfig
from .models import build_model
from .store import ResultStore
from .train import FusedTrainer, OptimConfig
from .transfer import HeadConfig, TransferOutputs, transfer_cached_features

OUTPUT_SCHEMA = {"margins": "float16", "is_correct": "bool", "predictions": "int16"}


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


@dataclass(frozen=True)
class WorkerConfig:
    source_train: str
    source_val: str
    target_train: str
    target_test: str
    resolution: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    stem: str = "small"
    width: float = 0.125
    models_per_process: int = 8
    device: str = "cpu"
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


def _eval_loader(beton: str, config: WorkerConfig, classes: Sequence[int] | None = None) -> ImageLoader:
    loader = replace(config.loader, order="sequential", drop_last=False)
    return ImageLoader(beton, train=False, resolution=config.resolution, config=loader, device=config.device,
                       classes=classes, crop_ratio=1.0)


def train_rows(store: ResultStore, rows: Sequence[int], config: WorkerConfig
               ) -> tuple[dict[int, str], list[float], list[TransferOutputs]]:
    """Train and transfer the models of `rows`: (failures by row, source accuracies, transfer outputs)."""
    from beton_writers.common import read_sidecar

    masks = np.asarray(store.fixed("masks")[list(rows)])
    num_source = masks.shape[1]
    num_target = read_sidecar(config.target_train)["num_classes"]
    union = np.flatnonzero(masks.any(axis=0))
    train = ImageLoader(config.source_train, train=True, resolution=config.resolution, config=config.loader,
                        device=config.device, classes=union, crop_scale=config.crop_scale)
    models = [build_model(num_source, stem=config.stem, width=config.width, device=config.device) for _ in rows]
    trainer = FusedTrainer(models, masks, config.optim, steps_per_epoch=len(train), device=config.device)
    for epoch in range(config.optim.epochs):
        trainer.train_epoch(train, epoch)
    source_acc = trainer.accuracy(_eval_loader(config.source_val, config, union))
    outputs = transfer_cached_features(models, _eval_loader(config.target_train, config),
                                       _eval_loader(config.target_test, config), num_target, config.head)
    return {rows[k]: reason for k, reason in trainer.failed.items()}, source_acc, outputs


def run_worker(store_dir: str | Path, config: WorkerConfig, rows: Sequence[int] | None = None) -> int:
    """Claim and complete rows K at a time until none is pending; returns how many were written."""
    store = ResultStore(store_dir)
    writer = store.writer()
    written = 0
    try:
        while claimed := writer.claim(config.models_per_process, rows=rows):
            failures, source_acc, outputs = train_rows(store, claimed, config)
            good = [k for k, row in enumerate(claimed) if row not in failures]
            for row, reason in failures.items():
                writer.fail(row, reason)
            if good:
                writer.write_many(
                    [claimed[k] for k in good],
                    margins=np.stack([outputs[k].margins.cpu().numpy() for k in good]).astype(np.float16),
                    is_correct=np.stack([outputs[k].is_correct.cpu().numpy() for k in good]),
                    predictions=np.stack([outputs[k].predictions.cpu().numpy() for k in good]).astype(np.int16),
                    source_acc=np.array([source_acc[k] for k in good], np.float32),
                    target_acc=np.array([outputs[k].accuracy for k in good], np.float32))
                written += len(good)
    finally:
        writer.close()
    return written
