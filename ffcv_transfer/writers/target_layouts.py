"""Each transfer target's official archive layout and canonical train/test split (the protocol of
Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019, with the class counts of
MadryLab/data-transfer's src/datasets.py). A reader takes the archives' files (`Inputs`) and returns a
`Layout`: the class names and, per split, (image path, label) pairs that targets.py finds and writes.
docs/betons.md states every rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ffcv_transfer.store.betons import BetonError
from ffcv_transfer.writers.archives import Inputs, is_image, load_mat, mat_column


@dataclass
class Split:
    items: list[tuple[str, int]]  # (image path, found as in Inputs.find; label)
    listed_in: str  # the file (or folder) that lists them, for messages


@dataclass
class Layout:
    class_names: list[str]
    train: Split
    test: Split
    rule: str  # the split rule, recorded in the sidecars
    crop_bottom: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _root(key: str, name: str) -> str:
    """The folder of a list file `key` found as `name` ("a/b/meta/train.txt", "meta/train.txt" -> "a/b/")."""
    return key[: len(key) - len(name)]


def aircraft(inputs: Inputs) -> Layout:
    names = inputs.text(inputs.require("variants.txt", "FGVC-Aircraft's 100 variant names, one per line"))
    index = {name: i for i, name in enumerate(names)}

    def split(kind: str) -> Split:
        name = f"images_variant_{kind}.txt"
        key = inputs.require(name, f"FGVC-Aircraft's {kind} list: '<image id> <variant>' per line")
        items = []
        for line in inputs.text(key):
            image, _, variant = line.partition(" ")  # variant names hold spaces ("Cessna 172")
            if variant not in index:
                raise BetonError(f"{inputs.files[key].name}: variant {variant!r} of {image} is not in variants.txt")
            items.append((f"{_root(key, name)}images/{image}.jpg", index[variant]))
        return Split(items, inputs.files[key].name)

    return Layout(
        names,
        split("trainval"),
        split("test"),
        "train: images_variant_trainval.txt; test: "
        "images_variant_test.txt; variant level, classes in variants.txt order; bottom 20 rows cut",
        crop_bottom=20,
    )


def birdsnap(inputs: Inputs) -> Layout:
    key = inputs.require(
        "test_images.txt", "Birdsnap's official test list: a header, then one <species folder>/<file> path per line"
    )
    tests = {"/".join(PurePosixPath(p).parts[-2:]) for p in inputs.text(key)[1:]}
    images = sorted(k for k in inputs.keys() if is_image(k) and len(PurePosixPath(k).parts) >= 2)
    classes = sorted({PurePosixPath(k).parent.name for k in images})
    index = {name: i for i, name in enumerate(classes)}
    strays = sorted({p.split("/")[0] for p in tests} - set(index))
    if strays:
        raise BetonError(f"{inputs.files[key].name}: test images of species without a folder: {', '.join(strays[:5])}")
    train = [
        (k, index[PurePosixPath(k).parent.name]) for k in images if "/".join(PurePosixPath(k).parts[-2:]) not in tests
    ]
    test = [(p, index[p.split("/")[0]]) for p in sorted(tests)]
    return Layout(
        classes,
        Split(train, ", ".join(inputs.labels)),
        Split(test, inputs.files[key].name),
        "test: test_images.txt; train: every other image; classes: sorted species folders",
    )


def _caltech(inputs: Inputs, top: str, per_class: int, excluded: set[str], rename: Callable[[str], str]) -> Layout:
    folders: dict[str, list[str]] = {}
    for key in inputs.keys():
        parts = PurePosixPath(key).parts
        if is_image(key) and len(parts) >= 3 and parts[-3] == top:  # only images directly in a class folder
            folders.setdefault(parts[-2], []).append(key)
    classes = sorted(set(folders) - excluded)
    if not classes:
        raise BetonError(f"{top}/ (its class folders) is missing: {inputs.where_missing()}")
    train, test = [], []
    for label, name in enumerate(classes):
        files = sorted(folders[name])
        if len(files) <= per_class:
            raise BetonError(f"{top}/{name}: {len(files)} images, but {per_class} train and some test images needed")
        train += [(k, label) for k in files[:per_class]]
        test += [(k, label) for k in files[per_class:]]
    rule = f"train: the first {per_class} images of each class by file name; test: the rest" + (
        f"; {', '.join(sorted(excluded))} left out" if excluded else ""
    )
    return Layout([rename(c) for c in classes], Split(train, top), Split(test, top), rule, extra={"folders": classes})


def caltech101(inputs: Inputs) -> Layout:
    return _caltech(inputs, "101_ObjectCategories", 30, {"BACKGROUND_Google"}, lambda c: c)


def caltech256(inputs: Inputs) -> Layout:
    return _caltech(inputs, "256_ObjectCategories", 60, set(), lambda c: c.split(".", 1)[-1])


def flowers102(inputs: Inputs) -> Layout:
    labels_key = inputs.require("imagelabels.mat", "Flowers-102's labels: `labels`, 1 x 8189, classes 1..102")
    split_key = inputs.require("setid.mat", "Flowers-102's split: `trnid`, `valid`, `tstid`, 1-based image numbers")
    labels = np.atleast_1d(load_mat(inputs, labels_key, ["labels"])["labels"]).astype(np.int64)
    ids = {
        k: np.atleast_1d(v).astype(np.int64)
        for k, v in load_mat(inputs, split_key, ["trnid", "valid", "tstid"]).items()
    }
    bad = [int(i) for v in ids.values() for i in v if not 1 <= i <= len(labels)]
    if bad or labels.min() < 1:
        raise BetonError(
            f"{inputs.files[split_key].name}: image numbers {bad[:5]} outside 1..{len(labels)} of "
            f"imagelabels.mat, or labels below 1"
        )

    def split(numbers: np.ndarray, source: str) -> Split:
        return Split([(f"jpg/image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in sorted(numbers)], source)

    source = inputs.files[split_key].name
    return Layout(
        [f"class {c}" for c in range(1, int(labels.max()) + 1)],
        split(np.concatenate([ids["trnid"], ids["valid"]]), source),
        split(ids["tstid"], source),
        "train: trnid + valid of setid.mat; test: tstid; classes: the 1-based numbers of imagelabels.mat",
    )


def food101(inputs: Inputs) -> Layout:
    classes = inputs.text(inputs.require("meta/classes.txt", "Food-101's 101 class folder names"))
    pretty = inputs.find("meta/labels.txt")
    names = inputs.text(pretty) if pretty else classes
    if len(names) != len(classes):
        raise BetonError(f"{inputs.files[pretty].name}: {len(names)} names for {len(classes)} classes")
    index = {c: i for i, c in enumerate(classes)}

    def split(kind: str) -> Split:
        key = inputs.require(f"meta/{kind}.txt", f"Food-101's {kind} list: '<class>/<image id>' per line")
        items = []
        for line in inputs.text(key):
            if line.split("/")[0] not in index:
                raise BetonError(f"{inputs.files[key].name}: {line} is of no class in meta/classes.txt")
            items.append((f"{_root(key, f'meta/{kind}.txt')}images/{line}.jpg", index[line.split("/")[0]]))
        return Split(items, inputs.files[key].name)

    return Layout(
        names,
        split("train"),
        split("test"),
        "train: meta/train.txt; test: meta/test.txt; classes in meta/classes.txt order",
    )


def pets(inputs: Inputs) -> Layout:
    names: dict[int, str] = {}

    def split(kind: str) -> Split:
        key = inputs.require(
            f"annotations/{kind}.txt",
            f"Oxford-IIIT Pets' {kind} list: '<image> <class id> <species> <breed id>' per line",
        )
        items = []
        for line in inputs.text(key):
            if line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise BetonError(f"{inputs.files[key].name}: {line!r} is not '<image> <class id> ...'")
            image, class_id = parts[:2]
            breed = image.rsplit("_", 1)[0]
            if names.setdefault(int(class_id), breed) != breed:
                raise BetonError(
                    f"{inputs.files[key].name}: class {class_id} is both {names[int(class_id)]} and {breed}"
                )
            items.append((f"images/{image}.jpg", int(class_id) - 1))
        return Split(items, inputs.files[key].name)

    train, test = split("trainval"), split("test")
    absent = sorted(set(range(1, max(names) + 1)) - set(names))
    if absent:
        raise BetonError(f"annotations/trainval.txt and test.txt list no image of class(es) {absent[:5]}")
    return Layout(
        [names[i] for i in range(1, max(names) + 1)],
        train,
        test,
        "train: annotations/trainval.txt; test: annotations/test.txt; 37 breeds by class id",
    )


def cars(inputs: Inputs) -> Layout:
    meta = inputs.require("cars_meta.mat", "Stanford Cars' class names (car_devkit.tgz: devkit/cars_meta.mat)")
    names = [str(n) for n in np.atleast_1d(load_mat(inputs, meta, ["class_names"])["class_names"])]

    def split(kind: str, annotations: str, what: str) -> Split:
        key = inputs.require(annotations, what)
        records = load_mat(inputs, key, ["annotations"])["annotations"]
        origin = inputs.files[key].name
        files, classes = mat_column(records, "fname", origin), mat_column(records, "class", origin)
        if not all(1 <= int(c) <= len(names) for c in classes):
            raise BetonError(f"{origin}: classes outside 1..{len(names)} of cars_meta.mat")
        return Split([(f"cars_{kind}/{f}", int(c) - 1) for f, c in zip(files, classes)], origin)

    return Layout(
        names,
        split(
            "train",
            "cars_train_annos.mat",
            "Stanford Cars' training annotations (car_devkit.tgz: devkit/cars_train_annos.mat)",
        ),
        split(
            "test",
            "cars_test_annos_withlabels.mat",
            "Stanford Cars' test labels (cars_test_annos_withlabels.mat, published apart from the devkit)",
        ),
        "train: cars_train/ with devkit/cars_train_annos.mat; test: cars_test/ with "
        "cars_test_annos_withlabels.mat; whole images (no bounding-box crop)",
    )


def sun397(inputs: Inputs) -> Layout:
    lists = {kind: inputs.find(f"{kind}_01.txt", stream=False) for kind in ("Training", "Testing")}
    if all(lists.values()):  # the partition is known before SUN397.tar.gz is read: pack only its images
        wanted = {PurePosixPath(line).name for key in lists.values() for line in inputs.text(key)}
        inputs.keep = lambda k: PurePosixPath(k).name in wanted
    classes = inputs.text(inputs.require("ClassName.txt", "SUN397's 397 class paths, e.g. /a/abbey"))
    index = {c: i for i, c in enumerate(classes)}

    def split(kind: str) -> Split:
        key = inputs.require(
            f"{kind}_01.txt",
            f"SUN397's first {kind.lower()} partition (Partitions.zip): one /<letter>/<class>/<file>.jpg path per line",
        )
        items = []
        for line in inputs.text(key):
            folder = str(PurePosixPath(line).parent)
            if folder not in index:
                raise BetonError(f"{inputs.files[key].name}: {line} is of no class in ClassName.txt")
            items.append((line.lstrip("/"), index[folder]))
        return Split(items, inputs.files[key].name)

    return Layout(
        [c.split("/", 2)[-1] for c in classes],
        split("Training"),
        split("Testing"),
        "train: Training_01.txt; test: Testing_01.txt (the first of the 10 partitions); classes in ClassName.txt order",
    )


READERS: dict[str, Callable[[Inputs], Layout]] = {
    "aircraft": aircraft,
    "birdsnap": birdsnap,
    "caltech101": caltech101,
    "caltech256": caltech256,
    "flowers102": flowers102,
    "food101": food101,
    "pets": pets,
    "cars": cars,
    "sun397": sun397,
}
