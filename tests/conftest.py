import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=None,
                     help="folder with the real data archives (default: $FFCV_TRANSFER_DATA)")


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    value = request.config.getoption("--data-dir") or os.environ.get("FFCV_TRANSFER_DATA")
    if not value:
        pytest.skip("real data not configured: pass --data-dir or set FFCV_TRANSFER_DATA to the shared data folder")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"real data folder {path} does not exist")
    return path


def read_with_loader(beton: Path, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Every record in beton order through ffcv's Loader (fixed-size images)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(beton), batch_size=batch_size, num_workers=2, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)
