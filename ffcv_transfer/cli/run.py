"""`ffcv-transfer` commands that run an experiment: settings, demo, masks, train, launch, store status and
influence."""

from __future__ import annotations

import argparse
import os

from ffcv_transfer.cli.common import (
    DATA_ENV,
    SETTINGS_HELP,
    add_memory_option,
    add_mode_option,
    check_at_least,
    check_folder_can_be,
    experiment_from_args,
    max_bytes_of,
    parse_rows,
    parse_settings,
    store_experiment,
)
from ffcv_transfer.settings import TRANSFER_MODES


def cmd_store_status(args: argparse.Namespace) -> None:
    from ffcv_transfer.store.results import ResultStore, format_status

    print(format_status(ResultStore(args.store).status(), args.store))


def cmd_store_verify(args: argparse.Namespace) -> None:
    """Every rejected and torn record is listed; an error (exit 2) while a rejected record's row has not
    been recomputed: once every such row has been, nothing is missing, and the listing is an audit."""
    from ffcv_transfer.store.results import ResultStore, StoreError

    store = ResultStore(args.store)
    shards = store.verify()
    missing = store.rejected_not_recomputed()
    for name, counts in shards.items():
        torn = f", a torn last record ({counts['torn_bytes']} bytes)" if counts["torn_bytes"] else ""
        print(f"{name}: {counts['intact']} intact, {counts['rejected']} rejected{torn}")
    bad = sum(counts["rejected"] for counts in shards.values())
    torn = sum(1 for counts in shards.values() if counts["torn_bytes"])
    print(f"{args.store}: {len(shards)} shards, {sum(c['intact'] for c in shards.values())} intact records")
    if missing["rejected"]:
        raise StoreError(
            f"{args.store}: {missing['rejected']} rejected record{'s' * (missing['rejected'] != 1)} not "
            "recomputed yet (their rows are pending again; `ffcv-transfer train` recomputes them)"
        )
    if bad:
        print(f"{bad} rejected record{'s' * (bad != 1)}: every row they were written for has been recomputed since")
    if torn:
        print(
            f"{torn} shard(s) end in a torn record (a writer killed mid-write): {torn - missing['torn']} of "
            "their rows recomputed since, the others pending again"
        )


def cmd_influence(args: argparse.Namespace) -> None:
    from pathlib import Path

    import numpy as np

    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.findings.influence import write_influence
    from ffcv_transfer.findings.kernel import resolve_backend

    if args.chunk < 1:
        raise ConfigError(f"--chunk {args.chunk}: expected at least 1 row per chunk")
    max_bytes = max_bytes_of(args)
    if not Path(args.out).resolve().parent.is_dir():  # before the computation, not after it
        raise ConfigError(f"--out {args.out}: its folder {Path(args.out).resolve().parent} does not exist")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; the influence is written to a .npy file")
    written = write_influence(
        args.store,
        args.out,
        args.key,
        target=args.target,
        mode=args.mode,
        mask_key=args.mask_key,
        backend=resolve_backend(args.backend),
        chunk=args.chunk,
        stderr=args.stderr,
        progress=True,
        max_bytes=max_bytes,
        process_budget=True,
        estimator=args.estimator,
    )
    classes, outputs = np.load(written[0], mmap_mode="r").shape
    print(f"wrote {written[0]}: influence {classes} classes x {outputs} outputs")
    if args.stderr:
        print(f"wrote {written[1]}")


def cmd_settings(args: argparse.Namespace) -> None:
    import yaml

    from ffcv_transfer.config import describe_settings

    if args.config is None and not args.settings:
        print(describe_settings())
    else:
        print(yaml.safe_dump(experiment_from_args(args, args.config).to_dict(), sort_keys=False), end="")


def cmd_demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.experiments.demo import CIFAR_ARCHIVE, TINY_ARCHIVE, TinySize, format_findings, run_demo

    check_folder_can_be(args.out, "--out")
    if args.workers is not None:
        check_at_least(args.workers, 1, "--workers", "a number of processes")
    check_at_least(args.counterfactual_seeds, 0, "--counterfactual-seeds", "a number of seeds")
    for name in ("classes", "per_class", "target_per_class"):
        if getattr(args, name) is not None:
            check_at_least(getattr(args, name), 1, f"--{name.replace('_', '-')}", "a count")
    data_dir = args.data_dir or os.environ.get(DATA_ENV) or "../shared/data"
    if args.data == "tiny-imagenet":
        missing = [name for name in (TINY_ARCHIVE, CIFAR_ARCHIVE) if not (Path(data_dir) / name).is_file()]
        if missing:
            raise ConfigError(
                f"--data-dir {data_dir}: --data tiny-imagenet needs {' and '.join(missing)} there (pass --data-dir "
                f"or set {DATA_ENV} to the shared data folder)"
            )
    findings = run_demo(
        args.out,
        data=args.data,
        config=args.config,
        overrides=parse_settings(args.settings),
        seed=args.seed,
        counterfactual_seeds=args.counterfactual_seeds,
        data_dir=data_dir,
        tiny=TinySize(
            **{
                name: value
                for name in ("classes", "per_class", "target_per_class")
                if (value := getattr(args, name)) is not None
            }
        ),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(format_findings(findings))
    print(f"\nfindings: {args.out}/findings.json")


def cmd_masks(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.store.experiment import (
        MASKS,
        add_models,
        create_class_store,
        create_example_store,
        describe_rows_without_a_step,
        examples_per_row,
        rows_without_a_step,
    )

    if args.add is not None:
        check_at_least(args.add, 1, "--add", "a number of models")
        if args.config or args.examples or args.settings:
            raise ConfigError("--add grows a store with its own experiment: no --config, --examples or settings")
        rows = add_models(args.store, args.add)
        print(
            f"added rows {rows.start}-{rows.stop - 1} to {args.store}; `ffcv-transfer train --store "
            f"{args.store}` trains them"
        )
        return
    if not args.config:
        raise ConfigError("masks: --config is required to create a store (or --add N to grow one)")
    check_folder_can_be(args.store, "--store")
    create = create_example_store if args.examples else create_class_store
    experiment = experiment_from_args(args, args.config)
    store = create(args.store, experiment, refuse_stuck=True)  # a design where no model can step: no store
    examples = examples_per_row(store, experiment)
    if len(stuck := rows_without_a_step(experiment, examples)):
        print(f"warning: {describe_rows_without_a_step(experiment, examples, stuck)}; they will be failed rows")
    masks = store.fixed(MASKS)
    fewest, most = masks.sum(1).min(), masks.sum(1).max()
    print(
        f"wrote {args.store}: {masks.shape[0]} models x {masks.shape[1]} source classes "
        f"({fewest if fewest == most else f'{fewest}-{most}'} classes each), "
        f"{store.schema['margins'][0][0]} target test examples"
    )


def check_device(experiment, gpus: list[int] | None = None) -> None:
    """Refuse a CUDA run.device (or --gpus) that this machine has no device for, before any worker starts."""
    from ffcv_transfer.config import ConfigError

    kind, _, index = experiment.run.device.partition(":")
    wanted = gpus or ([int(index or 0)] if kind == "cuda" else [])
    if not wanted:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if max(wanted) >= count:
        where = f"--gpus {','.join(map(str, gpus))}" if gpus else f"run.device {experiment.run.device}"
        raise ConfigError(f"{where}: this machine has {count or 'no'} CUDA device{'s' * (count != 1)}")


def check_some_completed(status: dict, store: str) -> None:
    """A run in which every row failed is an error (exit 2) naming the reasons, not a success."""
    from ffcv_transfer.store.results import StoreError

    if status["failed"] and not status["completed"]:
        reasons = "; ".join(f"{count} x {reason}" for reason, count in status["failure_reasons"].items())
        raise StoreError(f"{store}: every finished row failed ({status['failed']}): {reasons}")


def cmd_train(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.engine.worker import run_worker
    from ffcv_transfer.store.results import ResultStore, format_status

    if args.k is not None:
        args.settings += [f"--run.models_per_process={args.k}"]
    rows = parse_rows(args.models) if args.models else None
    experiment = store_experiment(args)
    num_rows = ResultStore(args.store).num_rows
    if rows is not None and max(rows) >= num_rows:
        raise ConfigError(f"--models {args.models}: store {args.store} has rows 0-{num_rows - 1}")
    check_device(experiment)
    written = run_worker(args.store, experiment, rows=rows, progress=not args.no_progress, label=args.label)
    print(f"this worker wrote {written} rows")
    status = ResultStore(args.store).status()
    print(format_status(status, args.store))
    check_some_completed(status, args.store)


def cmd_transfer(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.engine.transfer_only import import_checkpoints, run_transfer, transfer_experiment
    from ffcv_transfer.store.experiment import transfer_store_path
    from ffcv_transfer.store.results import ResultStore, format_status

    if args.checkpoints:
        if not args.config:
            raise ConfigError("transfer --checkpoints needs --config: the experiment the models belong to")
        store = import_checkpoints(args.checkpoints, args.store, experiment_from_args(args, args.config))
        print(f"imported {store.num_rows} checkpoints from {args.checkpoints} into {args.store}")
    elif args.config or args.settings:
        raise ConfigError(
            "transfer: a store's models are transferred with its own experiment; --config and "
            "settings only go with --checkpoints"
        )
    written = run_transfer(
        args.store, args.target, args.mode, args.recipe, progress=not args.no_progress, label=args.label
    )
    print(f"this worker wrote {written} rows")
    experiment = transfer_experiment(args.store, args.target, args.mode, args.recipe)
    sub = transfer_store_path(args.store, *experiment.transfers[0])
    print(format_status(ResultStore(sub).status(), sub))


LOCAL_OPTIONS = ("gpus", "workers")
SLURM_SIZES = ("tasks", "parallelism", "time_min", "partition", "gpus_per_task", "cpus_per_task")  # SlurmOptions
SLURM_OPTIONS = (*SLURM_SIZES, "sbatch", "no_wait")


def cmd_launch(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.engine.launch import SlurmOptions, launch_local, launch_slurm, local_workers
    from ffcv_transfer.store.results import ResultStore, format_status

    foreign = [
        name
        for name in (SLURM_OPTIONS if args.executor == "local" else LOCAL_OPTIONS)
        if getattr(args, name) not in (None, False)
    ]
    if foreign:
        hint = " (a SLURM task gets its GPUs with --gpus-per-task)" if "gpus" in foreign else ""
        raise ConfigError(
            f"{', '.join('--' + name.replace('_', '-') for name in foreign)}: not an option of "
            f"--executor {args.executor}{hint}"
        )
    if not args.poll_s > 0:
        raise ConfigError(f"--poll-s {args.poll_s}: expected a positive number of seconds")
    check_at_least(args.max_rounds, 1, "--max-rounds", "a number of rounds")
    if args.workers is not None:
        check_at_least(args.workers, 1, "--workers", "a number of processes")
    ResultStore(args.store)  # a missing store is named before its experiment.yaml is looked for
    if args.k is not None:
        args.settings += [f"--run.models_per_process={args.k}"]
    experiment = store_experiment(args)
    common = {"log_dir": args.log_dir, "max_rounds": args.max_rounds, "poll_s": args.poll_s}
    if args.executor == "local":
        gpus = parse_rows(args.gpus, "--gpus") if args.gpus is not None else None
        local_workers(gpus, args.workers, experiment.run.device)  # its own mistakes (--gpus with --workers) first
        check_device(experiment, gpus)
        status = launch_local(args.store, experiment, gpus=gpus, workers=args.workers, **common)
    else:
        pairs = [item.split("=", 1) for item in args.sbatch or []]
        if not all(len(pair) == 2 and all(pair) for pair in pairs):
            raise ConfigError(f"--sbatch {' '.join(args.sbatch)}: expected KEY=VALUE, e.g. --sbatch account=abc")
        sizes = {name: getattr(args, name) for name in SLURM_SIZES if getattr(args, name) is not None}
        status = launch_slurm(
            args.store, experiment, SlurmOptions(**sizes, sbatch=dict(pairs)), wait=not args.no_wait, **common
        )
    print(format_status(status, args.store))
    check_some_completed(status, args.store)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    from ffcv_transfer.findings.kernel import ESTIMATORS

    store = commands.add_parser("store", help="inspect a results store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    p = store_commands.add_parser("status", help="completed / claimed / pending / failed rows, failure reasons")
    p.add_argument("store", metavar="DIR")
    p.set_defaults(run=cmd_store_status)
    p = store_commands.add_parser(
        "verify",
        help="check every record of every shard; exit 2 while a rejected one's row is not recomputed",
    )
    p.add_argument("store", metavar="DIR")
    p.set_defaults(run=cmd_store_verify)

    p = commands.add_parser("settings", help="list every experiment setting, or print a config fully resolved")
    p.add_argument("--config", help="experiment YAML to resolve (with any --section.name=value after it)")
    p.set_defaults(run=cmd_settings, takes_settings=True)

    p = commands.add_parser(
        "demo", help="the whole pipeline, from data to an HTML report (minutes on a CPU)", epilog=SETTINGS_HELP
    )
    p.add_argument("--out", default="out/demo", help="output folder; rerunning resumes (default: out/demo)")
    p.add_argument(
        "--data",
        default="planted",
        choices=["planted", "tiny-imagenet"],
        help="planted synthetic data made on the fly (default), or the real small replica "
        "Tiny-ImageNet-200 -> CIFAR-10 from --data-dir",
    )
    p.add_argument("--config", help="experiment YAML (default: rs_configs/demo_cpu.yaml or tinyimagenet_demo_cpu.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted data")
    p.add_argument(
        "--counterfactual-seeds",
        type=int,
        default=7,
        help="retrain this many times with all classes, without the most negative class and without a "
        "random one (each class in turn, shuffled), the models of a seed from the same initial weights "
        "(default: 7; 0 skips)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="local worker processes that train the models, the rows and cores split evenly (default: one per core)",
    )
    group = p.add_argument_group("--data tiny-imagenet")
    group.add_argument("--data-dir", help=f"folder with the archives (default: ${DATA_ENV} or ../shared/data)")
    group.add_argument(
        "--classes",
        type=int,
        help="Tiny-ImageNet classes: those under a CIFAR-10 concept first "
        "(22), then others evenly spaced (default: demo.TinySize's)",
    )
    group.add_argument("--per-class", type=int, help="training images per source class (default: demo.TinySize's)")
    group.add_argument(
        "--target-per-class",
        type=int,
        help="CIFAR-10 training images per class; half as many test images (default: demo.TinySize's)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_demo, takes_settings=True)

    p = commands.add_parser(
        "masks", help="draw the random class subsets and create the results store", epilog=SETTINGS_HELP
    )
    p.add_argument("--config", help="experiment YAML (see rs_configs/); required to create a store")
    p.add_argument("--store", required=True, metavar="DIR", help="results store to create (or, with --add, grow)")
    p.add_argument(
        "--add",
        type=int,
        metavar="N",
        help="add N models to an existing store: new random subsets, rows pending for `train`",
    )
    p.add_argument(
        "--examples",
        action="store_true",
        help="random subsets of the source examples instead of "
        "classes (example-level influence; `ffcv-transfer leakage` reads the store)",
    )
    p.set_defaults(run=cmd_masks, takes_settings=True)

    p = commands.add_parser(
        "train", help="train, transfer and record pending models of a store (K at a time)", epilog=SETTINGS_HELP
    )
    p.add_argument("--store", required=True, metavar="DIR")
    p.add_argument("--config", help="experiment YAML (default: the one saved in the store by `masks`)")
    p.add_argument("--models", help="only these rows, e.g. 0-63,100 (default: all pending)")
    p.add_argument("--k", type=int, help="models per process (run.models_per_process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--label", help="first part of this worker's name in `store status` (e.g. gpu0)")
    p.set_defaults(run=cmd_train, takes_settings=True)

    p = commands.add_parser(
        "transfer",
        help="transfer already-trained source models (the store's checkpoints, or "
        "a folder of outside ones) to a target in a transfer mode, into "
        "STORE/transfers/TARGET/MODE; resumable",
        epilog=SETTINGS_HELP,
    )
    p.add_argument(
        "--store",
        required=True,
        metavar="DIR",
        help="a store trained with --run.checkpoints=true, or, with --checkpoints, the store to create",
    )
    p.add_argument("--target", help="one of the experiment's targets (default: the first, or --recipe's)")
    p.add_argument(
        "--recipe",
        metavar="FILE",
        help="a new target: its recipe file (data.target_name, "
        "data.target_train, data.target_test and transfer settings, e.g. rs_configs/targets/NAME.yaml), "
        "over the experiment's transfer section",
    )
    p.add_argument("--mode", choices=TRANSFER_MODES, help="transfer mode (default: the target's first)")
    p.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="outside source models: DIR/*.pt (torchvision's or this "
        "package's ResNet-18 names, bare or as {'state_dict': ...}) and DIR/masks.npy (their classes, "
        "one row per file in name order)",
    )
    p.add_argument("--config", help="with --checkpoints: the experiment (data, model, transfer recipe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--label", help="first part of this worker's name in `store status`")
    p.set_defaults(run=cmd_transfer, takes_settings=True)

    p = commands.add_parser(
        "launch",
        help="run many workers over one store: one per GPU, several on the CPU, or a SLURM job array",
        epilog=SETTINGS_HELP,
    )
    p.add_argument("--store", required=True, metavar="DIR", help="results store (made by `masks`)")
    p.add_argument("--config", help="experiment YAML (default: the one saved in the store by `masks`)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local", help="where workers run (default: local)")
    p.add_argument("--k", type=int, help="models per worker process (run.models_per_process)")
    p.add_argument(
        "--max-rounds",
        type=int,
        default=3,
        help="start workers again while rows are pending after all have ended (default: 3 rounds)",
    )
    p.add_argument("--log-dir", help="worker logs (default: DIR/launches/TIME-EXECUTOR)")
    p.add_argument("--poll-s", type=float, default=10, help="seconds between progress checks (default: 10)")
    group = p.add_argument_group("--executor local")
    group.add_argument("--gpus", help="GPU indices, e.g. 0,1,2,3 or 0-3: one worker per GPU")
    group.add_argument(
        "--workers",
        type=int,
        help="workers on run.device (default 1); CPU workers share the cores, OMP_NUM_THREADS = cores // workers each",
    )
    group = p.add_argument_group("--executor slurm (submitit; timed-out or preempted tasks requeue and resume)")
    group.add_argument("--tasks", type=int, help="array tasks, each one worker (default: 1)")
    group.add_argument("--parallelism", type=int, help="array tasks running at once (default: all)")
    group.add_argument("--time-min", type=int, help="time limit per task in minutes (default: 60)")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    group.add_argument("--gpus-per-task", type=int, help="GPUs per task (default: 0; run.device becomes cuda)")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per task, also its OMP_NUM_THREADS (default: 1)")
    group.add_argument(
        "--sbatch",
        action="append",
        metavar="KEY=VALUE",
        help="any other sbatch option, repeatable: --sbatch account=abc --sbatch mem=32G",
    )
    group.add_argument("--no-wait", action="store_true", help="submit and return (no further rounds)")
    p.set_defaults(run=cmd_launch, takes_settings=True)

    p = commands.add_parser("influence", help="class influence from a results store")
    p.add_argument(
        "store",
        metavar="DIR",
        nargs="+",
        help="a results store, or several read as one (their rows numbered store after store)",
    )
    p.add_argument(
        "--output",
        "--key",
        dest="key",
        default="margins",
        help="per-example output: margins, "
        "p_correct, correct_logit, is_correct, or any per-row field (default: margins)",
    )
    add_mode_option(p)
    p.add_argument("--mask-key", default="masks", help="mask field (default: masks)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba", "torch", "cupy"])
    p.add_argument("--chunk", type=int, default=8192, help="rows per streamed chunk (default: 8192)")
    p.add_argument(
        "--estimator",
        default="difference",
        choices=ESTIMATORS,
        help="difference: of means, with and without each class (the reference's; default); least_squares: "
        "each class's coefficient in a fit on every class's inclusion (needs more models than classes + 1)",
    )
    add_memory_option(p, whole_process=True)
    p.add_argument("--stderr", action="store_true", help="also write standard errors (OUT.stderr.npy)")
    p.add_argument("--out", default="influence.npy", help="output .npy [classes, outputs] (default: influence.npy)")
    p.set_defaults(run=cmd_influence)
