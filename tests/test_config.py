"""Experiment configs: the YAML files in rs_configs/ load, the DT config is the reference recipe,
command-line settings override files, and bad settings are errors that name the file and the setting."""

from pathlib import Path

import pytest
import yaml

from ffcv_transfer.cli.common import parse_rows, parse_settings
from ffcv_transfer.config import ConfigError, load_experiment

CONFIGS = Path(__file__).parent.parent / "rs_configs"
DATA = {
    "data.source_train": "s.beton",
    "data.source_val": "v.beton",
    "data.target_train": "t.beton",
    "data.target_test": "u.beton",
}


@pytest.mark.parametrize(
    "name",
    [
        "paper_dt_imagenet_cifar10",
        "paper_ffcv_imagenet_cifar10",
        "imagenet64_cheap",
        "tinyimagenet_cifar10",
        "demo_cpu",
        "tinyimagenet_demo_cpu",
        "tinyimagenet_gpu",
    ],
)
def test_every_shipped_config_loads_and_steps_on_per_model_batches(name):
    experiment = load_experiment(CONFIGS / f"{name}.yaml")
    assert experiment.data.path("source_train").name.endswith(".beton")
    assert experiment.source.per_model_batch > 0
    for target, mode in experiment.transfers:  # each trained transfer too
        config = experiment.target(target).transfer.for_mode(mode)
        assert config.per_model_batch > 0 or mode == "cached_features", (target, mode)


# MadryLab/data-transfer's values (configs/base_config.yaml, configs/cifar10_config.yaml, src/trainer.py,
# src/optimizers.py, src/datasets.py, src/decoders_and_transforms.py), written out by hand as settings
REFERENCE = {
    "masks.alpha": 0.5,  # num_classes: 500 of 1,000
    "model.stem": "imagenet",
    "model.width": 1.0,
    "model.blurpool": False,  # torchvision resnet18
    "source.epochs": 16,
    "source.lr": 0.5,
    "source.lr_peak_epoch": 2,
    "source.lr_schedule": "cyclic",
    "source.momentum": 0.9,
    "source.weight_decay": 5e-5,
    "source.bn_weight_decay": True,
    "source.label_smoothing": 0.0,
    "source.precision": "fp16",  # autocast + GradScaler
    "source.min_res": 160,
    "source.max_res": 192,
    "source.start_ramp": 11,
    "source.end_ramp": 13,
    "source.ramp_rounding": "nearest",
    "source.val_res": 224,
    "source.val_crop_ratio": 224 / 256,
    "source.val_accuracy": "all_classes",
    "source.crop_min_scale": 0.08,
    "transfer.mode": "fixed_feature",
    "transfer.epochs": 15,
    "transfer.lr": 0.1,
    "transfer.lr_peak_epoch": 5,
    "transfer.lr_schedule": "cyclic",
    "transfer.momentum": 0.9,
    "transfer.weight_decay": 5e-4,
    "transfer.bn_weight_decay": True,
    "transfer.label_smoothing": 0.0,
    "transfer.precision": "fp16",
    "source.per_model_batch": 1024,
    "transfer.per_model_batch": 1024,
    "transfer.resolution": 224,
    "transfer.upsample_from": 32,
    "transfer.crop_min_scale": 1.0,
    "transfer.test_crop_ratio": 1.0,
    "transfer.normalization": "cifar10",
}


def test_the_dt_config_is_the_reference_recipe_setting_by_setting():
    e = load_experiment(CONFIGS / "paper_dt_imagenet_cifar10.yaml")
    resolved = {f"{section}.{key}": value for section, values in e.to_dict().items() for key, value in values.items()}
    differ = {key: (resolved[key], value) for key, value in REFERENCE.items() if resolved[key] != pytest.approx(value)}
    assert not differ, differ
    # the shared decode batch holds about the reference's 1024 of each of K models on random halves
    union = 1 - (1 - e.masks.alpha) ** e.run.models_per_process
    assert abs(e.source.batch_size * e.masks.alpha / union - 1024) < 10
    flavour = load_experiment(CONFIGS / "paper_ffcv_imagenet_cifar10.yaml").to_dict()
    flavour = {f"{section}.{key}": value for section, values in flavour.items() for key, value in values.items()}
    assert {key for key in REFERENCE if flavour[key] != pytest.approx(REFERENCE[key])} == {
        "model.blurpool",
        "source.bn_weight_decay",
        "source.label_smoothing",
        "source.precision",
        "source.ramp_rounding",
        "source.val_res",
        "source.val_accuracy",
        "transfer.bn_weight_decay",
        "transfer.label_smoothing",
        "transfer.precision",
        "transfer.per_model_batch",
        "transfer.upsample_from",
        "transfer.crop_min_scale",
        "transfer.normalization",
    }  # what its header says differs


def test_command_line_overrides_file_and_types_are_parsed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {source_train: a.beton, source_val: b.beton, target_train: c.beton, target_test: d.beton, "
        "root: /data}\nsource: {epochs: 4, lr: 0.2}\nloader: {os_cache: false}\n"
    )
    e = load_experiment(
        path, parse_settings(["--source.epochs=7", "--run.models_per_process", "3", "--loader.os_cache=no"])
    )
    assert (e.source.epochs, e.source.lr, e.run.models_per_process, e.loader.os_cache) == (7, 0.2, 3, False)
    assert str(e.data.path("target_test")) == "/data/d.beton"
    e.save(tmp_path / "saved.yaml")
    assert load_experiment(tmp_path / "saved.yaml") == e  # a saved config reads back identical


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"source.epoch": "3"}, r"unknown setting\(s\) source.epoch \(did you mean source.epochs\?\)"),
        ({"source.precision": "fp8"}, r"source.precision: expected One of"),
        ({"source.epochs": "many"}, r"source.epochs: expected a int, got 'many'"),
        ({"loader.os_cache": "maybe"}, r"loader.os_cache: expected a bool"),
        ({"masks.alpha": "1.0"}, r"masks.alpha 1.0 must lie strictly between 0 and 1"),
        ({"loader.order": "quasi_random"}, r"quasi_random needs loader.os_cache false"),
        ({"run.compile": "default"}, r"run.compile default with run.fusion sequential needs source.per_model_batch"),
        ({"loader.kind": "gpu"}, r"loader.kind: expected One of"),
        ({"model.width": 0}, r"model.width must be > 0, got 0"),
        ({"run.device": "tpu"}, r"run.device 'tpu' is not cpu, cuda or cuda:N"),
        ({"loader.num_workers": -1}, r"loader.num_workers must be >= 0, got -1"),
        ({"source.min_res": 224, "source.max_res": 192}, r"need 0 < min_res <= max_res .* min_res 224, max_res 192"),
        ({"source.label_smoothing": 1.5}, r"source.label_smoothing 1.5 must lie in \[0, 1\]"),
        ({"transfer.lr": -0.1}, r"transfer.lr and transfer.weight_decay must be >= 0, got -0.1"),
        ({"masks.design": "orthogonal", "masks.num_models": 24}, r"needs masks.num_models a power of two >= 4, got 24"),
        ({"source.epochs": True}, r"source.epochs: expected a int, got True"),  # YAML's true is not 1
    ],
)
def test_bad_settings_name_the_file_and_the_setting(tmp_path, settings, message):
    tree = {}
    for key, value in {**DATA, **settings}.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=rf"bad.yaml: .*{message}"):
        load_experiment(path)


def test_experiment_files_with_the_old_setting_names_still_load(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {k.split(".")[1]: v for k, v in DATA.items()},
                "run": {"backend": "grouped"},
                "loader": {"backend": "resident"},
            }
        )
    )
    e = load_experiment(path)
    assert (e.run.fusion, e.loader.kind) == ("grouped", "resident")


def test_missing_and_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="data.source_train is required"):
        load_experiment(None, {"source.epochs": 2})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected sections"):
        load_experiment(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="nothing.yaml: cannot read"):
        load_experiment(tmp_path / "nothing.yaml")
    with pytest.raises(ConfigError, match="unexpected argument 'epochs'"):
        parse_settings(["epochs"])
    assert parse_rows("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    with pytest.raises(ConfigError, match="--models 'a-b'"):
        parse_rows("a-b")
    with pytest.raises(ConfigError, match="--models '3-1': 3-1 is no range"):
        parse_rows("3-1")
