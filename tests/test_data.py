"""ffcv loaders over planted betons: the evaluation pipeline returns the stored pixels normalised;
the training pipeline crops, flips, follows progressive resizing and loads only the chosen classes."""
import numpy as np
import pytest
import torch

from beton_writers import ImageOptions, PlantedSpec
from beton_writers.synthetic import make_planted, write_synthetic
from ffcv_transfer.data import MEAN, STD, ImageLoader, LoaderConfig, class_indices, resolution_at

SPEC = PlantedSpec(num_targets=3, num_unrelated=3, num_misleading=0, source_train_per_class=100,
                   source_val_per_class=20, target_train_per_class=20, target_test_per_class=20)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    return write_synthetic(out, seed=2, spec=SPEC, options=ImageOptions(write_mode="raw", num_workers=2))


def collect(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_eval_loader_returns_stored_images_normalised(betons):
    config = LoaderConfig(order="sequential", drop_last=False, num_workers=2)
    loader = ImageLoader(betons["source_val"], train=False, resolution=32, batch_size=25, config=config, classes=[1, 4],
                         crop_ratio=1.0)
    images, labels = collect(loader)
    arrays, truth = make_planted(SPEC, seed=2)["source_val"]
    keep = np.isin(truth, [1, 4])
    expected = (torch.as_tensor(arrays[keep]).permute(0, 3, 1, 2).double() - torch.as_tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.as_tensor(STD).view(1, 3, 1, 1)
    np.testing.assert_array_equal(labels.numpy(), truth[keep])
    torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-5)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_train_loader_crops_subsets_and_resizes(betons):
    classes = [0, 2, 5]
    config = LoaderConfig(order="random", num_workers=2)
    loader = ImageLoader(betons["source_train"], train=True, resolution=24, batch_size=64, config=config,
                         classes=classes)
    n = len(class_indices(betons["source_train"], classes))
    assert n == 300 and len(loader) == n // 64
    images, labels = collect(loader)
    assert images.shape == (n // 64 * 64, 3, 24, 24) and set(labels.tolist()) <= set(classes)
    loader.set_resolution(16)
    images, _ = next(iter(loader))
    assert images.shape == (64, 3, 16, 16)


def test_progressive_resizing_schedule():
    assert [resolution_at(e, 160, 192, 10, 13) for e in (0, 10, 11, 12, 13, 15)] == [160, 160, 160, 160, 192, 192]
    assert [resolution_at(e, 64, 128, 0, 4) for e in (0, 1, 2, 4)] == [64, 64, 96, 128]
    assert resolution_at(3, 24, 24, 0, 5) == 24 and resolution_at(0, 40, 72, 0, 1) == 40  # never below start
