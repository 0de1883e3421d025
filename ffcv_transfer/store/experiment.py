"""An experiment's results store: one row per source model, and what says what a row means.

    STORE/experiment.yaml           the resolved experiment (config.Experiment) its rows are trained with
    STORE/fixed/masks.npy           (N, C) bool: the source classes of each model
    STORE/fixed/init_seeds.npy      (N,) int64: the seed of each row's initial weights
    STORE/fixed/example_masks.npy   example-level stores: (N, ceil(E/8)) uint8, each model's source
                                    examples as packed bits in beton order (`masks` then holds the classes
                                    each model has examples of)
    STORE/fixed/removal.npy         counterfactual stores: (kind, count, seed) of each row
    per row                         source_acc; per (target, transfer mode) (`transfer_field` names
                                    them) margins, is_correct, predictions, p_correct, correct_logit:
                                    (T,) over that target's test set; target_acc (top-1),
                                    target_mean_class_acc (the mean of the per-class accuracies)

store.py is the generic on-disk format (records, claims, failures); this module is the experiment's
schema on top of it, and the one place that creates such stores and opens their experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.config import TARGETS as TARGETS_KEY
from ffcv_transfer.config import ConfigError, Experiment, load_experiment
from ffcv_transfer.store.files import atomic_write
from ffcv_transfer.store.masks import class_masks, random_class_masks, random_example_masks
from ffcv_transfer.store.results import ResultStore, StoreError

EXPERIMENT_FILE = "experiment.yaml"
MASKS = "masks"
INIT_SEEDS = "init_seeds"
EXAMPLE_MASKS = "example_masks"
REMOVAL = "removal"
# settings that may differ between stores read as one: how many models and their draw, where and how fast
POOL_FREE = {
    "masks.num_models",
    "masks.seed",
    "data.root",
    "run.device",
    "run.fusion",
    "run.compile",
    "run.checkpoints",
    "loader.num_workers",
    "loader.threading",
    "loader.os_cache",
}
CHECKPOINTS = "checkpoints"  # STORE/checkpoints/ROW.pt: the source models' weights (run.checkpoints)
TRANSFERS = "transfers"  # STORE/transfers/TARGET/MODE: a store of later transfers of the checkpointed source models
# (T,) per row; stores made before p_correct and correct_logit lack them (analyses then name what is missing)
OUTPUT_SCHEMA = {
    "margins": "float16",
    "is_correct": "bool",
    "predictions": "int16",
    "p_correct": "float16",
    "correct_logit": "float16",
}
OUTPUTS = ("margins", "p_correct", "correct_logit", "is_correct")  # what influence can be computed on
TRANSFER_SCALARS = ("target_acc", "target_mean_class_acc")  # float32 per row and transfer
ACCURACY_FIELDS = {"top1": "target_acc", "mean_per_class": "target_mean_class_acc"}  # by transfer.metric
SPLITS = ("source_train", "source_val", "target_train", "target_test")
TARGET_SPLITS = ("target_train", "target_test")
DEFAULT_TARGET = "target"  # data.target_name's default


def create_store(
    path: str | Path,
    masks: np.ndarray,
    num_target_test: int | dict[str, int],
    extra_fixed: dict[str, np.ndarray] | None = None,
    init_seeds: np.ndarray | None = None,
    experiment: Experiment | None = None,
) -> ResultStore:
    """A store with one row per model: its class mask and the seed of its initial weights (fixed; by
    default the row index), its source accuracy and, per transfer (target, mode) of `experiment` (one
    when none is given), per target test example its outputs (OUTPUT_SCHEMA) and its target accuracies
    (`transfer_field` names them). `num_target_test`: the test examples of each target by name (an int:
    of the one target). Rows given equal `init_seeds` start from the same weights (paired comparisons,
    as in the counterfactuals). `experiment` is saved beside the rows (`open_experiment`)."""
    seeds = np.arange(len(masks)) if init_seeds is None else np.asarray(init_seeds, np.int64)
    if seeds.shape != (len(masks),):
        raise ValueError(f"{path}: {len(seeds)} init seeds for {len(masks)} models")
    schema: dict[str, tuple[tuple[int, ...], str]] = {"source_acc": ((), "float32")}
    for target, mode in experiment.transfers if experiment is not None else ((None, None),):
        count = num_target_test if isinstance(num_target_test, int) else num_target_test[target]
        field = partial(transfer_field, experiment=experiment, target=target, mode=mode)
        schema |= {field(name): ((count,), dtype) for name, dtype in OUTPUT_SCHEMA.items()}
        schema |= {field(name): ((), "float32") for name in TRANSFER_SCALARS}
    return ResultStore.create(
        path,
        len(masks),
        schema,
        fixed={MASKS: masks, INIT_SEEDS: seeds.astype(np.int64), **(extra_fixed or {})},
        files={} if experiment is None else {EXPERIMENT_FILE: experiment.to_yaml().encode()},
    )


def transfer_field(name: str, experiment: Experiment | None, target: str | None = None, mode: str | None = None) -> str:
    """The store field of output `name` of the transfer to `target` (default: the first) in `mode`
    (default: the target's first): the first transfer's fields carry the bare names (as in stores of one
    transfer), the first target's other modes `name@mode`, other targets' `name@target/mode`. An unknown
    target or mode is a ConfigError naming the experiment's."""
    if experiment is None:
        return name
    first = experiment.targets[0]
    chosen = experiment.target(target)
    modes = chosen.transfer.modes
    if mode is not None and mode not in modes:
        raise ConfigError(
            f"--mode {mode}: this store's transfer modes{'' if len(experiment.targets) == 1 else f' to {chosen.name}'}"
            f" are {', '.join(modes)}"
        )
    mode = mode or modes[0]
    if chosen.name != first.name:
        return f"{name}@{chosen.name}/{mode}"
    return name if mode == modes[0] else f"{name}@{mode}"


def target_test_counts(experiment: Experiment) -> dict[str, int]:
    """Each target's test examples by name, from its sidecar (a missing beton is an error naming it)."""
    return {name: sidecars["target_test"]["num_examples"] for name, sidecars in target_sidecars(experiment).items()}


DRAW_BYTES_PER_ENTRY = 24  # a mask draw's peak per (model, class or example): float64 keys, int64 order, the bool


def check_draw_fits(experiment: Experiment, columns: int, what: str) -> None:
    """Refuse a mask draw of masks.num_models x `columns` that this machine's memory cannot hold, before
    drawing."""
    import os

    needed = experiment.masks.num_models * columns * DRAW_BYTES_PER_ENTRY
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > physical:
        raise ConfigError(
            f"masks.num_models {experiment.masks.num_models}: drawing their masks over {columns} {what} needs about "
            f"{needed / 2**30:.3g} GiB, more than this machine's {physical / 2**30:.3g} GiB"
        )


def rows_without_a_step(experiment: Experiment, examples: np.ndarray) -> np.ndarray:
    """The rows whose models cannot take one training step, given each row's source training examples:
    fewer than one per-model batch (source.per_model_batch), or none at all."""
    return np.flatnonzero(examples < max(experiment.source.per_model_batch, 1))


def class_examples_per_row(experiment: Experiment, masks: np.ndarray) -> np.ndarray:
    """Each row's source training examples: those of the classes its class mask holds."""
    from ffcv_transfer.store.betons import read_labels

    counts = np.bincount(read_labels(experiment.data.path("source_train")), minlength=masks.shape[1])
    return masks.astype(np.int64) @ counts


def examples_per_row(store: ResultStore, experiment: Experiment) -> np.ndarray:
    """Each row's source training examples in a store of `experiment`: its own (example-level stores) or
    those of its classes."""
    if EXAMPLE_MASKS in store.fixed_names:
        return np.unpackbits(store.fixed(EXAMPLE_MASKS), axis=1).sum(1)
    return class_examples_per_row(experiment, store.fixed(MASKS))


def describe_rows_without_a_step(experiment: Experiment, examples: np.ndarray, rows: np.ndarray) -> str:
    """Which rows cannot take a step and why, in one line."""
    shown = ", ".join(map(str, rows[:8])) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    batch = experiment.source.per_model_batch
    return (
        f"{len(rows)} of {len(examples)} models (rows {shown}) cannot take one training step: their source "
        f"examples ({examples[rows].min()}-{examples[rows].max()}) are "
        + (f"fewer than one per-model batch (source.per_model_batch {batch})" if batch else "none")
    )


def check_models_can_step(experiment: Experiment, examples: np.ndarray) -> None:
    """Refuse a design in which no model can take one training step (every row would fail only once
    training had started); `examples`: each model's source examples in one pass."""
    rows = rows_without_a_step(experiment, examples)
    if len(rows) == len(examples):
        raise ConfigError(
            f"{describe_rows_without_a_step(experiment, examples, rows)}: use more examples per class, larger "
            "subsets (masks.alpha) or a smaller source.per_model_batch"
        )


def create_class_store(path: str | Path, experiment: Experiment, refuse_stuck: bool = False) -> ResultStore:
    """Draw the experiment's class masks and create its store (`ffcv-transfer masks`); with `refuse_stuck`,
    a design in which no model can take a training step is refused before anything is written
    (`check_models_can_step`)."""
    sidecars = read_sidecars(experiment)
    num_classes = sidecars["source_train"]["num_classes"]
    check_draw_fits(experiment, num_classes, "classes")
    try:
        masks = class_masks(experiment.masks, num_classes)
    except ValueError as error:  # e.g. more classes than an orthogonal design of num_models holds
        raise ConfigError(f"{experiment.data.path('source_train')}: {num_classes} classes: {error}") from None
    if refuse_stuck:
        check_models_can_step(experiment, class_examples_per_row(experiment, masks))
    return create_store(path, masks, target_test_counts(experiment), experiment=experiment)


def create_example_store(path: str | Path, experiment: Experiment, refuse_stuck: bool = False) -> ResultStore:
    """A store whose models train on random subsets of the source *examples* (`ffcv-transfer masks
    --examples`): experiment.masks gives the number of models, alpha (the fraction of examples each one
    holds) and the seed; `refuse_stuck` as in `create_class_store`."""
    from ffcv_transfer.store.betons import read_labels

    sidecars = read_sidecars(experiment)
    labels = read_labels(experiment.data.path("source_train"))
    m = experiment.masks
    check_draw_fits(experiment, len(labels), "examples")
    masks = random_example_masks(m.num_models, len(labels), m.alpha, m.seed)
    if refuse_stuck:
        check_models_can_step(experiment, masks.sum(1))
    return create_store(
        path,
        class_masks_from_examples(masks, labels, sidecars["source_train"]["num_classes"]),
        target_test_counts(experiment),
        extra_fixed={EXAMPLE_MASKS: np.packbits(masks, axis=1)},
        experiment=experiment,
    )


def add_models(store_dir: str | Path, count: int) -> range:
    """Grow a store by `count` models of its experiment (`ffcv-transfer masks --store S --add N`): new
    random subsets drawn for the new rows (another draw than any earlier row's), their init seeds the row
    indices, the saved experiment's masks.num_models updated. Returns the new rows, pending for `train`."""
    import dataclasses

    store, experiment = ResultStore(store_dir), open_experiment(store_dir)
    if count < 1:
        raise ConfigError(f"--add {count}: expected at least one model")
    m, first = experiment.masks, store.num_rows
    if m.design != "random":
        raise ConfigError(
            f"{store_dir}: a {m.design} design is balanced as a whole and cannot grow; make another "
            "store with another masks.seed and read both as one (`influence S1 S2`)"
        )
    if INIT_SEEDS not in store.fixed_names or REMOVAL in store.fixed_names:
        raise ConfigError(f"{store_dir}: only stores made by `ffcv-transfer masks` can grow")
    new = {INIT_SEEDS: np.arange(first, first + count, dtype=np.int64)}
    if EXAMPLE_MASKS in store.fixed_names:
        from ffcv_transfer.store.betons import read_labels

        labels = read_labels(experiment.data.path("source_train"))
        examples = random_example_masks(count, len(labels), m.alpha, m.seed, first_row=first)
        new |= {
            EXAMPLE_MASKS: np.packbits(examples, axis=1),
            MASKS: class_masks_from_examples(examples, labels, store.fixed(MASKS).shape[1]),
        }
    else:
        new[MASKS] = random_class_masks(count, store.fixed(MASKS).shape[1], m.alpha, m.seed, first_row=first)
    rows = store.add_rows(new)
    grown = dataclasses.replace(experiment, masks=dataclasses.replace(m, num_models=store.num_rows))
    atomic_write(store.path / EXPERIMENT_FILE, grown.to_yaml().encode())
    return rows


def pooled_experiment(store_dirs: Sequence[str | Path]) -> Experiment:
    """The experiment of several stores read as one (`store.open_stores`): they must agree on every
    setting that changes what a row means (POOL_FREE ones may differ), and their masks.seed must differ,
    as equal seeds draw the same masks."""
    seen: dict[Path, str | Path] = {}
    for path in store_dirs:
        if Path(path).resolve() in seen:
            raise ConfigError(f"{path}: given twice (as {seen[Path(path).resolve()]}): its models would count twice")
        seen[Path(path).resolve()] = path
    experiments = [open_experiment(path) for path in store_dirs]
    first = experiments[0].to_dict()
    seeds: dict[int, str | Path] = {}
    for path, experiment in zip(store_dirs, experiments):
        other = experiment.to_dict()
        if other.get(TARGETS_KEY) != first.get(TARGETS_KEY):
            raise ConfigError(
                f"{path}: its further targets differ from those of {store_dirs[0]}: stores read as one "
                "must share their recipe"
            )
        for section, values in first.items():
            if section == TARGETS_KEY:
                continue
            for key, value in values.items():
                if f"{section}.{key}" not in POOL_FREE and other[section][key] != value:
                    raise ConfigError(
                        f"{path}: {section}.{key} is {other[section][key]!r} but {store_dirs[0]} has "
                        f"{value!r}: stores read as one must share their recipe"
                    )
        if experiment.masks.seed in seeds:
            raise ConfigError(
                f"{path}: masks.seed {experiment.masks.seed} is also that of {seeds[experiment.masks.seed]}:"
                " the two drew the same masks; pool stores with different seeds"
            )
        seeds[experiment.masks.seed] = path
    return experiments[0]


def class_masks_from_examples(example_masks: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) bool: the classes each model has at least one example of."""
    has = np.zeros((len(example_masks), num_classes), bool)
    for row, mask in zip(has, np.asarray(example_masks, bool)):
        row[np.asarray(labels)[mask]] = True
    return has


def example_masks_of(store: ResultStore, num_examples: int, rows: Sequence[int] | None = None) -> np.ndarray:
    """(len(rows), E) bool example masks of an example-level store (all rows by default)."""
    packed = store.fixed(EXAMPLE_MASKS)
    packed = np.asarray(packed if rows is None else packed[list(rows)])
    if packed.shape[1] != (num_examples + 7) // 8:
        raise ValueError(
            f"{store.path}: example masks hold {packed.shape[1] * 8} bits per model, not the "
            f"{num_examples} source examples"
        )
    return np.unpackbits(packed, axis=1, count=num_examples).astype(bool)


def init_seed(store: ResultStore, row: int, base_seed: int) -> int:
    """The torch seed of row `row`'s initial weights: from the store's init seed of the row (the row index
    in stores made before init seeds were stored) and the experiment's `masks.seed`."""
    seed = int(store.fixed(INIT_SEEDS)[row]) if INIT_SEEDS in store.fixed_names else row
    return int(np.random.SeedSequence([base_seed, seed]).generate_state(1)[0])


def transfer_seed(store: ResultStore, row: int, base_seed: int, mode: str, target: str = DEFAULT_TARGET) -> int:
    """The torch seed of the new heads when the group whose first row is `row` is transferred to
    `target` in `mode`: each transfer the same whether or not the experiment has other targets or modes
    (a target's name enters the seed, the default name adding nothing, so stores of one unnamed target
    keep theirs)."""
    import zlib

    from ffcv_transfer.settings import TRANSFER_MODES

    named = [] if target == DEFAULT_TARGET else [zlib.crc32(target.encode())]
    return int(
        np.random.SeedSequence(
            [base_seed, init_seed(store, row, base_seed), 1 + TRANSFER_MODES.index(mode), *named]
        ).generate_state(1)[0]
    )


def open_experiment(store_dir: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """The experiment saved in a store (with `overrides`); a missing store or file is a StoreError naming it."""
    ResultStore(store_dir)  # a missing store is named as such, before its experiment file
    path = Path(store_dir) / EXPERIMENT_FILE
    if not path.is_file():
        raise StoreError(f"{path}: not found; is {store_dir} a store made by `ffcv-transfer masks`?")
    return load_experiment(path, overrides)


def read_sidecars(experiment: Experiment) -> dict[str, dict]:
    """Every split's sidecar (of the first target); a missing beton is an error that names it."""
    from ffcv_transfer.store.betons import read_sidecar

    sidecars = {}
    for split in SPLITS:
        path = experiment.data.path(split)
        if not path.is_file():
            raise ConfigError(f"{path}: data.{split} does not exist (data.root is {experiment.data.root!r})")
        sidecars[split] = read_sidecar(path)
    return sidecars


def target_sidecars(experiment: Experiment) -> dict[str, dict[str, dict]]:
    """Each target's two sidecars (TARGET_SPLITS) by target name; a missing beton is an error naming it."""
    from ffcv_transfer.store.betons import read_sidecar

    found: dict[str, dict[str, dict]] = {}
    for target in experiment.targets:
        found[target.name] = {}
        for split in TARGET_SPLITS:
            path = target.path(experiment.data.root, split)
            if not path.is_file():
                raise ConfigError(
                    f"{path}: the {split.split('_')[1]} beton of target {target.name} does not exist "
                    f"(data.root is {experiment.data.root!r})"
                )
            found[target.name][split] = read_sidecar(path)
    return found


def check_inputs(store: ResultStore, experiment: Experiment) -> None:
    """The betons exist and match the store's masks and output columns; errors name the file."""
    sidecars = read_sidecars(experiment)
    num_classes = store.fixed(MASKS).shape[1]
    for split in ("source_train", "source_val"):
        if sidecars[split]["num_classes"] != num_classes:
            raise ConfigError(
                f"{experiment.data.path(split)}: {sidecars[split]['num_classes']} classes, but the "
                f"masks of store {store.path} cover {num_classes}"
            )
    if EXAMPLE_MASKS in store.fixed_names:
        bits, examples = store.fixed(EXAMPLE_MASKS).shape[1] * 8, sidecars["source_train"]["num_examples"]
        if not bits - 8 < examples <= bits:
            raise ConfigError(
                f"{experiment.data.path('source_train')}: {examples} examples, but the example masks "
                f"of store {store.path} cover {bits - 7}..{bits}"
            )
    for name, count in target_test_counts(experiment).items():
        field = transfer_field("margins", experiment, name)
        columns = store.schema[field][0][0] if field in store.schema else None
        if count != columns:
            raise ConfigError(
                f"{experiment.target(name).path(experiment.data.root, 'target_test')}: {count} examples, "
                f"but store {store.path} has {columns or 'no'} output columns for target {name}"
            )


def checkpoint_path(store_dir: str | Path, row: int) -> Path:
    return Path(store_dir) / CHECKPOINTS / f"{row}.pt"


def transfer_store_path(store_dir: str | Path, target: str, mode: str) -> Path:
    return Path(store_dir) / TRANSFERS / target / mode


def pending_transfer_rows(store_dir: str | Path, target: str, mode: str) -> list[int]:
    """Checkpointed rows not yet transferred to `target` in `mode`."""
    rows = sorted(int(path.stem) for path in (Path(store_dir) / CHECKPOINTS).glob("*.pt"))
    sub_dir = transfer_store_path(store_dir, target, mode)
    if not (sub_dir / "spec.json").exists():
        return rows
    sub = ResultStore(sub_dir)
    done = set(sub.completed_rows().tolist()) | set(sub.failures())
    return [row for row in rows if row not in done]


def later_transfer_stores(store_dirs: list[Path], target: str | None, mode: str | None) -> list[Path] | None:
    """The transfer-only stores (STORE/transfers/TARGET/MODE) of `store_dirs` for a --target/--mode choice
    that is not a transfer of their experiment, when every store has one (None otherwise); a target
    with several such modes needs --mode."""
    experiment = open_experiment(store_dirs[0])
    names = [t.name for t in experiment.targets]
    if (target is None or target in names) and (mode is None or mode in experiment.target(target).transfer.modes):
        return None
    target = target or names[0]
    if mode is None:
        modes = sorted(path.parent.name for path in (store_dirs[0] / TRANSFERS / target).glob("*/spec.json"))
        if len(modes) != 1:
            return None
        mode = modes[0]
    found = [transfer_store_path(path, target, mode) for path in store_dirs]
    return found if all((path / "spec.json").exists() for path in found) else None
