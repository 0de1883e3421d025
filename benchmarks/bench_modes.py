"""One source pass, several transfers: end-to-end source models per hour when each source model is
transferred 1, 2 or 3 ways in one run (`transfer.mode: a,b,c`), against training it again for each mode
(JSON + a table).

The demo's planted data and CPU recipe (rs_configs/demo_cpu.yaml), shortened: 8 models, K = 8, in one
worker process. Each case is a fresh store trained by `worker.run_worker` in this process; the first
case also pays the loaders' JIT compilation, so a warm-up run goes first.

    python benchmarks/bench_modes.py --out benchmarks/results/modes-cpu.json
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_common import machine, save_report

MODES = ("cached_features", "fixed_feature", "full_finetune")
CASES = [MODES[:1], MODES[:2], MODES, MODES[1:2], MODES[2:3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--source-epochs", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/modes-cpu.json")
    args = parser.parse_args()

    from beton_writers import ImageOptions
    from beton_writers.synthetic import write_synthetic
    from ffcv_transfer.config import load_experiment
    from ffcv_transfer.demo import demo_spec
    from ffcv_transfer.experiment_store import create_class_store
    from ffcv_transfer.loader_cache import LoaderCache
    from ffcv_transfer.worker import run_worker

    config = Path(__file__).resolve().parent.parent / "rs_configs" / "demo_cpu.yaml"
    report = {"machine": machine(), "models": args.models, "source_epochs": args.source_epochs, "results": []}
    with tempfile.TemporaryDirectory() as root:
        write_synthetic(Path(root) / "data", seed=0, spec=demo_spec(), options=ImageOptions(write_mode="raw"))
        loaders = LoaderCache()  # shared: every case after the warm-up finds its loaders compiled
        for n, modes in enumerate([MODES[:1], *CASES]):
            experiment = load_experiment(config, {
                "data.root": str(Path(root) / "data"), "masks.num_models": args.models, "masks.design": "random",
                "run.models_per_process": args.models, "source.epochs": args.source_epochs,
                "source.lr_peak_epoch": 1, "transfer.mode": ",".join(modes)})
            store = create_class_store(Path(root) / f"store{n}", experiment)
            began = time.perf_counter()
            written = run_worker(store.path, experiment, progress=False, loaders=loaders)
            seconds = time.perf_counter() - began
            if n == 0:
                continue  # the warm-up
            row = {"modes": list(modes), "written": written, "seconds": seconds,
                   "models_per_hour": 3600 * written / seconds}
            report["results"].append(row)
            save_report(args.out, report)
            print(row, flush=True)
    by_modes = {tuple(r["modes"]): r["seconds"] for r in report["results"]}
    separate = sum(by_modes[(mode,)] for mode in MODES)
    report["three_modes_together_s"], report["three_modes_separately_s"] = by_modes[MODES], separate
    save_report(args.out, report)
    print(f"{'transfer modes':48} {'seconds':>8} {'models/hour':>12}")
    for r in report["results"]:
        print(f"{', '.join(r['modes']):48} {r['seconds']:>8.1f} {r['models_per_hour']:>12.0f}")
    print(f"all three in one run: {by_modes[MODES]:.1f} s; three separate runs: {separate:.1f} s "
          f"({separate / by_modes[MODES]:.2f}x)")


if __name__ == "__main__":
    main()
