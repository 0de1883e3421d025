"""The CPU recipe under glibc's heap checks (`ffcv_transfer.engine.heap_check`), full length, and what the NCHW
CPU layout costs (JSON + a table).

  layout   one training step of a width-0.125 small-stem ResNet-18 at 32 px (the CPU configs' model) on 63
           images (odd: the oneDNN bug needs an odd batch), channels-last against NCHW, at 1 and 2 threads:
           how a heap-checked child ended and, where it survived, the median ms per step of a plain one.
  demo     `ffcv-transfer demo --no-progress` (planted data, 32 models, 7 counterfactual seeds) heap-checked:
           exit status, models and failures, and what it recovered (findings.json). Its time is no timing:
           the debugging allocator dominates it.

    python benchmarks/bench_heap_checked.py --cases layout demo --out benchmarks/results/heap-checked-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine, save_report

ROOT = Path(__file__).resolve().parent.parent
STEP = """
import time, torch, torch.nn.functional as F
from ffcv_transfer.engine.models import build_model
torch.manual_seed(0)
torch.set_num_threads({threads})
model = build_model(10, stem="small", width=0.125, memory_format=torch.{layout})
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
images = torch.randn(63, 3, 32, 32).contiguous(memory_format=torch.{layout})
labels = torch.randint(0, 10, (63,))
times = []
for step in range(25):
    began = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    times.append(time.perf_counter() - began)
print(1000 * sorted(times[5:])[len(times[5:]) // 2])
"""


def how_it_ended(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def layout_rows() -> list[dict]:
    from ffcv_transfer.engine.heap_check import heap_checked

    rows = []
    for layout in ("channels_last", "contiguous_format"):
        for threads in (1, 2):
            code = STEP.format(threads=threads, layout=layout)
            plain = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            checked = subprocess.run(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=heap_checked(plain),
                capture_output=True,
                text=True,
                timeout=600,
            )
            row = {
                "case": "layout",
                "layout": "NCHW" if layout == "contiguous_format" else "channels-last",
                "threads": threads,
                "ended": how_it_ended(checked.returncode),
            }
            if checked.returncode == 0:  # timed again in a plain environment (perturbed frees cost time)
                timed = subprocess.run(
                    [sys.executable, "-c", code],
                    cwd=ROOT,
                    env=plain,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=True,
                )
                row["step_ms"] = float(timed.stdout.strip().splitlines()[-1])
            rows.append(row)
    return rows


def demo_row(workdir: Path) -> dict:
    from ffcv_transfer.engine.heap_check import heap_checked

    out = workdir / "demo"
    began = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ffcv-transfer"), "demo", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=heap_checked(dict(os.environ)),
        capture_output=True,
        text=True,
    )
    row = {"case": "demo", "ended": how_it_ended(done.returncode), "seconds": time.monotonic() - began}
    if (out / "findings.json").exists():
        findings = json.loads((out / "findings.json").read_text())
        row.update(
            models=findings["models"],
            failed=findings["failed"],
            checks=findings.get("checks"),
            counterfactual=findings.get("counterfactual"),
        )
    else:
        row["stderr_tail"] = done.stderr[-2000:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=["layout", "demo"], default=["layout"])
    parser.add_argument("--out", default="benchmarks/results/heap-checked-cpu.json")
    args = parser.parse_args()
    report = {"machine": machine(), "results": []}
    if "layout" in args.cases:
        report["results"] += layout_rows()
        save_report(args.out, report)
    if "demo" in args.cases:
        with tempfile.TemporaryDirectory() as workdir:
            report["results"].append(demo_row(Path(workdir)))
        save_report(args.out, report)
    print(f"{'case':8} {'layout':14} {'threads':>7}  {'ended':22} {'step ms':>8}")
    for row in report["results"]:
        if row["case"] == "layout":
            step = f"{row['step_ms']:.0f}" if "step_ms" in row else "-"
            print(f"{'layout':8} {row['layout']:14} {row['threads']:>7}  {row['ended']:22} {step:>8}")
        else:
            print(
                f"demo: {row['ended']}, {row.get('models')} models, {row.get('failed')} failed, "
                f"{row['seconds']:.0f} s (heap-checked; no timing)"
            )


if __name__ == "__main__":
    main()
