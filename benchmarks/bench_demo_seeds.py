"""Does every finding of the main job hold on every planted data seed?

    .venv/bin/python benchmarks/bench_demo_seeds.py [--seeds 0 1 ... 9] [--counterfactual-seeds 7]
        [--set SECTION.NAME=VALUE ...] [--work out/demo-seeds] [--out benchmarks/results/demo-seeds-cpu.json]

Runs `ffcv-transfer demo` (experiments.demo.run_demo: planted data, its store, influence, findings and
counterfactual) once per data seed, in WORK/seedN (a rerun resumes each), and records per seed what a user
of the demo reads: how many planted twins come out on top of their target, whether the misleading class is
negative on the target classes it acts on and the most negative class overall, the counterfactual's gain of
removing the planted harmful class instead of a random one (paired by initial weights) and whether it is
resolved at 2 standard errors, whether the reliability banner shows and its verdict, the spread of the
models' source accuracy (lowest over the median, the goal being >= 0.9), and the wall time of each stage.
A seed *holds* when all of these pass. The JSON is rewritten after each seed; a table is printed at the end.
Wall times are as measured on the machine given, which may be shared (`load_average` at the end of each seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import accuracy_spread, machine  # noqa: E402

from ffcv_transfer.experiments.demo import run_demo  # noqa: E402

SOURCE_SPREAD_GOAL = 0.9  # every model's source accuracy at least this fraction of the median


def model_spread(store_dir: Path) -> dict:
    """Source accuracy (lowest, median, lowest / median) and target accuracy (mean, s.d.) over the store's
    models, the target accuracy of its first target in its first mode."""
    from ffcv_transfer.store.experiment import open_experiment, transfer_field
    from ffcv_transfer.store.results import ResultStore

    experiment = open_experiment(store_dir)
    target, mode = experiment.transfers[0]
    field = transfer_field("target_acc", experiment, target, mode)
    _, values = ResultStore(store_dir).read(["source_acc", field])
    source, target = (accuracy_spread(values[key].astype(float).tolist()) for key in ("source_acc", field))
    return {
        "source_min": source["min"],
        "source_median": source["median"],
        "source_min_over_median": source["min_over_median"],
        "target_mean": target["mean"],
        "target_sd": target["sd"],
    }


def seed_record(seed: int, findings: dict) -> dict:
    """What one demo run shows, and whether every finding holds."""
    checks = findings["checks"]
    gain = findings.get("counterfactual", {}).get("planted_harmful_gain_over_random", {"mean": None})
    resolved = gain["mean"] is not None and gain.get("stderr") is not None and gain["mean"] >= 2 * gain["stderr"]
    reliability = findings.get("reliability") or {}
    spread = model_spread(Path(findings["store"]))
    record = {
        "seed": seed,
        "models": findings["models"],
        "twins_on_top": sum(checks["twin_on_top"].values()),
        "twins": len(checks["twin_on_top"]),
        "misleading_negative": checks["misleading_negative"],
        "misleading_most_negative": checks["misleading_most_negative"],
        "gain": {key: gain.get(key) for key in ("mean", "stderr", "seeds_to_resolve")},
        "gain_resolved": resolved,
        "verdict": (reliability.get("verdict") or {}).get("level"),
        "banner": reliability.get("banner") is not None,
        "model_spread": spread,
        "seconds": findings["seconds"],
        "stage_seconds": findings["stage_seconds"],
        "load_average": list(os.getloadavg()),
    }
    record["holds"] = bool(
        record["twins_on_top"] == record["twins"]
        and all(checks["misleading_negative"].values())
        and checks["misleading_most_negative"]
        and resolved
        and not record["banner"]
        and spread["source_min_over_median"] >= SOURCE_SPREAD_GOAL
    )
    return record


def print_table(report: dict) -> None:
    print(
        f"{'seed':>4s} {'twins':>5s} {'mis. neg':>8s} {'most neg':>8s} {'gain ± s.e.':>17s} {'2 s.e.':>6s} "
        f"{'banner':>6s} {'src min/med':>11s} {'tgt sd':>6s} {'s':>5s} holds"
    )
    for r in report["seeds"]:
        gain = r["gain"]
        shown = "-" if gain["mean"] is None else f"{gain['mean']:+.3f} ± {gain['stderr'] or 0:.3f}"
        spread = r["model_spread"]
        print(
            f"{r['seed']:4d} {r['twins_on_top']}/{r['twins']:<3d} {str(all(r['misleading_negative'].values())):>8s} "
            f"{str(r['misleading_most_negative']):>8s} {shown:>17s} {str(r['gain_resolved']):>6s} "
            f"{str(r['banner']):>6s} {spread['source_min_over_median']:11.2f} {spread['target_sd']:6.3f} "
            f"{r['seconds']:5.0f} {r['holds']}"
        )
    held = sum(r["holds"] for r in report["seeds"])
    print(f"{held} of {len(report['seeds'])} seeds hold every finding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="planted data seeds")
    parser.add_argument("--counterfactual-seeds", type=int, default=7, help="initial seeds of the counterfactual")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.NAME=VALUE", help="recipe settings")
    parser.add_argument("--work", default="out/demo-seeds")
    parser.add_argument("--out", default="benchmarks/results/demo-seeds-cpu.json")
    args = parser.parse_args()

    overrides = {key: yaml.safe_load(value) for key, _, value in (entry.partition("=") for entry in args.set)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "machine": machine(),
        "commit": commit,
        "command": " ".join(sys.argv),
        "overrides": overrides,
        "counterfactual_seeds": args.counterfactual_seeds,
        "seeds": [],
    }
    for seed in args.seeds:
        findings = run_demo(
            Path(args.work) / f"seed{seed}",
            overrides=overrides,
            seed=seed,
            counterfactual_seeds=args.counterfactual_seeds,
            progress=False,
        )
        report["seeds"].append(seed_record(seed, findings))
        report["held"] = sum(r["holds"] for r in report["seeds"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"seed {seed}: {'holds' if report['seeds'][-1]['holds'] else 'does not hold'}", flush=True)
    print_table(report)


if __name__ == "__main__":
    main()
