"""The paper's transfer targets from their official archives -> OUTDIR/NAME_train.beton, NAME_test.beton.

`write_target(NAME, archives, outdir)` reads the archives (folders, tars, compressed tars, zips, single
files, in any order) as target_layouts.py describes each dataset, checks that every listed image is
there, then writes both betons; CIFAR-10/100 go through cifar.py. Nothing is downloaded: a missing file
is an error naming it and what it is. If the test beton fails, the train beton this call wrote is
removed again, so a pair is written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ffcv_transfer.store.betons import BetonError, sidecar_paths
from ffcv_transfer.writers.archives import Blob, BlobSource, Inputs
from ffcv_transfer.writers.cifar import load_cifar
from ffcv_transfer.writers.common import ArraySource, ExampleSource, ImageOptions, write_beton, writer_progress
from ffcv_transfer.writers.target_layouts import READERS, Layout, Split

CIFARS = ("cifar10", "cifar100")
TARGETS = (*READERS, *CIFARS)
SPLITS = ("train", "test")
# the archives each target is read from, as their authors publish them (for help and error messages)
ARCHIVES = {
    "aircraft": "fgvc-aircraft-2013b.tar.gz",
    "birdsnap": "the folder get_birdsnap.py downloaded (<species>/<image>.jpg) and test_images.txt",
    "caltech101": "101_ObjectCategories.tar.gz",
    "caltech256": "256_ObjectCategories.tar",
    "cifar10": "cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python.tar.gz",
    "flowers102": "102flowers.tgz imagelabels.mat setid.mat",
    "food101": "food-101.tar.gz",
    "pets": "images.tar.gz annotations.tar.gz",
    "cars": "cars_train.tgz cars_test.tgz car_devkit.tgz cars_test_annos_withlabels.mat",
    "sun397": "SUN397.tar.gz Partitions.zip",
}


def default_options(name: str) -> ImageOptions:
    """CIFAR at its native 32 px, raw (the reference decodes it as stored); the others as `write imagefolder`."""
    return ImageOptions(write_mode="raw") if name in CIFARS else ImageOptions()


def _find_images(inputs: Inputs, split: Split, allow_missing: bool) -> tuple[list[Blob], list[int], list[str]]:
    """(blobs, labels, listed paths that are absent) of a split; absent images are an error unless allowed."""
    blobs, labels, missing = [], [], []
    for path, label in split.items:
        key = inputs.find(path)
        if key is None:
            missing.append(path)
        else:
            blobs.append(inputs.files[key])
            labels.append(label)
    if missing and not allow_missing:
        raise BetonError(
            f"{split.listed_in}: {len(missing)} listed image(s) absent from "
            f"{', '.join(inputs.labels)}: {', '.join(missing[:5])}"
        )
    return blobs, labels, missing


def _cifar_sources(name: str, archives: Sequence[Path]) -> tuple[list[str], dict[str, ExampleSource], dict]:
    """(class names, {split: source}, sidecar extra) of CIFAR-10/100 through cifar.py, the variant checked."""
    if len(archives) != 1:
        raise BetonError(f"{name}: give one archive ({ARCHIVES[name]}), got {len(archives)}")
    sources, names = {}, []
    for split in SPLITS:
        images, labels, names, variant = load_cifar(archives[0], split)
        if variant != name:
            raise BetonError(f"{archives[0]}: holds {variant}, not {name}")
        sources[split] = ArraySource(images, labels, f"{archives[0]}:{split}")
    rule = "train: the five data_batch files (CIFAR-10) or train (CIFAR-100); test: test_batch or test"
    return names, sources, {"rule": rule}


def _remove(out: Path) -> None:
    for path in (out, *sidecar_paths(out)):
        path.unlink(missing_ok=True)


def write_target(
    name: str,
    archives: Sequence[str | Path],
    outdir: str | Path,
    *,
    options: ImageOptions | None = None,
    allow_missing: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write target `name`'s canonical train and test splits to `outdir`/NAME_{train,test}.beton;
    returns {split: sidecar}. `options` default to `default_options(name)`; `allow_missing` leaves out
    listed images that are absent (recorded in the sidecar) instead of failing."""
    if name not in TARGETS:
        raise BetonError(f"unknown target {name!r}: one of {', '.join(TARGETS)}")
    archives, outdir = [Path(a) for a in archives], Path(outdir)
    options = options or default_options(name)
    outs = {split: outdir / f"{name}_{split}.beton" for split in SPLITS}
    if not overwrite:  # refused before hours of reading, not after
        for path in (p for out in outs.values() for p in (out, *sidecar_paths(out))):
            if path.exists():
                raise BetonError(f"{path}: already exists (pass overwrite to replace it)")
    with folder_removed_if_left_empty(outdir):
        common = {"dataset": name, "archives": [a.name for a in archives]}
        if name in CIFARS:
            class_names, sources, extra = _cifar_sources(name, archives)
            return _write_pair(
                outs, sources, class_names, {s: common | extra for s in SPLITS}, options, progress, overwrite, archives
            )
        with Inputs(archives, outdir, progress) as inputs:
            layout: Layout = READERS[name](inputs)
            sources, extras = {}, {}
            for split, listed in zip(SPLITS, (layout.train, layout.test)):  # every split checked before writing
                blobs, labels, missing = _find_images(inputs, listed, allow_missing)
                if not blobs:
                    raise BetonError(f"{listed.listed_in}: no {split} images")
                sources[split] = BlobSource.of(blobs, labels, layout.crop_bottom)
                extras[split] = (
                    common
                    | layout.extra
                    | {"rule": layout.rule, "crop_bottom": layout.crop_bottom}
                    | ({"missing": len(missing), "missing_first": missing[:20]} if missing else {})
                )
            return _write_pair(outs, sources, layout.class_names, extras, options, progress, overwrite, archives)


@contextmanager
def folder_removed_if_left_empty(folder: Path) -> Iterator[None]:
    """Create `folder` (and its parents) for what follows; if that fails and leaves it empty, remove the
    folder again, so that a refused archive leaves nothing behind (parents made on the way stay)."""
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if made and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _write_pair(
    outs: dict[str, Path],
    sources: dict[str, ExampleSource],
    class_names: Sequence[str],
    extras: dict[str, dict],
    options: ImageOptions,
    progress: bool,
    overwrite: bool,
    archives: Sequence[Path],
) -> dict[str, dict[str, Any]]:
    written: dict[str, dict[str, Any]] = {}
    origin = ", ".join(map(str, archives))
    try:
        for split in SPLITS:
            with writer_progress(progress):
                written[split] = write_beton(
                    sources[split],
                    outs[split],
                    class_names=class_names,
                    options=options,
                    origin=f"{origin} ({split})",
                    extra=extras[split] | {"split": split},
                    overwrite=overwrite,
                )
    except BaseException:
        for split in written:  # a train beton without its test beton is half a target
            _remove(outs[split])
        raise
    return written
