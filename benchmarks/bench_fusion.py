"""Fusions on synthetic batches already in device memory (no loader, no decoding), JSON + a table:
model-images/s of one ResNet-18 at the full batch (the compute ceiling per model) against K models that
split each batch by class masks (alpha 0.5), trained by each fusion. The K models' shared batch is sized so
that each model's sub-batch averages the single model's batch (twice it at alpha 0.5), as a shared loader
must be to keep the one-model recipe's batch size. Cases, each in its own process:

  single            one model over every class (no routing)
  sequential        the K models one after another on their sub-batches
  grouped           the K models as one grouped network (weighted BatchNorm over the real rows)
  <case>+queued     single or sequential with per-model batches (`per_model_batch` = the size's batch):
                    each model steps on exactly the batch, static shapes
  <case>+compile    through torch.compile (grouped; single and sequential with +queued), compilation in
                    the untimed warm-up
  grouped+plainbn   a diagnostic, not a fusion: the grouped network with ordinary BatchNorm over all rows
                    (padding rows counted, so the statistics are wrong) to price the weighted BatchNorm
  <case>+cudnn      with torch.backends.cudnn.benchmark (kernels autotuned per shape; the timed steps
                    cycle through three batches, so every shape has been tuned: the steady state of a
                    run whose sub-batch lengths come from a few buckets)

    python benchmarks/bench_fusion.py                                   # tiny, CPU, a minute
    python benchmarks/bench_fusion.py --size real --device cuda         # 64 px, K=16
    python benchmarks/bench_fusion.py --size real160 --device cuda --cases single single+queued+compile \
        sequential+queued sequential+queued+compile                      # 160 px, K=8: the GPU-only ceiling
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from bench_common import case_parser, machine, parse_or_run_case, run_in_subprocess, save_report, shared_batch

SIZES = {
    "tiny": dict(res=32, batch=64, width=0.25, k=4, classes=8, steps=6),
    "real": dict(res=64, batch=1024, width=1.0, k=16, classes=64, steps=12),
    "real160": dict(res=160, batch=1024, width=1.0, k=8, classes=64, steps=9),
}
CASES = ["single", "sequential", "grouped", "grouped+plainbn", "grouped+compile", "single+cudnn", "grouped+cudnn"]


def run_case(args) -> dict:
    import torch

    from ffcv_transfer.engine.data import Batch
    from ffcv_transfer.engine.grouped import GroupedBatchNorm2d, GroupedTrainer
    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.train import SequentialTrainer
    from ffcv_transfer.settings import OptimConfig
    from ffcv_transfer.store.masks import random_class_masks

    size, device = SIZES[args.size], torch.device(args.device)
    fusion, *flags = args.case_name.split("+")
    torch.backends.cudnn.benchmark = "cudnn" in flags
    if "plainbn" in flags:
        GroupedBatchNorm2d.forward = torch.nn.BatchNorm2d.forward
    k = 1 if fusion == "single" else size["k"]
    masks = np.ones((1, size["classes"]), bool) if k == 1 else random_class_masks(k, size["classes"], 0.5, seed=0)
    batch = shared_batch(size["batch"], masks, np.arange(size["classes"]))  # classes drawn uniformly
    generator = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, size["classes"], (batch,), generator=generator).numpy() for _ in range(3)]
    batches = [
        Batch(
            (
                torch.randn(batch, 3, size["res"], size["res"], generator=generator).to(
                    device, memory_format=torch.channels_last
                ),
                torch.from_numpy(host).to(device),
            ),
            [host],
        )
        for host in labels
    ]
    routed = sum(int(masks[:, host].sum()) for host in labels) / len(batches)
    models = [build_model(size["classes"], width=size["width"], device=device) for _ in range(k)]
    queued = size["batch"] if "queued" in flags else 0
    config = OptimConfig(
        epochs=2,
        lr=0.1,
        lr_peak_epoch=1,
        batch_size=batch,
        per_model_batch=queued,
        precision="bf16" if device.type == "cuda" else "fp32",
    )
    options = {"compile": "default"} if "compile" in flags else {}
    if fusion != "grouped":
        per_step = sum(masks[:, host].sum(1) for host in labels) / len(labels)  # each model's rows per batch
        options["examples_per_epoch"] = (per_step * size["steps"]).astype(int)
    trainer = (SequentialTrainer if fusion in ("single", "sequential") else GroupedTrainer)(
        models, masks, config, steps_per_epoch=size["steps"], device=device, **options
    )

    def epoch(steps: int, index: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_epoch([batches[i % 3] for i in range(steps)], index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup = epoch(6, 0)
    seconds = epoch(size["steps"], 1)
    return {
        "case": args.case_name,
        "k": k,
        "device": str(device),
        "batch": batch,
        "warmup_s": warmup,
        "step_ms": 1000 * seconds / size["steps"],
        "model_images_per_step": routed,
        "model_images_per_s": routed * size["steps"] / seconds,
        "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = case_parser(__doc__, SIZES, "benchmarks/results/fusion-cpu.json")
    parser.add_argument("--cases", nargs="+", default=CASES, metavar="CASE", help=f"default: {' '.join(CASES)}")
    parser.add_argument("--case-name", help=argparse.SUPPRESS)
    args = parse_or_run_case(parser, run_case)
    if args is None:
        return
    rows = []
    for case in args.cases:
        result = run_in_subprocess(
            __file__, ["--case", "--case-name", case, "--size", args.size, "--device", args.device], case
        )
        rows.append({"case": case, **result})
        if "error" not in result:
            print(f"{case:22s} {result['model_images_per_s']:10.0f} model-img/s", file=sys.stderr)
        report = {"machine": machine(), "size": args.size, "size_settings": SIZES[args.size], "results": rows}
        save_report(args.out, report)
    print_table(report)


def print_table(report: dict) -> None:
    s = report["size_settings"]
    single = next((r["model_images_per_s"] for r in report["results"] if r["case"] == "single"), None)
    print(f"\nmachine: {report['machine']}")
    print(
        f"size {report['size']}: ResNet-18 width {s['width']} at {s['res']} px, batch {s['batch']} per model, "
        f"K={s['k']} over {s['classes']} classes at alpha 0.5; synthetic batches in device memory"
    )
    print(f"{'case':22s} {'step ms':>8s} {'model-img/s':>12s} {'x single':>9s} {'warm-up s':>10s}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['case']:22s} failed: {r['error']}")
            continue
        ratio = r["model_images_per_s"] / single if single else float("nan")
        print(f"{r['case']:22s} {r['step_ms']:8.1f} {r['model_images_per_s']:12.0f} {ratio:9.2f} {r['warmup_s']:10.1f}")


if __name__ == "__main__":
    main()
