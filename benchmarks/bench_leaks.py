"""How reliably example-level influence finds planted leaks (JSON + a table).

For each data draw (`--seeds`) and training length (`--epochs` of each model on its own examples), the
planted-leak trial of tests/test_leakage.py (`ffcv_transfer.experiments.leak_trial`): `--models` warm-started models
on random halves of the source examples, cached-feature transfer, example influence. Reported per planted
copy: its rank among the source images of its target image (leaks from the most positive, mislabelled
copies from the most negative), and per kind the share of copies in the top `--top`; false flags count
unplanted images that `leakage.flag_examples` confirms. Detection quality, not speed: the seconds are
those of one trial on this machine.

    python benchmarks/bench_leaks.py --seeds 0 1 2 3 4 5 --epochs 12 --jobs 2

`--jobs` runs that many trials at once, each in its own process with one torch thread (a trial's ranks
depend on the thread count: training is chaotic, and a different summation order is enough).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed

from bench_common import machine, save_report


def measure(seed: int, epochs: int, models: int, kinds: tuple[str, ...], top: int) -> dict:
    from ffcv_transfer.experiments.leak_trial import TrialRecipe, run_trial

    started = time.perf_counter()
    trial = run_trial(seed, models, TrialRecipe(epochs=epochs), kinds, top)
    return {
        "seed": seed,
        "epochs": epochs,
        "models": models,
        "copies": trial.ranks,
        "false_flags": len(trial.false_flags),
        "min_val_accuracy": round(min(trial.val_accuracy), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def table(trials: list[dict], top: int) -> str:
    ranks: dict[tuple, list[int]] = defaultdict(list)
    for trial in trials:
        for copy in trial["copies"]:
            ranks[(trial["epochs"], copy["role"], copy["kind"])].append(copy["rank"])
    lines = [f"| epochs | copy | ranks over the draws | in the top {top} |", "|---|---|---|---|"]
    for (epochs, role, kind), found in sorted(ranks.items()):
        inside = sum(rank <= top for rank in found)
        lines.append(f"| {epochs} | {kind} {role} | {', '.join(map(str, found))} | {inside} of {len(found)} |")
    false_flags = sum(trial["false_flags"] for trial in trials)
    lines.append(
        f"\n{len(trials)} trials, {false_flags} false flags, {sum(trial['seconds'] for trial in trials):.0f} s"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="data draws")
    parser.add_argument("--epochs", type=int, nargs="+", default=[6], help="each model's epochs on its examples")
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["exact", "downsampled", "crop"],
        help="copy kinds planted in turn (ffcv_transfer.writers.synthetic.LEAK_KINDS)",
    )
    parser.add_argument("--top", type=int, default=5, help="a copy counts as found within this rank")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once, one process and one thread each")
    parser.add_argument("--out", default="benchmarks/results/leaks-cpu.json")
    args = parser.parse_args()

    from tqdm import tqdm

    report = {"machine": machine(), "options": vars(args), "trials": []}
    with ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn"), initializer=one_thread) as pool:
        running = [
            pool.submit(measure, seed, epochs, args.models, tuple(args.kinds), args.top)
            for epochs in args.epochs
            for seed in args.seeds
        ]
        for done in tqdm(as_completed(running), total=len(running), desc="trials"):
            report["trials"].append(done.result())
            report["trials"].sort(key=lambda trial: (trial["epochs"], trial["seed"]))
            save_report(args.out, report)
    print(table(report["trials"], args.top))


if __name__ == "__main__":
    main()
