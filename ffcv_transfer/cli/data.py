"""`ffcv-transfer write ...` and `verify`: datasets to betons with their sidecars, and checking them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ffcv_transfer.cli.common import check_at_least, check_file_can_be, check_folder_can_be

if TYPE_CHECKING:
    from ffcv_transfer.writers.common import ImageOptions


def _image_options(args: argparse.Namespace, base: ImageOptions | None = None) -> ImageOptions:
    """ImageOptions from the command line; options a command leaves unset (see `_add_image_options`)
    come from `base` (a preset, or the dataset's default)."""
    from dataclasses import fields, replace

    from ffcv_transfer.writers.common import ImageOptions

    given = {f.name: getattr(args, f.name) for f in fields(ImageOptions) if hasattr(args, f.name)}
    options = replace(base or ImageOptions(), **given)
    check_at_least(options.num_workers, 0, "--num-workers", "a number of writer processes")
    check_at_least(options.chunk_size, 1, "--chunk-size", "a number of examples")
    return options


def _add_image_options(parser: argparse.ArgumentParser, write_mode: str | None) -> None:
    """ffcv's image storage options; with `write_mode` None they have no defaults here (an option not
    given is absent from the parsed arguments, and the command's preset or dataset default holds)."""
    fixed = write_mode is not None

    def default(value):
        return value if fixed else argparse.SUPPRESS

    def shown(value) -> str:
        return f" (default: {value})" if fixed else ""

    group = parser.add_argument_group("image storage (ffcv RGBImageField)")
    group.add_argument(
        "--write-mode",
        default=default(write_mode),
        choices=["raw", "jpg", "smart", "proportion"],
        help=f"how images are stored{shown(write_mode)}",
    )
    group.add_argument(
        "--max-resolution",
        type=int,
        default=default(None),
        help="resize so the longer side is at most this" + shown("keep"),
    )
    group.add_argument(
        "--square",
        action="store_true",
        default=default(False),
        help="centre-crop each image to a square first (with --max-resolution: one image size, "
        "which loader.kind resident needs)",
    )
    group.add_argument("--jpeg-quality", type=int, default=default(90), help="JPEG quality" + shown(90))
    group.add_argument(
        "--compress-probability",
        type=float,
        default=default(0.5),
        help="share of images JPEG-compressed in 'proportion' mode" + shown(0.5),
    )
    group.add_argument(
        "--smart-threshold",
        type=int,
        default=default(None),
        help="in 'smart' mode, JPEG-compress images whose raw size exceeds this many bytes",
    )
    group.add_argument("--num-workers", type=int, default=default(0), help="writer processes" + shown("one per core"))
    group.add_argument("--chunk-size", type=int, default=default(100), help="examples per work item" + shown(100))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing beton and sidecar")


def _add_archive_options(parser: argparse.ArgumentParser, preset_help: str) -> None:
    """--preset, --no-progress and the storage options of the writers from official archives."""
    parser.add_argument(
        "--preset",
        choices=["reference", "ffcv-imagenet"],
        default=None,
        help=f"{preset_help}; image options given explicitly override it. reference: "
        "MadryLab/data-transfer's writer (smart, longer side <= 256, quality 90); ffcv-imagenet: "
        "libffcv/ffcv-imagenet's (proportion, <= 500, half JPEG, quality 90)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_image_options(parser, None)


def _print_summary(meta: dict) -> None:
    print(
        f"wrote {meta['beton']}: {meta['num_examples']} examples, {meta['num_classes']} classes, "
        f"sha256 {meta['sha256'][:16]}..."
    )


def cmd_write_imagefolder(args: argparse.Namespace) -> None:
    from ffcv_transfer.writers.imagefolder import write_imagefolder

    check_file_can_be(args.out, "OUT")
    if args.per_class is not None:
        check_at_least(args.per_class, 1, "--per-class", "a number of images")
    classes = args.classes.split(",") if args.classes else None
    _print_summary(
        write_imagefolder(
            args.src,
            args.out,
            subdir=args.subdir,
            classes=classes,
            per_class=args.per_class,
            options=_image_options(args),
            overwrite=args.overwrite,
        )
    )


def cmd_write_cifar(args: argparse.Namespace) -> None:
    from ffcv_transfer.writers.cifar import write_cifar

    check_file_can_be(args.out, "OUT")
    _print_summary(
        write_cifar(args.src, args.out, split=args.split, options=_image_options(args), overwrite=args.overwrite)
    )


def _print_written(written: dict) -> None:
    for split, meta in written.items():
        print(f"{split:5s} ", end="")
        _print_summary(meta)


def cmd_write_imagenet(args: argparse.Namespace) -> None:
    from ffcv_transfer.writers.imagenet import PRESETS, write_imagenet

    check_folder_can_be(args.outdir, "OUTDIR")
    options = _image_options(args, PRESETS[args.preset or "reference"])
    _print_written(
        write_imagenet(
            args.outdir,
            train=args.train,
            val=args.val,
            devkit=args.devkit,
            options=options,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    )


def cmd_write_target(args: argparse.Namespace) -> None:
    from ffcv_transfer.store.betons import BetonError
    from ffcv_transfer.writers.imagenet import PRESETS
    from ffcv_transfer.writers.targets import default_options, write_target

    if len(args.paths) < 2:
        raise BetonError(f"write target {args.name}: give its archive(s), then OUTDIR")
    check_folder_can_be(args.paths[-1], "OUTDIR")
    options = _image_options(args, PRESETS[args.preset] if args.preset else default_options(args.name))
    _print_written(
        write_target(
            args.name,
            args.paths[:-1],
            args.paths[-1],
            options=options,
            allow_missing=args.allow_missing,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    )


def cmd_write_synthetic(args: argparse.Namespace) -> None:
    from ffcv_transfer.writers.synthetic import PlantedSpec, write_synthetic

    check_folder_can_be(args.outdir, "OUTDIR")
    spec = PlantedSpec(
        num_targets=args.targets,
        num_unrelated=args.unrelated,
        num_misleading=args.misleading,
        resolution=args.resolution,
        source_train_per_class=args.source_train_per_class,
        source_val_per_class=args.source_val_per_class,
        target_train_per_class=args.target_train_per_class,
        target_test_per_class=args.target_test_per_class,
        motif_amplitude=args.motif_amplitude,
        noise=args.noise,
        background_class=args.background_class,
        source_background=args.source_background,
        misleading_conflict=args.conflict,
        sibling_flips=args.sibling_flips,
        cue_decoys=args.cue_decoys,
    )
    for split, path in write_synthetic(
        args.outdir, seed=args.seed, spec=spec, options=_image_options(args), overwrite=args.overwrite
    ).items():
        print(f"{split:13s} {path}")


def cmd_verify(args: argparse.Namespace) -> None:
    from ffcv_transfer.store.betons import verify_beton

    for beton in args.betons:
        summary = verify_beton(beton, decode=not args.no_decode)
        print(
            f"ok {beton}: {summary['num_examples']} examples, {summary['num_classes']} classes"
            + ("" if summary["decoded"] else " (images not decoded)")
        )


def add_parsers(commands: argparse._SubParsersAction) -> None:
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

    p = writers.add_parser(
        "imagenet",
        help="ImageNet-1k from the official ILSVRC2012 archives (restartable)",
        description="Writes OUTDIR/imagenet_train.beton and/or imagenet_val.beton (labels: the "
        "standard 1k order) straight from the official archives, nothing unpacked. A split "
        "already complete from the same archives and options is kept, so rerunning a killed "
        "command resumes it.",
    )
    p.add_argument("outdir")
    p.add_argument("--train", help="ILSVRC2012_img_train.tar (a tar of one nXXXXXXXX.tar per class)")
    p.add_argument("--val", help="ILSVRC2012_img_val.tar (50,000 JPEGs, flat)")
    p.add_argument(
        "--devkit",
        help="ILSVRC2012_devkit_t12.tar.gz (or its folder): the val labels "
        "(data/ILSVRC2012_validation_ground_truth.txt) and data/meta.mat",
    )
    _add_archive_options(p, "storage settings (default: reference)")
    p.set_defaults(run=cmd_write_imagenet)

    from ffcv_transfer.writers.targets import ARCHIVES

    p = writers.add_parser(
        "target",
        help="a transfer target from its official archives, canonical split",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s NAME ARCHIVE [ARCHIVE ...] OUTDIR [options]",
        description="Writes OUTDIR/NAME_train.beton and OUTDIR/NAME_test.beton with the "
        "target's canonical split (docs/betons.md states each rule). Archives by target:\n"
        + "\n".join(f"  {name:11s} {files}" for name, files in ARCHIVES.items()),
    )
    p.add_argument("name", metavar="NAME", choices=sorted(ARCHIVES), help="the target")
    p.add_argument("paths", nargs="+", metavar="ARCHIVE... OUTDIR", help="its archives, files or folders; then OUTDIR")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="leave out listed images that are absent (e.g. Birdsnap's dead links), recorded in the "
        "sidecar, instead of failing",
    )
    _add_archive_options(p, "storage settings (default: raw for CIFAR, else as write imagefolder)")
    p.set_defaults(run=cmd_write_target)

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
    p.add_argument(
        "--background-class",
        action="store_true",
        help="add a target class without a class motif (no recognition by elimination)",
    )
    p.add_argument(
        "--source-background",
        action="store_true",
        help="add a source class without a class motif (where a source model places motif-less images)",
    )
    p.add_argument(
        "--conflict",
        default="next",
        help="which test images also carry target t's misleading cue: next (class t+1's, the default), "
        "background (the background class's) or none",
    )
    p.add_argument(
        "--sibling-flips",
        type=int,
        default=0,
        help="give each target motif a near-copy distractor with this many pixel swaps (default: 0, none)",
    )
    p.add_argument(
        "--cue-decoys",
        action="store_true",
        help="every target image without a misleading cue carries the cue's near-copy (needs "
        "--sibling-flips): only the misleading class's detector then makes the cue a shortcut",
    )
    _add_image_options(p, "raw")
    p.set_defaults(run=cmd_write_synthetic)

    p = commands.add_parser("verify", help="read every record of a beton back and check it against its sidecar")
    p.add_argument("betons", nargs="+", metavar="NAME.beton")
    p.add_argument("--no-decode", action="store_true", help="check header, sizes and labels, not every image")
    p.set_defaults(run=cmd_verify)
