"""The main job on the embedded default: planted synthetic data generated on the fly, then masks ->
train -> transfer -> store -> influence -> findings -> counterfactual retraining -> HTML report.
Rerunning with the same --out resumes: the data and finished rows are kept."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.findings.evidence import twins_on_top
from ffcv_transfer.findings.names import DATA_ENV

CONFIGS = Path(__file__).resolve().parents[2] / "rs_configs"
DEMO_CONFIG = CONFIGS / "demo_cpu.yaml"
TINY_CONFIG = CONFIGS / "tinyimagenet_demo_cpu.yaml"
DATASETS = {"planted": DEMO_CONFIG, "tiny-imagenet": TINY_CONFIG}
TINY_ARCHIVE, CIFAR_ARCHIVE = "tiny-imagenet-200-300pc-jpg.tar.gz", "cifar10-jpg.tar.gz"


def demo_spec():
    """4 targets plus a background class (so a target is recognised by its own motif, not by elimination),
    their 4 twins, 2 unrelated source classes and 1 misleading one, whose cue sits on target 0's training
    images and on the background's test images (a shortcut that fails on the test set, so removing the
    misleading class helps); each target motif has a sibling distractor, so that recognising a target
    takes its twin's detector."""
    from ffcv_transfer.writers.synthetic import PlantedSpec

    return PlantedSpec(
        num_targets=4,
        num_unrelated=2,
        num_misleading=1,
        resolution=32,
        source_train_per_class=150,
        source_val_per_class=30,
        target_train_per_class=100,
        target_test_per_class=150,
        motif_amplitude=1.2,
        noise=0.05,
        background_class=True,
        misleading_conflict="background",
        sibling_flips=4,
        cue_decoys=True,
    )


def write_tiny_imagenet(out: Path, data_dir: str | Path, classes: int, per_class: int, target_per_class: int) -> None:
    """The real small replica's betons in `out`: `classes` Tiny-ImageNet-200 classes chosen by
    `replica_classes` (`per_class` training images each, all their validation images) -> CIFAR-10
    (`target_per_class` training and `target_per_class // 2` test images per class), from the shared
    archives."""
    import tarfile

    from ffcv_transfer.findings.wordnet import load_hierarchy
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.imagefolder import write_imagefolder

    data_dir = Path(data_dir)
    archives = {name: data_dir / name for name in (TINY_ARCHIVE, CIFAR_ARCHIVE)}
    missing = [str(path) for path in archives.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"--data tiny-imagenet needs {', '.join(missing)} (pass --data-dir or set "
            "FFCV_TRANSFER_DATA to the shared data folder)"
        )
    with tarfile.open(archives[TINY_ARCHIVE], "r|*") as archive:
        member = next(m for m in archive if m.name.endswith("tiny-imagenet/wnids.txt"))
        wnids = replica_classes(
            archive.extractfile(member).read().decode().split(), classes, load_hierarchy(data_dir / "imagenet-meta")
        )
    options = ImageOptions(write_mode="jpg", max_resolution=64)
    for name, subdir, chosen, count in (
        ("tiny_train", "tiny-imagenet/train", wnids, per_class),
        ("tiny_val", "tiny-imagenet/val", wnids, None),
        ("cifar10_train", "cifar10/train", None, target_per_class),
        ("cifar10_test", "cifar10/test", None, max(target_per_class // 2, 1)),
    ):
        archive = archives[TINY_ARCHIVE if name.startswith("tiny") else CIFAR_ARCHIVE]
        write_imagefolder(
            archive,
            out / f"{name}.beton",
            subdir=subdir,
            classes=chosen,
            per_class=count,
            options=options,
            overwrite=True,
        )


def replica_classes(wnids: Sequence[str], count: int, hierarchy) -> list[str]:
    """`count` of the Tiny-ImageNet `wnids`, chosen so that the WordNet check can see structure: first the
    classes under a CIFAR-10 concept (semantic.CIFAR10_CONCEPTS: 22 of Tiny-ImageNet's 200), taken in turn
    from each concept, then others evenly spaced through the rest in wnid order (the controls). Sorted."""
    from ffcv_transfer.findings.wordnet import CIFAR10_CONCEPTS, concept_members

    wnids = sorted(wnids)
    if not 1 <= count <= len(wnids):
        raise ValueError(f"--classes {count}: choose 1..{len(wnids)} Tiny-ImageNet classes")
    members = concept_members(wnids, CIFAR10_CONCEPTS, hierarchy)  # (W, concepts)
    by_concept = [list(np.flatnonzero(members[:, k])) for k in range(members.shape[1])]
    in_turn = [index for group in itertools.zip_longest(*by_concept) for index in group if index is not None]
    others = np.flatnonzero(~members.any(1))
    extra = max(0, count - len(in_turn))
    chosen = in_turn[:count] + [int(i) for i in others[np.linspace(0, len(others) - 1, extra).round().astype(int)]]
    return sorted(wnids[i] for i in chosen)


@dataclass(frozen=True)
class TinySize:
    """How much of the real data `--data tiny-imagenet` uses."""

    classes: int = 44  # replica_classes: the 22 under CIFAR-10 concepts and 22 others
    per_class: int = 100
    target_per_class: int = 200


def run_demo(
    out: str | Path,
    data: str = "planted",
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    counterfactual_seeds: int = 7,
    data_dir: str | Path | None = None,
    tiny: TinySize = TinySize(),
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Everything under `out`: data/, store/, counterfactual/, influence.npy, findings.json, report.html.
    `data`: "planted" (generated, with its ground truth) or "tiny-imagenet" (Tiny-ImageNet-200 -> CIFAR-10
    from `data_dir`). The counterfactual retrains, per seed, one model on every source class, one without
    the most negative class, one without a random class and, on planted data, one without the planted
    harmful class where it is not the most negative (`counterfactual_seeds` 0 skips it). Models train in
    `workers` local worker processes (default: one per core), the rows split evenly."""
    from ffcv_transfer.config import load_experiment
    from ffcv_transfer.findings.rankings import rank_sources
    from ffcv_transfer.findings.report import gather, write_report
    from ffcv_transfer.store.experiment import create_class_store
    from ffcv_transfer.store.results import ResultStore
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.synthetic import write_synthetic

    if data not in DATASETS:
        raise ValueError(f"--data {data!r}: choose one of {', '.join(DATASETS)}")
    out, started, stages = Path(out), time.monotonic(), {}

    def lap(stage: str) -> None:  # seconds since the previous stage ended
        stages[stage] = round(time.monotonic() - started - sum(stages.values()), 1)

    if data == "tiny-imagenet" and not os.environ.get(DATA_ENV):  # `gather`'s WordNet check reads it there
        os.environ[DATA_ENV] = str(Path(data_dir).resolve())
    experiment = load_experiment(config or DATASETS[data], {"data.root": str(out / "data"), **(overrides or {})})
    target_test = experiment.data.path("target_test")
    if not target_test.exists():
        if data == "planted":
            write_synthetic(out / "data", seed=seed, spec=demo_spec(), options=ImageOptions(write_mode="raw"))
        else:
            write_tiny_imagenet(out / "data", data_dir, tiny.classes, tiny.per_class, tiny.target_per_class)
    lap("data")
    store_dir = out / "store"
    if not (store_dir / "spec.json").exists():
        create_class_store(store_dir, experiment)
    train = partial(train_in_workers, workers=workers or len(os.sched_getaffinity(0)), progress=progress)
    train(store_dir, experiment)
    lap("train")
    found = gather(store_dir, progress=progress)
    np.save(out / "influence.npy", found.influence)
    by_class = found.by_class
    status = ResultStore(store_dir).status()
    findings = {
        "data": data,
        "store": str(store_dir),
        "models": status["completed"],
        "failed": status["failed"],
        "ranking": rank_sources(by_class, found.source_names, found.target_names, found.stderr[:, :-1]),
    }
    if found.reliability:
        findings["reliability"] = found.reliability.to_json(found.evidence)
    if found.wordnet:
        findings["wordnet_agreement"] = found.wordnet
    if planted := found.planted:
        findings["ground_truth"] = {key: planted[key] for key in ("twin", "misleading", "unrelated", "expected_sign")}
        findings["checks"] = _checks(by_class, found.influence.mean(1), planted)
    counterfactual_dir = None
    if counterfactual_seeds:
        counterfactual_dir = out / "counterfactual"
        findings["counterfactual"] = _counterfactual(counterfactual_dir, experiment, found, counterfactual_seeds, train)
        lap("counterfactual")
    findings["report"] = str(
        write_report(store_dir, out / "report.html", counterfactual_dir=counterfactual_dir, found=found)
    )
    lap("report")
    findings["seconds"], findings["stage_seconds"] = round(time.monotonic() - started, 1), stages
    (out / "findings.json").write_text(json.dumps(findings, indent=1) + "\n")
    return findings


def train_in_workers(store_dir: Path, experiment, workers: int, progress: bool) -> None:
    """Train the store's pending rows in `workers` local worker processes (ffcv-transfer's local launcher),
    the rows split evenly and the cores too: small models on two threads leave the second core mostly idle
    (docs/benchmarks.md#training-throughput)."""
    from ffcv_transfer.engine.launch import launch_local
    from ffcv_transfer.store.results import ResultStore

    pending = ResultStore(store_dir).status()["pending"]
    if not pending:
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)  # ffcv sets torch's threads to its own count
    experiment = replace(
        experiment,
        run=replace(experiment.run, models_per_process=math.ceil(pending / workers)),
        loader=replace(experiment.loader, num_workers=threads),
    )
    launch_local(store_dir, experiment, workers=workers, poll_s=2, say=print if progress else lambda text: None)


def _counterfactual(path: Path, experiment, found, seeds: int, train: Callable[[Path, Any], None]) -> dict:
    """Per seed, models on every source class, without the most negative one, without a random one and,
    on planted data, without the planted harmful classes (an arm of its own only where they are not the
    most negative class), the models of a seed from the same initial weights; mean target accuracy per
    arm and, seed by seed, the gain of removing the planted harmful classes over removing a random one."""
    from ffcv_transfer.experiments.removals import removal_design, run_removals
    from ffcv_transfer.findings.counterfactual import accuracy_by_arm, accuracy_by_removal, paired_gain
    from ffcv_transfer.findings.reliability import seeds_to_resolve

    overall = found.influence.mean(1)
    removed_first = int(np.argmin(overall))
    harmful = sorted({m["source"] for m in found.planted["misleading"]}) if found.planted else []
    own_arm = bool(harmful) and harmful != [removed_first]
    masks, removals = removal_design(overall, [1], seeds, ["most_negative", "random"], harmful if own_arm else ())
    arms = accuracy_by_arm(run_removals(path, experiment, masks, removals, train=train))
    baseline, curves = accuracy_by_removal(arms)
    result = {
        "seeds": seeds,
        "all_classes": float(np.mean(baseline)),
        **{kind: float(np.mean(by_k[len(harmful) if kind == "chosen" else 1])) for kind, by_k in curves.items()},
        "removed_first": found.source_names[removed_first],
    }
    if harmful:
        arm = ("chosen", len(harmful)) if own_arm else ("most_negative", 1)
        result["planted_harmful"] = [found.source_names[c] for c in harmful]
        gain = result["planted_harmful_gain_over_random"] = paired_gain(arms, arm, ("random", 1))
        if len(gain["per_seed"]) >= 2 and gain["mean"]:
            gain["seeds_to_resolve"] = seeds_to_resolve(list(gain["per_seed"].values()))
    return result


def _checks(by_class: np.ndarray, overall: np.ndarray, planted: dict) -> dict:
    """The planted ground truth against the measured influences: each twin the most positive class of its
    target; each misleading class negative on its target and on the test images that carry its cue, and
    the most negative class over the whole test set."""
    names = planted["target_names"]
    twin_on_top = twins_on_top(by_class, planted)
    misleading_negative = {
        names[t]: bool(by_class[m["source"], t] < 0)
        for m in planted["misleading"]
        for t in (m["target"], m["conflict_target"])
        if t is not None
    }
    misleading = {m["source"] for m in planted["misleading"]}
    return {
        "twin_on_top": twin_on_top,
        "misleading_negative": misleading_negative,
        "misleading_most_negative": bool(misleading and int(np.nanargmin(overall)) in misleading),
    }


def format_findings(findings: dict) -> str:
    """Per target class its most positive and most negative source class (and, on planted data, whether
    the planted twin came out on top), the counterfactual and the report's path."""
    from ffcv_transfer.findings.counterfactual import format_gain

    checks = findings.get("checks")
    stages = ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in findings["stage_seconds"].items())
    lines = [
        f"{findings['models']} models ({findings['failed']} failed) in {findings['seconds']:.0f} s "
        f"({stages}); store {findings['store']}",
        "",
        f"{'target':12s} {'most positive source class (± s.e.)':40s} {'most negative source class (± s.e.)':40s}"
        + (" planted twin" if checks else ""),
    ]

    def cell(entry: dict) -> str:
        spread = f"±{entry['stderr']:4.2f}" if "stderr" in entry else ""
        return f"{entry['source']:24s} {entry['influence']:+9.2f} {spread:5s}"

    for name, ranked in findings["ranking"].items():
        t = name.removeprefix("target")
        twin = (
            ""
            if not checks or t not in checks["twin_on_top"]
            else " on top"
            if checks["twin_on_top"][t]
            else " NOT on top"
        )
        lines.append(f"{name:12s} {cell(ranked[0])} {cell(ranked[-1])}{twin}")
    for target, negative in (checks or {}).get("misleading_negative", {}).items():
        lines.append(f"misleading class on {target}: {'negative' if negative else 'NOT negative'}")
    if checks and checks["misleading_negative"]:
        most = "yes" if checks["misleading_most_negative"] else "NO"
        lines.append(f"misleading class the most negative overall: {most}")
    if cf := findings.get("counterfactual"):
        lines.append(
            f"counterfactual target accuracy ({cf['seeds']} seeds): all classes {cf['all_classes']:.3f}, "
            f"without the most negative class ({cf['removed_first']}) {cf['most_negative']:.3f}, "
            f"without a random class {cf['random']:.3f}"
            + (
                f", without the planted harmful {', '.join(cf['planted_harmful'])} {cf['chosen']:.3f}"
                if "chosen" in cf
                else ""
            )
        )
        gain = cf.get("planted_harmful_gain_over_random", {"mean": None})
        if change := format_gain(gain):
            needed = gain.get("seeds_to_resolve")
            resolved = (
                ""
                if needed is None
                else (
                    " (resolved at 2 s.e.)"
                    if needed <= len(gain["per_seed"])
                    else f" (~{needed} seeds would resolve a gain this size at 2 s.e.)"
                )
            )
            lines.append(
                f"removing the planted harmful class instead of a random one, seed by seed: {change} "
                f"target accuracy{resolved}"
            )
    if verdict := (findings.get("reliability") or {}).get("verdict"):
        lines.append(verdict["text"])
    if agreement := findings.get("wordnet_agreement"):
        from ffcv_transfer.findings.wordnet import describe_agreement

        lines.append(describe_agreement(agreement))
    lines.append(f"report: {findings['report']}")
    return "\n".join(lines)
