"""The loaders one worker process makes, kept for reuse: a new ffcv Loader JIT-compiles its pipeline in its
first epoch (tens of seconds on a CPU), which every group of K models over the same examples would pay
again. A LoaderCache is made per worker and passed down; it also holds the device-resident pixels."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ffcv_transfer.engine.data import ImageLoader, beton_identity, select_examples
from ffcv_transfer.engine.resident import PixelCache, ResidentLoader

if TYPE_CHECKING:
    from ffcv_transfer.config import Experiment
    from ffcv_transfer.settings import Target


class LoaderCache:
    """At most `size` loaders, the least recently used dropped first."""

    def __init__(self, size: int = 8, pixels: PixelCache | None = None):
        self.size, self.pixels = size, pixels or PixelCache()
        self.held: OrderedDict[tuple, ImageLoader | ResidentLoader] = OrderedDict()

    def get(
        self,
        experiment: Experiment,
        split: str,
        *,
        train: bool,
        resolution: int,
        batch_size: int,
        crop_min_scale: float | None = 1.0,
        crop_ratio: float = 1.0,
        classes: Sequence[int] | None = None,
        indices: np.ndarray | None = None,
        normalization: str = "imagenet",
        target: Target | None = None,
    ) -> ImageLoader | ResidentLoader:
        """An ImageLoader (loader.kind ffcv) or ResidentLoader over `split` at `resolution`: a training loader
        (random order, random-resized crops, or with `crop_min_scale` None centre crops of `crop_ratio`,
        flips) or an evaluation one (in order, every example); the one made before for the
        same arguments and examples if it is still held. `target`: whose target_train/target_test
        `split` is (default: the experiment's first)."""
        beton = target.path(experiment.data.root, split) if target else experiment.data.path(split)
        config = experiment.loader if train else replace(experiment.loader, order="sequential", drop_last=False)
        with_indices = indices is not None
        examples = select_examples(beton, classes, indices)
        key = (
            *beton_identity(beton),
            train,
            batch_size,
            config,
            experiment.run.device,
            crop_min_scale,
            crop_ratio,
            with_indices,
            normalization,
            None if examples is None else hashlib.sha1(examples.tobytes()).hexdigest(),
        )
        if key not in self.held:
            options = dict(
                train=train,
                resolution=resolution,
                batch_size=batch_size,
                config=config,
                device=experiment.run.device,
                indices=examples,
                crop_scale=crop_min_scale and (crop_min_scale, 1.0),
                crop_ratio=crop_ratio,
                with_indices=with_indices,
                normalization=normalization,
            )
            self.held[key] = (
                ResidentLoader(beton, **options, pixels=self.pixels)
                if config.kind == "resident"
                else ImageLoader(beton, **options)
            )
            if len(self.held) > self.size:
                self.held.popitem(last=False)
        self.held.move_to_end(key)
        loader = self.held[key]
        loader.set_resolution(resolution)
        return loader
