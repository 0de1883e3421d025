"""The analysis sub-commands of `ffcv-transfer` (rankings, explain, subpopulation, counterfactual, report).
Each reads a finished store and writes its figures and JSON under --out (default STORE/findings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ffcv_transfer.cli.common import (
    SETTINGS_HELP,
    add_memory_option,
    add_output_option,
    check_at_least,
    check_folder_can_be,
    max_bytes_of,
    parse_rows,
    store_experiment,
)


def checked_classes(args: argparse.Namespace):
    """The classes of the store a findings command reads (`report.read_classes`), after checking its --k and
    --out: every argument is refused before the influence is computed."""
    from ffcv_transfer.findings.report import read_classes

    check_at_least(args.k, 1, "--k", "a count")
    if args.out:
        check_folder_can_be(args.out, "--out")
    return read_classes(args.store, args.names, mode=args.mode, target=args.target)


def cmd_rankings(args: argparse.Namespace) -> None:
    from ffcv_transfer.findings.reliability import describe_column
    from ffcv_transfer.findings.report import findings_dir, gather, write_rankings
    from ffcv_transfer.findings.wordnet import describe_agreement

    classes = checked_classes(args)
    found = gather(args.store, output=args.output, classes=classes)
    if found.reliability:
        print(f"{found.reliability.verdict(found.evidence).text}\n")
    rankings, charts, written = write_rankings(found, findings_dir(args.store, args.out), args.k)
    for (name, ranking), chart in zip(rankings.items(), charts):
        stated = ranking["reliability"]
        print(f"{name}: chart {chart}" + (f"; {describe_column(stated)}" if stated else ""))
        for p, q in zip(ranking["positive"], ranking["negative"]):
            print(
                f"  {p['source']:30s} {p['influence']:+8.3f} ±{p['stderr']:6.3f}    "
                f"{q['source']:30s} {q['influence']:+8.3f} ±{q['stderr']:6.3f}"
            )
    if found.wordnet:
        print(describe_agreement(found.wordnet))
    print(f"wrote {written}")


def cmd_explain(args: argparse.Namespace) -> None:
    from ffcv_transfer.findings.rankings import explain_example
    from ffcv_transfer.findings.report import explanation_grid, findings_dir, gather
    from ffcv_transfer.store.betons import BetonRecords

    classes = checked_classes(args)
    j = classes.example(args.example)
    check_at_least(args.check, 0, "--check", "a number of models")
    found = gather(args.store, output=args.output, classes=classes)
    out = findings_dir(args.store, args.out)
    negative = explain_example(found.influence, j, args.k)
    target = found.target_names[found.labels[j]]
    print(
        f"target test example {j} ({target}), mean {found.output} over the models {found.mean_outputs[j]:+.3f}; "
        "most negative source classes:"
    )
    for c in negative:
        print(f"  {found.source_names[c]:30s} {found.influence[c, j]:+8.3f}")
    target_images, source_images = BetonRecords(found.betons["target_test"]), BetonRecords(found.betons["source_val"])
    grid = explanation_grid(out / f"explain_{j}.png", found, j, negative, target_images, source_images, per_class=4)
    print(f"images: {grid}")
    if args.check:
        from ffcv_transfer.experiments.explain_check import check_without_class

        source_class = int(negative[0])
        rates = check_without_class(
            out,
            store_experiment(args),
            len(found.source_names),
            j,
            source_class,
            args.check,
            progress=not args.no_progress,
            target=args.target,
            mode=args.mode,
        )
        print(
            f"retrained {rates['models']} models: example {j} predicted correctly by {rates['with']:.0%} of those "
            f"with {found.source_names[source_class]} and {rates['without']:.0%} of those without it"
        )


def cmd_subpopulation(args: argparse.Namespace) -> None:
    from ffcv_transfer.findings.plots import image_grid
    from ffcv_transfer.findings.rankings import subpopulation
    from ffcv_transfer.findings.report import findings_dir, gather
    from ffcv_transfer.store.betons import BetonRecords

    classes = checked_classes(args)
    c = classes.source_class(args.source_class)
    target = classes.target_class(args.target_class) if args.target_class else None
    found = gather(args.store, output=args.output, classes=classes)
    out = findings_dir(args.store, args.out)
    chosen = subpopulation(found.influence, c, args.k, found.labels, target)
    images = BetonRecords(found.betons["target_test"])
    for j in chosen:
        print(f"  #{j:<6d} {found.target_names[found.labels[j]]:20s} {found.influence[c, j]:+8.3f}")
    grid = image_grid(
        out / f"subpopulation_{c}.png",
        [images.image(int(j)) for j in chosen],
        [f"#{j} {found.influence[c, j]:+.2f}" for j in chosen],
        f"most influenced by {found.source_names[c]}",
    )
    print(f"images: {grid}")


def cmd_counterfactual(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.experiments.removals import run_counterfactual
    from ffcv_transfer.findings.counterfactual import format_gain, write_counterfactual
    from ffcv_transfer.findings.report import findings_dir, gather, read_classes

    ks = parse_rows(args.ks, "--ks")
    check_at_least(args.seeds, 1, "--seeds", "a number of models")
    if args.out:
        check_folder_can_be(args.out, "--out")
    experiment = store_experiment(args)
    classes = read_classes(args.store, mode=args.mode, target=args.target)
    if not 1 <= min(ks) <= max(ks) < len(classes.source_names):
        raise ConfigError(
            f"--ks {args.ks}: the source set has {len(classes.source_names)} classes; remove 1 to "
            f"{len(classes.source_names) - 1} of them"
        )
    found = gather(args.store, output=args.output, classes=classes)
    out = findings_dir(args.store, args.out)
    progress = not args.no_progress
    store = run_counterfactual(
        found.influence, out, experiment, ks, args.seeds, args.kinds, progress, target=args.target, mode=args.mode
    )
    baseline, curves, changes, plot = write_counterfactual(store, out, f"counterfactuals of {args.store}")
    print(f"all classes: {sum(baseline) / max(len(baseline), 1):.4f} target accuracy ({len(baseline)} models)")
    for kind, by_k in curves.items():
        for k, accuracies in sorted(by_k.items()):
            change = format_gain(changes[kind][k])
            print(
                f"without {k} {kind.replace('_', ' ')}: {sum(accuracies) / len(accuracies):.4f} "
                f"({len(accuracies)} models{'; against all classes, seed by seed: ' + change if change else ''})"
            )
    print(f"plot: {plot}")


def cmd_report(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.findings.report import write_report

    check_at_least(args.k, 1, "--k", "a count")
    if args.counterfactual and not (Path(args.counterfactual) / "spec.json").is_file():
        raise ConfigError(f"--counterfactual {args.counterfactual}: no removal store there (made by `counterfactual`)")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; the report is an HTML file")
    written = write_report(
        args.store,
        args.out,
        k=args.k,
        counterfactual_dir=args.counterfactual,
        names_file=args.names,
        progress=True,
        output=args.output,
        mode=args.mode,
        target=args.target,
    )
    print(f"wrote {written}")


def cmd_leakage(args: argparse.Namespace) -> None:
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.findings.leakage import find_leaks

    check_at_least(args.top, 1, "--top", "a number of source images")
    check_at_least(args.max_hash_distance, 0, "--max-hash-distance", "a number of bits")
    if not -1 <= args.min_similarity <= 1:
        raise ConfigError(f"--min-similarity {args.min_similarity}: a correlation, expected a number in -1..1")
    if args.out:
        check_folder_can_be(args.out, "--out")
    found = find_leaks(
        args.store,
        args.out,
        top=args.top,
        min_similarity=args.min_similarity,
        max_hash_distance=args.max_hash_distance,
        max_bytes=max_bytes_of(args),
        key=args.output,
        mode=args.mode,
        target=args.target,
    )
    for kind in ("leakage", "mislabelled"):
        print(f"{kind}: {len(found[kind])} source images confirmed as near-duplicates of a target image")
        for entry in found[kind][:20]:
            print(f"  source #{entry['source']} -> target #{entry['target']}: influence {entry['influence']:+.3f}")
    if "planted" in found:
        print(f"planted copies: {found['planted']}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    from ffcv_transfer.findings.leakage import DEFAULT_TOP, MAX_HASH_DISTANCE, MIN_SIMILARITY

    def store_parser(name: str, help: str, pooled: bool = False, **kwargs) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, **kwargs)
        if pooled:
            p.add_argument(
                "store",
                metavar="STORE",
                nargs="+",
                help="a results store with completed rows, or "
                "several stores of one experiment read as one (outputs go beside the first)",
            )
        else:
            p.add_argument("store", metavar="STORE", help="a results store with completed rows")
        p.add_argument(
            "--names",
            help="class names file, KEY<TAB>NAME per line (default: the beton's names; "
            "WordNet words for wnids from $FFCV_TRANSFER_DATA/imagenet-meta)",
        )
        add_output_option(p)
        return p

    p = store_parser(
        "rankings", "most positive and most negative source classes, overall and per target class", pooled=True
    )
    p.add_argument("--k", type=int, default=5, help="classes at each end (default: 5)")
    p.add_argument("--out", help="folder for rankings.json and the bar charts (default: STORE/findings)")
    p.set_defaults(run=cmd_rankings)

    p = store_parser("explain", "a target example's most negative source classes, with images", epilog=SETTINGS_HELP)
    p.add_argument("--example", type=int, required=True, help="index of the target test example")
    p.add_argument("--k", type=int, default=3, help="source classes to show (default: 3)")
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="R",
        help="also retrain R models with all classes and R without the most negative one",
    )
    p.add_argument("--out", help="folder for the figure (default: STORE/findings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_explain, takes_settings=True)

    p = store_parser("subpopulation", "the target images a source class influences most")
    p.add_argument("--source-class", required=True, help="index or name of the source class")
    p.add_argument("--target-class", help="only images of this target class (a name)")
    p.add_argument("--k", type=int, default=16, help="images (default: 16)")
    p.add_argument("--out", help="folder for the image grid (default: STORE/findings)")
    p.set_defaults(run=cmd_subpopulation)

    p = commands.add_parser(
        "counterfactual",
        help="retrain without the k most negative / most positive / random "
        "source classes and plot target accuracy against k",
        epilog=SETTINGS_HELP,
    )
    p.add_argument("store", metavar="STORE", help="the experiment whose influences choose the classes")
    add_output_option(p)
    p.add_argument("--ks", default="1,2,4", help="numbers of classes removed, e.g. 1,2,4 or 1-3 (default: 1,2,4)")
    p.add_argument("--seeds", type=int, default=3, help="models per (kind, k), and full-set models (default: 3)")
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["most_negative", "most_positive", "random"],
        choices=["most_negative", "most_positive", "random"],
        help="which classes are removed",
    )
    p.add_argument("--out", help="folder for the removal store, plot and JSON (default: STORE/findings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_counterfactual, takes_settings=True)

    p = commands.add_parser(
        "leakage",
        help="source images that are near-duplicates of target images, found by "
        "example-level influence (a store made by `masks --examples`)",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument(
        "--top",
        type=int,
        default=DEFAULT_TOP,
        help=f"source images examined per target image at each end of its influence ranking (default: {DEFAULT_TOP})",
    )
    p.add_argument(
        "--min-similarity",
        type=float,
        default=MIN_SIMILARITY,
        help=f"aligned-thumbnail correlation that makes a near-duplicate (default: {MIN_SIMILARITY})",
    )
    p.add_argument(
        "--max-hash-distance",
        type=int,
        default=MAX_HASH_DISTANCE,
        help=f"or at most this many perceptual-hash bits apart (default: {MAX_HASH_DISTANCE})",
    )
    add_memory_option(p, whole_process=False)
    add_output_option(p)
    p.add_argument("--out", help="folder for leaks.json and the image grids (default: STORE/leakage)")
    p.set_defaults(run=cmd_leakage)

    p = store_parser("report", "write a self-contained HTML report of a store's findings", pooled=True)
    p.add_argument("--out", help="HTML file (default: STORE/report.html)")
    p.add_argument("--k", type=int, default=5, help="classes at each end of the bar charts (default: 5)")
    p.add_argument("--counterfactual", metavar="DIR", help="a removal store to include (from `counterfactual`)")
    p.set_defaults(run=cmd_report)
