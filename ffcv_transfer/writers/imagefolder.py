"""ImageFolder trees (`ROOT/<class or wnid>/<image>`, the ImageNet layout) -> beton.

SRC is a folder or a .tar/.tar.gz/.tgz archive holding one; `subdir` picks the ImageFolder root inside
it (e.g. `cifar10/test` or `train`). An archive is streamed once: the chosen images are appended to a
single temporary pack file beside the output (one sequential write, not one file per image; removed
afterwards) and the writer's workers read them back by offset.
"""

from __future__ import annotations

import os
import re
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ffcv_transfer.store.betons import BetonError
from ffcv_transfer.writers.common import ImageOptions, unreadable_archive, write_beton

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WNID = re.compile(r"^n\d{8}$")
TOP = PurePosixPath(".")


@lru_cache(maxsize=1)
def imagenet1k_classes() -> dict[str, tuple[int, str]]:
    """wnid -> (standard ImageNet-1k index, short name)."""
    text = resources.files(__package__).joinpath("imagenet1k_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return {wnid: (index, name) for index, (wnid, name) in enumerate(rows)}


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


class Tree:
    """Folders and image files of a folder or an archive, by path relative to its top; `where[path]`
    tells how to read a file: a Path on disk, or (offset, size) in the pack file."""

    def __init__(self, label: str, in_archive: bool):
        self.label, self.in_archive = label, in_archive
        self.subdirs: dict[PurePosixPath, set[str]] = defaultdict(set)
        self.images: dict[PurePosixPath, list[str]] = defaultdict(list)
        self.where: dict[PurePosixPath, Any] = {}

    def add_dir(self, path: PurePosixPath) -> None:
        while path != TOP and not path.name.startswith("."):
            self.subdirs[path.parent].add(path.name)
            path = path.parent

    def add_image(self, path: PurePosixPath, where: Any) -> None:
        self.add_dir(path.parent)
        self.images[path.parent].append(path.name)
        self.where[path] = where

    def origin(self, folder: PurePosixPath) -> str:
        """How to name `folder` in messages and the sidecar: ARCHIVE:PATH or a filesystem path."""
        if folder == TOP:
            return self.label
        return f"{self.label}:{folder}" if self.in_archive else str(Path(self.label) / folder)

    def find_root(self, start: PurePosixPath) -> PurePosixPath:
        """Descend through single sub-folders to the folder whose sub-folders hold images."""
        folder = start
        while True:
            subdirs = sorted(self.subdirs.get(folder, ()))
            shown = self.origin(folder)
            if not subdirs:
                raise BetonError(f"{shown}: no class folders")
            if any(self.images.get(folder / d) for d in subdirs):
                return folder
            if len(subdirs) > 1:
                raise BetonError(
                    f"{shown}: holds folders of folders ({', '.join(subdirs[:8])}); "
                    f"choose the ImageFolder root with --subdir"
                )
            folder = folder / subdirs[0]

    def scan(
        self, root: PurePosixPath, classes: Sequence[str] | None, per_class: int | None = None
    ) -> tuple[list[PurePosixPath], np.ndarray, list[str]]:
        """Image paths sorted by class then file name, their labels, and the sorted class folder names
        (only `classes`, when given; only the first `per_class` images of each, when given)."""
        names = sorted(self.subdirs.get(root, ()))
        if classes is not None:
            missing = sorted(set(classes) - set(names))
            if missing:
                raise BetonError(f"{self.origin(root)}: no class folder(s) {', '.join(missing[:10])}")
            names = [n for n in names if n in set(classes)]
        files: list[PurePosixPath] = []
        labels: list[int] = []
        for index, name in enumerate(names):
            images = sorted(self.images.get(root / name, ()))[:per_class]
            if not images:
                raise BetonError(
                    f"{self.origin(root)}: class folder {name}/ holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += [root / name / image for image in images]
            labels += [index] * len(images)
        return files, np.asarray(labels, np.int64), names


class ImageFolderSource:
    def __init__(self, tree: Tree, files: list[PurePosixPath], labels: np.ndarray, pack_fd: int | None):
        self.tree, self.files, self.labels, self.pack_fd = tree, files, labels, pack_fd

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        where = self.tree.where[self.files[index]]
        handle = where if self.pack_fd is None else BytesIO(os.pread(self.pack_fd, where[1], where[0]))
        with Image.open(handle) as image:
            return np.asarray(image.convert("RGB")), int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.tree.origin(self.files[index])


def _folder_tree(src: Path) -> Tree:
    tree = Tree(str(src), in_archive=False)
    for folder, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative = PurePosixPath(Path(folder).relative_to(src).as_posix())
        tree.add_dir(relative)
        for name in filenames:
            if _is_image(name):
                tree.add_image(relative / name, Path(folder) / name)
    return tree


@contextmanager
def open_tree(
    src: Path, subdir: str | None, workdir: Path, classes: Sequence[str] | None = None
) -> Iterator[tuple[Tree, PurePosixPath, int | None]]:
    """Yield (tree, the folder `subdir` names in it, pack file descriptor or None) for a folder or
    an archive. From an archive with `subdir` given, only the class folders in `classes` are packed."""
    start = PurePosixPath(subdir.strip("/")) if subdir else TOP
    if src.is_dir():
        if not (src / start).is_dir():
            raise BetonError(f"{src}: no folder {subdir!r} inside")
        yield _folder_tree(src / start), TOP, None
        return
    if not src.exists():
        raise BetonError(f"{src}: no such file or folder")
    if not is_archive(src):
        raise BetonError(f"{src}: neither a folder nor a .tar/.tar.gz/.tgz archive")
    wanted = set(classes) if classes is not None and subdir else None

    def keep(inside: PurePosixPath) -> bool:
        if start == TOP:
            parts = inside.parts
        elif inside == start or start in inside.parents:
            parts = inside.relative_to(start).parts
        else:
            return False
        return wanted is None or not parts or parts[0] in wanted

    tree = Tree(str(src), in_archive=True)
    with tempfile.TemporaryFile(prefix=".pack-", dir=workdir) as pack:
        from tqdm import tqdm

        try:
            with tarfile.open(src, "r|*") as archive, tqdm(desc=f"read {src.name}", unit=" images") as bar:
                for member in archive:
                    inside = PurePosixPath(member.name.lstrip("./") or ".")
                    if not keep(inside):
                        continue
                    if member.isdir():
                        tree.add_dir(inside)
                    elif member.isfile() and _is_image(inside.name):
                        data = archive.extractfile(member).read()
                        tree.add_image(inside, (pack.tell(), len(data)))
                        pack.write(data)
                        bar.update()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise unreadable_archive(src, "archive", e) from None
        if start != TOP and not tree.subdirs.get(start):
            raise BetonError(f"{src}: no folder {subdir!r} inside the archive")
        pack.flush()
        yield tree, start, pack.fileno()


def write_imagefolder(
    src: str | Path,
    out: str | Path,
    *,
    subdir: str | None = None,
    classes: Sequence[str] | None = None,
    per_class: int | None = None,
    options: ImageOptions = ImageOptions(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an ImageFolder tree (folder or archive) to `out`; returns the sidecar dict.

    `classes` restricts the beton to those class folders (labels then index the sorted subset);
    `per_class` keeps the first images of each class by file name.
    Labels index the sorted class folder names. When the folder names are ImageNet wnids, the sidecar
    also holds their ImageNet short names and standard ImageNet-1k indices (sorted wnids are the
    standard order, so all 1,000 wnids get labels 0..999 in the standard order).
    """
    src, out = Path(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_tree(src, subdir, out.parent, classes) as (tree, start, pack_fd):
        root = tree.find_root(start)
        files, labels, folder_names = tree.scan(root, classes, per_class)
        origin = tree.origin(root)
        wnids = folder_names if all(WNID.match(n) for n in folder_names) else None
        known = imagenet1k_classes()
        class_names = [known[n][1] if n in known else n for n in folder_names] if wnids else folder_names
        extra = {"folder_names": folder_names} | ({"per_class": per_class} if per_class else {})
        if wnids:
            extra["imagenet1k_index"] = [known[n][0] if n in known else None for n in folder_names]
        return write_beton(
            ImageFolderSource(tree, files, labels, pack_fd),
            out,
            class_names=class_names,
            wnids=wnids,
            options=options,
            origin=origin,
            extra=extra,
            overwrite=overwrite,
        )
