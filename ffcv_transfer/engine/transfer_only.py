"""`ffcv-transfer transfer`: transfer source models that are already trained to a target or in a mode their
store did not run, without training them again. The models come from the store's checkpoints
(`run.checkpoints`) or from a folder of outside checkpoints with their class masks (`import_checkpoints`);
the target is one of the experiment's or a new one from a target recipe file. Results go to a store of
their own, STORE/transfers/TARGET/MODE, with the rows' masks and init seeds and the experiment of that one
transfer: every analysis reads it by its path, or through the main store with `--target`/`--mode`.
Resumable like `train`: rows already written are skipped, claims of killed workers are taken over."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ffcv_transfer.config import ConfigError, Experiment, with_target
from ffcv_transfer.engine.checkpoints import load_into, outside_checkpoints, read_state_dict, save_checkpoint
from ffcv_transfer.engine.claims import GroupOutcome, Report, run_claims
from ffcv_transfer.engine.loader_cache import LoaderCache
from ffcv_transfer.engine.models import build_model
from ffcv_transfer.engine.worker import record_values, transfer_models
from ffcv_transfer.settings import TRANSFER_MODES
from ffcv_transfer.store.experiment import (
    CHECKPOINTS,
    INIT_SEEDS,
    MASKS,
    checkpoint_path,
    create_store,
    open_experiment,
    pending_transfer_rows,
    read_sidecars,
    target_test_counts,
    transfer_seed,
    transfer_store_path,
)
from ffcv_transfer.store.results import ResultStore, StoreError


def transfer_experiment(
    store_dir: str | Path, target: str | None = None, mode: str | None = None, recipe: str | Path | None = None
) -> Experiment:
    """The one-transfer experiment of a store's models to `target` (default: the first; with `recipe`, the
    target of that recipe file) in `mode` (default: the target's first)."""
    experiment = open_experiment(store_dir)
    if recipe is not None:
        experiment = with_target(experiment, recipe)
        target = experiment.targets[-1].name if target is None else target
    chosen = experiment.target(target)
    if mode is not None and mode not in TRANSFER_MODES:
        raise ConfigError(f"--mode {mode}: expected one of {', '.join(TRANSFER_MODES)}")
    return experiment.for_target(chosen.name, mode or chosen.transfer.modes[0])


def run_transfer(
    store_dir: str | Path,
    target: str | None = None,
    mode: str | None = None,
    recipe: str | Path | None = None,
    progress: bool = True,
    label: str | None = None,
    loaders: LoaderCache | None = None,
) -> int:
    """Transfer every checkpointed source model of the store (`transfer_experiment` says to which target
    and how) into STORE/transfers/TARGET/MODE, K at a time (claims.run_claims); returns how many rows this
    call wrote."""
    store = ResultStore(store_dir)
    if not list((store.path / CHECKPOINTS).glob("*.pt")):
        raise StoreError(
            f"{store.path / CHECKPOINTS}: no checkpoints; train with --run.checkpoints=true or "
            "import a folder (`transfer --checkpoints DIR`)"
        )
    experiment = transfer_experiment(store_dir, target, mode, recipe)
    target, mode = experiment.transfers[0]
    sub_dir = transfer_store_path(store_dir, target, mode)
    if not (sub_dir / "spec.json").exists():
        create_store(
            sub_dir,
            store.fixed(MASKS),
            target_test_counts(experiment),
            init_seeds=store.fixed(INIT_SEEDS),
            experiment=experiment,
        )
    sub = ResultStore(sub_dir)
    num_classes = sub.fixed(MASKS).shape[1]
    trained, values = store.read(["source_acc"])
    source_acc = dict(zip(trained.tolist(), values["source_acc"].tolist()))
    loaders = loaders or LoaderCache()

    def transfer_group(claimed: list[int], report: Report) -> GroupOutcome:
        models = [load_source_model(checkpoint_path(store.path, row), experiment, num_classes) for row in claimed]
        torch.manual_seed(transfer_seed(sub, claimed[0], experiment.masks.seed, mode, target))
        outputs, failures = transfer_models(models, experiment, loaders, report)
        good = [k for k in range(len(claimed)) if k not in failures]
        results = [(source_acc.get(claimed[k], float("nan")), {(target, mode): outputs[k]}) for k in good]
        return GroupOutcome(
            [claimed[k] for k in good],
            record_values(experiment, results) if good else {},
            {claimed[k]: f"transfer ({target}, {mode}): {reason}" for k, reason in failures.items()},
        )

    todo = pending_transfer_rows(store_dir, target, mode)
    return run_claims(sub, experiment.run.models_per_process, transfer_group, todo, progress, label)


def load_source_model(path: Path, experiment: Experiment, num_classes: int) -> torch.nn.Module:
    """The source model of a checkpoint, built as the experiment's model section says, on its device."""
    state, _ = read_state_dict(path)
    model = build_model(num_classes, **asdict(experiment.model), device="cpu")
    load_into(model, state, path)
    return model.to(experiment.run.device)


def import_checkpoints(folder: str | Path, store_dir: str | Path, experiment: Experiment) -> ResultStore:
    """A store for outside source models: FOLDER/*.pt (torchvision's or this package's ResNet-18 names,
    bare or wrapped) with FOLDER/masks.npy (their source classes, one row per file in name order). Each
    checkpoint is checked against the experiment's model and written to STORE/checkpoints in this
    package's names; the store's own rows stay untrained, and `run_transfer` transfers the models."""
    files, masks = outside_checkpoints(folder)
    num_classes = read_sidecars(experiment)["source_train"]["num_classes"]
    if masks.shape[1] != num_classes:
        raise ConfigError(
            f"{Path(folder) / 'masks.npy'}: masks over {masks.shape[1]} classes, the source beton "
            f"{experiment.data.path('source_train')} has {num_classes}"
        )
    store = create_store(store_dir, masks, target_test_counts(experiment), experiment=experiment)
    try:
        for row, file in enumerate(files):
            model = build_model(num_classes, **asdict(experiment.model), device="cpu")
            load_into(model, read_state_dict(file)[0], file)
            save_checkpoint(checkpoint_path(store.path, row), model, masks[row], row)
    except BaseException:
        shutil.rmtree(store.path)  # nothing half-imported is left to block the retry
        raise
    return store
