"""The worker's mechanics on planted betons: masks, store schema, claiming, writing, resuming after a
kill -9, and a diverging model marked failed and left out of the influences. (Whether the models learn
enough for the influences to recover the planted ground truth is the end-to-end test.)"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ffcv_transfer.config import ConfigError, load_experiment
from ffcv_transfer.engine import worker as worker_module
from ffcv_transfer.engine.data import LoaderSpec
from ffcv_transfer.engine.loader_cache import LoaderCache
from ffcv_transfer.engine.worker import run_worker
from ffcv_transfer.experiments.removals import removal_design, run_removals
from ffcv_transfer.findings.influence import influence_from_store
from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.store.betons import read_labels, read_sidecar
from ffcv_transfer.store.experiment import EXPERIMENT_FILE, create_class_store, create_store, init_seed
from ffcv_transfer.store.masks import random_class_masks
from ffcv_transfer.store.results import ResultStore

from .conftest import DEMO_CONFIG, TINY_SPEC, tiny_settings


def test_random_class_masks_have_exact_subset_sizes():
    masks = random_class_masks(200, 11, 0.5, seed=3)
    assert masks.shape == (200, 11) and (masks.sum(1) == round(0.5 * 11)).all()
    np.testing.assert_array_equal(masks, random_class_masks(200, 11, 0.5, seed=3))
    assert np.abs(masks.mean(0) - 6 / 11).max() < 0.12  # every class in about 6 of 11 models
    with pytest.raises(ValueError, match="alpha 1"):
        random_class_masks(3, 4, 1.0, seed=0)


@pytest.fixture(scope="module")
def filled(tiny_data, tmp_path_factory):
    """A store of 4 rows filled by one worker with K = 2 (the reference transfer: an SGD head), whose
    second model returns NaN logits; what the worker built and which loaders it asked for, recorded."""
    experiment = load_experiment(
        DEMO_CONFIG,
        tiny_settings(
            tiny_data,
            **{
                "transfer.mode": "fixed_feature",
                "transfer.epochs": 1,
                "transfer.lr_peak_epoch": 0.5,
                "transfer.batch_size": 32,
                "transfer.crop_min_scale": 1.0,
                "run.models_per_process": 2,
            },
        ),
    )
    store = create_class_store(tmp_path_factory.mktemp("worker") / "store", experiment)
    built, initial, loaders = [], [], []
    real_build_model = worker_module.build_model

    def build_model(*args, **kwargs):  # the second model built returns NaN logits: its loss diverges
        model = real_build_model(*args, **kwargs)
        initial.append(([p.detach().clone() for p in model.parameters()], args, kwargs))
        if len(built) == 1:
            model.register_forward_hook(lambda module, inputs, output: output * torch.nan)
        built.append(model)
        return model

    class Recording(LoaderCache):
        def get(self, *args, **kwargs):
            made = super().get(*args, **kwargs)
            loaders.append((args[1].split, args[1].train, made))
            return made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker_module, "build_model", build_model)
        written = run_worker(store.path, experiment, progress=False, loaders=Recording())
    return {
        "store": store,
        "experiment": experiment,
        "written": written,
        "initial": initial,
        "loaders": loaders,
        "build_model": real_build_model,
        "num_test": read_sidecar(tiny_data / "target_test.beton")["num_examples"],
    }


def test_the_store_keeps_its_experiment(filled):
    assert load_experiment(filled["store"].path / EXPERIMENT_FILE) == filled["experiment"]


def test_groups_of_k_reuse_the_loaders_of_the_same_examples(filled):
    """Two groups of K = 2: the second reuses the first's target loaders (no second JIT compilation), and
    its source loaders where its union of classes is the same."""
    loaders, masks = filled["loaders"], filled["store"].fixed("masks")
    assert len(loaders) == 8
    for (split, train, first), (split_2, train_2, second) in zip(loaders[:4], loaders[4:]):
        assert (split, train) == (split_2, train_2)
        same_examples = split.startswith("target") or (masks[:2].any(0) == masks[2:].any(0)).all()
        assert (first is second) == same_examples, split


def test_each_model_starts_from_its_rows_own_seed(filled):
    """Rows 0-3 in claim order, each model from its row's seed, whatever the process ran before."""
    store, experiment = filled["store"], filled["experiment"]
    for row, (weights, args, kwargs) in enumerate(filled["initial"]):
        torch.manual_seed(init_seed(store, row, experiment.masks.seed))
        for found, expected in zip(weights, filled["build_model"](*args, **kwargs).parameters()):
            torch.testing.assert_close(found, expected, rtol=0, atol=0)
    assert len({float(weights[0].sum()) for weights, _, _ in filled["initial"]}) == 4


def test_the_diverged_row_is_failed_and_a_rerun_finds_nothing_pending(filled):
    store = filled["store"]
    assert filled["written"] == 3
    assert run_worker(store.path, filled["experiment"], progress=False) == 0  # nothing pending: no work
    status = store.status()
    assert (status["completed"], status["failed"], status["duplicates"]) == (3, 1, 0)
    assert store.failures() == {1: "source training: non-finite loss at epoch 0"}


def test_the_stored_outputs_agree_with_each_other(filled):
    store, num_test = filled["store"], filled["num_test"]
    rows, values = store.read(
        [
            "masks",
            "margins",
            "is_correct",
            "predictions",
            "source_acc",
            "target_acc",
            "p_correct",
            "correct_logit",
            "target_mean_class_acc",
        ]
    )
    assert rows.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(values["masks"], store.fixed("masks")[[0, 2, 3]])
    assert values["margins"].shape == (3, num_test) and np.isfinite(values["margins"]).all()
    np.testing.assert_array_equal(values["is_correct"], values["margins"] > 0)
    np.testing.assert_allclose(values["target_acc"], values["is_correct"].mean(1), atol=1e-6)
    assert ((0 <= values["source_acc"]) & (values["source_acc"] <= 1)).all()
    assert set(np.unique(values["predictions"])) <= set(range(TINY_SPEC.num_targets))
    p_correct, correct_logit = values["p_correct"].astype(np.float64), values["correct_logit"].astype(np.float64)
    # with K classes and margin m (correct logit minus the largest other): 1 / (1 + (K-1) e^-m) <= p <= 1 / (1 + e^-m)
    margins, k = values["margins"].astype(np.float64), TINY_SPEC.num_targets
    assert (p_correct <= 1 / (1 + np.exp(-margins)) + 2e-3).all()
    assert (p_correct >= 1 / (1 + (k - 1) * np.exp(-margins)) - 2e-3).all() and np.isfinite(correct_logit).all()
    labels = read_labels(filled["experiment"].data.path("target_test"))
    per_class = [values["is_correct"][:, labels == c].mean(1) for c in np.unique(labels)]
    np.testing.assert_allclose(values["target_mean_class_acc"], np.mean(per_class, axis=0), atol=1e-6)


def test_the_failed_row_is_left_out_of_the_influences(filled):
    """They equal the influences of the three good rows alone."""
    store = filled["store"]
    _, values = store.read(["masks", "margins"])
    with pytest.warns(RuntimeWarning, match="included in every model or in none"):  # 3 rows: some classes are
        expected = class_influence(values["masks"], values["margins"].astype(np.float64))
        found = influence_from_store(store.path, "margins", progress=False)
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    "settings, reason",
    [
        (
            {"source.batch_size": 512, "source.per_model_batch": 0},
            "no batch held one of its classes' examples (batches of 512; the last incomplete one is dropped)",
        ),
        ({"source.per_model_batch": 512}, "fewer of its classes' examples in an epoch than one per-model batch (512)"),
    ],
)
def test_models_whose_classes_fill_no_batch_are_failed_not_stored(tiny_data, tmp_path, settings, reason):
    """A shared batch (dropped as the last incomplete one) or a per-model batch larger than any model's
    examples: every row fails with the reason instead of being transferred and stored at chance accuracy."""
    experiment = load_experiment(DEMO_CONFIG, tiny_settings(tiny_data, **settings))
    store = create_class_store(tmp_path / "store", experiment)
    assert run_worker(store.path, experiment, progress=False) == 0
    assert set(store.failures().values()) == {f"source training: no training step: {reason}"}
    assert store.status()["failed"] == 4


def test_counterfactual_arms_of_a_seed_start_from_the_same_weights(tiny_data, tmp_path):
    experiment = load_experiment(DEMO_CONFIG, tiny_settings(tiny_data))
    num_classes = read_sidecar(tiny_data / "source_train.beton")["num_classes"]
    masks, removals = removal_design(np.arange(float(num_classes)), [1], 3, ["most_negative", "random"])
    store = run_removals(tmp_path / "cf", experiment, masks, removals, train=lambda path, experiment: None)
    seeds = [init_seed(store, row, experiment.masks.seed) for row in range(len(masks))]
    assert [seeds[r] == seeds[r - r % 3] for r in range(len(masks))] == [True] * len(masks)
    assert len(set(seeds)) == 3
    other = load_experiment(DEMO_CONFIG, tiny_settings(tiny_data, **{"masks.seed": 1}))
    assert init_seed(store, 0, other.masks.seed) not in seeds


def test_rows_are_seeded_by_their_index_by_default_and_in_stores_made_before_init_seeds(tmp_path):
    expected = [int(np.random.SeedSequence([7, row]).generate_state(1)[0]) for row in range(3)]
    new = create_store(tmp_path / "new", np.ones((3, 4), bool), 2)
    old = ResultStore.create(
        tmp_path / "old", 3, {"margins": ((2,), "float16")}, fixed={"masks": np.ones((3, 4), bool)}
    )
    assert [init_seed(new, row, 7) for row in range(3)] == [init_seed(old, row, 7) for row in range(3)] == expected
    with pytest.raises(ValueError, match="2 init seeds for 3 models"):
        create_store(tmp_path / "bad", np.ones((3, 4), bool), 2, init_seeds=[0, 1])


def test_inputs_that_do_not_match_the_store_are_refused(tiny_data, tmp_path):
    experiment = load_experiment(DEMO_CONFIG, tiny_settings(tiny_data))
    create_class_store(tmp_path / "store", experiment)
    with pytest.raises(ConfigError, match=r"nowhere/source_train.beton: data.source_train does not exist"):
        run_worker(
            tmp_path / "store", load_experiment(DEMO_CONFIG, tiny_settings(tmp_path / "nowhere")), progress=False
        )
    mismatch = load_experiment(DEMO_CONFIG, tiny_settings(tiny_data, **{"data.target_test": "source_val.beton"}))
    with pytest.raises(ConfigError, match=r"source_val.beton: \d+ examples, but store .* has \d+ output columns"):
        run_worker(tmp_path / "store", mismatch, progress=False)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_completes_every_row_once(tiny_data, tmp_path):
    """`ffcv-transfer masks` then `train` (grouped fusion) with K=2 over 4 rows; SIGKILL once the first
    2 rows are written; a restarted worker takes over the dead worker's claims at once and completes the rest."""
    store_dir = tmp_path / "store"
    cli = [sys.executable, "-m", "ffcv_transfer.cli"]
    overrides = [
        f"--{key}={value}"
        for key, value in tiny_settings(
            tiny_data, **{"run.models_per_process": 2, "run.fusion": "grouped", "source.per_model_batch": 0}
        ).items()
    ]
    subprocess.run([*cli, "masks", "--config", str(DEMO_CONFIG), "--store", str(store_dir), *overrides], check=True)
    process = subprocess.Popen(
        [*cli, "train", "--store", str(store_dir), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = ResultStore(store_dir)
    try:
        deadline = time.monotonic() + 600
        while store.status()["completed"] < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the worker ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    before = store.status()
    assert before["completed"] == 2 and before["pending"] + before["claimed"] == 2
    experiment = load_experiment(store_dir / EXPERIMENT_FILE)
    assert run_worker(store_dir, experiment, progress=False) == 2
    after = store.status()
    assert (after["completed"], after["failed"], after["duplicates"], after["claimed"]) == (4, 0, 0, 0)
    assert not list((store_dir / "claims").glob("*.claim"))


def test_resident_loader_gives_the_ffcv_loaders_transfer_and_runs_the_worker(tiny_data, tmp_path):
    """loader.kind resident: the cached-feature transfer of the same models through it equals the one
    through ffcv's loaders (the same stored pixels), and the worker completes a store with it."""
    from dataclasses import replace

    from ffcv_transfer.engine.models import build_model
    from ffcv_transfer.engine.resident import ResidentLoader

    experiment = load_experiment(
        DEMO_CONFIG, tiny_settings(tiny_data, **{"run.fusion": "grouped", "source.per_model_batch": 0})
    )
    resident = replace(experiment, loader=replace(experiment.loader, kind="resident"))
    torch.manual_seed(0)
    models = [build_model(TINY_SPEC.num_sources, stem="small", width=0.125) for _ in range(2)]
    outputs = []
    for e in (experiment, resident):
        torch.manual_seed(1)  # the same initial heads (L-BFGS stops after 20 iterations here)
        outputs.append(worker_module.transfer_models(models, e, LoaderCache(), lambda stage: None)[0])
    by_ffcv, by_resident = outputs
    for a, b in zip(by_ffcv, by_resident):
        np.testing.assert_allclose(b.margins.numpy(), a.margins.numpy(), rtol=1e-3, atol=1e-3)
    assert isinstance(
        LoaderCache().get(resident, LoaderSpec("target_test", train=False, resolution=16, batch_size=8)), ResidentLoader
    )

    store = create_class_store(tmp_path / "store", resident)
    assert run_worker(store.path, resident, progress=False) == 4
    rows, values = store.read(["margins", "is_correct", "source_acc"])
    assert len(rows) == 4 and np.isfinite(values["margins"]).all()
    np.testing.assert_array_equal(values["is_correct"], values["margins"] > 0)


def test_one_source_pass_serves_every_transfer_mode(tiny_data, tmp_path, fit_stages, capsys):
    """transfer.mode=cached_features,fixed_feature: each source model is trained once and transferred both
    ways, into columns side by side; each mode's outputs equal those of a store with that mode alone from
    the same seeds (resident loader, seeded order and flips), within float16 storage; analyses pick a mode."""
    from ffcv_transfer.cli import main as cli_main
    from ffcv_transfer.findings.report import gather, write_report

    base = tiny_settings(
        tiny_data,
        **{
            "loader.kind": "resident",
            "loader.seed": 0,
            "transfer.epochs": 2,
            "transfer.lr_peak_epoch": 1,
            "transfer.crop_min_scale": 1.0,
            "transfer.batch_size": 20,
        },
    )
    stores = {}
    for mode in ("cached_features,fixed_feature", "cached_features", "fixed_feature"):
        experiment = load_experiment(DEMO_CONFIG, {**base, "transfer.mode": mode})
        stores[mode] = create_class_store(tmp_path / mode.replace(",", "+"), experiment)
        assert run_worker(stores[mode].path, experiment, progress=False) == 4
    assert fit_stages.count("source epoch") == 3  # one source pass per store, the two-mode one included
    both = stores["cached_features,fixed_feature"]
    assert {"margins", "margins@fixed_feature", "target_acc@fixed_feature"} <= set(both.schema)
    for field, alone in (("margins", "cached_features"), ("margins@fixed_feature", "fixed_feature")):
        for name in ("margins", "p_correct"):
            together = both.read([field.replace("margins", name)])[1][field.replace("margins", name)]
            single = stores[alone].read([name])[1][name]
            np.testing.assert_allclose(together.astype(float), single.astype(float), atol=2e-3, err_msg=field)
    assert not np.allclose(
        both.read(["margins"])[1]["margins"], both.read(["margins@fixed_feature"])[1]["margins@fixed_feature"]
    )  # two different transfers
    found = gather(both.path, mode="fixed_feature")
    expected = class_influence(
        *(both.read(["masks", "margins@fixed_feature"])[1][k] for k in ("masks", "margins@fixed_feature"))
    )
    np.testing.assert_allclose(found.influence, expected, atol=1e-5, equal_nan=True)
    assert cli_main(["rankings", str(both.path), "--mode", "full_finetune"]) == 2
    assert "this store's transfer modes are cached_features, fixed_feature" in capsys.readouterr().err
    page = write_report(both.path, tmp_path / "report.html").read_text()
    assert "<h2>Transfers</h2>" in page and "on target: cached_features against fixed_feature" in page


def test_target_images_decoded_small_then_upsampled_with_their_own_statistics(tiny_data):
    """transfer.upsample_from / normalization / test_crop_ratio reach the target loaders: decoded at 8 px,
    normalised with CIFAR-10's statistics, evaluated on a 7/8 centre crop, upsampled to 16 px on the device."""
    from ffcv_transfer.engine.data import normalisation
    from ffcv_transfer.engine.models import build_model

    experiment = load_experiment(
        DEMO_CONFIG,
        tiny_settings(
            tiny_data,
            **{
                "loader.kind": "resident",
                "transfer.upsample_from": 8,
                "transfer.normalization": "cifar10",
                "transfer.test_crop_ratio": 0.875,
            },
        ),
    )
    models = [build_model(TINY_SPEC.num_sources, stem="small", width=0.125) for _ in range(2)]
    cache = LoaderCache()
    outputs, failures = worker_module.transfer_models(models, experiment, cache, lambda stage: None)
    assert not failures and all(np.isfinite(out.margins.numpy()).all() for out in outputs)
    held = list(cache.held.values())
    assert len(held) == 2 and {loader.resolution for loader in held} == {8}
    assert {loader.crop_ratio for loader in held} == {0.875}
    for loader in held:
        torch.testing.assert_close(loader.mean, normalisation(loader.device, "cifar10")[0])
