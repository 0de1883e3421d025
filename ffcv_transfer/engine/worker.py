"""The worker: claim pending rows of a store, train their source models K at a time on one shared
loader, transfer each to every target of the experiment in each of its transfer modes, and write the
outputs; rows whose model diverged are marked failed with the reason.
Run it any number of times, in any number of processes: completed rows are skipped and rows of a killed
worker are taken over (claims.run_claims)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ffcv_transfer.config import Experiment
from ffcv_transfer.engine.checkpoints import save_checkpoint
from ffcv_transfer.engine.claims import GroupOutcome, Report, run_claims
from ffcv_transfer.engine.data import Loader, LoaderSpec, Upsampled
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
from ffcv_transfer.store.results import ResultStore

TRAINERS = {"sequential": SequentialTrainer, "grouped": GroupedTrainer}  # by settings.FUSIONS

Transfers = dict[tuple[str, str], TransferOutputs]  # by (target name, transfer mode)


@dataclass(frozen=True)
class GroupExamples:
    """What a group of K rows trains on, from its store's masks and the source labels (read once per
    group): `masks`, what the trainer routes on ((K, C) classes, or (K, E) examples with `example_labels`
    (E,)); `examples`, the source_train positions the shared loader reads (the union of the K subsets);
    `per_model`, each model's examples in one pass; `classes`, the union of the K models' classes."""

    masks: np.ndarray
    example_labels: np.ndarray | None
    examples: np.ndarray
    per_model: np.ndarray
    classes: np.ndarray


def group_examples(store: ResultStore, rows: Sequence[int], labels: np.ndarray) -> GroupExamples:
    """The examples of `rows`: over their example masks in a store that has them
    (experiment_store.create_example_store), else over their class masks."""
    classes = np.asarray(store.fixed(MASKS)[list(rows)], bool)
    union = classes.any(axis=0)
    if EXAMPLE_MASKS in store.fixed_names:
        examples = example_masks_of(store, len(labels), rows)
        return GroupExamples(examples, labels, np.flatnonzero(examples.any(axis=0)), examples.sum(1), union)
    counts = np.bincount(labels, minlength=classes.shape[1])
    return GroupExamples(classes, None, np.flatnonzero(union[labels]), classes.astype(np.int64) @ counts, union)


def train_rows(
    store: ResultStore,
    rows: Sequence[int],
    experiment: Experiment,
    loaders: LoaderCache,
    on_epoch: Report = lambda stage: None,
) -> tuple[dict[int, str], dict[int, tuple[float, Transfers]]]:
    """Train and transfer the models of `rows`: (failures by row, (source accuracy, outputs by transfer)
    by row)."""
    from ffcv_transfer.store.betons import read_labels

    source, device = experiment.source, experiment.run.device
    group = group_examples(store, rows, read_labels(experiment.data.path("source_train")))
    models = []
    for row in rows:  # each model's initial weights from its row's seed, whatever else this process ran
        torch.manual_seed(init_seed(store, row, experiment.masks.seed))
        models.append(build_model(len(group.classes), **asdict(experiment.model), device=device))
    trainer_class = TRAINERS[experiment.run.fusion]
    if experiment.run.compile != "none":  # validated: static shapes
        trainer_class = partial(trainer_class, compile=experiment.run.compile)
    if source.per_model_batch:  # validated: the sequential fusion
        trainer_class = partial(trainer_class, examples_per_epoch=group.per_model)
    train = loaders.get(
        decoding_experiment(experiment, source.per_model_batch),
        LoaderSpec(
            "source_train",
            train=True,
            resolution=source.min_res,
            batch_size=source.batch_size,
            crop_min_scale=source.crop_min_scale,
            with_indices=group.example_labels is not None,  # example masks route on example indices
        ),
        group.examples,
    )
    trainer = trainer_class(
        models, group.masks, source, steps_per_epoch=len(train), device=device, example_labels=group.example_labels
    )
    trainer.fit(train, source.epochs, resolution=source_resolution(source), on_epoch=on_epoch, stage="source epoch")
    failures = {rows[k]: f"source training: {reason}" for k, reason in trainer.failed.items()}
    alive = [k for k in range(len(rows)) if rows[k] not in failures]
    if not alive:
        return failures, {}
    val_spec = LoaderSpec(
        "source_val",
        train=False,
        resolution=source.val_res,
        batch_size=source.batch_size,
        crop_ratio=source.val_crop_ratio,
    )
    val_examples = np.flatnonzero(group.classes[read_labels(experiment.data.path("source_val"))])
    source_acc = trainer.accuracy(
        loaders.get(experiment, val_spec, val_examples), among_own=source.val_accuracy == "own_classes"
    )
    if experiment.run.checkpoints:  # before transfer, which changes the models
        masks = store.fixed(MASKS)
        for k in alive:
            save_checkpoint(checkpoint_path(store.path, rows[k]), models[k], masks[rows[k]], rows[k])
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
    on_epoch: Report,
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

    def loader(split: str, train: bool, **crops) -> Loader:
        """Decoded at upsample_from px and upsampled on the device when set, else at the resolution."""
        spec = LoaderSpec(
            split,
            train=train,
            resolution=config.upsample_from or config.resolution,
            batch_size=config.batch_size,
            normalization=config.normalization,
            target=chosen.name,
            **crops,
        )
        made = loaders.get(decoding, spec)
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
    """Claim and complete rows K at a time until none is pending (claims.run_claims); returns how many were
    written. `label` starts this worker's name in the store (`store status` lists workers by name);
    `loaders` (default: a new LoaderCache) lets successive runs in one process share their loaders."""
    store = ResultStore(store_dir)
    check_inputs(store, experiment)
    loaders = loaders or LoaderCache()

    def train_group(claimed: list[int], report: Report) -> GroupOutcome:
        failures, results = train_rows(store, claimed, experiment, loaders, report)
        done = sorted(results)
        return GroupOutcome(done, record_values(experiment, [results[r] for r in done]) if done else {}, failures)

    return run_claims(store, experiment.run.models_per_process, train_group, rows, progress, label)


def record_values(experiment: Experiment, results: list[tuple[float, Transfers]]) -> dict[str, np.ndarray]:
    """The store's fields for each (source accuracy, outputs by transfer)."""
    values = {"source_acc": np.array([acc for acc, _ in results], np.float32)}
    for target, mode in experiment.transfers:
        outputs = [by_transfer[target, mode] for _, by_transfer in results]
        field = partial(transfer_field, experiment=experiment, target=target, mode=mode)
        values[field("target_acc")] = np.array([out.accuracy for out in outputs], np.float32)
        values[field("target_mean_class_acc")] = np.array([out.mean_class_accuracy for out in outputs], np.float32)
        for name in OUTPUT_SCHEMA:
            values[field(name)] = np.stack([getattr(out, name).cpu().numpy() for out in outputs])
    return values
