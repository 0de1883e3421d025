"""ImageNet-1k (ILSVRC2012) from its official archives -> OUTDIR/imagenet_train.beton, imagenet_val.beton.

- `ILSVRC2012_img_train.tar`: a plain tar of 1,000 plain tars `nXXXXXXXX.tar`, one per class. Nothing is
  unpacked: each class tar's member list is read in place, and every JPEG is a byte range of the outer
  tar that the writer's processes read with pread (random access at no disk cost). The index of each
  class (file names, offsets, sizes: ~50 MB for all 1.28 M images) is kept in
  `OUTDIR/.imagenet_train.staging/` until the train beton is complete, so that a run resumed after a kill
  reads no class tar twice.
- `ILSVRC2012_img_val.tar`: a flat plain tar of `ILSVRC2012_val_NNNNNNNN.JPEG`. Image n's label is line n
  of the devkit's `data/ILSVRC2012_validation_ground_truth.txt`, an ILSVRC2012_ID, which is NOT the
  sorted-wnid index: the devkit's `data/meta.mat` (`synsets`: ILSVRC2012_ID, WNID, words, num_children)
  maps it to its wnid.

Labels index the sorted wnids (for all 1,000 classes: the standard order of imagenet1k_classes.tsv);
examples go by class, then file name (the order `write imagefolder` gives the same images in class
folders). A split whose beton is already complete, from the same archives with the same storage
options, is kept as it is.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ffcv_transfer.store.betons import BetonError, read_sidecar
from ffcv_transfer.store.files import atomic_write
from ffcv_transfer.writers.archives import BlobSource, Inputs, load_mat, mat_column, tar_members
from ffcv_transfer.writers.common import ImageOptions, write_beton, writer_progress
from ffcv_transfer.writers.imagefolder import imagenet1k_classes

CLASS_TAR = re.compile(r"^(n\d{8})\.tar$")
VAL_IMAGE = "ILSVRC2012_val_{:08d}.JPEG"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
# Storage presets. reference: MadryLab/data-transfer's src/write_image_datasets.py (write_mode smart by
# default, compress_probability 0, jpeg_quality 90; --max_resolution is required and its training script
# reads `imagenet-{train,val}-256` betons). ffcv-imagenet: libffcv/ffcv-imagenet's README command
# `./write_imagenet.sh 500 0.50 90` (proportion mode, longer side <= 500, half JPEG, quality 90).
PRESETS = {
    "reference": ImageOptions(write_mode="smart", max_resolution=256, compress_probability=0.0, jpeg_quality=90),
    "ffcv-imagenet": ImageOptions(
        write_mode="proportion", max_resolution=500, compress_probability=0.5, jpeg_quality=90
    ),
}


def archive_identity(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """What tells one copy of an archive from another: name, size, modification time."""
    return [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]


def _comparable(writer: dict[str, Any]) -> dict[str, Any]:
    # workers and chunks change how fast a beton is written, not what it holds
    return {k: v for k, v in writer.items() if k not in ("num_workers", "chunk_size")}


def finished_split(
    out: Path, identity: list[dict[str, Any]], options: ImageOptions, overwrite: bool
) -> dict[str, Any] | None:
    """The sidecar of `out` if it is complete from these archives with these options (None if it must be
    written); another existing `out` is a BetonError unless `overwrite`."""
    if not out.exists():
        return None
    try:
        meta = read_sidecar(out)
    except BetonError:
        meta = {}
    if meta.get("extra", {}).get("archives") == identity and _comparable(meta["writer"]) == _comparable(
        asdict(options)
    ):
        return meta
    if not overwrite:
        raise BetonError(f"{out}: already exists from other archives or storage options (pass overwrite to replace it)")
    return None


def _class_names(wnids: Sequence[str], words: dict[str, str]) -> tuple[list[str], list[int | None]]:
    """(short names, standard ImageNet-1k indices) of `wnids`; unknown wnids are named by the devkit."""
    known = imagenet1k_classes()
    names = [known[w][1] if w in known else words.get(w, w) for w in wnids]
    return names, [known[w][0] if w in known else None for w in wnids]


def _class_tars(f: Any, train: Path) -> list[tarfile.TarInfo]:
    """The class tars of the train tar (open as `f`), sorted by name (= by wnid)."""
    if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        raise BetonError(
            f"{train}: compressed; the train tar is read in place, so it must be the official "
            f"uncompressed ILSVRC2012_img_train.tar"
        )
    f.seek(0)
    members = [m for m in tar_members(f, train.stat().st_size, str(train)) if m.isreg()]
    strays = [m.name for m in members if not CLASS_TAR.match(PurePosixPath(m.name).name)]
    if strays or not members:
        raise BetonError(
            f"{train}: expected one nXXXXXXXX.tar per class (ILSVRC2012_img_train.tar), found "
            + (", ".join(strays[:5]) if strays else "no member")
        )
    return sorted(members, key=lambda m: PurePosixPath(m.name).name)


def _index_class(outer: tarfile.TarFile, member: tarfile.TarInfo, label: str) -> dict[str, list]:
    """Names, absolute offsets and sizes of one class tar's images, sorted by name."""
    inner = [m for m in tar_members(outer.extractfile(member), member.size, label) if m.isreg()]
    if not inner:
        raise BetonError(f"{label}: a class tar without images")
    inner.sort(key=lambda m: m.name)
    return {
        "names": [PurePosixPath(m.name).name for m in inner],
        "offsets": [member.offset_data + m.offset_data for m in inner],
        "sizes": [m.size for m in inner],
    }


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(value).encode())  # a class's index appears whole or not at all


def index_train(train: Path, staging: Path, progress: bool = True) -> tuple[list[str], BlobSource]:
    """(sorted wnids, their images in class then file-name order) of the train tar. Each class's index is
    kept in `staging` (a folder; discarded first if it holds another archive's) and read from there."""
    from tqdm import tqdm

    identity = archive_identity([train])
    with open(train, "rb") as f:
        members = _class_tars(f, train)  # a refused archive leaves no staging folder behind
    manifest = staging / "archive.json"
    if staging.exists() and (not manifest.exists() or json.loads(manifest.read_text()) != identity):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    _write_json(manifest, identity)
    wnids, offsets, sizes, names, labels = [], [], [], [], []
    with open(train, "rb") as f:
        with tarfile.open(fileobj=f, mode="r:") as outer:  # reads one header; extractfile serves any member
            for label, member in enumerate(
                tqdm(members, desc=f"index {train.name}", unit=" classes", disable=not progress)
            ):
                wnid = CLASS_TAR.match(PurePosixPath(member.name).name).group(1)
                cached = staging / f"{wnid}.json"
                if cached.exists():
                    index = json.loads(cached.read_text())
                else:
                    try:
                        index = _index_class(outer, member, f"{train}:{member.name}")
                    except BetonError:  # a damaged archive: its staged indexes serve no later run
                        shutil.rmtree(staging)
                        raise
                    _write_json(cached, index)
                wnids.append(wnid)
                offsets += index["offsets"]
                sizes += index["sizes"]
                names += [f"{train.name}:{member.name}/{n}" for n in index["names"]]
                labels += [label] * len(index["names"])
    return wnids, BlobSource(
        [str(train)], np.zeros(len(labels), np.int64), np.array(offsets), np.array(sizes), names, labels
    )


def read_devkit(devkit: Path, workdir: Path, progress: bool = True) -> tuple[dict[int, str], dict[str, str], list[int]]:
    """(ILSVRC2012_ID -> wnid of the leaf synsets, wnid -> first word, validation IDs in image order)."""
    with Inputs([devkit], workdir, progress) as kit:
        truth_key = kit.require(GROUND_TRUTH, "the devkit's validation labels: one ILSVRC2012_ID per image")
        meta_key = kit.require(META, "the devkit's synsets, which map ILSVRC2012_IDs to wnids")
        synsets = load_mat(kit, meta_key, ["synsets"])["synsets"]
        origin = kit.files[meta_key].name
        ids, wnids, words, children = (
            mat_column(synsets, f, origin) for f in ("ILSVRC2012_ID", "WNID", "words", "num_children")
        )
        try:
            truth = [int(line) for line in kit.text(truth_key)]
        except ValueError as e:
            raise BetonError(f"{kit.files[truth_key].name}: not one integer ID per line ({e})") from None
    leaves = {int(i): str(w) for i, w, c in zip(ids, wnids, children) if int(c) == 0}
    unknown = sorted(set(truth) - set(leaves))
    if unknown:
        raise BetonError(f"{devkit}: {GROUND_TRUTH} holds IDs {unknown[:5]} that are no leaf synset of {META}")
    return leaves, {str(w): str(d).split(",")[0] for w, d in zip(wnids, words)}, truth


def index_val(inputs: Inputs, wnids: Sequence[str], leaves: dict[int, str], truth: Sequence[int]) -> BlobSource:
    """The validation images of `inputs` labelled by the ground truth (labels index `wnids`), in class
    then file-name order."""
    val = inputs.labels[0]
    images = [k for k in inputs.keys() if k.upper().endswith(".JPEG")]
    if not images:
        raise BetonError(
            f"{val}: holds no validation image ({VAL_IMAGE.format(1)} ...): this is not the validation archive "
            "(ILSVRC2012_img_val.tar)"
        )
    if len(images) != len(truth):
        raise BetonError(f"{val}: {len(images)} images, but {GROUND_TRUTH} labels {len(truth)}")
    keys = [inputs.find(VAL_IMAGE.format(n)) for n in range(1, len(truth) + 1)]
    missing = [VAL_IMAGE.format(n) for n, k in enumerate(keys, 1) if k is None]
    if missing:
        raise BetonError(
            f"{val}: {len(missing)} image(s) labelled in {GROUND_TRUTH} are absent: {', '.join(missing[:5])}"
        )
    position = {w: i for i, w in enumerate(wnids)}
    labels = [position[leaves[t]] for t in truth]
    order = sorted(range(len(keys)), key=lambda i: (labels[i], keys[i]))
    return BlobSource.of([inputs.files[keys[i]] for i in order], [labels[i] for i in order])


def _check_inputs(train: Path | None, val: Path | None, devkit: Path | None) -> None:
    if train is None and val is None:
        raise BetonError("write_imagenet: give the train tar, the val tar, or both")
    if val is not None and devkit is None:
        raise BetonError(
            f"{val}: the val split needs the devkit (ILSVRC2012_devkit_t12.tar.gz: {GROUND_TRUTH} and {META})"
        )
    for path in (train, val, devkit):
        if path is not None and not path.exists():
            raise BetonError(f"{path}: no such file or folder")


def write_imagenet(
    outdir: str | Path,
    *,
    train: str | Path | None = None,
    val: str | Path | None = None,
    devkit: str | Path | None = None,
    options: ImageOptions = PRESETS["reference"],
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write `imagenet_train.beton` from the train tar and/or `imagenet_val.beton` from the val tar and the
    devkit (its .tar.gz, folder, or the two files) into `outdir`; returns {split: sidecar}. Everything
    that can be checked cheaply (the devkit, the val images, the class tars) is checked before writing."""
    outdir = Path(outdir)
    train, val, devkit = (Path(p) if p is not None else None for p in (train, val, devkit))
    _check_inputs(train, val, devkit)
    outdir.mkdir(parents=True, exist_ok=True)
    archives = {split: paths for split, paths in (("train", [train]), ("val", [val, devkit])) if paths[0]}
    outs = {split: outdir / f"imagenet_{split}.beton" for split in archives}
    written = {
        split: finished_split(outs[split], archive_identity(paths), options, overwrite)
        for split, paths in archives.items()
    }
    staging = outdir / ".imagenet_train.staging"
    with ExitStack() as stack:
        leaves, words, truth = read_devkit(devkit, outdir, progress) if val else ({}, {}, [])
        wnids = sorted(leaves.values())
        if written.get("val") is None and val:  # the val images are checked before the long train write
            val_source = index_val(stack.enter_context(Inputs([val], outdir, progress)), wnids, leaves, truth)
        if train and val:
            with open(train, "rb") as f:
                train_wnids = [CLASS_TAR.match(PurePosixPath(m.name).name).group(1) for m in _class_tars(f, train)]
            if train_wnids != wnids:
                raise BetonError(
                    f"{train}: its {len(train_wnids)} class tars are not the devkit's {len(wnids)} "
                    f"leaf synsets ({META}): train and val labels would differ"
                )
        for split in [s for s, meta in written.items() if meta is None]:
            if split == "train":
                wnids, source = index_train(train, staging, progress)
            else:
                source = val_source
            names, standard = _class_names(wnids, words)
            identity = archive_identity(archives[split])
            extra = {"dataset": "imagenet", "split": split, "archives": identity, "imagenet1k_index": standard}
            with writer_progress(progress):
                written[split] = write_beton(
                    source,
                    outs[split],
                    class_names=names,
                    wnids=wnids,
                    options=options,
                    origin=str(archives[split][0]),
                    extra=extra,
                    overwrite=overwrite,
                )
            if split == "train":
                shutil.rmtree(staging)  # the beton is complete: nothing left to resume
    return written
