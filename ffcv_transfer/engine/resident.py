"""A device-resident loader for low-resolution recipes: the beton's images are read once into device memory (uint8, one
tensor per beton and device, in a PixelCache that loaders share), and each batch is gathered, cropped, flipped,
resized and normalised on the device. No decoding per epoch and no ffcv pipeline: 64 px ImageNet's pixels fit beside
the models in an H100's memory.

Same interface as data.ImageLoader. Training crops are random-resized (area fraction in `crop_scale`, aspect ratio
3/4..4/3; `crop_scale` None: the evaluation's centre crop) with a random flip; evaluation takes the centre crop of
`crop_ratio` of the shorter side; both resample bilinearly (ffcv resizes with OpenCV's area filter: equal for crops
at the stored size, softer when shrinking much). Every image of a beton must have the same size."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ffcv_transfer.engine.data import Batch, beton_identity, normalisation, sorted_examples, to_device
from ffcv_transfer.engine.models import memory_format_for
from ffcv_transfer.settings import LoaderConfig


class Pixels(NamedTuple):
    """Every record of a beton: images (N, H, W, 3) uint8 and labels (N,) int64 on a device, and the labels
    on the host too (what batches carry for routing, read with the records rather than again)."""

    images: torch.Tensor
    labels: torch.Tensor
    host_labels: np.ndarray


class PixelCache:
    """Betons' pixels in device memory, read once and shared by every ResidentLoader over them; at most
    `max_bytes` of them (the least recently used beton goes first; the one asked for always stays)."""

    def __init__(self, max_bytes: int = 32 * 2**30):
        self.max_bytes = max_bytes
        self.held: OrderedDict[tuple, Pixels] = OrderedDict()

    def pixels(self, beton: str | Path, device: torch.device) -> Pixels:
        """Every record of `beton`, on `device`."""
        key = (*beton_identity(beton), str(device))
        if key not in self.held:
            self.held[key] = read_pixels(beton, device)
            while len(self.held) > 1 and sum(held.images.nbytes for held in self.held.values()) > self.max_bytes:
                self.held.popitem(last=False)
        self.held.move_to_end(key)
        return self.held[key]


def read_pixels(beton: str | Path, device: torch.device) -> Pixels:
    """Every record of `beton`, on `device`."""
    from ffcv_transfer.store.betons import BetonError, BetonRecords

    records = BetonRecords(beton)
    sizes = {(int(h), int(w)) for h, w in zip(records.images["height"], records.images["width"])}
    if len(sizes) != 1:
        raise BetonError(
            f"{beton}: images of {len(sizes)} sizes (e.g. {sorted(sizes)[:3]}); the resident "
            "loader needs one size: write the beton with --square --max-resolution R"
        )
    ((height, width),) = sizes
    images = torch.empty((len(records), height, width, 3), dtype=torch.uint8, device=device)
    chunk = 4096
    for start in range(0, len(records), chunk):  # via host memory in chunks, not all of it at once
        stop = min(start + chunk, len(records))
        images[start:stop] = torch.from_numpy(np.stack([records.image(i) for i in range(start, stop)]))
    host_labels = np.asarray(records.labels, np.int64)
    return Pixels(images, torch.as_tensor(host_labels, device=device), host_labels)


class ResidentLoader:
    """Iterate for (images, labels), or (images, labels, indices) with `with_indices`: normalised
    float32 images on the device, in its layout (models.memory_format_for). `indices`: the beton positions
    to load (None: all)."""

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
        pixels: PixelCache | None = None,
        normalization: str = "imagenet",
    ):
        selected = sorted_examples(indices)
        self.device = torch.device(device)
        self.images, self.labels, self.host_labels = (pixels or PixelCache()).pixels(beton, self.device)
        self.examples = np.arange(len(self.host_labels)) if selected is None else selected
        self.train, self.batch_size, self.resolution = train, batch_size, resolution
        self.crop_ratio, self.crop_scale, self.with_indices = crop_ratio, crop_scale, with_indices
        self.order, self.drop_last = config.order, config.drop_last
        # the order is drawn on the host (the batch's labels are known there without a device sync); the
        # crops on the device, from the same generator on a CPU
        self.order_generator = torch.Generator()
        self.generator = self.order_generator if self.device.type == "cpu" else torch.Generator(device=self.device)
        for generator in {self.order_generator, self.generator}:
            if config.seed is None:
                generator.seed()  # non-deterministic, and the global RNG untouched
            else:
                generator.manual_seed(config.seed)
        self.mean, self.std = normalisation(self.device, normalization)

    def set_resolution(self, resolution: int) -> None:
        self.resolution = resolution

    def __len__(self) -> int:
        whole, rest = divmod(len(self.examples), self.batch_size)
        return whole if self.drop_last or not rest else whole + 1

    def __iter__(self) -> Iterator[Batch]:
        examples = self.examples
        if self.order != "sequential":
            examples = examples[torch.randperm(len(examples), generator=self.order_generator).numpy()]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            host = [examples[start : start + self.batch_size]]
            picked = to_device(host[0], self.device)
            pixels = self.images[picked].permute(0, 3, 1, 2).float()
            images = F.grid_sample(
                pixels,
                self._grid(len(picked), *pixels.shape[2:]),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
            images = ((images - self.mean) / self.std).contiguous(memory_format=memory_format_for(self.device))
            host.insert(0, self.host_labels[host[0]])
            yield Batch(
                (images, self.labels[picked]) + ((picked,) if self.with_indices else ()),
                host if self.with_indices else host[:1],
            )

    def _grid(self, n: int, height: int, width: int) -> torch.Tensor:
        """Sampling grids of the crops: (n, R, R, 2) in grid_sample's [-1, 1] coordinates."""
        if self.train and self.crop_scale:
            area = height * width * self._uniform(n, *self.crop_scale)
            ratio = torch.exp(self._uniform(n, math.log(3 / 4), math.log(4 / 3)))
            crop_w, crop_h = torch.sqrt(area * ratio) / width, torch.sqrt(area / ratio) / height
            fits = (crop_w <= 1) & (crop_h <= 1)  # else the whole image (torchvision's fallback, after one draw)
            crop_w, crop_h = torch.where(fits, crop_w, 1.0), torch.where(fits, crop_h, 1.0)  # fractions of the sides
            centre_x = (1 - crop_w) * (2 * self._uniform(n, 0, 1) - 1)  # the crop stays inside the image
            centre_y = (1 - crop_h) * (2 * self._uniform(n, 0, 1) - 1)
            flip = torch.where(self._uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        else:
            side = self.crop_ratio * min(height, width)
            crop_w = torch.full((n,), side / width, device=self.device)
            crop_h = torch.full((n,), side / height, device=self.device)
            centre_x = centre_y = torch.zeros(n, device=self.device)
            flip = (
                torch.where(self._uniform(n, 0, 1) < 0.5, -1.0, 1.0)
                if self.train
                else torch.ones(n, device=self.device)
            )
        zero = torch.zeros(n, device=self.device)
        theta = torch.stack(
            [torch.stack([crop_w * flip, zero, centre_x], 1), torch.stack([zero, crop_h, centre_y], 1)], 1
        )
        return F.affine_grid(theta, [n, 3, self.resolution, self.resolution], align_corners=False)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator, device=self.device)
