"""The worker: claim pending rows of a store, train their source models K at a time on one shared
loader, transfer each to the target in each of the experiment's transfer modes, and write the outputs; rows whose model diverged are marked failed
with the reason. Run it any number of times, in any number of processes: completed rows are skipped and
rows of a killed worker are taken over."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoints import checkpoint_path, save_checkpoint
from .config import Experiment
from .data import Upsampled
from .experiment_store import (EXAMPLE_MASKS, MASKS, OUTPUT_SCHEMA, check_inputs, example_masks_of, init_seed,
                               transfer_field, transfer_seed)
from .grouped import GroupedTrainer
from .loader_cache import LoaderCache
from .models import build_model
from .store import ResultStore, worker_name
from .train import SequentialTrainer, source_resolution
from .transfer import TransferOutputs, transfer_by_training, transfer_cached_features

TRAINERS = {"sequential": SequentialTrainer, "grouped": GroupedTrainer}  # by settings.FUSIONS

Transfers = dict[str, TransferOutputs]  # by transfer mode


def train_rows(store: ResultStore, rows: Sequence[int], experiment: Experiment, loaders: LoaderCache,
               on_epoch: Callable[[str], None] = lambda stage: None
               ) -> tuple[dict[int, str], dict[int, tuple[float, Transfers]]]:
    """Train and transfer the models of `rows`: (failures by row, (source accuracy, outputs by transfer
    mode) by row).
    A store with example masks (experiment_store.create_example_store) trains each model on its examples."""
    source, device = experiment.source, experiment.run.device
    masks = np.asarray(store.fixed(MASKS)[list(rows)])
    union = np.flatnonzero(masks.any(axis=0))
    models = []
    for row in rows:  # each model's initial weights from its row's seed, whatever else this process ran
        torch.manual_seed(init_seed(store, row, experiment.masks.seed))
        models.append(build_model(masks.shape[1], **asdict(experiment.model), device=device))
    trainer_class = TRAINERS[experiment.run.fusion]
    if experiment.run.compile != "none":  # validated: the grouped fusion
        trainer_class = partial(trainer_class, compile=experiment.run.compile)
    if EXAMPLE_MASKS in store.fixed_names:  # route on example indices; the loader reads the union of the K subsets
        from beton_writers.common import read_labels

        labels = read_labels(experiment.data.path("source_train"))
        examples = example_masks_of(store, len(labels), rows)
        train = loaders.get(experiment, "source_train", train=True, resolution=source.min_res,
                            batch_size=source.batch_size, crop_min_scale=source.crop_min_scale,
                            indices=np.flatnonzero(examples.any(axis=0)))
        trainer = trainer_class(models, examples, source, steps_per_epoch=len(train), device=device, example_labels=labels)
    else:
        train = loaders.get(experiment, "source_train", train=True, resolution=source.min_res,
                            batch_size=source.batch_size, crop_min_scale=source.crop_min_scale, classes=union)
        trainer = trainer_class(models, masks, source, steps_per_epoch=len(train), device=device)
    trainer.fit(train, source.epochs, resolution=source_resolution(source), on_epoch=on_epoch, stage="source epoch")
    failures = {rows[k]: f"source training: {reason}" for k, reason in trainer.failed.items()}
    alive = [k for k in range(len(rows)) if rows[k] not in failures]
    if not alive:
        return failures, {}
    source_acc = trainer.accuracy(loaders.get(experiment, "source_val", train=False, resolution=source.val_res,
                                              batch_size=source.batch_size, crop_ratio=source.val_crop_ratio,
                                              classes=union), among_own=source.val_accuracy == "own_classes")
    if experiment.run.checkpoints:  # before transfer, which changes the models
        for k in alive:
            save_checkpoint(checkpoint_path(store.path, rows[k]), models[k], masks[k], rows[k])
    modes = experiment.transfer.modes
    by_mode: dict[str, list[TransferOutputs]] = {}
    for n, mode in enumerate(modes):  # the last mode may change the models; the others get copies
        transferred = [models[k] if n == len(modes) - 1 else copy.deepcopy(models[k]) for k in alive]
        torch.manual_seed(transfer_seed(store, rows[alive[0]], experiment.masks.seed, mode))
        by_mode[mode], transfer_failures = transfer_models(transferred, experiment, loaders, on_epoch, mode)
        for k, reason in transfer_failures.items():
            failures.setdefault(rows[alive[k]], f"transfer ({mode}): {reason}")
    results = {rows[k]: (source_acc[k], {mode: by_mode[mode][i] for mode in modes})
               for i, k in enumerate(alive) if rows[k] not in failures}
    return failures, results


def transfer_models(models: list, experiment: Experiment, loaders: LoaderCache, on_epoch: Callable[[str], None],
                    mode: str | None = None) -> tuple[list[TransferOutputs], dict[int, str]]:
    """Each model transferred to the experiment's target in `mode` (default: its first transfer mode):
    (test outputs, failures by index). fixed_feature and full_finetune change the models."""
    from beton_writers.common import read_sidecar

    config = experiment.transfer.for_mode(mode or experiment.transfer.modes[0])
    num_classes = read_sidecar(experiment.data.path("target_train"))["num_classes"]

    def target(split: str, train: bool, **crops):
        """Decoded at upsample_from px and upsampled on the device when set, else at the resolution."""
        loader = loaders.get(experiment, split, train=train, resolution=config.upsample_from or config.resolution,
                             batch_size=config.batch_size, normalization=config.normalization, **crops)
        return Upsampled(loader, config.resolution) if config.upsample_from else loader

    test = target("target_test", False, crop_ratio=config.test_crop_ratio)
    if config.mode == "cached_features":
        train = target("target_train", False, crop_ratio=config.test_crop_ratio)
        outputs = transfer_cached_features(models, train, test, num_classes, config)
        on_epoch("transfer (cached_features)")
        return outputs, {}
    train = target("target_train", True, crop_min_scale=config.crop_min_scale)
    return transfer_by_training(models, train, test, num_classes, config, steps_per_epoch=len(train),
                                device=experiment.run.device, on_epoch=on_epoch)


def run_worker(store_dir: str | Path, experiment: Experiment, rows: Sequence[int] | None = None,
               progress: bool = True, label: str | None = None, loaders: LoaderCache | None = None) -> int:
    """Claim and complete rows K at a time until none is pending; returns how many were written.
    `label` starts this worker's name in the store (`store status` lists workers by name); `loaders`
    (default: a new LoaderCache) lets successive runs in one process share their loaders."""
    from tqdm import tqdm

    store = ResultStore(store_dir)
    check_inputs(store, experiment)
    loaders = loaders or LoaderCache()
    writer = store.writer(worker_name(label))
    todo = _pending(store, rows)
    bar = tqdm(total=len(todo), unit="model", disable=not progress, dynamic_ncols=True)
    start, written = time.monotonic(), 0

    def on_epoch(stage: str) -> None:
        writer.heartbeat()
        bar.set_description(f"rows {claimed[0]}-{claimed[-1]}: {stage}", refresh=True)
        if not progress:  # a line per stage for logs (the local launcher shows each worker's latest)
            print(f"rows {claimed[0]}-{claimed[-1]}: {stage}", flush=True)

    try:
        while claimed := writer.claim(experiment.run.models_per_process, rows=rows):
            failures, results = train_rows(store, claimed, experiment, loaders, on_epoch)
            for row, reason in failures.items():
                writer.fail(row, reason)
            if results:
                done = sorted(results)
                writer.write_many(done, **record_values(store, experiment, [results[r] for r in done]))
                written += len(done)
            bar.update(len(claimed))
            per_hour = 3600 * bar.n / (time.monotonic() - start)
            bar.set_postfix_str(f"{per_hour:.1f} models/h, {len(failures)} failed", refresh=True)
    finally:
        writer.close()
        bar.close()
    return written


def record_values(store: ResultStore, experiment: Experiment, results: list[tuple[float, Transfers]]
                   ) -> dict[str, np.ndarray]:
    """The store's fields for each (source accuracy, outputs by mode); a store made before a field existed
    gets the fields it has."""
    modes = experiment.transfer.modes
    values = {"source_acc": np.array([acc for acc, _ in results], np.float32)}
    for mode in modes:
        outputs = [by_mode[mode] for _, by_mode in results]
        field = partial(transfer_field, modes=modes, mode=mode)
        values[field("target_acc")] = np.array([out.accuracy for out in outputs], np.float32)
        values[field("target_mean_class_acc")] = np.array([out.mean_class_accuracy for out in outputs], np.float32)
        for name in OUTPUT_SCHEMA:
            values[field(name)] = np.stack([getattr(out, name).cpu().numpy() for out in outputs])
    return {name: value for name, value in values.items() if name in store.schema}


def _pending(store: ResultStore, rows: Sequence[int] | None) -> list[int]:
    done = set(store.completed_rows().tolist()) | set(store.failures())
    return [r for r in (range(store.num_rows) if rows is None else rows) if r not in done]
