"""Source checkpoints and transfer-only runs: models trained once are transferred later in another mode,
from their bf16 checkpoints or from outside state dicts (torchvision's names, the reference's wrapper),
with the same outputs as transferring those weights directly; a cut-off run resumes."""

import re

import numpy as np
import pytest
import torch

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.config import load_experiment
from ffcv_transfer.engine import transfer_only
from ffcv_transfer.engine.loader_cache import LoaderCache
from ffcv_transfer.engine.models import build_model
from ffcv_transfer.engine.worker import run_worker, transfer_models
from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.findings.report import gather
from ffcv_transfer.store.experiment import create_class_store, transfer_seed
from ffcv_transfer.store.results import ResultStore

from .conftest import DEMO_CONFIG, TINY_SPEC, tiny_settings

SEEDED = {
    "loader.kind": "resident",
    "loader.seed": 0,
    "transfer.epochs": 2,
    "transfer.lr_peak_epoch": 1,
    "transfer.crop_min_scale": 1.0,
    "transfer.batch_size": 20,
    "run.models_per_process": 2,
}


def direct_outputs(models, experiment, sub, first_row, mode):
    """The outputs of transferring `models` in this process, as run_transfer does for the group at `first_row`."""
    torch.manual_seed(transfer_seed(sub, first_row, experiment.masks.seed, mode))
    outputs, failures = transfer_models(models, experiment, LoaderCache(), lambda stage: None, mode)
    assert not failures
    return np.stack([out.margins.numpy() for out in outputs])


def test_checkpointed_models_transfer_later_and_a_cut_off_run_resumes(tiny_data, tmp_path, monkeypatch):
    experiment = load_experiment(DEMO_CONFIG, tiny_settings(tiny_data, **SEEDED, **{"run.checkpoints": True}))
    store = create_class_store(tmp_path / "store", experiment)
    assert run_worker(store.path, experiment, progress=False) == 4
    for row in range(4):
        saved = torch.load(store.path / "checkpoints" / f"{row}.pt", weights_only=False)
        assert saved["row"] == row and np.array_equal(saved["classes"], store.fixed("masks")[row])
        assert all(v.dtype == torch.bfloat16 for v in saved["state_dict"].values() if v.is_floating_point())

    calls = []
    real = transfer_only.transfer_models

    def cut_off_after_one_group(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the run is stopped while transferring its second group
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer_only, "transfer_models", cut_off_after_one_group)
    with pytest.raises(KeyboardInterrupt):
        transfer_only.run_transfer(store.path, mode="fixed_feature", progress=False)
    sub = ResultStore(store.path / "transfers" / "target" / "fixed_feature")
    assert sub.status()["completed"] == 2
    monkeypatch.setattr(transfer_only, "transfer_models", real)
    assert transfer_only.run_transfer(store.path, mode="fixed_feature", progress=False) == 2
    assert transfer_only.run_transfer(store.path, mode="fixed_feature", progress=False) == 0
    status = sub.status()
    assert (status["completed"], status["duplicates"], status["failed"]) == (4, 0, 0)

    rows, values = sub.read(["masks", "margins", "source_acc"])
    np.testing.assert_array_equal(values["source_acc"], store.read(["source_acc"])[1]["source_acc"])
    target = load_experiment(sub.path / "experiment.yaml")
    assert target.transfer.modes == ("fixed_feature",)
    for first in (0, 2):  # each group against transferring its checkpoints' (bf16-rounded) weights here
        models = [
            transfer_only.load_source_model(store.path / "checkpoints" / f"{row}.pt", target, 5)
            for row in (first, first + 1)
        ]
        np.testing.assert_allclose(
            values["margins"][first : first + 2].astype(float),
            direct_outputs(models, target, sub, first, "fixed_feature"),
            rtol=1e-3,
            atol=2e-3,
        )  # float16 storage
    found = gather(store.path, mode="fixed_feature")  # through the main store
    np.testing.assert_allclose(
        found.influence, class_influence(values["masks"], values["margins"].astype(float)), atol=1e-5, equal_nan=True
    )


def torchvision_names(state: dict) -> dict:
    """This package's ResNet-18 names as torchvision's, under a DataParallel prefix."""
    renamed = {}
    for name, value in state.items():
        name = re.sub(r"^stem\.0\.", "conv1.", name)
        name = re.sub(r"^stem\.1\.", "bn1.", name)
        name = re.sub(r"^layers\.(\d)\.", lambda m: f"layer{int(m.group(1)) + 1}.", name)
        renamed["module." + name.replace(".shortcut.", ".downsample.")] = value
    return renamed


def test_outside_checkpoints_with_torchvision_names_are_imported_and_transferred(tiny_data, tmp_path, capsys):
    settings = tiny_settings(tiny_data, **SEEDED)
    experiment = load_experiment(DEMO_CONFIG, settings)
    folder = tmp_path / "outside"
    folder.mkdir()
    models = []
    for k, name in enumerate(("a", "b", "c")):
        torch.manual_seed(k)
        model = build_model(TINY_SPEC.num_sources, stem="small", width=0.125)
        models.append(model)
        torch.save({"state_dict": torchvision_names(model.state_dict()), "epoch": 16}, folder / f"{name}.pt")
    masks = np.random.default_rng(0).random((3, TINY_SPEC.num_sources)) < 0.5
    np.save(folder / "masks.npy", masks)
    argv = [
        "transfer",
        "--store",
        str(tmp_path / "store"),
        "--mode",
        "cached_features",
        "--no-progress",
        "--checkpoints",
        str(folder),
        "--config",
        str(DEMO_CONFIG),
        *[f"--{k}={v}" for k, v in settings.items()],
    ]
    assert cli_main(argv) == 0
    sub = ResultStore(tmp_path / "store" / "transfers" / "target" / "cached_features")
    rows, values = sub.read(["masks", "margins"])
    assert rows.tolist() == [0, 1, 2] and np.array_equal(values["masks"], masks)
    for model in models:  # what the checkpoints hold: bf16-rounded weights
        model.load_state_dict({k: v.bfloat16().to(v.dtype) for k, v in model.state_dict().items()})
    np.testing.assert_allclose(
        values["margins"][:2].astype(float),
        direct_outputs(models[:2], experiment, sub, 0, "cached_features"),
        rtol=1e-3,
        atol=2e-3,
    )  # float16 storage
    capsys.readouterr()

    np.save(folder / "masks.npy", masks[:2])  # a mask row short
    assert cli_main([*argv[:2], str(tmp_path / "second"), *argv[3:]]) == 2
    assert "masks.npy: expected a (3, classes) 0/1 array" in capsys.readouterr().err
    np.save(folder / "masks.npy", masks)
    bad = torch.load(folder / "b.pt", weights_only=False)
    bad["state_dict"]["module.fc.weight"] = torch.zeros(3, 8)
    torch.save(bad, folder / "b.pt")
    assert cli_main([*argv[:2], str(tmp_path / "third"), *argv[3:]]) == 2
    assert "b.pt: fc.weight has shape (3, 8)" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()  # nothing half-imported
