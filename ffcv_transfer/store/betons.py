"""Reading betons: their sidecars (NAME.meta.json, NAME.labels.npy), their records, and a check of both.

A beton `NAME.beton` always comes with `NAME.meta.json` (what it holds and how it was written) and
`NAME.labels.npy` (labels in beton order), so later stages find the examples of any class without opening
the beton. `ffcv_transfer.writers` writes all three; everything else reads them through this module.
ffcv is imported only when records are read.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.threading_layer import use_threading_layer

use_threading_layer()  # before ffcv imports numba (threading_layer.py says why)

SIDECAR_FORMAT = "ffcv-transfer/beton-sidecar"
SIDECAR_VERSION = 1
JPEG_MODE, RAW_MODE = 0, 1  # ffcv's per-record image mode codes


class BetonError(Exception):
    """Bad input or a beton that does not match its sidecar; the message names the file."""


def sidecar_paths(beton: str | Path) -> tuple[Path, Path]:
    """(NAME.meta.json, NAME.labels.npy) beside NAME.beton."""
    beton = Path(beton)
    stem = beton.name[: -len(".beton")] if beton.name.endswith(".beton") else beton.name
    return beton.with_name(stem + ".meta.json"), beton.with_name(stem + ".labels.npy")


def file_sha256(path: str | Path, block: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(beton: str | Path) -> dict[str, Any]:
    meta_path, _ = sidecar_paths(beton)
    if not meta_path.exists():
        raise BetonError(f"{meta_path}: sidecar missing (every beton needs one; rewrite the beton)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BetonError(f"{meta_path}: sidecar is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise BetonError(f"{meta_path}: not an ffcv-transfer sidecar (no format {SIDECAR_FORMAT!r})")
    return meta


def read_labels(beton: str | Path) -> np.ndarray:
    _, labels_path = sidecar_paths(beton)
    if not labels_path.exists():
        raise BetonError(f"{labels_path}: labels file missing")
    try:
        return np.load(labels_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BetonError(f"{labels_path}: unreadable labels file ({e})") from None


def open_reader(beton: Path) -> Any:
    """ffcv's Reader (header, per-record metadata, allocation table) of an image/label beton."""
    from ffcv.reader import Reader

    try:
        reader = Reader(str(beton))
    except Exception as e:  # noqa: BLE001 - ffcv raises assorted numpy/assertion errors on bad files
        raise BetonError(f"{beton}: not a readable ffcv beton ({type(e).__name__}: {e})") from None
    if reader.field_names != ["image", "label"]:
        raise BetonError(f"{beton}: fields {reader.field_names}, expected ['image', 'label']")
    return reader


def stored_records(reader: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image metadata, labels); ffcv names the metadata columns f0, f1 in field order."""
    return reader.metadata["f0"], reader.metadata["f1"].astype(np.int64)


def verify_beton(beton: str | Path, *, decode: bool = True, progress: bool = True) -> dict[str, Any]:
    """Check a beton against its sidecar; raise BetonError naming the first problem found.

    Checks: the sidecar and labels files, size and sha256, the header, every label against
    NAME.labels.npy, and (with `decode`) every image record: in bounds, and decoding to its recorded size.
    """
    beton = Path(beton)
    if not beton.is_file():
        raise BetonError(f"{beton}: no such beton")
    meta = read_sidecar(beton)
    labels = read_labels(beton)
    meta_path, labels_path = sidecar_paths(beton)
    size = beton.stat().st_size
    if size != meta["size_bytes"]:
        state = "truncated" if size < meta["size_bytes"] else "longer than written"
        raise BetonError(f"{beton}: {state}: {size} bytes, but {meta_path.name} records {meta['size_bytes']}")
    if file_sha256(beton) != meta["sha256"]:
        raise BetonError(f"{beton}: contents do not match the sha256 in {meta_path.name} (corrupt or replaced)")
    if file_sha256(labels_path) != meta["labels_sha256"]:
        raise BetonError(f"{labels_path}: does not match the labels_sha256 in {meta_path.name}")
    if labels.shape != (meta["num_examples"],):
        raise BetonError(f"{labels_path}: {labels.shape[0]} labels, sidecar says {meta['num_examples']} examples")

    reader = open_reader(beton)
    if reader.num_samples != meta["num_examples"]:
        raise BetonError(f"{beton}: {reader.num_samples} records, sidecar says {meta['num_examples']}")
    _, stored_labels = stored_records(reader)
    if not np.array_equal(stored_labels, labels):
        bad = np.flatnonzero(stored_labels != labels)
        raise BetonError(f"{beton}: {len(bad)} labels differ from {labels_path.name} (first at record {bad[0]})")
    counts = np.bincount(labels, minlength=meta["num_classes"])
    if len(counts) != meta["num_classes"] or counts.tolist() != meta["class_counts"]:
        raise BetonError(f"{beton}: per-class counts differ from {meta_path.name}")

    if decode:
        _check_images(beton, reader, progress)
    return {
        "beton": str(beton),
        "num_examples": int(reader.num_samples),
        "num_classes": meta["num_classes"],
        "decoded": decode,
    }


class BetonRecords:
    """Random access to the stored images of a beton without an ffcv Loader (for checks and reports)."""

    def __init__(self, beton: str | Path, reader: Any = None):
        self.beton = Path(beton)
        reader = reader or open_reader(self.beton)
        self.images, self.labels = stored_records(reader)
        table = reader.alloc_table
        order = np.argsort(table["ptr"])
        ptrs, sizes = table["ptr"][order], table["size"][order]
        slot = np.minimum(np.searchsorted(ptrs, self.images["data_ptr"]), max(len(ptrs) - 1, 0))
        missing = np.flatnonzero(ptrs[slot] != self.images["data_ptr"]) if len(ptrs) else np.arange(len(slot))
        if len(missing):
            raise BetonError(f"{self.beton}: record {missing[0]} points outside the allocation table")
        self.sizes = sizes[slot]
        self.data = np.memmap(self.beton, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> np.ndarray:
        """The stored image as HxWx3 uint8 (JPEG records decoded)."""
        from PIL import Image

        mode, width, height, ptr = (int(self.images[index][k]) for k in ("mode", "width", "height", "data_ptr"))
        size = int(self.sizes[index])
        if ptr + size > len(self.data):
            raise BetonError(f"{self.beton}: record {index} runs past the end of the file")
        blob = self.data[ptr : ptr + size]
        if mode == RAW_MODE:
            if size != width * height * 3:
                raise BetonError(f"{self.beton}: raw record {index} holds {size} bytes, not {height}x{width}x3")
            return np.asarray(blob).reshape(height, width, 3)
        try:
            with Image.open(io.BytesIO(blob.tobytes())) as image:
                decoded = np.asarray(image.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt record
            raise BetonError(f"{self.beton}: JPEG record {index} does not decode ({e})") from None
        if decoded.shape != (height, width, 3):
            raise BetonError(f"{self.beton}: record {index} decodes to {decoded.shape[:2]}, not {height}x{width}")
        return decoded


def _check_images(beton: Path, reader: Any, progress: bool) -> None:
    from tqdm import tqdm

    records = BetonRecords(beton, reader)
    for i in tqdm(range(len(records)), desc=f"verify {beton.name}", unit=" img", disable=not progress):
        records.image(i)
