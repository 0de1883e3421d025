"""ImageFolder trees (`ROOT/<class or wnid>/<image>`, the ImageNet layout) -> beton.

SRC is a folder or a .tar/.tar.gz/.tgz archive holding one; `subdir` picks the ImageFolder root inside
it (e.g. `cifar10/test` or `train`). Archives are streamed once and only the chosen folder is
extracted, into a temporary folder beside the output that is removed afterwards.
"""
from __future__ import annotations

import re
import tarfile
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

import numpy as np

from .common import BetonError, ImageOptions, write_beton

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet1k_classes() -> dict[str, tuple[int, str]]:
    """wnid -> (standard ImageNet-1k index, short name)."""
    text = resources.files(__package__).joinpath("imagenet1k_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return {wnid: (index, name) for index, (wnid, name) in enumerate(rows)}


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_root(folder: Path, label: str) -> Path:
    """Descend through single sub-folders to the folder whose sub-folders hold images."""
    while True:
        subdirs = _visible_dirs(folder)
        if not subdirs:
            raise BetonError(f"{label}: no class folders in {folder}")
        if any(_is_image(p) for d in subdirs for p in d.iterdir()):
            return folder
        if len(subdirs) > 1:
            names = ", ".join(d.name for d in subdirs[:8])
            raise BetonError(f"{label}: {folder.name}/ holds folders of folders ({names}); "
                             f"choose the ImageFolder root with --subdir")
        folder = subdirs[0]


def scan_imagefolder(root: Path, label: str, classes: Sequence[str] | None = None
                     ) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files sorted by class then file name, their labels, and the sorted class folder names
    (only `classes`, when given)."""
    files: list[Path] = []
    labels: list[int] = []
    class_dirs = _visible_dirs(root)
    if classes is not None:
        missing = sorted(set(classes) - {d.name for d in class_dirs})
        if missing:
            raise BetonError(f"{label}: no class folder(s) {', '.join(missing[:10])}")
        class_dirs = [d for d in class_dirs if d.name in set(classes)]
    for index, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir() if p.is_file() and _is_image(p))
        if not images:
            raise BetonError(f"{label}: class folder {class_dir.name}/ holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += images
        labels += [index] * len(images)
    return files, np.asarray(labels, np.int64), [d.name for d in class_dirs]


class ImageFolderSource:
    def __init__(self, files: list[Path], labels: np.ndarray, root: Path, shown_root: str):
        self.files, self.labels, self.root, self.shown_root = files, labels, root, shown_root

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return np.asarray(image.convert("RGB")), int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.shown_root}/{self.files[index].relative_to(self.root)}"


@contextmanager
def materialize(src: Path, subdir: str | None, workdir: Path, classes: Sequence[str] | None = None
                ) -> Iterator[tuple[Path, str]]:
    """Yield (local folder, name to show in messages) for a folder or an archive's sub-folder.
    From an archive with `subdir` given, only the class folders in `classes` (if given) are extracted."""
    if src.is_dir():
        folder = src / subdir if subdir else src
        if not folder.is_dir():
            raise BetonError(f"{src}: no folder {subdir!r} inside")
        yield folder, str(folder)
        return
    if not src.exists():
        raise BetonError(f"{src}: no such file or folder")
    if not is_archive(src):
        raise BetonError(f"{src}: neither a folder nor a .tar/.tar.gz/.tgz archive")
    prefix = PurePosixPath(subdir.strip("/")) if subdir else None
    wanted = set(classes) if classes is not None and prefix else None

    def keep(inside: PurePosixPath) -> bool:
        if prefix is None:
            return True
        if inside != prefix and prefix not in inside.parents:
            return False
        parts = inside.relative_to(prefix).parts
        return wanted is None or not parts or parts[0] in wanted
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=workdir) as tmp:
        from tqdm import tqdm

        try:
            with tarfile.open(src, "r|*") as archive, tqdm(desc=f"extract {src.name}", unit=" files") as bar:
                for member in archive:
                    inside = PurePosixPath(member.name.lstrip("./"))
                    if keep(inside):
                        archive.extract(member, tmp, filter="data")
                        bar.update(member.isfile())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise BetonError(f"{src}: unreadable archive ({e})") from None
        folder = Path(tmp) / prefix if prefix else Path(tmp)
        if not folder.is_dir():
            raise BetonError(f"{src}: no folder {subdir!r} inside the archive")
        yield folder, f"{src}:{prefix}" if prefix else str(src)


def write_imagefolder(
    src: str | Path,
    out: str | Path,
    *,
    subdir: str | None = None,
    classes: Sequence[str] | None = None,
    options: ImageOptions = ImageOptions(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an ImageFolder tree (folder or archive) to `out`; returns the sidecar dict.

    `classes` restricts the beton to those class folders (labels then index the sorted subset).
    Labels index the sorted class folder names. When the folder names are ImageNet wnids, the sidecar
    also holds their ImageNet short names and standard ImageNet-1k indices (sorted wnids are the
    standard order, so all 1,000 wnids get labels 0..999 in the standard order).
    """
    src, out = Path(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with materialize(src, subdir, out.parent, classes) as (folder, shown):
        root = find_root(folder, shown)
        shown_root = shown if root == folder else f"{shown}/{root.relative_to(folder)}"
        files, labels, folder_names = scan_imagefolder(root, shown_root, classes)
        wnids = folder_names if all(WNID.match(n) for n in folder_names) else None
        known = imagenet1k_classes()
        class_names = [known[n][1] if n in known else n for n in folder_names] if wnids else folder_names
        extra = {"folder_names": folder_names}
        if wnids:
            extra["imagenet1k_index"] = [known[n][0] if n in known else None for n in folder_names]
        return write_beton(ImageFolderSource(files, labels, root, shown_root), out, class_names=class_names,
                           wnids=wnids, options=options, origin=shown_root, extra=extra, overwrite=overwrite)
