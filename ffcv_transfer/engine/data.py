"""Loaders over source and target betons: what each yields (`Batch`), what trainers and transfers ask of
one (`Loader`), and the ffcv one (`ImageLoader`; resident.ResidentLoader keeps pixels on the device,
`Upsampled` wraps either). Batches come out as normalised float tensors on the chosen device (CPU or
CUDA) in that device's layout (models.memory_format_for), labels as int64. A loader reads the examples
it is given (`LoaderSpec` says how): choosing them (a group's classes or examples) is the caller's."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ffcv_transfer.engine.models import memory_format_for
from ffcv_transfer.settings import NORMALIZATIONS, LoaderConfig

# ImageNet statistics on the 0..255 scale, as in libffcv/ffcv-imagenet
MEAN, STD = (np.array(values) * 255 for values in NORMALIZATIONS["imagenet"])  # of 0-255 pixels


@dataclass(frozen=True)
class LoaderSpec:
    """How to load one split (loader_cache.LoaderCache makes the loader): training (random order,
    random-resized crops of area fraction `crop_min_scale`..1, or with it None centre crops of `crop_ratio`;
    flips) or evaluation (in order, every example, centre crops of `crop_ratio`), at `resolution` px in
    batches of `batch_size`, normalised with `normalization` (settings.NORMALIZATIONS); `with_indices`:
    batches carry each example's beton position (what example masks route on). `target`: whose
    target_train/target_test `split` is (default: the experiment's first)."""

    split: str
    train: bool
    resolution: int
    batch_size: int
    crop_min_scale: float | None = 1.0
    crop_ratio: float = 1.0
    normalization: str = "imagenet"
    with_indices: bool = False
    target: str | None = None


class Loader(Protocol):
    """What the trainers and transfers iterate: one epoch of `Batch`es per iteration, `len` batches of it,
    and a resolution that may change between epochs (progressive resizing)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_resolution(self, resolution: int) -> None: ...


def class_indices(beton: str | Path, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Positions in the beton of the examples whose label is in `classes` (from NAME.labels.npy)."""
    from ffcv_transfer.store.betons import read_labels

    return np.flatnonzero(np.isin(read_labels(beton), np.asarray(classes)))


def sorted_examples(indices: Sequence[int] | np.ndarray | None) -> np.ndarray | None:
    """The beton positions a loader reads, sorted (None: all)."""
    return None if indices is None else np.sort(np.asarray(indices, np.int64))


def beton_identity(beton: str | Path) -> tuple[str, int, int]:
    """(resolved path, mtime, size): what process-level caches of a beton's loaders and pixels key on."""
    written = Path(beton).stat()
    return str(Path(beton).resolve()), written.st_mtime_ns, written.st_size


def decoding_threads(config: LoaderConfig, device: torch.device) -> int:
    """loader.num_workers, or by default every core this process may use beside a CPU device, and all but
    two beside a CUDA device: the training thread (routing, queues, kernel launches) and its copies keep
    cores of their own, so decoding the next batches overlaps the step instead of starving it."""
    if config.num_workers:
        return config.num_workers
    cores = len(os.sched_getaffinity(0))
    return cores if device.type == "cpu" else max(1, cores - 2)


def normalisation(device: torch.device, kind: str = "imagenet") -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) of 0-255 pixels of settings.NORMALIZATIONS[kind], as (1, 3, 1, 1) float32 tensors on
    `device`."""
    return tuple(
        torch.tensor(np.array(v) * 255, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        for v in NORMALIZATIONS[kind]
    )


class Batch(tuple):
    """(images, labels[, indices]) on the device, with `host`: the labels (and indices) as int64 numpy arrays
    on the host, what the trainers route on without waiting for the device."""

    host: tuple[np.ndarray, ...]

    def __new__(cls, items: Sequence[torch.Tensor], host: Sequence[np.ndarray]) -> Batch:
        batch = super().__new__(cls, items)
        batch.host = tuple(host)
        return batch


def to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`, copied asynchronously (from pinned memory) on CUDA."""
    tensor = torch.from_numpy(host)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


class Upsampled:
    """A loader whose images are upsampled on their device, nearest-neighbour, to `size` px: what the
    reference does to 32 px CIFAR images (nn.Upsample before the model) instead of resizing on the CPU.
    `set_resolution` sets the resolution decoded, before upsampling."""

    def __init__(self, loader: Loader, size: int):
        self.loader, self.size = loader, size

    def __len__(self) -> int:
        return len(self.loader)

    def set_resolution(self, resolution: int) -> None:
        self.loader.set_resolution(resolution)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            images, *rest = batch
            upsampled = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="nearest")
            yield Batch((upsampled, *rest), batch.host)


def _index_decoder():
    """An ffcv decoder for a scalar field that outputs each sample's index in the beton instead of the
    field's value (ffcv passes the sample ids to every decoder); used on the label field a second time."""
    from ffcv.fields.basics import IntDecoder

    class IndexDecoder(IntDecoder):
        def generate_code(self):
            def decoder(indices, destination, metadata, storage_state):
                for ix, sample_id in enumerate(indices):
                    destination[ix] = sample_id
                return destination[: len(indices)]

            return decoder

    return IndexDecoder()


class ImageLoader:
    """Iterate for (images, labels), or (images, labels, indices) with `with_indices` (each example's
    position in the beton, int64: what example masks route on). Training: random-resized-crop (area
    fraction in `crop_scale`; None: the evaluation's centre crop) + flip; evaluation: centre crop of
    `crop_ratio` of the shorter side.
    `indices`: the beton positions to load (None: all). Images come normalised with `normalization`
    (settings.NORMALIZATIONS)."""

    def __init__(
        self,
        beton: str | Path,
        *,
        train: bool,
        resolution: int,
        batch_size: int,
        config: LoaderConfig = LoaderConfig(),
        device: str | torch.device = "cpu",
        crop_ratio: float = 224 / 256,
        crop_scale: tuple[float, float] | None = (0.08, 1.0),
        indices: Sequence[int] | np.ndarray | None = None,
        with_indices: bool = False,
        normalization: str = "imagenet",
    ):
        from ffcv_transfer.threading_layer import use_threading_layer

        use_threading_layer(config.threading)  # before ffcv's import, which starts numba's threads
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        indices = sorted_examples(indices)
        self.device = torch.device(device)
        size = (resolution, resolution)
        self.decoder = (
            RandomResizedCropRGBImageDecoder(size, scale=crop_scale)
            if train and crop_scale
            else CenterCropRGBImageDecoder(size, crop_ratio)
        )
        image = (
            [self.decoder]
            + ([RandomHorizontalFlip()] if train else [])
            + [
                ToTensor(),
                ToDevice(self.device, non_blocking=True),
                ToTorchImage(channels_last=memory_format_for(self.device) == torch.channels_last),
            ]
        )
        label = [IntDecoder(), ToTensor(), Squeeze()]  # kept on the host: trainers route on it there
        pipelines = {"image": image, "label": label}
        self.with_indices = with_indices
        if with_indices:  # the label field decoded a second time, into the sample index
            pipelines["index"] = PipelineSpec("label", decoder=_index_decoder(), transforms=[ToTensor(), Squeeze()])
        self.loader = Loader(
            str(beton),
            batch_size=batch_size,
            num_workers=decoding_threads(config, self.device),
            order=getattr(OrderOption, config.order.upper()),
            os_cache=config.os_cache,
            drop_last=config.drop_last,
            indices=indices,
            seed=config.seed,
            pipelines=pipelines,
        )
        self.mean, self.std = normalisation(self.device, normalization)

    def set_resolution(self, resolution: int) -> None:
        self.decoder.output_size = (resolution, resolution)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for images, *keys in self.loader:
            # copies: ffcv reuses its batch buffers, so a caller that keeps labels across batches (feature
            # extraction concatenates a whole pass) would otherwise see later batches' labels in earlier ones
            host = [np.array(key, np.int64).reshape(-1) for key in keys]
            yield Batch(((images.float() - self.mean) / self.std, *(to_device(h, self.device) for h in host)), host)
