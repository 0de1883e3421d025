"""The main job on the embedded default: planted synthetic data generated on the fly, then masks ->
train -> transfer -> store -> influence -> findings. Rerunning with the same --out resumes: the data
and finished rows are kept."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "rs_configs" / "demo_cpu.yaml"


def demo_spec():
    """4 targets (plus a background class, so a target is recognised by its own motif, not by elimination),
    their 4 twins, 2 unrelated source classes and 1 misleading one."""
    from beton_writers.synthetic import PlantedSpec

    return PlantedSpec(num_targets=4, num_unrelated=2, num_misleading=1, resolution=32, source_train_per_class=150,
                       source_val_per_class=30, target_train_per_class=100, target_test_per_class=50,
                       motif_amplitude=1.2, noise=0.05, background_class=True, misleading_conflict=False)


def run_demo(out: str | Path, config: str | Path = DEMO_CONFIG, overrides: Mapping[str, Any] | None = None,
             seed: int = 0, progress: bool = True) -> dict:
    from beton_writers import ImageOptions, read_sidecar
    from beton_writers.synthetic import write_synthetic

    from .analyses import influence_by_target_class, rank_sources
    from .config import load_experiment
    from .influence import influence_from_store
    from .store import ResultStore
    from .worker import create_experiment_store, run_worker

    out, started = Path(out), time.monotonic()
    data = out / "data"
    if not (data / "target_test.beton").exists():
        write_synthetic(data, seed=seed, spec=demo_spec(), options=ImageOptions(write_mode="raw"))
    experiment = load_experiment(config, {"data.root": str(data), **(overrides or {})})
    store_dir = out / "store"
    if not (store_dir / "spec.json").exists():
        create_experiment_store(store_dir, experiment)
    run_worker(store_dir, experiment, progress=progress)
    influence = influence_from_store(store_dir, "margins", progress=progress)
    np.save(out / "influence.npy", influence)

    planted = read_sidecar(data / "target_test.beton")["extra"]["planted"]
    labels = np.load(data / "target_test.labels.npy")
    targets = planted["target_names"]
    by_class = influence_by_target_class(influence, labels, len(targets))
    ranking = rank_sources(by_class, planted["source_names"], targets)
    status = ResultStore(store_dir).status()
    findings = {"store": str(store_dir), "models": status["completed"], "failed": status["failed"],
                "seconds": round(time.monotonic() - started, 1), "ranking": ranking,
                "ground_truth": {key: planted[key] for key in ("twin", "misleading", "unrelated", "expected_sign")},
                "checks": _checks(by_class, planted)}
    (out / "findings.json").write_text(json.dumps(findings, indent=1) + "\n")
    return findings


def _checks(by_class: np.ndarray, planted: dict) -> dict:
    """The planted ground truth against the measured influences."""
    twin_on_top = {t: int(np.nanargmax(by_class[:, int(t)])) == twin for t, twin in planted["twin"].items()}
    misleading_negative = {str(m["target"]): bool(by_class[m["source"], m["target"]] < 0)
                           for m in planted["misleading"]}
    return {"twin_on_top": twin_on_top, "misleading_negative": misleading_negative}


def format_findings(findings: dict) -> str:
    names = [f"target{t}" for t in sorted(findings["ground_truth"]["twin"], key=int)]
    lines = [f"{findings['models']} models ({findings['failed']} failed) in {findings['seconds']:.0f} s; "
             f"store {findings['store']}", "",
             f"{'target':10s} {'most positive source class':34s} {'most negative source class':34s} planted twin"]
    for name in names:
        ranked = findings["ranking"][name]
        t = name.removeprefix("target")
        ok = "on top" if findings["checks"]["twin_on_top"][t] else "NOT on top"
        lines.append(f"{name:10s} {ranked[0]['source']:24s} {ranked[0]['influence']:+9.2f} "
                     f"{ranked[-1]['source']:24s} {ranked[-1]['influence']:+9.2f} {ok}")
    for target, negative in findings["checks"]["misleading_negative"].items():
        lines.append(f"misleading class for target{target}: {'negative' if negative else 'NOT negative'}")
    return "\n".join(lines)
