"""End to end on planted synthetic data, through the main job (`ffcv-transfer demo`): write betons ->
32 orthogonal class masks -> train the 32 small models (two local worker processes on 2 cores, each
training its 16 in lockstep on one shared ffcv loader) -> cached-feature transfer -> store -> influence
-> findings -> counterfactual retraining -> HTML report: the test that checks the science (slow tier;
its time in docs/benchmarks.md#test-suite).

Asserted against the planted ground truth, at the strength it holds run after run (docs/benchmarks.md#the-demo):
each twin raises its own target's margins (its influence there is positive), and it is its target's
single most positive source class for at least 3 of the 4 targets (all 4 in most runs; the weakest
target's lead is within two standard errors of zero, so "all 4" fails now and then); the misleading class
is the most negative one on the test images that carry its cue; and retraining without it is not worse
than retraining without a random class beyond two standard errors of the paired gain over the
counterfactual's seeds (the models of a seed start from the same weights; the random arm removes each of
the 7 classes once). That it is better holds on average over runs, not in every run of 7 seeds: one
model's target accuracy spreads across initial weights more than the effect (docs/benchmarks.md#counterfactual).
The second test asserts "better" with 28 seeds of the counterfactual alone."""

import json
from functools import partial

import numpy as np
import pytest

from ffcv_transfer.experiments.demo import DEMO_CONFIG, demo_spec, format_findings, run_demo, train_in_workers
from ffcv_transfer.experiments.removals import removal_design, run_removals
from ffcv_transfer.findings.counterfactual import KINDS, accuracy_by_arm, paired_gain
from ffcv_transfer.findings.rankings import influence_by_target_class
from ffcv_transfer.store.betons import read_sidecar
from ffcv_transfer.store.results import ResultStore


@pytest.mark.slow
def test_demo_recovers_the_planted_influences(tmp_path):
    findings = run_demo(tmp_path, progress=False)
    saved = json.loads((tmp_path / "findings.json").read_text())
    data = tmp_path / "data"
    planted = read_sidecar(data / "target_test.beton")["extra"]["planted"]
    store = ResultStore(tmp_path / "store")
    status = store.status()
    assert status["completed"] + status["failed"] == 32 and status["failed"] <= 1 and status["duplicates"] == 0
    _, values = store.read(["source_acc", "target_acc"])
    assert np.median(values["source_acc"]) > 0.8  # own ~3-4 classes; chance ~0.3

    influence = np.load(tmp_path / "influence.npy")
    labels = np.load(data / "target_test.labels.npy")
    by_class = influence_by_target_class(influence, labels, len(planted["target_names"]))
    on_top = []
    for t, twin in planted["twin"].items():
        np.testing.assert_allclose(by_class[:, int(t)], influence[:, labels == int(t)].mean(1), rtol=1e-5)
        assert by_class[twin, int(t)] > 0, (t, by_class[:, int(t)].round(2).tolist())
        on_top.append(np.argmax(by_class[:, int(t)]) == twin)
    assert sum(on_top) >= 3, by_class.round(2).tolist()
    assert saved["checks"]["twin_on_top"] == {t: bool(top) for t, top in zip(planted["twin"], on_top)}
    # the misleading class: the most negative on the background's test images, which carry its cue, by a
    # wide margin; over the whole test set and on its own target it is not reliably the most negative
    # (docs/benchmarks.md#the-demo)
    (misleading,) = planted["misleading"]
    background = planted["target_names"].index("background")
    assert misleading["conflict_target"] == background
    assert np.argmin(by_class[:, background]) == misleading["source"], by_class[:, background].round(2).tolist()
    assert saved["checks"]["misleading_negative"]["background"]

    # per seed: all classes, without the most negative, without a random class (and without the planted harmful
    # class where it is not the most negative); removing the planted harmful class is not worse than removing a
    # random one beyond two standard errors: "beats" is not established per run of 7 seeds
    # (docs/benchmarks.md#counterfactual)
    counterfactual = findings["counterfactual"]
    assert counterfactual["planted_harmful"] == [planted["source_names"][m["source"]] for m in planted["misleading"]]
    assert counterfactual["removed_first"] == planted["source_names"][int(np.argmin(influence.mean(1)))]
    arms = 3 if counterfactual["planted_harmful"] == [counterfactual["removed_first"]] else 4
    removal = ResultStore(tmp_path / "counterfactual")
    assert removal.status()["completed"] + removal.status()["failed"] == arms * counterfactual["seeds"]
    random_rows = removal.fixed("removal")[:, 0] == KINDS.index("random")
    removed = np.bincount(np.nonzero(~removal.fixed("masks")[random_rows])[1], minlength=len(planted["source_names"]))
    assert removed.max() - removed.min() <= 1, removed  # the random arm deals the classes evenly
    gain = counterfactual["planted_harmful_gain_over_random"]
    assert len(gain["per_seed"]) >= counterfactual["seeds"] - 1 and gain["mean"] + 2 * gain["stderr"] > 0, gain

    for name, ranked in saved["ranking"].items():
        column = planted["target_names"].index(name)
        assert [r["index"] for r in ranked] == np.argsort(-by_class[:, column], kind="stable").tolist()
    assert saved["models"] == status["completed"]
    report = (tmp_path / "report.html").read_text()
    assert report.count("<img") > 5 and "Counterfactuals" in report and "target3" in format_findings(findings)


COUNTERFACTUAL_SEEDS = 28


@pytest.mark.slow
def test_removing_the_planted_harmful_class_beats_removing_a_random_one(tmp_path):
    """The counterfactual criterion at a size that can show it: on the demo's planted data and recipe, 28
    seeds of two models from the same initial weights, one without the misleading class and one without a
    random class (each of the 7 dealt 4 times), trained by the worker as the demo does. The demo's 7 seeds
    cannot separate the arms; the pooled gain puts 28 seeds well above zero (docs/benchmarks.md#counterfactual)."""
    from ffcv_transfer.config import load_experiment
    from ffcv_transfer.writers.common import ImageOptions
    from ffcv_transfer.writers.synthetic import write_synthetic

    write_synthetic(tmp_path / "data", seed=0, spec=demo_spec(), options=ImageOptions(write_mode="raw"))
    experiment = load_experiment(DEMO_CONFIG, {"data.root": str(tmp_path / "data")})
    planted = read_sidecar(tmp_path / "data" / "target_test.beton")["extra"]["planted"]
    (harmful,) = [m["source"] for m in planted["misleading"]]
    num_classes = len(planted["source_names"])
    masks, removals = removal_design(
        np.zeros(num_classes), [1], COUNTERFACTUAL_SEEDS, kinds=("random",), chosen=[harmful], baseline=False
    )
    random_rows = removals[:, 0] == KINDS.index("random")
    removed = np.nonzero(~masks[random_rows])[1]
    assert (np.bincount(removed, minlength=num_classes) == COUNTERFACTUAL_SEEDS // num_classes).all()
    store = run_removals(
        tmp_path / "counterfactual",
        experiment,
        masks,
        removals,
        train=partial(train_in_workers, workers=2, progress=False),
    )
    assert store.status()["completed"] >= len(masks) - 2
    gain = paired_gain(accuracy_by_arm(store), ("chosen", 1), ("random", 1))
    assert len(gain["per_seed"]) >= COUNTERFACTUAL_SEEDS - 2 and gain["mean"] > 0, gain
