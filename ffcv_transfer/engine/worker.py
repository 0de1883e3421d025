"""The worker: claim pending rows of a store, train their source models K at a time on one shared
loader, transfer each to every target of the experiment in each of its transfer modes, and write the
outputs; rows whose model diverged are marked failed with the reason.
Run it any number of times, in any number of processes: completed rows are skipped and rows of a killed
worker are taken over."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ffcv_transfer.config import Experiment
from ffcv_transfer.engine.checkpoints import save_checkpoint
from ffcv_transfer.engine.data import Upsampled
from ffcv_transfer.engine.grouped import GroupedTrainer
from ffcv_transfer.engine.loader_cache import LoaderCache
from ffcv_transfer.engine.models import build_model
from ffcv_transfer.engine.train import SequentialTrainer, source_resolution
from ffcv_transfer.engine.transfer import TransferOutputs, transfer_by_training, transfer_cached_features
from ffcv_transfer.store.experiment import (
    EXAMPLE_MASKS,
    MASKS,
    OUTPUT_SCHEMA,
    check_inputs,
    checkpoint_path,
    example_masks_of,
    init_seed,
    transfer_field,
    transfer_seed,
)
from ffcv_transfer.store.results import ResultStore, worker_name

TRAINERS = {"sequential": SequentialTrainer, "grouped": GroupedTrainer}  # by settings.FUSIONS

Transfers = dict[tuple[str, str], TransferOutputs]  # by (target name, transfer mode)


def train_rows(
    store: ResultStore,
    rows: Sequence[int],
    experiment: Experiment,
    loaders: LoaderCache,
    on_epoch: Callable[[str], None] = lambda stage: None,
) -> tuple[dict[int, str], dict[int, tuple[float, Transfers]]]:
    """Train and transfer the models of `rows`: (failures by row, (source accuracy, outputs by transfer)
    by row).
    A store with example masks (experiment_store.create_example_store) trains each model on its examples."""
    from ffcv_transfer.store.betons import read_labels

    source, device = experiment.source, experiment.run.device
    masks = np.asarray(store.fixed(MASKS)[list(rows)])
    union = np.flatnonzero(masks.any(axis=0))
    models = []
    for row in rows:  # each model's initial weights from its row's seed, whatever else this process ran
        torch.manual_seed(init_seed(store, row, experiment.masks.seed))
        models.append(build_model(masks.shape[1], **asdict(experiment.model), device=device))
    trainer_class = TRAINERS[experiment.run.fusion]
    if experiment.run.compile != "none":  # validated: static shapes
        trainer_class = partial(trainer_class, compile=experiment.run.compile)
    decoding = decoding_experiment(experiment, source.per_model_batch)  # validated: the sequential fusion
    labels = read_labels(experiment.data.path("source_train"))
    if EXAMPLE_MASKS in store.fixed_names:  # route on example indices; the loader reads the union of the K subsets
        examples = example_masks_of(store, len(labels), rows)
        train = loaders.get(
            decoding,
            "source_train",
            train=True,
            resolution=source.min_res,
            batch_size=source.batch_size,
            crop_min_scale=source.crop_min_scale,
            indices=np.flatnonzero(examples.any(axis=0)),
        )
        if source.per_model_batch:
            trainer_class = partial(trainer_class, examples_per_epoch=examples.sum(1))
        trainer = trainer_class(
            models, examples, source, steps_per_epoch=len(train), device=device, example_labels=labels
        )
    else:
        train = loaders.get(
            decoding,
            "source_train",
            train=True,
            resolution=source.min_res,
            batch_size=source.batch_size,
            crop_min_scale=source.crop_min_scale,
            classes=union,
        )
        if source.per_model_batch:
            counts = np.bincount(labels, minlength=masks.shape[1])
            trainer_class = partial(trainer_class, examples_per_epoch=masks.astype(np.int64) @ counts)
        trainer = trainer_class(models, masks, source, steps_per_epoch=len(train), device=device)
    trainer.fit(train, source.epochs, resolution=source_resolution(source), on_epoch=on_epoch, stage="source epoch")
    failures = {rows[k]: f"source training: {reason}" for k, reason in trainer.failed.items()}
    alive = [k for k in range(len(rows)) if rows[k] not in failures]
    if not alive:
        return failures, {}
    source_acc = trainer.accuracy(
        loaders.get(
            experiment,
            "source_val",
            train=False,
            resolution=source.val_res,
            batch_size=source.batch_size,
            crop_ratio=source.val_crop_ratio,
            classes=union,
        ),
        among_own=source.val_accuracy == "own_classes",
    )
    if experiment.run.checkpoints:  # before transfer, which changes the models
        for k in alive:
            save_checkpoint(checkpoint_path(store.path, rows[k]), models[k], masks[k], rows[k])
    transfers = experiment.transfers
    outputs: dict[tuple[str, str], list[TransferOutputs]] = {}
    for n, (target, mode) in enumerate(transfers):  # the last transfer may change the models; the others get copies
        transferred = [models[k] if n == len(transfers) - 1 else copy.deepcopy(models[k]) for k in alive]
        torch.manual_seed(transfer_seed(store, rows[alive[0]], experiment.masks.seed, mode, target))
        outputs[target, mode], transfer_failures = transfer_models(
            transferred, experiment, loaders, on_epoch, mode, target
        )
        for k, reason in transfer_failures.items():
            failures.setdefault(rows[alive[k]], f"transfer ({target}, {mode}): {reason}")
    results = {
        rows[k]: (source_acc[k], {pair: outputs[pair][i] for pair in transfers})
        for i, k in enumerate(alive)
        if rows[k] not in failures
    }
    return failures, results


def transfer_models(
    models: list,
    experiment: Experiment,
    loaders: LoaderCache,
    on_epoch: Callable[[str], None],
    mode: str | None = None,
    target: str | None = None,
) -> tuple[list[TransferOutputs], dict[int, str]]:
    """Each model transferred to the experiment's target `target` (default: its first) in `mode`
    (default: the target's first transfer mode): (test outputs, failures by index). fixed_feature and
    full_finetune change the models."""
    from ffcv_transfer.store.betons import read_sidecar

    chosen = experiment.target(target)
    config = chosen.transfer.for_mode(mode or chosen.transfer.modes[0])
    sidecar = read_sidecar(chosen.path(experiment.data.root, "target_train"))
    report = on_epoch if len(experiment.targets) == 1 else (lambda stage: on_epoch(f"{chosen.name}: {stage}"))
    decoding = decoding_experiment(experiment, config.per_model_batch)

    def loader(split: str, train: bool, **crops):
        """Decoded at upsample_from px and upsampled on the device when set, else at the resolution."""
        made = loaders.get(
            decoding,
            split,
            train=train,
            resolution=config.upsample_from or config.resolution,
            batch_size=config.batch_size,
            normalization=config.normalization,
            target=chosen,
            **crops,
        )
        return Upsampled(made, config.resolution) if config.upsample_from else made

    test = loader("target_test", False, crop_ratio=config.test_crop_ratio)
    if config.mode == "cached_features":
        train = loader("target_train", False, crop_ratio=config.test_crop_ratio)
        outputs = transfer_cached_features(models, train, test, sidecar["num_classes"], config)
        report("transfer (cached_features)")
        return outputs, {}
    crops = (
        dict(crop_min_scale=config.crop_min_scale)
        if config.train_crop == "random_resized"
        else dict(crop_min_scale=None, crop_ratio=config.test_crop_ratio)
    )
    train = loader("target_train", True, **crops)
    return transfer_by_training(
        models,
        train,
        test,
        sidecar["num_classes"],
        config,
        steps_per_epoch=len(train),
        device=experiment.run.device,
        on_epoch=report,
        examples_per_epoch=sidecar["num_examples"],
        compile=experiment.run.compile if config.per_model_batch else "none",
    )


def decoding_experiment(experiment: Experiment, per_model_batch: int) -> Experiment:
    """The experiment whose training loaders feed per-model queues (`per_model_batch` > 0): every example
    decoded, as each model drops the rest of its own queue at an epoch's end; else `experiment`."""
    return replace(experiment, loader=replace(experiment.loader, drop_last=False)) if per_model_batch else experiment


def run_worker(
    store_dir: str | Path,
    experiment: Experiment,
    rows: Sequence[int] | None = None,
    progress: bool = True,
    label: str | None = None,
    loaders: LoaderCache | None = None,
) -> int:
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


def record_values(
    store: ResultStore, experiment: Experiment, results: list[tuple[float, Transfers]]
) -> dict[str, np.ndarray]:
    """The store's fields for each (source accuracy, outputs by transfer); a store made before a field
    existed gets the fields it has."""
    values = {"source_acc": np.array([acc for acc, _ in results], np.float32)}
    for target, mode in experiment.transfers:
        outputs = [by_transfer[target, mode] for _, by_transfer in results]
        field = partial(transfer_field, experiment=experiment, target=target, mode=mode)
        values[field("target_acc")] = np.array([out.accuracy for out in outputs], np.float32)
        values[field("target_mean_class_acc")] = np.array([out.mean_class_accuracy for out in outputs], np.float32)
        for name in OUTPUT_SCHEMA:
            values[field(name)] = np.stack([getattr(out, name).cpu().numpy() for out in outputs])
    return {name: value for name, value in values.items() if name in store.schema}


def _pending(store: ResultStore, rows: Sequence[int] | None) -> list[int]:
    done = set(store.completed_rows().tolist()) | set(store.failures())
    return [r for r in (range(store.num_rows) if rows is None else rows) if r not in done]
