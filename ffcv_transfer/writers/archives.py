"""Datasets as their authors publish them: folders, plain or compressed tars, zips and single files, read
by member path without unpacking them.

A file of a folder or a plain (uncompressed) tar is read in place: it is a byte range of a file on disk,
read with `os.pread`, which gives ffcv's writer processes random access at no disk cost. Compressed tars
and zips allow no cheap random access, so the members a writer needs are copied, in one streaming pass,
into one unnamed temporary pack file in the output folder (gone when it is closed, even after a crash).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import tempfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from ffcv_transfer.store.betons import BetonError
from ffcv_transfer.writers.common import unreadable_archive
from ffcv_transfer.writers.imagefolder import IMAGE_SUFFIXES

BLOCK = tarfile.BLOCKSIZE
DECOMPRESSORS = {(".tar.gz", ".tgz"): gzip.open, (".tar.bz2", ".tbz2"): bz2.open, (".tar.xz", ".txz"): lzma.open}
COMPRESSED_TARS = tuple(suffix for suffixes in DECOMPRESSORS for suffix in suffixes)
MAX_METADATA_BYTES = 1 << 28  # non-image members of compressed archives larger than this are not kept


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def member_key(name: str) -> str:
    """A tar or zip member's path as a key: without a leading ./ or /."""
    return name[2:] if name.startswith("./") else name.lstrip("/")


@dataclass(frozen=True)
class Blob:
    """A file's bytes: `size` bytes at `offset` of `source` (a path, or a pack file's descriptor); size -1:
    the whole file. `name` says where it is in messages (ARCHIVE:MEMBER or a path)."""

    source: str | int
    offset: int
    size: int
    name: str


def read_range(source: str | int, offset: int, size: int, name: str) -> bytes:
    """`size` bytes at `offset` of `source` (all of it for size -1); a short read is a BetonError."""
    fd = source if isinstance(source, int) else os.open(source, os.O_RDONLY)
    try:
        data = os.pread(fd, size if size >= 0 else os.fstat(fd).st_size, offset)
    finally:
        if fd is not source:
            os.close(fd)
    if size >= 0 and len(data) != size:
        raise BetonError(f"{name}: truncated ({len(data)} of {size} bytes readable)")
    return data


def tar_members(fileobj: IO[bytes], length: int, label: str) -> list[tarfile.TarInfo]:
    """The members of the plain tar in `fileobj` (`length` bytes long), checked complete: every member's
    data inside the archive and the end-of-archive block after the last one. tarfile itself takes a tar
    cut short, or with a damaged header, for a shorter archive; here that is a BetonError naming `label`."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise unreadable_archive(label, "tar", e) from None
    end = 0
    for member in members:
        if member.offset_data + member.size > length:
            raise BetonError(f"{label}: truncated tar ({member.name} runs past the end, {length} bytes)")
        end = member.offset_data + -(-member.size // BLOCK) * BLOCK
    fileobj.seek(end)
    if fileobj.read(BLOCK) != bytes(BLOCK):
        raise BetonError(f"{label}: truncated or damaged tar (no end-of-archive block after byte {end})")
    return members


class Inputs:
    """The files of the folders, archives and single files given, by their path inside each (a single
    file: its name). Use as a context manager: leaving it closes the pack file.

    Compressed tars are streamed once, when something is first looked up that the other inputs lack;
    `keep(path)`, when set before that, chooses which of their images are packed (default: all)."""

    def __init__(self, paths: Sequence[str | Path], workdir: Path, progress: bool = True):
        self.labels, self.progress = [str(p) for p in paths], progress
        self.files: dict[str, Blob] = {}
        self.by_name: dict[str, list[str]] = defaultdict(list)
        self.pending: list[Path] = []
        self.keep: Callable[[str], bool] | None = None
        self.pack = tempfile.TemporaryFile(prefix=".pack-", dir=workdir)
        try:
            for path in map(Path, paths):
                self._index(path)
        except BaseException:
            self.pack.close()
            raise

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pack.close()

    def _add(self, source: Path, key: str, blob: Blob) -> None:
        if key in self.files:  # the same path in two inputs (a README): told apart by the input's name
            key = f"{source.name}/{key}"
        self.files[key] = blob
        self.by_name[PurePosixPath(key).name].append(key)

    def _index(self, path: Path) -> None:
        lower = path.name.lower()
        if path.is_dir():
            for folder, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if not name.startswith("."):
                        file = Path(folder) / name
                        self._add(path, file.relative_to(path).as_posix(), Blob(str(file), 0, -1, str(file)))
        elif not path.is_file():
            raise BetonError(f"{path}: no such file or folder")
        elif lower.endswith(COMPRESSED_TARS):
            self.pending.append(path)
        elif lower.endswith(".zip"):
            self._pack_zip(path)
        elif lower.endswith(".tar"):
            with open(path, "rb") as f:
                for m in tar_members(f, path.stat().st_size, str(path)):
                    if m.isreg():
                        blob = Blob(str(path), m.offset_data, m.size, f"{path}:{m.name}")
                        self._add(path, member_key(m.name), blob)
        else:
            self._add(path, path.name, Blob(str(path), 0, -1, str(path)))

    def _store(self, path: Path, key: str, data: bytes) -> None:
        offset = self.pack.seek(0, io.SEEK_END)
        self.pack.write(data)
        self._add(path, key, Blob(self.pack.fileno(), offset, len(data), f"{path}:{key}"))

    def _wanted(self, key: str, size: int) -> bool:
        if is_image(key):
            return self.keep is None or self.keep(key)
        return size <= MAX_METADATA_BYTES

    def _pack_zip(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and self._wanted(info.filename, info.file_size):
                        self._store(path, member_key(info.filename), archive.read(info))
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise unreadable_archive(path, "zip", e) from None
        self.pack.flush()  # the writer's processes pread the file, past Python's buffer

    def _stream_pending(self) -> None:
        from tqdm import tqdm

        pending, self.pending = self.pending, []
        for path in pending:
            opener = next(o for suffixes, o in DECOMPRESSORS.items() if path.name.lower().endswith(suffixes))
            try:
                with (
                    opener(path, "rb") as raw,
                    tarfile.open(fileobj=raw, mode="r|") as archive,
                    tqdm(desc=f"read {path.name}", unit=" files", leave=False, disable=not self.progress) as bar,
                ):
                    for member in archive:
                        key = member_key(member.name)
                        if member.isreg() and self._wanted(key, member.size):
                            self._store(path, key, archive.extractfile(member).read())
                            bar.update()
                    # tarfile takes a cut stream for a shorter archive; the decompressor, read to its end, does not
                    while raw.read(1 << 20):
                        pass
            except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
                raise unreadable_archive(path, "archive", e) from None
        self.pack.flush()  # the writer's processes pread the file, past Python's buffer

    def find(self, path: str, stream: bool = True) -> str | None:
        """The key of the file whose path is `path` or ends with /`path` (several must be copies of one
        file); None if there is none (without `stream`, compressed tars not yet read are not read for it)."""
        matches = [k for k in self.by_name.get(PurePosixPath(path).name, ()) if k == path or k.endswith("/" + path)]
        if not matches and stream and self.pending:
            self._stream_pending()
            return self.find(path)
        if len(matches) > 1 and len({self.read(k) for k in matches}) > 1:  # copies of one file are fine
            raise BetonError(f"{path} is ambiguous in {', '.join(self.labels)}: {', '.join(sorted(matches)[:4])}")
        return min(matches) if matches else None

    def require(self, path: str, what: str) -> str:
        """The key of `path` (see `find`); a BetonError naming the file and what it is if it is absent."""
        key = self.find(path)
        if key is None:
            raise BetonError(f"{path} ({what}) is missing: {self.where_missing()}")
        return key

    def where_missing(self) -> str:
        """The end of a 'something is missing' message: the inputs searched, and the archives they hold
        inside (a download that wraps the dataset's own archive, such as caltech-101.zip around
        101_ObjectCategories.tar.gz), which are not opened: the user should pass those instead."""
        inner = sorted(key for key in self.files if key.lower().endswith((*COMPRESSED_TARS, ".tar", ".zip")))
        found = f"it is in none of {', '.join(self.labels)}"
        if inner:
            found += f"; they hold the archive(s) {', '.join(inner[:4])}: extract and pass those instead"
        return found

    def read(self, key: str) -> bytes:
        blob = self.files[key]
        return read_range(blob.source, blob.offset, blob.size, blob.name)

    def text(self, key: str) -> list[str]:
        """The non-empty lines of a text file."""
        try:
            return [line.strip() for line in self.read(key).decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise BetonError(f"{self.files[key].name}: not a text file ({e})") from None

    def keys(self) -> Iterator[str]:
        """Every file's key (compressed tars read first)."""
        if self.pending:
            self._stream_pending()
        return iter(list(self.files))


def load_mat(inputs: Inputs, key: str, variables: Sequence[str]) -> dict[str, Any]:
    """The named variables of a MATLAB .mat file (squeezed: a 1xN row is a vector, a struct array a
    record array); a missing variable or an unreadable file is a BetonError naming it."""
    from scipy.io import loadmat

    name, data = inputs.files[key].name, inputs.read(key)
    try:
        content = loadmat(io.BytesIO(data), squeeze_me=True)
    except Exception as e:  # noqa: BLE001 - scipy raises assorted errors on a damaged file
        raise BetonError(f"{name}: not a readable .mat file ({type(e).__name__}: {e})") from None
    missing = [v for v in variables if v not in content]
    if missing:
        raise BetonError(f"{name}: no variable {', '.join(missing)} (found {', '.join(sorted(content))})")
    return {v: content[v] for v in variables}


def mat_column(records: Any, field: str, origin: str) -> list:
    """One field of a .mat struct array, as a list (also for a struct array of one)."""
    try:
        return np.atleast_1d(records[field]).tolist()
    except (ValueError, KeyError, IndexError) as e:
        raise BetonError(f"{origin}: the struct array has no field {field} ({e})") from None


class BlobSource:
    """ExampleSource of encoded images (JPEG, PNG, ...) stored as byte ranges: image i is `sizes[i]` bytes at
    `offsets[i]` of `sources[which[i]]`, decoded to RGB, with its bottom `crop_bottom` rows cut off (the
    copyright banner of FGVC-Aircraft). Columns rather than Blob objects keep ImageNet's 1.28 M records
    compact in the writer's forked processes."""

    def __init__(
        self,
        sources: Sequence[str | int],
        which: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        names: Sequence[str],
        labels: Sequence[int],
        crop_bottom: int = 0,
    ):
        self.sources, self.names, self.crop_bottom = list(sources), list(names), crop_bottom
        self.which, self.offsets, self.sizes = (np.asarray(a, np.int64) for a in (which, offsets, sizes))
        self.labels = np.asarray(labels, np.int64)

    @classmethod
    def of(cls, blobs: Sequence[Blob], labels: Sequence[int], crop_bottom: int = 0) -> BlobSource:
        """The source of `blobs` with their labels."""
        sources = list(dict.fromkeys(b.source for b in blobs))
        index = {source: i for i, source in enumerate(sources)}
        return cls(
            sources,
            np.array([index[b.source] for b in blobs]),
            np.array([b.offset for b in blobs]),
            np.array([b.size for b in blobs]),
            [b.name for b in blobs],
            labels,
            crop_bottom,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        data = read_range(
            self.sources[self.which[index]], int(self.offsets[index]), int(self.sizes[index]), self.names[index]
        )
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
        if self.crop_bottom:
            if array.shape[0] <= self.crop_bottom:
                raise ValueError(f"{array.shape[0]} rows, not more than the {self.crop_bottom} to crop")
            array = array[: -self.crop_bottom]
        return array, int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.names[index]
