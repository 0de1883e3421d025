"""Loaders over planted betons (ffcv's and the device-resident one): the evaluation pipeline returns
the stored pixels normalised; the training pipeline crops, flips, follows progressive resizing and loads
only the chosen classes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffcv_transfer.engine.data import MEAN, STD, ImageLoader, class_indices
from ffcv_transfer.engine.resident import PixelCache, ResidentLoader
from ffcv_transfer.engine.train import resolution_at
from ffcv_transfer.settings import LoaderConfig
from ffcv_transfer.store.betons import BetonError
from ffcv_transfer.writers.common import ImageOptions
from ffcv_transfer.writers.synthetic import PlantedSpec, make_planted, write_synthetic

SPEC = PlantedSpec(
    num_targets=3,
    num_unrelated=3,
    num_misleading=0,
    source_train_per_class=100,
    source_val_per_class=20,
    target_train_per_class=20,
    target_test_per_class=20,
)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    return write_synthetic(out, seed=2, spec=SPEC, options=ImageOptions(write_mode="raw", num_workers=2))


def collect(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def normalised(arrays: np.ndarray) -> torch.Tensor:
    return (
        torch.as_tensor(arrays).permute(0, 3, 1, 2).double() - torch.as_tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.as_tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("kind", [ImageLoader, ResidentLoader])
def test_eval_loader_returns_stored_images_normalised(betons, kind):
    config = LoaderConfig(order="sequential", drop_last=False, num_workers=2)
    loader = kind(
        betons["source_val"],
        train=False,
        resolution=32,
        batch_size=25,
        config=config,
        indices=class_indices(betons["source_val"], [1, 4]),
        crop_ratio=1.0,
    )
    images, labels = collect(loader)
    arrays, truth = make_planted(SPEC, seed=2)["source_val"]
    keep = np.isin(truth, [1, 4])
    np.testing.assert_array_equal(labels.numpy(), truth[keep])
    torch.testing.assert_close(images.double(), normalised(arrays[keep]), rtol=0, atol=1e-5)
    assert images.is_contiguous()  # the CPU's layout (models.memory_format_for)
    # kept across a pass of more batches than ffcv has buffers (it reuses them), labels stay each batch's own
    loader = kind(
        betons["source_val"],
        train=False,
        resolution=32,
        batch_size=4,
        config=config,
        indices=class_indices(betons["source_val"], [1, 4]),
        crop_ratio=1.0,
    )
    np.testing.assert_array_equal(torch.cat([labels for _, labels in loader]).numpy(), truth[keep])


def test_target_normalisations_and_nearest_upsampling_on_the_device(betons):
    """The reference's CIFAR transfer: native pixels normalised with CIFAR-10's statistics (or none: / 255),
    then upsampled nearest-neighbour on the device, each pixel a block of identical ones."""
    from ffcv_transfer.engine.data import Upsampled
    from ffcv_transfer.settings import NORMALIZATIONS

    config = LoaderConfig(order="sequential", drop_last=False)
    arrays = torch.as_tensor(make_planted(SPEC, seed=2)["target_test"][0]).permute(0, 3, 1, 2).double()
    for kind in ("cifar10", "none"):
        loader = ResidentLoader(
            betons["target_test"],
            train=False,
            resolution=32,
            batch_size=16,
            config=config,
            crop_ratio=1.0,
            normalization=kind,
        )
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) * 255 for v in NORMALIZATIONS[kind])
        images, _ = collect(loader)
        torch.testing.assert_close(images.double(), (arrays - mean) / std, rtol=0, atol=1e-5)
        upsampled, _ = collect(Upsampled(loader, 96))
        assert upsampled.shape[-2:] == (96, 96) and len(Upsampled(loader, 96)) == len(loader)
        torch.testing.assert_close(upsampled, images.repeat_interleave(3, 2).repeat_interleave(3, 3))


def test_train_loader_crops_subsets_and_resizes(betons):
    classes = [0, 2, 5]
    config = LoaderConfig(order="random", num_workers=2)
    loader = ImageLoader(
        betons["source_train"],
        train=True,
        resolution=24,
        batch_size=64,
        config=config,
        indices=class_indices(betons["source_train"], classes),
    )
    n = len(class_indices(betons["source_train"], classes))
    assert n == 300 and len(loader) == n // 64
    images, labels = collect(loader)
    assert images.shape == (n // 64 * 64, 3, 24, 24) and set(labels.tolist()) <= set(classes)
    loader.set_resolution(16)
    images, _ = next(iter(loader))
    assert images.shape == (64, 3, 16, 16)


@pytest.mark.parametrize("kind", ["ffcv", "resident"])
def test_batches_carry_their_labels_and_indices_on_the_host_too(betons, kind):
    """data.Batch.host: what the trainers route on without a device sync, equal to the batch's own."""
    from ffcv_transfer.engine.data import Batch

    loader_class = ImageLoader if kind == "ffcv" else ResidentLoader
    loader = loader_class(
        betons["source_val"],
        train=True,
        resolution=16,
        batch_size=32,
        with_indices=True,
        config=LoaderConfig(num_workers=2),
    )
    for batch in loader:
        assert isinstance(batch, Batch) and len(batch.host) == 2
        np.testing.assert_array_equal(batch.host[0], batch[1].numpy())
        np.testing.assert_array_equal(batch.host[1], batch[2].numpy())


def test_progressive_resizing_schedule():
    assert [resolution_at(e, 160, 192, 10, 13) for e in (0, 10, 11, 12, 13, 15)] == [160, 160, 160, 160, 192, 192]
    assert [resolution_at(e, 64, 128, 0, 4) for e in (0, 1, 2, 4)] == [64, 64, 96, 128]
    assert resolution_at(3, 24, 24, 0, 5) == 24 and resolution_at(0, 40, 72, 0, 1) == 40  # never below start


def test_pixel_cache_reads_each_beton_once_and_holds_at_most_its_bound(betons):
    """Loaders over one beton share its pixels; past max_bytes the least recently used beton is dropped
    (here room for one: source_val's 32 px images are 3,072 bytes each)."""
    val_bytes = 32 * 32 * 3 * SPEC.source_val_per_class * SPEC.num_sources
    pixels = PixelCache(max_bytes=val_bytes)
    first = pixels.pixels(betons["source_val"], torch.device("cpu"))
    assert first[0].nbytes == val_bytes and pixels.pixels(betons["source_val"], torch.device("cpu"))[0] is first[0]
    pixels.pixels(betons["target_test"], torch.device("cpu"))
    assert len(pixels.held) == 1  # source_val went
    roomy = PixelCache()
    loaders = [
        ResidentLoader(betons["source_val"], train=False, resolution=16, batch_size=8, pixels=roomy) for _ in range(2)
    ]
    assert loaders[0].images is loaders[1].images and len(roomy.held) == 1


def test_resident_loader_halves_by_area_and_flips_whole_images(betons):
    """Evaluation at half the stored size: the 2 x 2 means (what ffcv's area resize gives). Training with
    crops of the whole area: each image once per epoch, itself or its mirror, in random order."""
    arrays, truth = make_planted(SPEC, seed=2)["source_train"]
    config = LoaderConfig(order="sequential", drop_last=False)
    half = ResidentLoader(
        betons["source_train"], train=False, resolution=16, batch_size=64, config=config, crop_ratio=1.0
    )
    images, _ = collect(half)
    pooled = normalised(arrays).reshape(len(arrays), 3, 16, 2, 16, 2).mean((3, 5))
    torch.testing.assert_close(images.double(), pooled, rtol=0, atol=1e-5)

    picked = class_indices(betons["source_train"], [0, 3])
    train = ResidentLoader(
        betons["source_train"],
        train=True,
        resolution=32,
        batch_size=64,
        crop_scale=(1.0, 1.0),
        config=LoaderConfig(seed=0),
        indices=picked,
        with_indices=True,
    )
    assert len(train) == len(picked) // 64
    images, labels, indices = (torch.cat(parts) for parts in zip(*train))
    assert len(set(indices.tolist())) == len(indices) == len(train) * 64 and set(indices.tolist()) <= set(picked)
    assert indices.tolist() != sorted(indices.tolist())
    np.testing.assert_array_equal(labels.numpy(), truth[indices.numpy()])
    stored = normalised(arrays[indices.numpy()])
    same = (images.double() - stored).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (images.double() - stored.flip(3)).abs().amax((1, 2, 3)) < 1e-5
    assert (same | mirrored).all() and 0.3 < mirrored.float().mean() < 0.7
    train.set_resolution(24)
    assert next(iter(train))[0].shape == (64, 3, 24, 24)


def test_resident_loader_refuses_images_of_several_sizes_and_square_writes_fix_it(tmp_path):
    from PIL import Image

    from ffcv_transfer.writers.imagefolder import write_imagefolder

    rng = np.random.default_rng(0)
    pictures = {
        "a": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (16, 24, 3), dtype=np.uint8),
    }
    for name, picture in pictures.items():
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(picture).save(tmp_path / "src" / name / "x.png")
    write_imagefolder(tmp_path / "src", tmp_path / "mixed.beton", options=ImageOptions(write_mode="raw"))
    with pytest.raises(BetonError, match="mixed.beton: images of 2 sizes"):
        ResidentLoader(tmp_path / "mixed.beton", train=False, resolution=16, batch_size=2)
    write_imagefolder(
        tmp_path / "src",
        tmp_path / "square.beton",
        options=ImageOptions(write_mode="raw", square=True, max_resolution=16),
    )
    loader = ResidentLoader(
        tmp_path / "square.beton",
        train=False,
        resolution=16,
        batch_size=2,
        crop_ratio=1.0,
        config=LoaderConfig(order="sequential", drop_last=False),
    )
    images, labels = collect(loader)
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]
    torch.testing.assert_close(images[1:].double(), normalised(pictures["b"][None, :, 4:20]), rtol=0, atol=1e-5)


def test_loader_threading_layer_is_chosen_before_numba_starts_and_refused_after():
    """loader.threading decides numba's layer while no parallel code has run in the process (ffcv_transfer.writers'
    environment default notwithstanding); afterwards a different layer warns and changes nothing."""
    script = """
import os, warnings
import ffcv_transfer.writers
print(os.environ["NUMBA_THREADING_LAYER"])  # the default, set before numba is imported
import numba, numpy as np
from ffcv_transfer.threading_layer import use_threading_layer
use_threading_layer("omp")
@numba.njit(parallel=True)
def total(x):
    s = 0.0
    for i in numba.prange(len(x)):
        s += x[i]
    return s
assert total(np.ones(100)) == 100
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    use_threading_layer("workqueue")
print(numba.threading_layer(), len(caught), "takes effect in a new process" in str(caught[0].message))
"""
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.split() == ["workqueue", "omp", "1", "True"], done.stderr[-2000:]
    chosen = subprocess.run(
        [sys.executable, "-c", "import os, ffcv_transfer.writers; print(os.environ['NUMBA_THREADING_LAYER'])"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "NUMBA_THREADING_LAYER": "omp"},
    )
    assert chosen.stdout.strip() == "omp", chosen.stderr[-2000:]  # the environment's choice is kept
    with pytest.raises(ValueError, match="loader.threading"):
        LoaderConfig(threading="threads")
