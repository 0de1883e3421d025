"""One source pass, several transfers: end-to-end source models per hour when each source model is
transferred several ways in one run, against training it again for each transfer (JSON + a table).

    modes:    the one target in 1, 2 or 3 modes (`transfer.mode: a,b,c`), and each mode alone
    targets:  1 or 4 targets (the experiment's `targets:` list), fixed_feature, and each target alone

The demo's planted data and CPU recipe (rs_configs/demo_cpu.yaml), shortened: 8 models, K = 8, in one
worker process; the further targets are the target splits of planted data sets of other seeds (same
sizes). Each case is a fresh store trained by `worker.run_worker` in this process with one shared
LoaderCache, after a warm-up run that compiles every loader (each case then finds its loaders compiled).

    python benchmarks/bench_transfers.py --out benchmarks/results/transfers-cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_common import machine, save_report

MODES = ("cached_features", "fixed_feature", "full_finetune")
TARGETS = ("target", "second", "third", "fourth")
CASES = {
    "modes": [
        (("target",), MODES[:1]),
        (("target",), MODES[:2]),
        (("target",), MODES),
        (("target",), MODES[1:2]),
        (("target",), MODES[2:3]),
    ],
    "targets": [
        (TARGETS[:1], ("fixed_feature",)),
        (TARGETS, ("fixed_feature",)),
        *(((name,), ("fixed_feature",)) for name in TARGETS[1:]),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--source-epochs", type=int, default=4)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="benchmarks/results/transfers-cpu.json")
    args = parser.parse_args()

    import yaml

    from ffcv_transfer.config import load_experiment
    from ffcv_transfer.engine.loader_cache import LoaderCache
    from ffcv_transfer.engine.worker import run_worker
    from ffcv_transfer.experiments.demo import demo_spec
    from ffcv_transfer.store.experiment import create_class_store
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.synthetic import write_synthetic

    config = Path(__file__).resolve().parent.parent / "rs_configs" / "demo_cpu.yaml"
    report = {"machine": machine(), "models": args.models, "source_epochs": args.source_epochs, "results": []}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for seed, name in enumerate(TARGETS):
            write_synthetic(root / name, seed=seed, spec=demo_spec(), options=ImageOptions(write_mode="raw"))
        recipes = {
            name: {
                "data": {
                    "target_name": name,
                    "target_train": str(root / name / "target_train.beton"),
                    "target_test": str(root / name / "target_test.beton"),
                }
            }
            for name in TARGETS
        }

        def experiment(targets: tuple[str, ...], modes: tuple[str, ...]):
            tree = yaml.safe_load(config.read_text()) | {"targets": [recipes[name] for name in targets[1:]]}
            tree["data"] |= recipes[targets[0]]["data"]
            path = root / "experiment.yaml"
            path.write_text(yaml.safe_dump(tree))
            return load_experiment(
                path,
                {
                    "data.root": str(root / "target"),
                    "masks.num_models": args.models,
                    "masks.design": "random",
                    "run.models_per_process": args.models,
                    "source.epochs": args.source_epochs,
                    "source.lr_peak_epoch": 1,
                    "transfer.mode": ",".join(modes),
                },
            )

        loaders = LoaderCache(size=32)  # shared: every case after the warm-up finds its loaders compiled
        warm_up = [(TARGETS, MODES)]
        cases = [(kind, case) for kind in args.cases for case in CASES[kind]]
        for n, (kind, (targets, modes)) in enumerate([("warm-up", case) for case in warm_up] + cases):
            store = create_class_store(root / f"store{n}", experiment(targets, modes))
            began = time.perf_counter()
            written = run_worker(store.path, experiment(targets, modes), progress=False, loaders=loaders)
            seconds = time.perf_counter() - began
            if kind == "warm-up":
                continue
            row = {
                "case": kind,
                "targets": list(targets),
                "modes": list(modes),
                "written": written,
                "seconds": seconds,
                "models_per_hour": 3600 * written / seconds,
            }
            report["results"].append(row)
            save_report(args.out, report)
            print(row, flush=True)
    seconds = {(tuple(r["targets"]), tuple(r["modes"])): r["seconds"] for r in report["results"]}
    summary = {}
    if "modes" in args.cases:
        summary["modes"] = {
            "together_s": seconds[("target",), MODES],
            "separately_s": sum(seconds[("target",), (mode,)] for mode in MODES),
        }
    if "targets" in args.cases:
        summary["targets"] = {
            "together_s": seconds[TARGETS, ("fixed_feature",)],
            "separately_s": sum(seconds[(name,), ("fixed_feature",)] for name in TARGETS),
        }
    report["summary"] = summary
    save_report(args.out, report)
    print(f"{'targets':32} {'transfer modes':48} {'seconds':>8} {'models/hour':>12}")
    for r in report["results"]:
        targets, modes = ", ".join(r["targets"]), ", ".join(r["modes"])
        print(f"{targets:32} {modes:48} {r['seconds']:>8.1f} {r['models_per_hour']:>12.0f}")
    for kind, s in summary.items():
        print(
            f"all {kind} in one run: {s['together_s']:.1f} s; separate runs: {s['separately_s']:.1f} s "
            f"({s['separately_s'] / s['together_s']:.2f}x)"
        )


if __name__ == "__main__":
    main()
