"""`ffcv-transfer write ...` and `verify`: datasets to betons with their sidecars, and checking them."""
from __future__ import annotations

import argparse


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
                            "which loader.kind resident needs)")
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
