"""One table from a GPU check's folder: every training case against the GPU-only ceiling measured in the
same run at its resolution (bench_fusion's one-model rate on batches already in device memory, eager or
compiled, whichever is faster: ceiling*.json), with its extrapolated source models per GPU-hour.

    python benchmarks/gpu_summary.py gpu-check/          # after benchmarks/gpu_check.sh gpu-check/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECIPE_MODEL_IMAGES = 16 * 1_281_167 * 0.5  # one source model's recipe: 16 epochs over its half of ImageNet


def main(folder: Path) -> None:
    ceilings = {}  # resolution -> model-images/s
    for path in sorted(folder.glob("ceiling*.json")):
        report = json.loads(path.read_text())
        rates = [r["model_images_per_s"] for r in report["results"] if r.get("k") == 1 and "model_images_per_s" in r]
        if rates:
            ceilings[report["size_settings"]["res"]] = max(rates)
    for res, rate in sorted(ceilings.items()):
        print(
            f"GPU-only ceiling at {res} px: {rate:,.0f} model-images/s (one model, batches in device memory) = "
            f"{3600 * rate / RECIPE_MODEL_IMAGES:.1f} source models/GPU-hour, source training alone"
        )
    print(f"{'step':10s} {'case':32s} {'model-img/s':>12s} {'of ceiling':>10s} {'models/h*':>10s} {'x reference':>11s}")
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("ceiling"):
            continue
        report = json.loads(path.read_text())
        ceiling = ceilings.get(report.get("size_settings", {}).get("res"))
        for row in report.get("results", []):
            if "recipe_models_per_hour" not in row:
                continue
            fraction = f"{row['model_images_per_s'] / ceiling:10.2f}" if ceiling else f"{'-':>10s}"
            print(
                f"{path.stem:10s} {row['case']:32s} {row['model_images_per_s']:12,.0f} {fraction} "
                f"{row['recipe_models_per_hour']:10.2f} {row.get('vs_reference', float('nan')):11.2f}"
            )
    print(
        "* source models per GPU-hour, extrapolated to the full recipe (16 source epochs, CIFAR-10 fixed-feature "
        "transfer) from the rates measured at the case's resolutions"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check"))
