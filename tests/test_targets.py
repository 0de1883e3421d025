"""Several targets per store: each source model is trained once and transferred to every target of the
experiment in each of that target's modes, with the same outputs as single-target runs from the same
seeds; a later target from a recipe file is transferred from checkpoints; analyses pick a target."""

import numpy as np
import pytest
import yaml

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.config import ConfigError, load_experiment
from ffcv_transfer.engine import worker as worker_module
from ffcv_transfer.engine.worker import run_worker
from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.findings.report import gather, write_report
from ffcv_transfer.store.experiment import create_class_store
from ffcv_transfer.store.results import ResultStore
from ffcv_transfer.writers.common import ImageOptions
from ffcv_transfer.writers.synthetic import write_synthetic

from .conftest import DEMO_CONFIG, TINY_SPEC, tiny_settings

# the resident loader with a seeded order and flips: equal seeds give equal batches
SEEDED = {
    "loader.kind": "resident",
    "loader.seed": 0,
    "transfer.epochs": 2,
    "transfer.lr_peak_epoch": 1,
    "transfer.crop_min_scale": 1.0,
    "transfer.batch_size": 20,
    "transfer.mode": "cached_features,fixed_feature",
}
OTHER_RECIPE = {"transfer.lr": 0.05, "transfer.train_crop": "center", "transfer.metric": "mean_per_class"}


@pytest.fixture(scope="module")
def other_target(tmp_path_factory):
    """A second planted target (another seed: other images, other planted influences)."""
    out = tmp_path_factory.mktemp("other") / "data"
    write_synthetic(out, seed=1, spec=TINY_SPEC, options=ImageOptions(write_mode="raw", num_workers=2))
    return {
        "data.target_name": "other",
        "data.target_train": str(out / "target_train.beton"),
        "data.target_test": str(out / "target_test.beton"),
    }


def experiment_file(tmp_path, targets: list) -> str:
    """demo_cpu.yaml with a `targets:` list."""
    tree = yaml.safe_load(DEMO_CONFIG.read_text()) | {"targets": targets}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def nested(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


def test_one_source_pass_serves_every_target_and_mode(tiny_data, other_target, tmp_path, fit_stages, capsys):
    base = tiny_settings(tiny_data, **SEEDED)
    together = load_experiment(experiment_file(tmp_path, [nested(other_target | OTHER_RECIPE)]), base)
    assert together.transfers == (
        ("target", "cached_features"),
        ("target", "fixed_feature"),
        ("other", "cached_features"),
        ("other", "fixed_feature"),
    )
    assert together.target("other").transfer.lr == 0.05 and together.transfer.lr != 0.05
    alone = {
        "target": load_experiment(DEMO_CONFIG, base),
        "other": load_experiment(DEMO_CONFIG, base | other_target | OTHER_RECIPE),
    }
    stores = {}
    for name, experiment in (("together", together), *alone.items()):
        stores[name] = create_class_store(tmp_path / name, experiment)
        assert run_worker(stores[name].path, experiment, progress=False) == 4
    assert fit_stages.count("source epoch") == 3  # one source pass per store, the four-transfer one included
    both = stores["together"]
    assert load_experiment(both.path / "experiment.yaml").extra_targets == together.extra_targets  # saved whole
    pairs = {
        "margins": ("target", "margins"),
        "margins@fixed_feature": ("target", "margins@fixed_feature"),
        "margins@other/cached_features": ("other", "margins"),
        "margins@other/fixed_feature": ("other", "margins@fixed_feature"),
    }
    for field, (name, single_field) in pairs.items():
        for output in ("margins", "p_correct"):
            mine = both.read([field.replace("margins", output)])[1][field.replace("margins", output)]
            single = stores[name].read([single_field.replace("margins", output)])[1][
                single_field.replace("margins", output)
            ]
            np.testing.assert_allclose(mine.astype(float), single.astype(float), atol=2e-3, err_msg=field)  # float16
    assert both.schema["margins@other/cached_features"][0] == (TINY_SPEC.num_targets * TINY_SPEC.target_test_per_class,)

    found = gather(both.path, target="other", mode="fixed_feature")
    masks, margins = (
        both.read(["masks", "margins@other/fixed_feature"])[1][k] for k in ("masks", "margins@other/fixed_feature")
    )
    np.testing.assert_allclose(found.influence, class_influence(masks, margins), atol=1e-5, equal_nan=True)
    assert str(found.betons["target_test"]) == other_target["data.target_test"]
    assert cli_main(["rankings", str(both.path), "--target", "nope"]) == 2
    assert "this experiment's targets are target, other" in capsys.readouterr().err
    page = write_report(both.path, tmp_path / "report.html", target="other").read_text()
    assert "<h2>Transfers</h2>" in page and "(mean_per_class)" in page and "Above: other, cached_features" in page


def test_target_recipes_are_checked_and_named(tiny_data, other_target, tmp_path):
    base = tiny_settings(tiny_data)
    with pytest.raises(ConfigError, match=r"targets\[0\].*missing: data.target_test"):
        load_experiment(experiment_file(tmp_path, [{"data": {"target_name": "x", "target_train": "a.beton"}}]), base)
    with pytest.raises(ConfigError, match=r"unexpected: source.epochs"):
        load_experiment(experiment_file(tmp_path, [nested(other_target) | {"source": {"epochs": 3}}]), base)
    with pytest.raises(ConfigError, match="target names must differ"):
        load_experiment(experiment_file(tmp_path, [nested(other_target | {"data.target_name": "target"})]), base)
    with pytest.raises(ConfigError, match="transfer.lr: expected a float"):
        load_experiment(experiment_file(tmp_path, [nested(other_target | {"transfer.lr": "fast"})]), base)
    recipe = tmp_path / "other.yaml"
    recipe.write_text(yaml.safe_dump(nested(other_target | OTHER_RECIPE)))
    by_file = load_experiment(experiment_file(tmp_path, [str(recipe)]), base)
    assert by_file.target("other").transfer.train_crop == "center"
    with pytest.raises(ConfigError, match=r"other_test.beton: the test beton of target other does not exist"):
        create_class_store(
            tmp_path / "store",
            load_experiment(
                experiment_file(tmp_path, [nested(other_target | {"data.target_test": "other_test.beton"})]), base
            ),
        )
    assert not (tmp_path / "store").exists()


def test_a_new_target_from_its_recipe_file_is_transferred_from_checkpoints(tiny_data, other_target, tmp_path, capsys):
    """`ffcv-transfer transfer --recipe FILE`: the store's checkpointed models transferred to a target the
    experiment did not have, into STORE/transfers/NAME/MODE, equal to transferring their bf16 weights here;
    analyses reach it through the main store with --target."""
    import torch

    from ffcv_transfer.engine import transfer_only
    from ffcv_transfer.engine.loader_cache import LoaderCache
    from ffcv_transfer.store.experiment import transfer_seed

    experiment = load_experiment(
        DEMO_CONFIG,
        tiny_settings(
            tiny_data,
            **SEEDED | {"transfer.mode": "cached_features", "run.checkpoints": True, "run.models_per_process": 2},
        ),
    )
    store = create_class_store(tmp_path / "store", experiment)
    assert run_worker(store.path, experiment, progress=False) == 4
    recipe = tmp_path / "other.yaml"
    recipe.write_text(yaml.safe_dump(nested(other_target | OTHER_RECIPE)))
    assert cli_main(["transfer", "--store", str(store.path), "--recipe", str(recipe), "--no-progress"]) == 0
    sub = ResultStore(store.path / "transfers" / "other" / "cached_features")
    rows, values = sub.read(["masks", "margins"])
    assert rows.tolist() == [0, 1, 2, 3]
    assert sub.schema["margins"][0] == (TINY_SPEC.num_targets * TINY_SPEC.target_test_per_class,)
    target = transfer_only.transfer_experiment(store.path, recipe=recipe)
    assert (target.data.target_name, target.transfer.lr, target.transfers) == (
        "other",
        0.05,
        (("other", "cached_features"),),
    )
    models = [
        transfer_only.load_source_model(store.path / "checkpoints" / f"{row}.pt", target, TINY_SPEC.num_sources)
        for row in (0, 1)
    ]
    torch.manual_seed(transfer_seed(sub, 0, experiment.masks.seed, "cached_features", "other"))
    direct, failures = worker_module.transfer_models(models, target, LoaderCache(), lambda stage: None)
    assert not failures
    np.testing.assert_allclose(
        values["margins"][:2].astype(float), np.stack([o.margins.numpy() for o in direct]), rtol=1e-3, atol=2e-3
    )  # float16 storage
    found = gather(store.path, target="other")
    np.testing.assert_allclose(
        found.influence, class_influence(values["masks"], values["margins"].astype(float)), atol=1e-5, equal_nan=True
    )
    assert cli_main(["rankings", str(store.path), "--target", "other", "--k", "1"]) == 0


def test_centre_cropped_training_images_are_the_evaluation_crops_flipped_at_random(tiny_data):
    """transfer.train_crop center (the reference's "cc" train decoder): each training image is the
    evaluation's centre crop of test_crop_ratio, or its mirror image, about half of each."""
    import torch

    from ffcv_transfer.engine.resident import ResidentLoader
    from ffcv_transfer.settings import LoaderConfig

    beton = tiny_data / "target_train.beton"
    options = dict(resolution=12, batch_size=60, crop_ratio=0.75)
    in_order = LoaderConfig(order="sequential", drop_last=False)
    evaluation = torch.cat([images for images, _ in ResidentLoader(beton, train=False, config=in_order, **options)])
    train = ResidentLoader(
        beton, train=True, crop_scale=None, indices=None, with_indices=True, config=LoaderConfig(seed=3), **options
    )
    flips = []
    for images, _, index in train:
        reference = evaluation[index]
        same = (images - reference).abs().amax((1, 2, 3)) < 1e-5
        mirrored = (images - reference.flip(3)).abs().amax((1, 2, 3)) < 1e-5
        assert (same | mirrored).all()
        flips.append(mirrored & ~same)
    assert 0.3 < torch.cat(flips).float().mean() < 0.7


def test_removals_retrain_and_score_the_target_and_mode_asked_for(tiny_data, other_target, tmp_path, monkeypatch):
    """`counterfactual --target other --mode fixed_feature` and `explain --check` with them: the removal
    models are transferred to that target in that mode (the worker is replaced by a recorder; no training)."""
    from .conftest import row_values

    base = tiny_settings(tiny_data, **{"transfer.mode": "cached_features,fixed_feature"})
    experiment = load_experiment(experiment_file(tmp_path, [nested(other_target | OTHER_RECIPE)]), base)
    store = create_class_store(tmp_path / "store", experiment)
    rng = np.random.default_rng(0)
    planted = {
        name: rng.normal(size=(store.num_rows, *shape))
        for name, (shape, _) in store.schema.items()
        if "margins" in name
    }
    store.writer().write_many(range(store.num_rows), **row_values(store, store.num_rows, **planted))
    seen = []

    def recorder(path, experiment, **kwargs):
        seen.append((experiment.data.target_name, experiment.data.target_test, experiment.transfer.modes))
        removal = ResultStore(path)
        removal.writer().write_many(range(removal.num_rows), **row_values(removal, removal.num_rows))
        return removal.num_rows

    monkeypatch.setattr(worker_module, "run_worker", recorder)
    asked = ["--target", "other", "--mode", "fixed_feature", "--no-progress"]
    cf = [
        "counterfactual",
        str(store.path),
        "--ks",
        "1",
        "--seeds",
        "1",
        "--kinds",
        "random",
        "--out",
        str(tmp_path / "cf"),
    ]
    assert cli_main([*cf, *asked]) == 0
    assert (
        cli_main(["explain", str(store.path), "--example", "3", "--check", "1", "--out", str(tmp_path / "x"), *asked])
        == 0
    )
    assert seen == [("other", other_target["data.target_test"], ("fixed_feature",))] * 2
    assert cli_main([*cf, "--target", "other", "--mode", "full_finetune"]) == 2  # not a mode of that target
