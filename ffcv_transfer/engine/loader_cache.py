"""The loaders one worker process makes, kept for reuse: a new ffcv Loader JIT-compiles its pipeline in its
first epoch (tens of seconds on a CPU), which every group of K models over the same examples would pay
again. A LoaderCache is made per worker and passed down; it also holds the device-resident pixels. It is
the one place a loader is made from a `LoaderSpec` and the examples its caller chose."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ffcv_transfer.engine.data import ImageLoader, Loader, LoaderSpec, beton_identity
from ffcv_transfer.engine.resident import PixelCache, ResidentLoader

if TYPE_CHECKING:
    from ffcv_transfer.config import Experiment


class LoaderCache:
    """At most `size` loaders, the least recently used dropped first."""

    def __init__(self, size: int = 8, pixels: PixelCache | None = None):
        self.size, self.pixels = size, pixels or PixelCache()
        self.held: OrderedDict[tuple, Loader] = OrderedDict()

    def get(self, experiment: Experiment, spec: LoaderSpec, examples: np.ndarray | None = None) -> Loader:
        """An ImageLoader (loader.kind ffcv) or ResidentLoader over the experiment's beton of `spec.split`,
        reading `examples` (beton positions; None: all) as `spec` says; the one made before for the same
        spec (resolution aside: it is set on the loader) and examples if it is still held."""
        target = experiment.target(spec.target) if spec.target else None
        beton = target.path(experiment.data.root, spec.split) if target else experiment.data.path(spec.split)
        config = experiment.loader if spec.train else replace(experiment.loader, order="sequential", drop_last=False)
        key = (
            *beton_identity(beton),
            replace(spec, resolution=0),
            config,
            experiment.run.device,
            None if examples is None else hashlib.sha1(np.asarray(examples, np.int64).tobytes()).hexdigest(),
        )
        if key not in self.held:
            options = dict(
                train=spec.train,
                resolution=spec.resolution,
                batch_size=spec.batch_size,
                config=config,
                device=experiment.run.device,
                indices=examples,
                crop_scale=spec.crop_min_scale and (spec.crop_min_scale, 1.0),
                crop_ratio=spec.crop_ratio,
                with_indices=spec.with_indices,
                normalization=spec.normalization,
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
        loader.set_resolution(spec.resolution)
        return loader
