"""What every beton writer shares: the two ffcv fields and the sidecar (`ffcv_transfer.store.betons` reads
them). The three files appear only once the beton is complete: each is written through
`ffcv_transfer.store.files.atomic_path` and renamed at the end, beton last.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ffcv_transfer.store.betons import (
    JPEG_MODE,
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    BetonError,
    file_sha256,
    open_reader,
    sidecar_paths,
    stored_records,
)
from ffcv_transfer.store.files import atomic_path, temporary_path

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
PAGE_SIZE = 1 << 23  # ffcv's default page; one stored image must fit in it


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored; the defaults are libffcv/ffcv-imagenet's recommended ImageNet settings."""

    write_mode: str = "proportion"
    max_resolution: int | None = None
    square: bool = False  # centre-crop to a square first: with max_resolution, one image size (resident loader)
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    smart_threshold: int | None = None
    num_workers: int = 0  # 0: one per CPU core
    chunk_size: int = 100

    def __post_init__(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise BetonError(f"write mode {self.write_mode!r} is not one of {', '.join(WRITE_MODES)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise BetonError(f"JPEG quality {self.jpeg_quality} is not in 1..100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise BetonError(f"compress probability {self.compress_probability} is not in [0, 1]")
        if self.max_resolution is not None and self.max_resolution < 1:
            raise BetonError(f"max resolution {self.max_resolution} must be positive")


class ExampleSource(Protocol):
    """What a writer reads from: indexable (image HxWx3 uint8, label) pairs with labels known upfront."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...

    def describe(self, index: int) -> str: ...


class ArraySource:
    """Images held in memory, (N, H, W, 3) uint8."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], origin: str = "array"):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise BetonError(f"{origin}: images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise BetonError(f"{origin}: labels must be {len(images)} integers, got {labels.shape} {labels.dtype}")
        self.images, self.labels, self.origin = images, labels.astype(np.int64), origin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.origin}[{index}]"


class _GuardedSource:
    """Records a failing example instead of raising: ffcv's writer waits forever for a worker that died."""

    def __init__(self, source: ExampleSource, error_log: Path, options: ImageOptions):
        self.source, self.error_log, self.options = source, error_log, options

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            image, label = self.source[index]
            image = np.ascontiguousarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
                raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
            if self.options.square:
                side = min(image.shape[:2])
                top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
                image = np.ascontiguousarray(image[top : top + side, left : left + side])
            stored = np.array(image.shape[:2])
            if self.options.max_resolution and stored.max() > self.options.max_resolution:
                stored = (stored * (self.options.max_resolution / stored.max())).astype(int)
            if self.options.write_mode != "jpg" and stored.prod() * 3 > PAGE_SIZE:
                raise ValueError(
                    f"a {stored[0]}x{stored[1]} image does not fit ffcv's {PAGE_SIZE >> 20} MiB "
                    f"page uncompressed; set max_resolution or write_mode jpg"
                )
            return image, label
        except Exception as e:  # noqa: BLE001 - any failure is reported with its example after the write
            with open(self.error_log, "a") as log:
                log.write(f"{self.source.describe(index)}: {type(e).__name__}: {e}\n".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), -1


def _stored_stats(beton: Path) -> dict[str, Any]:
    image, _ = stored_records(open_reader(beton))
    heights, widths = image["height"].astype(np.int64), image["width"].astype(np.int64)

    def stats(values: np.ndarray) -> dict[str, float]:
        return {"min": int(values.min()), "max": int(values.max()), "mean": round(float(values.mean()), 3)}

    return {
        "height": stats(heights),
        "width": stats(widths),
        "jpeg_fraction": float((image["mode"] == JPEG_MODE).mean()),
    }


def write_beton(
    source: ExampleSource,
    out: str | Path,
    *,
    class_names: Sequence[str],
    options: ImageOptions = ImageOptions(),
    wnids: Sequence[str] | None = None,
    origin: str,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `source` to `out` (.beton) with its sidecar; returns the sidecar dict.

    Any example that cannot be read aborts the write with a BetonError listing the bad examples;
    no file named `out` (or its sidecar) is created or touched unless the write succeeds.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    if out.suffix != ".beton":
        raise BetonError(f"{out}: output must end in .beton")
    meta_path, labels_path = sidecar_paths(out)
    for path in (out, meta_path, labels_path):  # checked before anything is written
        if path.is_dir():
            raise BetonError(f"{path}: is a directory, not a file that could be replaced")
    if not overwrite:
        for path in (out, meta_path, labels_path):
            if path.exists():
                raise BetonError(f"{path}: already exists (pass overwrite to replace it)")
    labels = np.asarray(source.labels, dtype=np.int64)
    num_classes = len(class_names)
    if len(source) == 0:
        raise BetonError(f"{origin}: no examples to write")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise BetonError(f"{origin}: labels span {labels.min()}..{labels.max()} but there are {num_classes} classes")
    if wnids is not None and len(wnids) != num_classes:
        raise BetonError(f"{origin}: {len(wnids)} wnids for {num_classes} classes")

    out.parent.mkdir(parents=True, exist_ok=True)
    error_log = temporary_path(out.with_name(f"{out.name}.errors"))
    # renamed into place on leaving the block in reverse order: labels, sidecar, then the beton
    with atomic_path(out) as tmp_beton, atomic_path(meta_path) as tmp_meta, atomic_path(labels_path) as tmp_labels:
        try:
            fields = {
                "image": RGBImageField(
                    write_mode=options.write_mode,
                    max_resolution=options.max_resolution,
                    smart_threshold=options.smart_threshold,
                    jpeg_quality=options.jpeg_quality,
                    compress_probability=options.compress_probability,
                ),
                "label": IntField(),
            }
            num_workers = options.num_workers or os.cpu_count() or 1
            writer = DatasetWriter(
                str(tmp_beton), fields, page_size=PAGE_SIZE, num_workers=min(num_workers, len(source))
            )
            writer.from_indexed_dataset(_GuardedSource(source, error_log, options), chunksize=options.chunk_size)
            if error_log.exists():
                errors = error_log.read_text().splitlines()
                shown = "\n  ".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
                raise BetonError(
                    f"{origin}: {len(errors)} example(s) could not be read; nothing was written:\n  {shown}"
                )
        finally:
            error_log.unlink(missing_ok=True)
        with open(tmp_labels, "wb") as f:
            np.save(f, labels)
        meta = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "beton": out.name,
            "num_examples": int(len(labels)),
            "num_classes": num_classes,
            "class_names": list(class_names),
            "wnids": list(wnids) if wnids is not None else None,
            "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
            "fields": {"image": "RGBImageField", "label": "IntField"},
            "resolution": _stored_stats(tmp_beton),
            "writer": asdict(options) | {"num_workers": num_workers},
            "source": origin,
            "size_bytes": tmp_beton.stat().st_size,
            "sha256": file_sha256(tmp_beton),
            "labels_sha256": file_sha256(tmp_labels),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "extra": extra or {},
        }
        tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def write_arrays(
    images: np.ndarray,
    labels: Sequence[int],
    out: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    options: ImageOptions = ImageOptions(write_mode="raw"),
    origin: str = "array",
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write in-memory images (N, H, W, 3) uint8 with integer labels."""
    source = ArraySource(images, labels, origin)
    if class_names is None:
        class_names = [str(c) for c in range(int(source.labels.max()) + 1)]
    return write_beton(
        source, out, class_names=class_names, options=options, origin=origin, extra=extra, overwrite=overwrite
    )


@contextmanager
def writer_progress(enabled: bool) -> Iterator[None]:
    """Within the block, ffcv's writer shows its progress bar only if `enabled`. ffcv has no option for
    it (and tqdm reads TQDM_DISABLE only when imported), so the bar class of ffcv.writer is swapped."""
    if enabled:
        yield
        return
    from functools import partial

    import ffcv.writer
    from tqdm import tqdm

    shown = ffcv.writer.tqdm
    ffcv.writer.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = shown


def unreadable_archive(path: str | Path, kind: str, error: Exception) -> BetonError:
    """The one-line error for an archive that cannot be read: the library's reason on one line (tarfile's
    spans several, one per compression it tried)."""
    return BetonError(f"{path}: unreadable or truncated {kind} ({' '.join(str(error).split())})")
