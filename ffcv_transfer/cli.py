"""`ffcv-transfer` command line. Sub-commands import their (slow) dependencies only when they run."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .cli_findings import add_parsers as add_findings_parsers

DATA_ENV = "FFCV_TRANSFER_DATA"


def _image_options(args: argparse.Namespace):
    from beton_writers.common import ImageOptions

    return ImageOptions(write_mode=args.write_mode, max_resolution=args.max_resolution, square=args.square,
                        jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                        smart_threshold=args.smart_threshold, num_workers=args.num_workers,
                        chunk_size=args.chunk_size)


def _add_image_options(parser: argparse.ArgumentParser, write_mode: str) -> None:
    group = parser.add_argument_group("image storage (ffcv RGBImageField)")
    group.add_argument("--write-mode", default=write_mode, choices=["raw", "jpg", "smart", "proportion"],
                       help=f"how images are stored (default: {write_mode})")
    group.add_argument("--max-resolution", type=int, default=None,
                       help="resize so the longer side is at most this (default: keep)")
    group.add_argument("--square", action="store_true",
                       help="centre-crop each image to a square first (with --max-resolution: one image size, "
                            "which loader.backend resident needs)")
    group.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default: 90)")
    group.add_argument("--compress-probability", type=float, default=0.5,
                       help="share of images JPEG-compressed in 'proportion' mode (default: 0.5)")
    group.add_argument("--smart-threshold", type=int, default=None,
                       help="in 'smart' mode, JPEG-compress images whose raw size exceeds this many bytes")
    group.add_argument("--num-workers", type=int, default=0, help="writer processes (default: one per core)")
    group.add_argument("--chunk-size", type=int, default=100, help="examples per work item (default: 100)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing beton and sidecar")


def _print_summary(meta: dict) -> None:
    print(f"wrote {meta['beton']}: {meta['num_examples']} examples, {meta['num_classes']} classes, "
          f"sha256 {meta['sha256'][:16]}...")


def cmd_write_imagefolder(args: argparse.Namespace) -> None:
    from beton_writers.imagefolder import write_imagefolder

    classes = args.classes.split(",") if args.classes else None
    _print_summary(write_imagefolder(args.src, args.out, subdir=args.subdir, classes=classes, per_class=args.per_class,
                                     options=_image_options(args), overwrite=args.overwrite))


def cmd_write_cifar(args: argparse.Namespace) -> None:
    from beton_writers.cifar import write_cifar

    _print_summary(write_cifar(args.src, args.out, split=args.split, options=_image_options(args),
                               overwrite=args.overwrite))


def cmd_write_synthetic(args: argparse.Namespace) -> None:
    from beton_writers.synthetic import PlantedSpec, write_synthetic

    spec = PlantedSpec(num_targets=args.targets, num_unrelated=args.unrelated, num_misleading=args.misleading,
                       resolution=args.resolution, source_train_per_class=args.source_train_per_class,
                       source_val_per_class=args.source_val_per_class,
                       target_train_per_class=args.target_train_per_class,
                       target_test_per_class=args.target_test_per_class, motif_amplitude=args.motif_amplitude,
                       noise=args.noise, background_class=args.background_class,
                       source_background=args.source_background,
                       misleading_conflict=args.conflict, sibling_flips=args.sibling_flips,
                       cue_decoys=args.cue_decoys)
    for split, path in write_synthetic(args.outdir, seed=args.seed, spec=spec, options=_image_options(args),
                                       overwrite=args.overwrite).items():
        print(f"{split:13s} {path}")


def cmd_verify(args: argparse.Namespace) -> None:
    from beton_writers.verify import verify_beton

    for beton in args.betons:
        summary = verify_beton(beton, decode=not args.no_decode)
        print(f"ok {beton}: {summary['num_examples']} examples, {summary['num_classes']} classes"
              + ("" if summary["decoded"] else " (images not decoded)"))


def cmd_store_status(args: argparse.Namespace) -> None:
    from .store import ResultStore, format_status

    print(format_status(ResultStore(args.store).status(), args.store))


def cmd_influence(args: argparse.Namespace) -> None:
    import numpy as np

    from .influence import influence_from_store

    result = influence_from_store(args.store, args.key, mask_key=args.mask_key, backend=args.backend,
                                  chunk=args.chunk, stderr=args.stderr, progress=True)
    influence, stderr = result if args.stderr else (result, None)
    np.save(args.out, influence)
    print(f"wrote {args.out}: influence {influence.shape[0]} classes x {influence.shape[1]} outputs")
    if stderr is not None:
        stderr_path = args.out.removesuffix(".npy") + ".stderr.npy"
        np.save(stderr_path, stderr)
        print(f"wrote {stderr_path}")


def parse_settings(tokens: list[str]) -> dict[str, str]:
    """`--section.name=value` or `--section.name value` tokens -> {"section.name": "value"}."""
    from .config import ConfigError

    settings, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            raise ConfigError(f"command line: unexpected argument {token!r} (settings look like --source.epochs=4)")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens):
            key, value = token[2:], tokens[i + 1]
            i += 2
        else:
            raise ConfigError(f"command line: setting {token} has no value")
        settings[key] = value
    return settings


def parse_rows(text: str, option: str = "--models") -> list[int]:
    """'0-63,100,120-127' -> [0, ..., 63, 100, 120, ..., 127]."""
    from .config import ConfigError

    rows: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            rows.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected ranges like 0-63,100") from None
    return rows


def _experiment(args: argparse.Namespace, config: str | None):
    from .config import load_experiment

    return load_experiment(config, parse_settings(args.settings))


def cmd_settings(args: argparse.Namespace) -> None:
    import yaml

    from .config import describe_settings

    if args.config is None and not args.settings:
        print(describe_settings())
    else:
        print(yaml.safe_dump(_experiment(args, args.config).to_dict(), sort_keys=False), end="")


def cmd_demo(args: argparse.Namespace) -> None:
    import os

    from .demo import TinySize, format_findings, run_demo

    data_dir = args.data_dir or os.environ.get(DATA_ENV) or "../shared/data"
    findings = run_demo(args.out, data=args.data, config=args.config, overrides=parse_settings(args.settings),
                        seed=args.seed, counterfactual_seeds=args.counterfactual_seeds, data_dir=data_dir,
                        tiny=TinySize(args.classes, args.per_class, args.target_per_class),
                        workers=args.workers, progress=not args.no_progress)
    print(format_findings(findings))
    print(f"\nfindings: {args.out}/findings.json")


def cmd_masks(args: argparse.Namespace) -> None:
    from .leakage import create_example_store
    from .worker import create_experiment_store

    create = create_example_store if args.examples else create_experiment_store
    store = create(args.store, _experiment(args, args.config))
    masks = store.fixed("masks")
    print(f"wrote {args.store}: {masks.shape[0]} models x {masks.shape[1]} source classes "
          f"({masks.sum(1).min()} classes each), {store.schema['margins'][0][0]} target test examples")


def cmd_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .store import ResultStore, format_status
    from .worker import EXPERIMENT_FILE, run_worker

    if args.k is not None:
        args.settings += [f"--run.models_per_process={args.k}"]
    experiment = _experiment(args, args.config or str(Path(args.store) / EXPERIMENT_FILE))
    rows = parse_rows(args.models) if args.models else None
    written = run_worker(args.store, experiment, rows=rows, progress=not args.no_progress, label=args.label)
    print(f"this worker wrote {written} rows")
    print(format_status(ResultStore(args.store).status(), args.store))


LOCAL_OPTIONS = ("gpus", "workers")
SLURM_SIZES = ("tasks", "parallelism", "time_min", "partition", "gpus_per_task", "cpus_per_task")  # SlurmOptions
SLURM_OPTIONS = (*SLURM_SIZES, "sbatch", "no_wait")


def cmd_launch(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .config import ConfigError
    from .launch import SlurmOptions, launch_local, launch_slurm
    from .store import ResultStore, format_status
    from .worker import EXPERIMENT_FILE

    foreign = [name for name in (SLURM_OPTIONS if args.executor == "local" else LOCAL_OPTIONS)
               if getattr(args, name) not in (None, False)]
    if foreign:
        hint = " (a SLURM task gets its GPUs with --gpus-per-task)" if "gpus" in foreign else ""
        raise ConfigError(f"{', '.join('--' + name.replace('_', '-') for name in foreign)}: not an option of "
                          f"--executor {args.executor}{hint}")
    ResultStore(args.store)  # a missing store is named before its experiment.yaml is looked for
    if args.k is not None:
        args.settings += [f"--run.models_per_process={args.k}"]
    experiment = _experiment(args, args.config or str(Path(args.store) / EXPERIMENT_FILE))
    common = {"log_dir": args.log_dir, "max_rounds": args.max_rounds, "poll_s": args.poll_s}
    if args.executor == "local":
        gpus = parse_rows(args.gpus, "--gpus") if args.gpus is not None else None
        status = launch_local(args.store, experiment, gpus=gpus, workers=args.workers, **common)
    else:
        pairs = [item.split("=", 1) for item in args.sbatch or []]
        if not all(len(pair) == 2 and all(pair) for pair in pairs):
            raise ConfigError(f"--sbatch {' '.join(args.sbatch)}: expected KEY=VALUE, e.g. --sbatch account=abc")
        sizes = {name: getattr(args, name) for name in SLURM_SIZES if getattr(args, name) is not None}
        status = launch_slurm(args.store, experiment, SlurmOptions(**sizes, sbatch=dict(pairs)),
                              wait=not args.no_wait, **common)
    print(format_status(status, args.store))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffcv-transfer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = commands.add_parser("write", help="convert a dataset to a .beton with its sidecar")
    writers = write.add_subparsers(dest="format", required=True, metavar="FORMAT")

    p = writers.add_parser("imagefolder", help="ImageFolder / ImageNet layout, from a folder or a .tar(.gz)")
    p.add_argument("src", help="folder, or .tar/.tar.gz/.tgz archive holding one")
    p.add_argument("out", help="output NAME.beton")
    p.add_argument("--subdir", help="ImageFolder root inside SRC, e.g. cifar10/test or train")
    p.add_argument("--classes", help="comma-separated class folder names to keep (default: all)")
    p.add_argument("--per-class", type=int, help="keep the first N images of each class by file name (default: all)")
    _add_image_options(p, "proportion")
    p.set_defaults(run=cmd_write_imagefolder)

    p = writers.add_parser("cifar", help="CIFAR-10/100 python pickle batches (folder or original .tar.gz)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--split", required=True, choices=["train", "test"])
    _add_image_options(p, "raw")
    p.set_defaults(run=cmd_write_cifar)

    p = writers.add_parser("synthetic", help="planted source/target data with known influences")
    p.add_argument("outdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", type=int, default=5, help="target classes")
    p.add_argument("--unrelated", type=int, default=10, help="unrelated source classes")
    p.add_argument("--misleading", type=int, default=1, help="misleading source classes (0..targets)")
    p.add_argument("--resolution", type=int, default=32, help="image side, a multiple of 8 in 16..64")
    p.add_argument("--source-train-per-class", type=int, default=200)
    p.add_argument("--source-val-per-class", type=int, default=50)
    p.add_argument("--target-train-per-class", type=int, default=200)
    p.add_argument("--target-test-per-class", type=int, default=100)
    p.add_argument("--motif-amplitude", type=float, default=0.8, help="motif contrast (default: 0.8)")
    p.add_argument("--noise", type=float, default=0.08, help="pixel noise (default: 0.08)")
    p.add_argument("--background-class", action="store_true",
                   help="add a target class without a class motif (no recognition by elimination)")
    p.add_argument("--source-background", action="store_true",
                   help="add a source class without a class motif (where a source model places motif-less images)")
    p.add_argument("--conflict", default="next",
                   help="which test images also carry target t's misleading cue: next (class t+1's, the default), "
                   "background (the background class's) or none")
    p.add_argument("--sibling-flips", type=int, default=0,
                   help="give each target motif a near-copy distractor with this many pixel swaps (default: 0, none)")
    p.add_argument("--cue-decoys", action="store_true",
                   help="every target image without a misleading cue carries the cue's near-copy (needs "
                   "--sibling-flips): only the misleading class's detector then makes the cue a shortcut")
    _add_image_options(p, "raw")
    p.set_defaults(run=cmd_write_synthetic)

    p = commands.add_parser("verify", help="read every record of a beton back and check it against its sidecar")
    p.add_argument("betons", nargs="+", metavar="NAME.beton")
    p.add_argument("--no-decode", action="store_true", help="check header, sizes and labels, not every image")
    p.set_defaults(run=cmd_verify)

    store = commands.add_parser("store", help="inspect a results store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    p = store_commands.add_parser("status", help="completed / claimed / pending / failed rows, failure reasons")
    p.add_argument("store", metavar="DIR")
    p.set_defaults(run=cmd_store_status)

    settings = "Any setting can be overridden as --section.name=value; `ffcv-transfer settings` lists them all."
    p = commands.add_parser("settings", help="list every experiment setting, or print a config fully resolved")
    p.add_argument("--config", help="experiment YAML to resolve (with any --section.name=value after it)")
    p.set_defaults(run=cmd_settings, takes_settings=True)

    p = commands.add_parser("demo", help="the whole pipeline, from data to an HTML report (minutes on a CPU)",
                            epilog=settings)
    p.add_argument("--out", default="out/demo", help="output folder; rerunning resumes (default: out/demo)")
    p.add_argument("--data", default="planted", choices=["planted", "tiny-imagenet"],
                   help="planted synthetic data made on the fly (default), or the real small replica "
                   "Tiny-ImageNet-200 -> CIFAR-10 from --data-dir")
    p.add_argument("--config", help="experiment YAML (default: rs_configs/demo_cpu.yaml or tinyimagenet_demo_cpu.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted data")
    p.add_argument("--counterfactual-seeds", type=int, default=7,
                   help="retrain this many times with all classes, without the most negative class and without a "
                   "random one (each class in turn, shuffled), the models of a seed from the same initial weights "
                   "(default: 7; 0 skips)")
    p.add_argument("--workers", type=int, help="local worker processes that train the models, the rows and cores "
                   "split evenly (default: one per core)")
    group = p.add_argument_group("--data tiny-imagenet")
    group.add_argument("--data-dir", help=f"folder with the archives (default: ${DATA_ENV} or ../shared/data)")
    group.add_argument("--classes", type=int, default=20, help="first Tiny-ImageNet classes by wnid (default: 20)")
    group.add_argument("--per-class", type=int, default=100, help="training images per source class (default: 100)")
    group.add_argument("--target-per-class", type=int, default=200,
                       help="CIFAR-10 training images per class; half as many test images (default: 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_demo, takes_settings=True)

    p = commands.add_parser("masks", help="draw the random class subsets and create the results store",
                            epilog=settings)
    p.add_argument("--config", required=True, help="experiment YAML (see rs_configs/)")
    p.add_argument("--store", required=True, metavar="DIR", help="results store to create")
    p.add_argument("--examples", action="store_true", help="random subsets of the source examples instead of "
                   "classes (example-level influence; `ffcv-transfer leakage` reads the store)")
    p.set_defaults(run=cmd_masks, takes_settings=True)

    p = commands.add_parser("train", help="train, transfer and record pending models of a store (K at a time)",
                            epilog=settings)
    p.add_argument("--store", required=True, metavar="DIR")
    p.add_argument("--config", help="experiment YAML (default: the one saved in the store by `masks`)")
    p.add_argument("--models", help="only these rows, e.g. 0-63,100 (default: all pending)")
    p.add_argument("--k", type=int, help="models per process (run.models_per_process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--label", help="first part of this worker's name in `store status` (e.g. gpu0)")
    p.set_defaults(run=cmd_train, takes_settings=True)

    p = commands.add_parser("launch", help="run many workers over one store: one per GPU, several on the CPU, "
                            "or a SLURM job array", epilog=settings)
    p.add_argument("--store", required=True, metavar="DIR", help="results store (made by `masks`)")
    p.add_argument("--config", help="experiment YAML (default: the one saved in the store by `masks`)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local", help="where workers run (default: local)")
    p.add_argument("--k", type=int, help="models per worker process (run.models_per_process)")
    p.add_argument("--max-rounds", type=int, default=3,
                   help="start workers again while rows are pending after all have ended (default: 3 rounds)")
    p.add_argument("--log-dir", help="worker logs (default: DIR/launches/TIME-EXECUTOR)")
    p.add_argument("--poll-s", type=float, default=10, help="seconds between progress checks (default: 10)")
    group = p.add_argument_group("--executor local")
    group.add_argument("--gpus", help="GPU indices, e.g. 0,1,2,3 or 0-3: one worker per GPU")
    group.add_argument("--workers", type=int, help="workers on run.device (default 1); CPU workers share the "
                       "cores, OMP_NUM_THREADS = cores // workers each")
    group = p.add_argument_group("--executor slurm (submitit; timed-out or preempted tasks requeue and resume)")
    group.add_argument("--tasks", type=int, help="array tasks, each one worker (default: 1)")
    group.add_argument("--parallelism", type=int, help="array tasks running at once (default: all)")
    group.add_argument("--time-min", type=int, help="time limit per task in minutes (default: 60)")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    group.add_argument("--gpus-per-task", type=int, help="GPUs per task (default: 0; run.device becomes cuda)")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per task, also its OMP_NUM_THREADS (default: 1)")
    group.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                       help="any other sbatch option, repeatable: --sbatch account=abc --sbatch mem=32G")
    group.add_argument("--no-wait", action="store_true", help="submit and return (no further rounds)")
    p.set_defaults(run=cmd_launch, takes_settings=True)

    p = commands.add_parser("influence", help="class influence from a results store")
    p.add_argument("store", metavar="DIR")
    p.add_argument("--key", default="margins", help="per-row output field (default: margins)")
    p.add_argument("--mask-key", default="masks", help="mask field (default: masks)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba", "torch", "cupy"])
    p.add_argument("--chunk", type=int, default=8192, help="rows per streamed chunk (default: 8192)")
    p.add_argument("--stderr", action="store_true", help="also write standard errors (OUT.stderr.npy)")
    p.add_argument("--out", default="influence.npy", help="output .npy [classes, outputs] (default: influence.npy)")
    p.set_defaults(run=cmd_influence)

    add_findings_parsers(commands, settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_settings", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.settings = extra
    from beton_writers.common import BetonError

    from .config import ConfigError
    from .influence import InfluenceError
    from .launch import LaunchError
    from .store import StoreError

    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except (BetonError, StoreError, InfluenceError, ConfigError, LaunchError) as e:
        print(f"ffcv-transfer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
