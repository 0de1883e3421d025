import os
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from ffcv_transfer.writers.common import ImageOptions
from ffcv_transfer.writers.synthetic import PlantedSpec, write_synthetic


def pytest_addoption(parser):
    parser.addoption(
        "--data-dir", default=None, help="folder with the real data archives (default: $FFCV_TRANSFER_DATA)"
    )


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    value = request.config.getoption("--data-dir") or os.environ.get("FFCV_TRANSFER_DATA")
    if not value:
        pytest.skip("real data not configured: pass --data-dir or set FFCV_TRANSFER_DATA to the shared data folder")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"real data folder {path} does not exist")
    return path


# A planted data set small enough for a worker to train a model in seconds (tests of the engine's mechanics)
TINY_SPEC = PlantedSpec(
    num_targets=3,
    num_unrelated=2,
    num_misleading=0,
    resolution=16,
    source_train_per_class=40,
    source_val_per_class=10,
    target_train_per_class=20,
    target_test_per_class=10,
)
DEMO_CONFIG = Path(__file__).parent.parent / "rs_configs" / "demo_cpu.yaml"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted") / "data"
    write_synthetic(out, seed=0, spec=TINY_SPEC, options=ImageOptions(write_mode="raw", num_workers=2))
    return out


def tiny_settings(data: Path, **extra) -> dict:
    """demo_cpu.yaml shrunk to seconds on the tiny planted data: 4 random subsets, 1 epoch at 16 px, per-model
    batches of 16 (source) and 20 (transfer), cached-feature transfer alone."""
    return {
        "data.root": str(data),
        "masks.num_models": 4,
        "masks.design": "random",
        "source.epochs": 1,
        "source.lr_peak_epoch": 0.5,
        "source.batch_size": 32,
        "source.per_model_batch": 16,
        "transfer.per_model_batch": 20,
        "source.min_res": 16,
        "source.max_res": 16,
        "source.val_res": 16,
        "transfer.resolution": 16,
        "transfer.head_max_iter": 20,
        "transfer.mode": "cached_features",
        "run.models_per_process": 4,
        **extra,
    }


def read_with_loader(beton: Path, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Every record in beton order through ffcv's Loader (fixed-size images)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(
        str(beton),
        batch_size=batch_size,
        num_workers=2,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


class IdRecorder(nn.Module):
    """Records the example ids (pixel 0 of channel 0) of every training batch it is given."""

    def __init__(self, classes):
        super().__init__()
        self.fc, self.seen = nn.Linear(1, classes), []

    def forward(self, x):
        if self.training:
            self.seen += x[:, 0, 0, 0].long().tolist()
        return self.fc(x[:, :1, 0, 0])


def row_values(store, count: int, **given) -> dict:
    """`given` fields for `count` rows of `store`, every other field of its schema zero-filled."""
    values = {name: np.zeros((count, *shape), dtype) for name, (shape, dtype) in store.schema.items()}
    return values | given


def influence_reference(masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Class influence in float64 by its formula: mean over models with the class minus without."""
    m, y = masks.astype(np.float64), outputs.astype(np.float64)
    n_in = m.sum(0)[:, None]
    sums = m.T @ y
    return sums / n_in - (y.sum(0) - sums) / (len(m) - n_in)


@pytest.fixture
def fit_stages(monkeypatch) -> list:
    """The `stage` of every fit of the worker's sequential trainer while the test runs ("source epoch" once
    per source pass)."""
    from ffcv_transfer.engine import worker

    stages = []

    class Counting(worker.SequentialTrainer):
        def fit(self, batches, epochs, **kwargs):
            stages.append(kwargs.get("stage"))
            return super().fit(batches, epochs, **kwargs)

    monkeypatch.setitem(worker.TRAINERS, "sequential", Counting)
    return stages
