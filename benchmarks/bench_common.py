"""What the benchmark scripts share: the machine description and running one case in its own process."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# how paper_ffcv_imagenet_cifar10.yaml's betons store ImageNet: at most 256 px, half of the images JPEG, half raw
PAPER_STORAGE = dict(write_mode="proportion", max_resolution=256, compress_probability=0.5, jpeg_quality=90)


def torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if torch_cuda():
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def accuracy_spread(values: list[float]) -> dict:
    """Lowest, median, highest, mean and s.d. of per-model accuracies, and the lowest over the median (how
    far the worst model lags: the goal of every model learning is >= 0.9)."""
    median = statistics.median(values)
    return {
        "min": min(values),
        "median": median,
        "max": max(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min_over_median": min(values) / median if median else None,
    }


def shared_batch(per_model: int, masks, labels) -> int:
    """The batch of a loader shared by the models of `masks` (K, C) over the union of their classes, such
    that each model's sub-batch averages `per_model` examples (the one-model recipe's batch); `labels` are
    the examples' classes."""
    union = masks.any(0)[labels].sum()
    return int(round(per_model * union / masks[:, labels].sum(1).mean()))


def run_in_subprocess(script: str, arguments: list[str], label: str) -> dict:
    """Run `script --case ...` in a fresh process; its last stdout line is the JSON result (or an error row)."""
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
    if done.returncode:
        print(f"{label}: FAILED {done.stderr.strip()[-800:]}", file=sys.stderr)
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def case_parser(doc: str, sizes: dict, out: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: --size, --device, --out, and the hidden --case/--data with which
    it runs one case in a subprocess (`run_in_subprocess`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--size", choices=sizes, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=out)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_or_run_case(parser: argparse.ArgumentParser, run_case) -> argparse.Namespace | None:
    """The parsed options; in a case subprocess (`--case`) instead run the case, print its JSON result for
    `run_in_subprocess` and return None."""
    args = parser.parse_args()
    if not args.case:
        return args
    print(json.dumps(run_case(args)))
    return None


def save_report(out: str, report: dict) -> None:
    """Write the report's JSON to `out` (called after every case, so that a cut-off run keeps them)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
