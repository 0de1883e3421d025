"""ffcv Loaders over source and target betons. Batches come out as normalised float tensors on the
chosen device (CPU or CUDA) in that device's layout (models.memory_format_for), labels as int64; the
class subset to load is found from the beton's sidecar labels, without reading the beton."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ffcv_transfer.engine.models import memory_format_for
from ffcv_transfer.settings import NORMALIZATIONS, LoaderConfig

# ImageNet statistics on the 0..255 scale, as in libffcv/ffcv-imagenet
MEAN, STD = (np.array(values) * 255 for values in NORMALIZATIONS["imagenet"])  # of 0-255 pixels


def class_indices(beton: str | Path, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Positions in the beton of the examples whose label is in `classes` (from NAME.labels.npy)."""
    from ffcv_transfer.store.betons import read_labels

    return np.flatnonzero(np.isin(read_labels(beton), np.asarray(classes)))


def select_examples(
    beton: str | Path,
    classes: Sequence[int] | np.ndarray | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray | None:
    """The sorted beton positions a loader reads: those of `classes`, or `indices`, or None for all."""
    if classes is not None and indices is not None:
        raise ValueError("give classes or indices, not both")
    if classes is not None:
        return class_indices(beton, classes)
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
    reference does to 32 px CIFAR images (nn.Upsample before the model) instead of resizing on the CPU."""

    def __init__(self, loader, size: int):
        self.loader, self.size = loader, size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.loader:
            images, *rest = batch
            upsampled = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="nearest")
            host = getattr(batch, "host", None)
            yield (upsampled, *rest) if host is None else Batch((upsampled, *rest), host)


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
    `classes` loads the examples of those classes, `indices` exactly those examples (not both). Images
    come normalised with `normalization` (settings.NORMALIZATIONS)."""

    def __init__(
        self,
        beton: str | Path,
        *,
        train: bool,
        resolution: int,
        batch_size: int,
        config: LoaderConfig = LoaderConfig(),
        device: str | torch.device = "cpu",
        classes: Sequence[int] | np.ndarray | None = None,
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

        indices = select_examples(beton, classes, indices)
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
