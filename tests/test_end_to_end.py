"""End to end on planted synthetic data, through the main job (`ffcv-transfer demo`): write betons ->
masks -> train 16 small models on one shared ffcv loader -> cached-feature transfer -> store ->
influence -> findings. About 4 minutes on 2 CPU cores.

What it asserts: every stage ran and agrees with the next (store complete, findings consistent with the
saved influence matrix), the models learned their source classes, transfer beats chance, and each
planted twin helps its own target more than it helps the other targets on average. Not asserted,
because it does not yet hold reliably at this size (docs/measurements.md): that every twin is its
target's single most positive source class."""
import json

import numpy as np

from beton_writers import read_sidecar
from ffcv_transfer.analyses import influence_by_target_class
from ffcv_transfer.demo import format_findings, run_demo
from ffcv_transfer.store import ResultStore


def test_demo_runs_end_to_end_and_twins_help_their_targets(tmp_path):
    findings = run_demo(tmp_path, overrides={"masks.num_models": 16, "run.models_per_process": 16}, progress=False)
    data = tmp_path / "data"
    planted = read_sidecar(data / "target_test.beton")["extra"]["planted"]
    store = ResultStore(tmp_path / "store")
    status = store.status()
    assert status["completed"] + status["failed"] == 16 and status["failed"] <= 1 and status["duplicates"] == 0
    _, values = store.read(["source_acc", "target_acc"])
    num_targets = len(planted["target_names"])
    assert np.median(values["source_acc"]) > 0.8  # own ~3-4 classes; chance ~0.3
    assert values["target_acc"].mean() > 2 / num_targets  # chance 1/5

    influence = np.load(tmp_path / "influence.npy")
    labels = np.load(data / "target_test.labels.npy")
    by_class = influence_by_target_class(influence, labels, num_targets)
    for t, twin in planted["twin"].items():  # per target class means, computed independently here
        np.testing.assert_allclose(by_class[:, int(t)], influence[:, labels == int(t)].mean(1), rtol=1e-5)
        others = [k for k in range(len(planted["twin"])) if k != int(t)]
        assert by_class[twin, int(t)] > by_class[twin, others].mean(), (t, by_class[twin].round(2).tolist())

    saved = json.loads((tmp_path / "findings.json").read_text())
    for name, ranked in saved["ranking"].items():
        column = planted["target_names"].index(name)
        assert [r["index"] for r in ranked] == np.argsort(-by_class[:, column], kind="stable").tolist()
    assert saved["models"] == status["completed"] and "target3" in format_findings(findings)
