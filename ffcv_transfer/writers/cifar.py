"""CIFAR-10/100 in the python pickle batch format distributed by its authors -> beton.

SRC is the extracted folder (`cifar-10-batches-py/` or `cifar-100-python/`) or the original
`.tar.gz`, which is read in place.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ffcv_transfer.store.betons import BetonError
from ffcv_transfer.writers.common import ArraySource, ImageOptions, unreadable_archive, write_beton

# split -> batch files, and the file holding class names, per variant
LAYOUTS = {
    "cifar10": {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": "label_names",
        "labels_key": "labels",
    },
    "cifar100": {
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": "fine_label_names",
        "labels_key": "fine_labels",
    },
}


def _read_members(src: Path, wanted: set[str]) -> dict[str, bytes]:
    """Raw bytes of the wanted batch files (matched by base name) from a folder or a tar archive."""
    found: dict[str, bytes] = {}
    if src.is_dir():
        for path in src.rglob("*"):
            if path.name in wanted and path.is_file():
                found[path.name] = path.read_bytes()
    elif src.is_file():
        try:
            with tarfile.open(src, "r:*") as archive:
                for member in archive:
                    name = PurePath(member.name).name
                    if name in wanted and member.isfile():
                        found[name] = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise unreadable_archive(src, "archive", e) from None
    else:
        raise BetonError(f"{src}: no such file or folder")
    return found


def _unpickle(blob: bytes, name: str, src: Path) -> dict[str, Any]:
    try:
        batch = pickle.loads(blob, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt batch file
        raise BetonError(f"{src}: batch file {name} is not a CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise BetonError(f"{src}: batch file {name} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar(src: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(images N x 32 x 32 x 3 uint8, labels, class names, variant) of one split."""
    src = Path(src)
    if split not in ("train", "test"):
        raise BetonError(f"split {split!r} must be train or test")
    everything = {n for layout in LAYOUTS.values() for n in layout[split] + [layout["meta"]]}
    blobs = _read_members(src, everything)
    present = [name for name, layout in LAYOUTS.items() if {layout["meta"], *layout[split]} <= blobs.keys()]
    if not present:
        raise BetonError(
            f"{src}: no CIFAR-10 ({', '.join(LAYOUTS['cifar10'][split])}, batches.meta) "
            f"or CIFAR-100 ({split}, meta) batch files for the {split} split"
        )
    variant = present[0]
    layout = LAYOUTS[variant]
    meta = _unpickle(blobs[layout["meta"]], layout["meta"], src)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout["names_key"]]]
    images, labels = [], []
    for name in layout[split]:
        batch = _unpickle(blobs[name], name, src)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            batch_labels = np.asarray(batch[layout["labels_key"]], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise BetonError(f"{src}: batch file {name} lacks CIFAR data/labels ({e})") from None
        if len(batch_labels) != len(data):
            raise BetonError(f"{src}: batch file {name} has {len(data)} images but {len(batch_labels)} labels")
        images.append(data)
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names, variant


def write_cifar(
    src: str | Path,
    out: str | Path,
    *,
    split: str,
    options: ImageOptions = ImageOptions(write_mode="raw"),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write one split of CIFAR-10/100 (pickle batches) to `out`; returns the sidecar dict."""
    images, labels, names, variant = load_cifar(src, split)
    origin = f"{src}:{split}"
    return write_beton(
        ArraySource(images, labels, origin),
        out,
        class_names=names,
        options=options,
        origin=origin,
        extra={"dataset": variant, "split": split},
        overwrite=overwrite,
    )
