"""Writers from the archives the dataset authors publish: ImageNet's nested train tar, flat val tar and
devkit, and each transfer target's official layout and canonical split. Every test builds a small archive
in the official layout (real JPEG/PNG bytes, real .mat/.txt formats) and checks the betons against it:
counts, labels, class names and the pixels of the images as PIL decodes the bytes it wrote."""

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.io import savemat

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.config import load_experiment
from ffcv_transfer.store.betons import BetonError, BetonRecords, read_labels, read_sidecar, verify_beton
from ffcv_transfer.writers import imagenet as imagenet_module
from ffcv_transfer.writers.common import ImageOptions
from ffcv_transfer.writers.imagenet import PRESETS, write_imagenet
from ffcv_transfer.writers.targets import write_target

from .test_writers import smooth_images, write_cifar_pickles

RAW = ImageOptions(write_mode="raw", num_workers=1)
RNG = np.random.default_rng(0)


def encoded(height: int, width: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_images(RNG, 1, height, width)[0]).save(buffer, fmt, quality=95)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def outputs(folder: Path) -> set[str]:
    """The outputs in `folder`; a refused write leaves none, nor the folder it would have made."""
    return (
        {p.name for p in folder.iterdir() if p.name.endswith((".beton", ".json", ".npy"))} if folder.exists() else set()
    )


def check_beton(out: Path, expected: list[tuple[bytes, int]], class_names: list[str], crop_bottom: int = 0) -> dict:
    """The beton holds exactly `expected` (encoded image, label) in order, pixels as PIL decodes them."""
    meta = read_sidecar(out)
    assert meta["class_names"] == class_names
    labels = [label for _, label in expected]
    np.testing.assert_array_equal(read_labels(out), labels)
    assert meta["class_counts"] == np.bincount(labels, minlength=len(class_names)).tolist()
    records = BetonRecords(out)
    np.testing.assert_array_equal(records.labels, labels)
    for i, (data, _) in enumerate(expected):
        image = decoded(data)
        np.testing.assert_array_equal(records.image(i), image[: len(image) - crop_bottom])
    verify_beton(out, progress=False)
    return meta


# ---------------------------------------------------------------- ImageNet

# wnid -> (ILSVRC2012_ID, short name, standard index): the IDs are deliberately not the sorted-wnid order
CLASSES = {"n01440764": (3, "tench", 0), "n01443537": (1, "goldfish", 1), "n02119789": (2, "kit fox", 278)}
VAL_TRUTH = [2, 3, 1, 1, 2, 3, 3]  # ILSVRC2012_ID of val image 1..7


def make_devkit(path: Path, truth=VAL_TRUTH, with_meta: bool = True) -> Path:
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat (synsets struct) and the validation ground truth."""
    kind = [
        ("ILSVRC2012_ID", "O"),
        ("WNID", "O"),
        ("words", "O"),
        ("gloss", "O"),
        ("num_children", "O"),
        ("children", "O"),
        ("wordnet_height", "O"),
        ("num_train_images", "O"),
    ]
    synsets = np.zeros((len(CLASSES) + 1, 1), dtype=kind)
    for row, (wnid, (ilsvrc_id, name, _)) in enumerate(CLASSES.items()):
        synsets[row, 0] = (ilsvrc_id, wnid, f"{name}, a word", "gloss", 0, np.zeros((1, 0)), 0, 1300)
    synsets[-1, 0] = (1001, "n00001740", "entity", "gloss", 3, np.array([[1, 2, 3]]), 18, 0)  # not a leaf
    buffer = io.BytesIO()
    savemat(buffer, {"synsets": synsets})
    members = {
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{t}\n" for t in truth).encode()
    }
    if with_meta:
        members["ILSVRC2012_devkit_t12/data/meta.mat"] = buffer.getvalue()
    return make_tar(path, members, "w:gz")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A nested train tar (class tars in non-sorted order), a flat val tar and a devkit."""
    root = tmp_path_factory.mktemp("ilsvrc")
    train, class_tars = {}, {}
    for wnid in ("n02119789", "n01440764", "n01443537"):
        train[wnid] = {f"{wnid}_{n}.JPEG": encoded(18 + 3 * n, 24) for n in (12, 3, 7)}
        class_tars[f"{wnid}.tar"] = make_tar(root / f"{wnid}.tar", train[wnid]).read_bytes()
    val = {f"ILSVRC2012_val_{n:08d}.JPEG": encoded(20, 16 + n) for n in range(1, len(VAL_TRUTH) + 1)}
    return {
        "train_tar": make_tar(root / "ILSVRC2012_img_train.tar", class_tars),
        "train": train,
        "val_tar": make_tar(root / "ILSVRC2012_img_val.tar", val),
        "val": val,
        "devkit": make_devkit(root / "ILSVRC2012_devkit_t12.tar.gz"),
    }


def expected_imagenet(imagenet) -> dict[str, list]:
    """Both splits by class (sorted wnids) then file name, as `write imagefolder` orders class folders."""
    wnids = sorted(CLASSES)
    train = [
        (imagenet["train"][w][name], label) for label, w in enumerate(wnids) for name in sorted(imagenet["train"][w])
    ]
    by_id = {ilsvrc_id: wnids.index(w) for w, (ilsvrc_id, _, _) in CLASSES.items()}
    val = sorted(((name, by_id[t]) for name, t in zip(sorted(imagenet["val"]), VAL_TRUTH)), key=lambda x: (x[1], x[0]))
    return {"train": train, "val": [(imagenet["val"][name], label) for name, label in val]}


def test_imagenet_from_official_archives_via_cli(imagenet, tmp_path, capsys):
    out = tmp_path / "betons"
    code = cli_main(
        [
            "write",
            "imagenet",
            str(out),
            "--train",
            str(imagenet["train_tar"]),
            "--val",
            str(imagenet["val_tar"]),
            "--devkit",
            str(imagenet["devkit"]),
            "--preset",
            "ffcv-imagenet",
            "--write-mode",
            "raw",
            "--num-workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    expected = expected_imagenet(imagenet)
    for split in ("train", "val"):
        meta = check_beton(out / f"imagenet_{split}.beton", expected[split], ["tench", "goldfish", "kit fox"])
        assert meta["wnids"] == sorted(CLASSES)
        assert meta["extra"]["imagenet1k_index"] == [CLASSES[w][2] for w in sorted(CLASSES)]
        # the ffcv-imagenet preset with the write mode overridden on the command line
        assert (meta["writer"]["write_mode"], meta["writer"]["max_resolution"]) == ("raw", 500)
        assert meta["writer"]["compress_probability"] == 0.5 and meta["writer"]["jpeg_quality"] == 90
    assert read_sidecar(out / "imagenet_val.beton")["class_counts"] == [3, 2, 2]  # ID 3 (tench) thrice
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"imagenet_{s}.{x}" for s in ("train", "val") for x in ("beton", "meta.json", "labels.npy")
    )


def test_imagenet_presets_are_the_documented_settings():
    assert PRESETS["reference"] == ImageOptions(
        write_mode="smart", max_resolution=256, compress_probability=0.0, jpeg_quality=90
    )
    assert PRESETS["ffcv-imagenet"] == ImageOptions(
        write_mode="proportion", max_resolution=500, compress_probability=0.5, jpeg_quality=90
    )


def test_imagenet_resumes_where_a_killed_run_stopped(imagenet, tmp_path, monkeypatch):
    indexed, writes = [], []
    real_index, real_write = imagenet_module._index_class, imagenet_module.write_beton

    def index_then_die(outer, member, label):
        if len(indexed) == 1:
            raise KeyboardInterrupt  # killed while reading the second class tar
        indexed.append(member.name)
        return real_index(outer, member, label)

    monkeypatch.setattr(imagenet_module, "_index_class", index_then_die)
    args = dict(
        train=imagenet["train_tar"], val=imagenet["val_tar"], devkit=imagenet["devkit"], options=RAW, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        write_imagenet(tmp_path, **args)
    staging = tmp_path / ".imagenet_train.staging"
    assert sorted(p.name for p in staging.iterdir()) == ["archive.json", "n01440764.json"] and not outputs(tmp_path)

    def count_index(outer, member, label):
        indexed.append(member.name)
        return real_index(outer, member, label)

    def write_then_die(source, out, **kwargs):
        if out.name == "imagenet_val.beton":
            raise KeyboardInterrupt  # killed when the train beton was done
        writes.append(out.name)
        return real_write(source, out, **kwargs)

    monkeypatch.setattr(imagenet_module, "_index_class", count_index)
    monkeypatch.setattr(imagenet_module, "write_beton", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_imagenet(tmp_path, **args)
    assert indexed == ["n01440764.tar", "n01443537.tar", "n02119789.tar"]  # the first class tar read once
    assert writes == ["imagenet_train.beton"] and not staging.exists()
    first = read_sidecar(tmp_path / "imagenet_train.beton")

    monkeypatch.setattr(
        imagenet_module,
        "write_beton",
        lambda source, out, **kw: writes.append(out.name) or real_write(source, out, **kw),
    )
    written = write_imagenet(tmp_path, **args)
    assert writes == ["imagenet_train.beton", "imagenet_val.beton"] and len(indexed) == 3  # train kept
    assert written["train"] == first
    expected = expected_imagenet(imagenet)
    for split in ("train", "val"):
        check_beton(tmp_path / f"imagenet_{split}.beton", expected[split], ["tench", "goldfish", "kit fox"])
    with pytest.raises(BetonError, match="already exists from other archives or storage options"):
        write_imagenet(tmp_path, **(args | {"options": ImageOptions(write_mode="jpg", num_workers=1)}))


def test_imagenet_malformed_archives_are_named(imagenet, tmp_path):
    out = tmp_path / "out"
    good = dict(
        train=imagenet["train_tar"], val=imagenet["val_tar"], devkit=imagenet["devkit"], options=RAW, progress=False
    )
    cut = tmp_path / "ILSVRC2012_img_train.tar"
    whole = imagenet["train_tar"].read_bytes()
    cut.write_bytes(whole[: len(whole) * 3 // 5])  # into a class tar's data
    with pytest.raises(BetonError, match=f"{cut}: (unreadable or )?truncated"):
        write_imagenet(out, **(good | {"train": cut}))
    inner = make_tar(tmp_path / "n01440764.tar", imagenet["train"]["n01440764"]).read_bytes()[:2000]
    broken = make_tar(tmp_path / "broken.tar", {"n01440764.tar": inner})
    with pytest.raises(BetonError, match=r"broken.tar:n01440764.tar: truncated"):
        write_imagenet(out, train=broken, options=RAW, progress=False)
    gzipped = tmp_path / "ILSVRC2012_img_train.tar.gz"
    gzipped.write_bytes(gzip.compress(whole))
    with pytest.raises(BetonError, match="compressed; the train tar is read in place"):
        write_imagenet(out, train=gzipped, options=RAW, progress=False)
    with pytest.raises(BetonError, match=r"data/meta.mat \(the devkit's synsets.*is missing"):
        write_imagenet(out, **(good | {"devkit": make_devkit(tmp_path / "nometa.tar.gz", with_meta=False)}))
    with pytest.raises(BetonError, match=r"8 images, but .* labels 7|7 images, but .*labels 8"):
        write_imagenet(out, **(good | {"devkit": make_devkit(tmp_path / "more.tar.gz", VAL_TRUTH + [1])}))
    gap = dict(imagenet["val"])
    gap["ILSVRC2012_val_00000009.JPEG"] = gap.pop("ILSVRC2012_val_00000004.JPEG")
    with pytest.raises(BetonError, match="absent: ILSVRC2012_val_00000004.JPEG"):
        write_imagenet(out, **(good | {"val": make_tar(tmp_path / "gap.tar", gap)}))
    assert not outputs(out)
    assert cli_main(["write", "imagenet", str(out), "--val", str(imagenet["val_tar"])]) == 2


def test_imagenet_wrong_archives_say_what_they_are_and_leave_no_staging(imagenet, tmp_path):
    """The devkit or the train tar passed as --val is named as not the validation archive; a tar refused
    as the train tar leaves no .imagenet_train.staging folder behind."""
    out = tmp_path / "out"
    for wrong in (imagenet["devkit"], imagenet["train_tar"]):
        with pytest.raises(BetonError, match=f"{wrong}: holds no validation image .*not the validation archive"):
            write_imagenet(out, val=wrong, devkit=imagenet["devkit"], options=RAW, progress=False)
    with pytest.raises(BetonError, match="expected one nXXXXXXXX.tar per class"):
        write_imagenet(out, train=imagenet["val_tar"], options=RAW, progress=False)
    assert not (out / ".imagenet_train.staging").exists() and not outputs(out)


# ---------------------------------------------------------------- transfer targets


def write_and_check(
    name: str, archives: list, tmp_path: Path, expected: dict, class_names: list, crop_bottom: int = 0
) -> dict:
    out = tmp_path / "betons"
    written = write_target(name, archives, out, options=RAW, progress=False)
    for split in ("train", "test"):
        meta = check_beton(out / f"{name}_{split}.beton", expected[split], class_names, crop_bottom)
        assert meta == written[split] and meta["extra"]["split"] == split and meta["extra"]["dataset"] == name
    assert outputs(out) == {f"{name}_{s}.{x}" for s in ("train", "test") for x in ("beton", "meta.json", "labels.npy")}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no pack file left
    return written


def test_aircraft_variant_lists_and_banner_crop(tmp_path):
    variants = ["707-320", "Cessna 172", "F-16A/B"]  # variant names hold spaces and slashes
    images = {f"{1000000 + i}": encoded(44, 30) for i in range(7)}
    ids = sorted(images)
    lists = {
        "trainval": [(ids[0], 1), (ids[1], 0), (ids[2], 2), (ids[3], 1)],
        "test": [(ids[4], 2), (ids[5], 0), (ids[6], 1)],
    }
    members = {"fgvc-aircraft-2013b/data/variants.txt": "".join(v + "\n" for v in variants).encode()}
    for kind, rows in lists.items():
        members[f"fgvc-aircraft-2013b/data/images_variant_{kind}.txt"] = "".join(
            f"{i} {variants[v]}\n" for i, v in rows
        ).encode()
    members |= {f"fgvc-aircraft-2013b/data/images/{i}.jpg": data for i, data in images.items()}
    archive = make_tar(tmp_path / "fgvc-aircraft-2013b.tar.gz", members, "w:gz")
    expected = {
        split: [(images[i], v) for i, v in lists[kind]] for split, kind in (("train", "trainval"), ("test", "test"))
    }
    written = write_and_check("aircraft", [archive], tmp_path, expected, variants, crop_bottom=20)
    assert written["test"]["resolution"]["height"] == {"min": 24, "max": 24, "mean": 24.0}  # 44 - 20 rows


def test_birdsnap_local_folder_with_official_test_list(tmp_path):
    folder = tmp_path / "download" / "images"
    files = {
        ("Acadian_Flycatcher", "a1.jpg"): 0,
        ("Acadian_Flycatcher", "a2.jpg"): 0,
        ("Blue_Jay", "b1.jpg"): 1,
        ("Blue_Jay", "b2.jpg"): 1,
        ("Blue_Jay", "b3.jpg"): 1,
        ("Cedar_Waxwing", "c1.jpg"): 2,
    }
    data = {}
    for species, name in files:
        (folder / species).mkdir(parents=True, exist_ok=True)
        data[species, name] = encoded(20, 22)
        (folder / species / name).write_bytes(data[species, name])
    tests = [("Blue_Jay", "b2.jpg"), ("Acadian_Flycatcher", "a1.jpg")]
    listing = tmp_path / "test_images.txt"
    listing.write_text("path\n" + "".join(f"{s}/{n}\n" for s, n in tests))
    expected = {
        "train": [(data[k], files[k]) for k in sorted(files) if k not in tests],
        "test": [(data[k], files[k]) for k in sorted(tests)],
    }
    write_and_check(
        "birdsnap", [folder.parent, listing], tmp_path, expected, ["Acadian_Flycatcher", "Blue_Jay", "Cedar_Waxwing"]
    )

    listing.write_text("path\nBlue_Jay/b2.jpg\nBlue_Jay/gone.jpg\n")  # a dead Flickr link
    with pytest.raises(BetonError, match=r"test_images.txt: 1 listed image\(s\) absent .*Blue_Jay/gone.jpg"):
        write_target("birdsnap", [folder.parent, listing], tmp_path / "strict", options=RAW, progress=False)
    meta = write_target(
        "birdsnap", [folder.parent, listing], tmp_path / "lenient", options=RAW, progress=False, allow_missing=True
    )["test"]
    assert meta["num_examples"] == 1 and meta["extra"]["missing"] == 1


def caltech_archive(tmp_path: Path, top: str, counts: dict, mode: str, name) -> tuple[Path, dict]:
    members, data = {}, {}
    for folder, count in counts.items():
        for n in range(1, count + 1):
            key = f"{top}/{folder}/{name(folder, n)}"
            data[key] = members[key] = encoded(8, 10)
    return make_tar(tmp_path / f"{top}.tar{'.gz' if 'gz' in mode else ''}", members, mode), data


def test_caltech101_thirty_per_class_without_background(tmp_path):
    counts = {"accordion": 32, "Faces_easy": 31, "BACKGROUND_Google": 33}
    archive, data = caltech_archive(tmp_path, "101_ObjectCategories", counts, "w:gz", lambda c, n: f"image_{n:04d}.jpg")
    classes = ["Faces_easy", "accordion"]  # sorted folder names; the background class is left out
    expected = {"train": [], "test": []}
    for label, folder in enumerate(classes):
        keys = sorted(k for k in data if f"/{folder}/" in k)
        expected["train"] += [(data[k], label) for k in keys[:30]]
        expected["test"] += [(data[k], label) for k in keys[30:]]
    written = write_and_check("caltech101", [archive], tmp_path, expected, classes)
    assert written["train"]["class_counts"] == [30, 30] and written["test"]["class_counts"] == [1, 2]


def test_caltech101_inside_the_zip_it_is_served_in_is_named(tmp_path):
    """caltech-101.zip (the download) wraps 101_ObjectCategories.tar.gz: the error says to pass that."""
    archive, _ = caltech_archive(tmp_path, "101_ObjectCategories", {"accordion": 32}, "w:gz", lambda c, n: f"{n}.jpg")
    wrapped = tmp_path / "caltech-101.zip"
    with zipfile.ZipFile(wrapped, "w") as zipped:
        zipped.write(archive, "caltech-101/101_ObjectCategories.tar.gz")
    with pytest.raises(BetonError, match=r"caltech-101/101_ObjectCategories.tar.gz: extract and pass those instead"):
        write_target("caltech101", [wrapped], tmp_path / "betons", options=RAW, progress=False)


def test_caltech256_sixty_per_class_with_clutter(tmp_path):
    counts = {"001.ak47": 61, "257.clutter": 62}
    archive, data = caltech_archive(tmp_path, "256_ObjectCategories", counts, "w", lambda c, n: f"{c[:3]}_{n:04d}.jpg")
    with tarfile.open(archive, "a") as tar:  # a file deeper than the class folder is no image of the class
        deeper = encoded(8, 8)
        info = tarfile.TarInfo("256_ObjectCategories/001.ak47/greg/x.jpg")
        info.size = len(deeper)
        tar.addfile(info, io.BytesIO(deeper))
    expected = {"train": [], "test": []}
    for label, folder in enumerate(counts):
        keys = sorted(k for k in data if f"/{folder}/" in k)
        expected["train"] += [(data[k], label) for k in keys[:60]]
        expected["test"] += [(data[k], label) for k in keys[60:]]
    written = write_and_check("caltech256", [archive], tmp_path, expected, ["ak47", "clutter"])
    assert written["test"]["class_counts"] == [1, 2]


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_targets(tmp_path, variant):
    truth = write_cifar_pickles(tmp_path / "batches", variant, np.random.default_rng(1))
    archive = tmp_path / f"{variant}-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "batches", arcname="batches")
    written = write_target(variant, [archive], tmp_path / "out", progress=False)
    for split in ("train", "test"):
        images, labels = truth[split]
        records = BetonRecords(tmp_path / "out" / f"{variant}_{split}.beton")
        np.testing.assert_array_equal(np.stack([records.image(i) for i in range(len(records))]), images)
        np.testing.assert_array_equal(records.labels, labels)
        assert written[split]["class_names"] == truth["names"] and written[split]["writer"]["write_mode"] == "raw"
    other = "cifar100" if variant == "cifar10" else "cifar10"
    with pytest.raises(BetonError, match=f"holds {variant}, not {other}"):
        write_target(other, [archive], tmp_path / "wrong", progress=False)


def flowers_files(tmp_path: Path, with_setid: bool = True) -> tuple[list, dict]:
    labels = [2, 1, 3, 1, 2, 3, 1, 2]  # 1-based classes of image_00001..8
    images = {n: encoded(16, 12 + n) for n in range(1, 9)}
    archive = make_tar(tmp_path / "102flowers.tgz", {f"jpg/image_{n:05d}.jpg": d for n, d in images.items()}, "w:gz")
    savemat(tmp_path / "imagelabels.mat", {"labels": np.array([labels], np.uint8)})
    savemat(
        tmp_path / "setid.mat",
        {
            "trnid": np.array([[5, 1]], np.uint16),
            "valid": np.array([[3, 8]], np.uint16),
            "tstid": np.array([[2, 4, 6, 7]], np.uint16),
        },
    )
    files = [archive, tmp_path / "imagelabels.mat"] + ([tmp_path / "setid.mat"] if with_setid else [])
    split = {"train": [1, 3, 5, 8], "test": [2, 4, 6, 7]}  # trnid + valid, by image number
    return files, {s: [(images[n], labels[n - 1] - 1) for n in ids] for s, ids in split.items()}


def test_flowers102_train_plus_val_against_test(tmp_path):
    files, expected = flowers_files(tmp_path)
    write_and_check("flowers102", files, tmp_path, expected, ["class 1", "class 2", "class 3"])


def food_members(classes: list, lists: dict) -> tuple[dict, dict]:
    members = {
        "food-101/meta/classes.txt": "".join(c + "\n" for c in classes).encode(),
        "food-101/meta/labels.txt": "".join(c.replace("_", " ").capitalize() + "\n" for c in classes).encode(),
    }
    images = {}
    for kind, rows in lists.items():
        members[f"food-101/meta/{kind}.txt"] = "".join(r + "\n" for r in rows).encode()
        for row in rows:
            images[row] = members[f"food-101/images/{row}.jpg"] = encoded(14, 18)
    return members, images


def test_food101_meta_lists(tmp_path):
    classes = ["apple_pie", "baby_back_ribs"]
    lists = {"train": ["apple_pie/1005649", "baby_back_ribs/22", "apple_pie/134"], "test": ["baby_back_ribs/9"]}
    members, images = food_members(classes, lists)
    archive = make_tar(tmp_path / "food-101.tar.gz", members, "w:gz")
    expected = {s: [(images[r], classes.index(r.split("/")[0])) for r in rows] for s, rows in lists.items()}
    write_and_check("food101", [archive], tmp_path, expected, ["Apple pie", "Baby back ribs"])


def test_pets_trainval_and_test_lists(tmp_path):
    rows = {
        "trainval": [("Abyssinian_100", 1, 1, 1), ("american_bulldog_10", 2, 2, 1), ("Bengal_3", 3, 1, 3)],
        "test": [("Abyssinian_101", 1, 1, 1), ("Bengal_7", 3, 1, 3)],
    }
    images = {r[0]: encoded(12, 20, "PNG") for kind in rows.values() for r in kind}  # PNG bytes in a .jpg name
    image_tar = make_tar(
        tmp_path / "images.tar.gz",
        {f"images/{k}.jpg": v for k, v in images.items()} | {"images/Abyssinian_100.mat": b"stray"},
        "w:gz",
    )
    notes = {
        f"annotations/{kind}.txt": "".join(" ".join(map(str, r)) + "\n" for r in rs).encode()
        for kind, rs in rows.items()
    }
    notes["annotations/list.txt"] = b"#Image CLASS-ID SPECIES BREED ID\n"
    annotations = make_tar(tmp_path / "annotations.tar.gz", notes, "w:gz")
    expected = {s: [(images[r[0]], r[1] - 1) for r in rows[k]] for s, k in (("train", "trainval"), ("test", "test"))}
    write_and_check("pets", [image_tar, annotations], tmp_path, expected, ["Abyssinian", "american_bulldog", "Bengal"])


def cars_annotations(rows: list) -> np.ndarray:
    kind = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    records = np.zeros((1, len(rows)), dtype=kind)
    for i, (fname, label) in enumerate(rows):
        records[0, i] = (
            np.array([[1]], np.uint8),
            np.array([[2]], np.uint8),
            np.array([[9]], np.uint8),
            np.array([[7]], np.uint8),
            np.array([[label]], np.uint8),
            fname,
        )
    return records


def test_cars_devkit_annotations(tmp_path):
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Bugatti Veyron 16.4 Coupe 2009"]
    rows = {
        "train": [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2)],
        "test": [("00001.jpg", 2), ("00002.jpg", 1)],
    }
    images = {(s, f): encoded(15, 21) for s, rs in rows.items() for f, _ in rs}  # test names repeat train names
    tars = [
        make_tar(tmp_path / f"cars_{s}.tgz", {f"cars_{s}/{f}": images[s, f] for f, _ in rs}, "w:gz")
        for s, rs in rows.items()
    ]
    mats = {}
    for file, value in (
        ("cars_meta.mat", {"class_names": np.array([names], dtype=object)}),
        ("cars_train_annos.mat", {"annotations": cars_annotations(rows["train"])}),
        ("cars_test_annos.mat", {"annotations": cars_annotations(rows["test"])}),
        ("cars_test_annos_withlabels.mat", {"annotations": cars_annotations(rows["test"])}),
    ):
        buffer = io.BytesIO()
        savemat(buffer, value)
        mats[file] = buffer.getvalue()
    devkit = make_tar(tmp_path / "car_devkit.tgz", {f"devkit/{f}": mats[f] for f in list(mats)[:3]}, "w:gz")
    (tmp_path / "cars_test_annos_withlabels.mat").write_bytes(mats["cars_test_annos_withlabels.mat"])
    expected = {s: [(images[s, f], c - 1) for f, c in rs] for s, rs in rows.items()}
    write_and_check("cars", [*tars, devkit, tmp_path / "cars_test_annos_withlabels.mat"], tmp_path, expected, names)


def test_sun397_first_partition(tmp_path):
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    images = {f"{c}/sun_{c[3:6]}{n}.jpg": encoded(16, 24) for c in classes for n in range(3)}
    paths = sorted(images)
    train, test, other = paths[0::3], paths[1::3], paths[2::3]  # `other` only in partition 02
    archive = make_tar(
        tmp_path / "SUN397.tar.gz",
        {f"SUN397{p}": d for p, d in images.items()}
        | {"SUN397/ClassName.txt": "".join(c + "\n" for c in classes).encode()},
        "w:gz",
    )
    with zipfile.ZipFile(tmp_path / "Partitions.zip", "w") as z:
        z.writestr("Partitions/ClassName.txt", "".join(c + "\n" for c in classes))
        for name, rows in (("Training_01", train), ("Testing_01", test), ("Training_02", other)):
            z.writestr(f"Partitions/{name}.txt", "".join(r + "\n" for r in rows))
    label = {p: next(i for i, c in enumerate(classes) if p.startswith(c + "/")) for p in paths}
    expected = {"train": [(images[p], label[p]) for p in train], "test": [(images[p], label[p]) for p in test]}
    write_and_check(
        "sun397",
        [archive, tmp_path / "Partitions.zip"],
        tmp_path,
        expected,
        ["abbey", "apartment_building/outdoor", "bakery/shop"],
    )


# ---------------------------------------------------------------- malformed target archives


def test_missing_metadata_file_is_named_and_the_cli_writes_once_it_is_there(tmp_path, capsys):
    files, expected = flowers_files(tmp_path, with_setid=False)
    with pytest.raises(BetonError, match=r"setid.mat \(Flowers-102's split: `trnid`.*\) is missing"):
        write_target("flowers102", files, tmp_path / "out", options=RAW, progress=False)
    command = ["write", "target", "flowers102", *map(str, files), str(tmp_path / "out"), "--no-progress"]
    assert cli_main(command) == 2
    assert "ffcv-transfer: error: setid.mat (Flowers-102's split" in capsys.readouterr().err
    assert not outputs(tmp_path / "out")
    raw = ["--write-mode", "raw", "--num-workers", "1"]
    assert cli_main(command[:-2] + [str(tmp_path / "setid.mat"), str(tmp_path / "out"), *raw]) == 0
    assert "flowers102_test.beton: 4 examples, 3 classes" in capsys.readouterr().out
    check_beton(tmp_path / "out" / "flowers102_test.beton", expected["test"], ["class 1", "class 2", "class 3"])


def test_listed_but_absent_image_is_named(tmp_path):
    members, _ = food_members(["apple_pie"], {"train": ["apple_pie/1"], "test": ["apple_pie/2"]})
    members["food-101/meta/test.txt"] = b"apple_pie/2\napple_pie/404\n"
    archive = make_tar(tmp_path / "food-101.tar.gz", members, "w:gz")
    with pytest.raises(BetonError, match=r"meta/test.txt: 1 listed image\(s\) absent .*food-101/images/apple_pie/404"):
        write_target("food101", [archive], tmp_path / "out", options=RAW, progress=False)
    assert not outputs(tmp_path / "out")


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_truncated_archive_is_named(tmp_path, suffix, mode):
    members, _ = food_members(["apple_pie"], {"train": [f"apple_pie/{n}" for n in range(6)], "test": ["apple_pie/9"]})
    whole = make_tar(tmp_path / f"whole{suffix}", members, mode).read_bytes()
    cut = tmp_path / f"food-101{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BetonError, match=f"{cut}: unreadable or truncated"):
        write_target("food101", [cut], tmp_path / "out", options=RAW, progress=False)
    assert not outputs(tmp_path / "out")


def test_a_failing_test_split_leaves_no_train_beton(tmp_path):
    members, _ = food_members(["apple_pie"], {"train": ["apple_pie/1"], "test": ["apple_pie/2"]})
    members["food-101/images/apple_pie/2.jpg"] = b"\xff\xd8 not a JPEG"
    archive = make_tar(tmp_path / "food-101.tar.gz", members, "w:gz")
    with pytest.raises(BetonError, match=r"(?s)could not be read.*apple_pie/2.jpg: UnidentifiedImageError"):
        write_target("food101", [archive], tmp_path / "out", options=RAW, progress=False)
    assert not outputs(tmp_path / "out")


# ---------------------------------------------------------------- recipes

RECIPES = Path(__file__).parent.parent / "rs_configs" / "targets"
SHAPE = {
    "data": {"target_name", "target_train", "target_test"},
    "transfer": {
        "epochs",
        "lr",
        "lr_schedule",
        "lr_step_size",
        "lr_gamma",
        "lr_peak_epoch",
        "batch_size",
        "per_model_batch",
        "momentum",
        "weight_decay",
        "bn_weight_decay",
        "label_smoothing",
        "precision",
        "resolution",
        "upsample_from",
        "train_crop",
        "crop_min_scale",
        "test_crop_ratio",
        "normalization",
        "metric",
        "mode",
    },
}
# MadryLab/data-transfer's configs/<target>_config.yaml: epochs, lr, schedule, step size, train decoder
# (rrc: random_resized_crop, cc: center_crop_256, simple), upsample, normalisation, granularity
REFERENCE = {
    "aircraft": (24, 0.3, "cyclic", None, "cc", False, "none", "per_class"),
    "birdsnap": (15, 0.3, "cyclic", None, "rrc", False, "none", "global"),
    "caltech101": (24, 0.2, "cyclic", None, "cc", False, "none", "per_class"),
    "caltech256": (14, 0.2, "cyclic", None, "cc", False, "none", "per_class"),
    "cifar10": (15, 0.1, "cyclic", None, "simple", True, "cifar10", "global"),
    "cifar100": (15, 0.1, "cyclic", None, "simple", True, "cifar100", "global"),
    "flowers102": (50, 0.15, "cyclic", None, "cc", False, "none", "per_class"),
    "food101": (15, 0.1, "step", 5, "cc", False, "none", "global"),
    "imagenet": (15, 0.01, "step", 10, "rrc", False, "imagenet", "global"),
    "pets": (24, 0.1, "cyclic", None, "rrc", False, "none", "per_class"),
    "cars": (50, 0.3, "cyclic", None, "rrc", False, "none", "global"),
    "sun397": (24, 0.2, "cyclic", None, "rrc", False, "none", "global"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_target_recipes_load_and_match_the_reference(name):
    tree = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert set(tree) == set(SHAPE) and set(tree["data"]) == SHAPE["data"] and set(tree["transfer"]) <= SHAPE["transfer"]
    assert ("mode" in tree["transfer"]) == (name == "imagenet")
    flat = {f"{section}.{key}": value for section, values in tree.items() for key, value in values.items()}
    experiment = load_experiment(None, {"data.source_train": "s.beton", "data.source_val": "v.beton", **flat})
    data, t = experiment.data, experiment.transfer
    epochs, lr, schedule, step, decoder, upsample, normalization, granularity = REFERENCE[name]
    assert data.target_name == name
    test_split = "val" if name == "imagenet" else "test"
    assert (data.target_train, data.target_test) == (f"{name}_train.beton", f"{name}_{test_split}.beton")
    assert (t.epochs, t.lr, t.lr_schedule, t.normalization) == (epochs, lr, schedule, normalization)
    assert t.metric == ("mean_per_class" if granularity == "per_class" else "top1")
    assert t.train_crop == ("random_resized" if decoder == "rrc" else "center")
    assert t.test_crop_ratio == (1.0 if decoder == "simple" else 224 / 256)
    assert t.upsample_from == (32 if upsample else 0) and t.resolution == 224
    if step:
        assert (t.lr_step_size, t.lr_gamma) == (step, 0.1)
    assert (
        t.batch_size,
        t.per_model_batch,
        t.momentum,
        t.weight_decay,
        t.label_smoothing,
        t.precision,
        t.lr_peak_epoch,
    ) == (1024, 1024, 0.9, 5e-4, 0.0, "fp16", 5)
    assert t.bn_weight_decay and t.modes == ("fixed_feature",)
    for key in SHAPE["transfer"] - {"mode", "lr_step_size", "lr_gamma"}:
        assert key in tree["transfer"], f"{name}: {key} left to the experiment's transfer section"


def test_target_recipes_as_the_targets_of_one_experiment(tmp_path):
    files = sorted(RECIPES.glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(REFERENCE)
    experiment_file = tmp_path / "experiment.yaml"
    experiment_file.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source_train": "s.beton",
                    "source_val": "v.beton",
                    "target_name": "planted",
                    "target_train": "t.beton",
                    "target_test": "u.beton",
                },
                "transfer": {"mode": "cached_features,fixed_feature", "epochs": 10, "lr": 0.5},
                "targets": [str(f) for f in files],
            }
        )
    )
    experiment = load_experiment(experiment_file)
    targets = {t.name: t for t in experiment.targets}
    assert list(targets) == ["planted", *(f.stem for f in files)]
    assert (targets["flowers102"].train, targets["flowers102"].transfer.epochs) == ("flowers102_train.beton", 50)
    assert targets["flowers102"].transfer.modes == ("cached_features", "fixed_feature")  # mode: the experiment's
    assert targets["imagenet"].transfer.modes == ("fixed_feature",) and targets["imagenet"].test == "imagenet_val.beton"
    assert targets["food101"].transfer.lr == 0.1 and targets["planted"].transfer.lr == 0.5
