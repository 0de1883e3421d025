"""The worker's mechanics on planted betons: masks, store schema, claiming, writing, resuming.
(Whether the models learn enough for influences to recover the planted ground truth is issue 4's
end-to-end test, still to come.)"""
import numpy as np
import pytest

from beton_writers import ImageOptions, PlantedSpec, read_sidecar
from beton_writers.synthetic import write_synthetic
from ffcv_transfer.data import LoaderConfig
from ffcv_transfer.store import ResultStore
from ffcv_transfer.train import OptimConfig
from ffcv_transfer.worker import WorkerConfig, create_store, random_class_masks, run_worker


def test_random_class_masks_have_exact_subset_sizes():
    masks = random_class_masks(200, 11, 0.5, seed=3)
    assert masks.shape == (200, 11) and (masks.sum(1) == round(0.5 * 11)).all()
    np.testing.assert_array_equal(masks, random_class_masks(200, 11, 0.5, seed=3))
    assert np.abs(masks.mean(0) - 6 / 11).max() < 0.12  # every class in about 6 of 11 models
    with pytest.raises(ValueError, match="alpha 1"):
        random_class_masks(3, 4, 1.0, seed=0)


def test_worker_fills_the_store_and_resumes(tmp_path):
    spec = PlantedSpec(num_targets=3, num_unrelated=2, num_misleading=0, source_train_per_class=40,
                       source_val_per_class=10, target_train_per_class=20, target_test_per_class=10)
    paths = write_synthetic(tmp_path / "data", seed=0, spec=spec, options=ImageOptions(write_mode="raw", num_workers=2))
    masks = random_class_masks(3, spec.num_sources, 0.5, seed=0)
    num_test = read_sidecar(paths["target_test"])["num_examples"]
    create_store(tmp_path / "store", masks, num_test)
    config = WorkerConfig(*(str(paths[s]) for s in ("source_train", "source_val", "target_train", "target_test")),
                          models_per_process=3, loader=LoaderConfig(batch_size=32, num_workers=2),
                          optim=OptimConfig(epochs=1, lr=0.05, lr_peak_epoch=0.5, precision="fp32"))
    assert run_worker(tmp_path / "store", config) == 3
    assert run_worker(tmp_path / "store", config) == 0  # nothing pending: a restarted worker does no work
    store = ResultStore(tmp_path / "store")
    rows, values = store.read(["masks", "margins", "is_correct", "predictions", "source_acc", "target_acc"])
    assert rows.tolist() == [0, 1, 2] and store.status()["completed"] == 3
    np.testing.assert_array_equal(values["masks"], masks)
    assert values["margins"].shape == (3, num_test) and np.isfinite(values["margins"]).all()
    np.testing.assert_array_equal(values["is_correct"], values["margins"] > 0)
    np.testing.assert_allclose(values["target_acc"], values["is_correct"].mean(1), atol=1e-6)
    assert ((0 <= values["source_acc"]) & (values["source_acc"] <= 1)).all()
    assert set(np.unique(values["predictions"])) <= set(range(spec.num_targets))
