"""Beton writers: round trips against the input arrays, sidecars, verify, and every bad input."""

import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.store.betons import (
    BetonError,
    BetonRecords,
    file_sha256,
    read_labels,
    read_sidecar,
    sidecar_paths,
    verify_beton,
)
from ffcv_transfer.writers.cifar import write_cifar
from ffcv_transfer.writers.common import ImageOptions, write_arrays
from ffcv_transfer.writers.imagefolder import write_imagefolder

from .conftest import read_with_loader

RAW = ImageOptions(write_mode="raw", num_workers=2)
JPEG = ImageOptions(write_mode="jpg", jpeg_quality=90, num_workers=2)


def smooth_images(rng, n, height, width):
    """Natural-ish images (smooth gradients plus mild noise) so JPEG error is meaningful."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(0, 1, (n, 1, 1, 3)) * 200 + 40 * np.sin(6 * x + rng.uniform(0, 6, (n, 1, 1)))[..., None]
    return np.clip(base + 30 * y[..., None] + rng.normal(0, 2, (n, height, width, 3)), 0, 255).astype(np.uint8)


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def make_imagefolder(root: Path, classes: dict[str, int], rng, size=(20, 24), suffix=".png") -> dict[str, list]:
    """A class-folder tree of PNGs (lossless); returns {class: [image arrays in file-name order]}."""
    arrays = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        arrays[name] = list(smooth_images(rng, count, *size))
        for i, image in enumerate(arrays[name]):
            Image.fromarray(image).save(root / name / f"img{i:03d}{suffix}")
    return arrays


# ---------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def raw_arrays(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, size=300)
    labels[:7] = np.arange(7)  # every class present
    out = tmp_path_factory.mktemp("raw") / "arr.beton"
    meta = write_arrays(images, labels, out, class_names=[f"c{i}" for i in range(7)], options=RAW)
    return images, labels, out, meta


def test_raw_round_trip_is_bit_identical_through_ffcv_loader(raw_arrays):
    images, labels, out, _ = raw_arrays
    loaded_images, loaded_labels = read_with_loader(out, batch_size=64)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_sidecar_describes_the_beton(raw_arrays):
    images, labels, out, meta = raw_arrays
    meta_path, labels_path = sidecar_paths(out)
    assert json.loads(meta_path.read_text()) == meta == read_sidecar(out)
    np.testing.assert_array_equal(read_labels(out), labels)
    assert meta["num_examples"] == 300 and meta["num_classes"] == 7 and meta["wnids"] is None
    assert meta["class_names"] == [f"c{i}" for i in range(7)]
    assert meta["class_counts"] == np.bincount(labels, minlength=7).tolist()
    assert meta["sha256"] == file_sha256(out) and meta["size_bytes"] == out.stat().st_size
    assert meta["resolution"]["height"] == {"min": 16, "max": 16, "mean": 16.0}
    assert meta["resolution"]["jpeg_fraction"] == 0.0
    assert meta["writer"]["write_mode"] == "raw"
    assert verify_beton(out, progress=False)["num_examples"] == 300
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_jpeg_round_trip_within_tolerance_and_variable_sizes(tmp_path):
    rng = np.random.default_rng(1)
    images = [smooth_images(rng, 1, h, w)[0] for h, w in [(40, 56), (64, 48), (33, 33), (80, 20)]] * 5
    source = _ListSource(images, np.arange(20) % 4)
    from ffcv_transfer.writers.common import write_beton

    out = tmp_path / "jpg.beton"
    meta = write_beton(source, out, class_names=list("abcd"), options=JPEG, origin="list")
    records = BetonRecords(out)
    assert meta["resolution"]["jpeg_fraction"] == 1.0
    for i, original in enumerate(images):
        decoded = records.image(i).astype(int)
        assert decoded.shape == original.shape
        # stated tolerance for quality 90 on smooth images: mean |error| <= 2 levels, max <= 40
        assert np.abs(decoded - original).mean() <= 2.0 and np.abs(decoded - original).max() <= 40
    verify_beton(out, progress=False)


class _ListSource:
    def __init__(self, images, labels):
        self.images, self.labels = images, np.asarray(labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def describe(self, i):
        return f"list[{i}]"


def test_max_resolution_resizes_longer_side(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "small.beton"
    meta = write_arrays(
        smooth_images(rng, 6, 40, 64),
        np.zeros(6, int),
        out,
        options=ImageOptions(write_mode="raw", max_resolution=32, num_workers=1),
    )
    assert (meta["resolution"]["height"]["max"], meta["resolution"]["width"]["max"]) == (20, 32)
    assert BetonRecords(out).image(0).shape == (20, 32, 3)


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture
def folder_tree(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "data" / "train"
    arrays = make_imagefolder(root, {"zebra": 3, "apple": 4, "mango": 2}, rng)
    return tmp_path / "data", arrays


def check_imagefolder_beton(out: Path, arrays: dict[str, list]) -> dict:
    meta = read_sidecar(out)
    names = sorted(arrays)
    assert meta["class_names"] == names and meta["wnids"] is None
    expected_images = [im for name in names for im in arrays[name]]
    expected_labels = [names.index(name) for name in names for _ in arrays[name]]
    records = BetonRecords(out)
    np.testing.assert_array_equal(records.labels, expected_labels)
    np.testing.assert_array_equal(read_labels(out), expected_labels)
    for i, image in enumerate(expected_images):
        np.testing.assert_array_equal(records.image(i), image)
    verify_beton(out, progress=False)
    return meta


def test_imagefolder_from_folder_sorts_classes_and_files(folder_tree, tmp_path):
    src, arrays = folder_tree
    out = tmp_path / "folder.beton"
    write_imagefolder(src, out, options=RAW)  # descends the single `train` folder by itself
    meta = check_imagefolder_beton(out, arrays)
    assert meta["class_counts"] == [4, 2, 3]


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_imagefolder_from_archive_with_subdir(folder_tree, tmp_path, suffix, mode):
    src, arrays = folder_tree
    (src / "test" / "apple").mkdir(parents=True)  # a second split makes --subdir necessary
    Image.fromarray(arrays["apple"][0]).save(src / "test" / "apple" / "x.png")
    archive = tmp_path / f"data{suffix}"
    with tarfile.open(archive, mode) as tar:
        tar.add(src, arcname="data")
    with pytest.raises(BetonError, match="choose the ImageFolder root with --subdir"):
        write_imagefolder(archive, tmp_path / "ambiguous.beton", options=RAW)
    out = tmp_path / "archive.beton"
    meta = write_imagefolder(archive, out, subdir="data/train", options=RAW)
    check_imagefolder_beton(out, arrays)
    assert meta["source"] == f"{archive}:data/train"
    assert files_in(tmp_path) == {"data", archive.name, "archive.beton", "archive.meta.json", "archive.labels.npy"}


def test_imagefolder_class_subset_and_wnid_names(tmp_path):
    rng = np.random.default_rng(4)
    wnids = {"n01443537": 2, "n01440764": 3, "n99999999": 1}  # goldfish, tench, and an unknown wnid
    arrays = make_imagefolder(tmp_path / "tree", wnids, rng, suffix=".JPEG")
    out = tmp_path / "wnid.beton"
    meta = write_imagefolder(tmp_path / "tree", out, classes=["n99999999", "n01443537"], options=RAW)
    assert meta["wnids"] == ["n01443537", "n99999999"]
    assert meta["class_names"] == ["goldfish", "n99999999"]
    assert meta["extra"]["imagenet1k_index"] == [1, None]
    assert meta["class_counts"] == [2, 1] and len(arrays["n01440764"]) == 3
    with pytest.raises(BetonError, match="no class folder.*n00000001"):
        write_imagefolder(tmp_path / "tree", tmp_path / "x.beton", classes=["n00000001"], options=RAW)


# ---------------------------------------------------------------- CIFAR pickles


def write_cifar_pickles(folder: Path, variant: str, rng) -> dict:
    """The authors' format: dicts with bytes keys, data N x 3072 uint8 in R, G, B planes."""
    folder.mkdir(parents=True)
    truth = {}
    if variant == "cifar10":
        layout = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        names_file, names_key, labels_key, num_classes = "batches.meta", b"label_names", b"labels", 10
    else:
        layout = {"train": ["train"], "test": ["test"]}
        names_file, names_key, labels_key, num_classes = "meta", b"fine_label_names", b"fine_labels", 100
    for split, batch_files in layout.items():
        images, labels = [], []
        for name in batch_files:
            hwc = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
            batch_labels = rng.integers(0, num_classes, 7).tolist()
            data = hwc.transpose(0, 3, 1, 2).reshape(7, 3072)
            (folder / name).write_bytes(pickle.dumps({b"data": data, labels_key: batch_labels, b"batch_label": b"x"}))
            images.append(hwc)
            labels += batch_labels
        truth[split] = (np.concatenate(images), np.array(labels))
    class_names = [f"class{i}".encode() for i in range(num_classes)]
    (folder / names_file).write_bytes(pickle.dumps({names_key: class_names}))
    truth["names"] = [n.decode() for n in class_names]
    return truth


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_pickles_from_folder_and_tarball(tmp_path, variant):
    truth = write_cifar_pickles(tmp_path / "cifar-batches-py", variant, np.random.default_rng(5))
    tarball = tmp_path / "cifar-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "cifar-batches-py", arcname="cifar-batches-py")
    for src, split in [(tmp_path / "cifar-batches-py", "train"), (tarball, "test")]:
        out = tmp_path / f"{split}.beton"
        meta = write_cifar(src, out, split=split, options=RAW)
        images, labels = truth[split]
        records = BetonRecords(out)
        np.testing.assert_array_equal(np.stack([records.image(i) for i in range(len(records))]), images)
        np.testing.assert_array_equal(read_labels(out), labels)
        assert meta["class_names"] == truth["names"] and meta["extra"]["dataset"] == variant


def test_cifar_bad_inputs(tmp_path):
    with pytest.raises(BetonError, match="no such file"):
        write_cifar(tmp_path / "absent", tmp_path / "x.beton", split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BetonError, match="no CIFAR-10"):
        write_cifar(tmp_path / "empty", tmp_path / "x.beton", split="test")
    truth_dir = tmp_path / "c10"
    write_cifar_pickles(truth_dir, "cifar10", np.random.default_rng(6))
    (truth_dir / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(BetonError, match="test_batch is not a CIFAR pickle"):
        write_cifar(truth_dir, tmp_path / "x.beton", split="test")
    assert not (tmp_path / "x.beton").exists()


# ---------------------------------------------------------------- bad inputs


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(BetonError, match=f"{tmp_path / 'nope'}: no such file or folder"):
        write_imagefolder(tmp_path / "nope", tmp_path / "x.beton")
    make_imagefolder(tmp_path / "tree", {"a": 2}, np.random.default_rng(7))
    (tmp_path / "tree" / "b").mkdir()
    with pytest.raises(BetonError, match=r"class folder b/ holds no images"):
        write_imagefolder(tmp_path / "tree", tmp_path / "x.beton")
    assert not (tmp_path / "x.beton").exists()


def test_unreadable_image_aborts_without_leaving_files(tmp_path):
    make_imagefolder(tmp_path / "tree", {"a": 3, "b": 3}, np.random.default_rng(8))
    (tmp_path / "tree" / "b" / "img001.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "out").mkdir()
    with pytest.raises(BetonError, match=r"(?s)1 example\(s\) could not be read.*b/img001.png: UnidentifiedImageError"):
        write_imagefolder(tmp_path / "tree", tmp_path / "out" / "x.beton", options=RAW)
    assert files_in(tmp_path / "out") == set()


def test_existing_output_is_kept_unless_overwrite(raw_arrays, tmp_path):
    images, labels, out, meta = raw_arrays
    target = tmp_path / "arr.beton"
    write_arrays(images[:10], labels[:10], target, class_names=[str(i) for i in range(7)], options=RAW)
    before = file_sha256(target)
    with pytest.raises(BetonError, match="already exists"):
        write_arrays(images, labels, target, options=RAW)
    assert file_sha256(target) == before
    write_arrays(images, labels, target, class_names=meta["class_names"], options=RAW, overwrite=True)
    assert read_sidecar(target)["num_examples"] == 300
    folder = tmp_path / "folder.beton"
    folder.mkdir()
    with pytest.raises(BetonError, match="folder.beton: is a directory"):  # refused before anything is written
        write_arrays(images, labels, folder, class_names=meta["class_names"], options=RAW, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "arr.beton",
        "arr.labels.npy",
        "arr.meta.json",
        "folder.beton",
    ]


def test_verify_catches_truncation_corruption_and_mismatch(raw_arrays, tmp_path):
    _, _, out, _ = raw_arrays

    def copy_beton(name):
        dst = tmp_path / f"{name}.beton"
        for src_file, dst_file in zip((out, *sidecar_paths(out)), (dst, *sidecar_paths(dst))):
            dst_file.write_bytes(src_file.read_bytes())
        return dst

    truncated = copy_beton("truncated")
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    with pytest.raises(BetonError, match=f"{truncated}: truncated"):
        verify_beton(truncated)

    corrupt = copy_beton("corrupt")
    blob = bytearray(corrupt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    with pytest.raises(BetonError, match="do not match the sha256"):
        verify_beton(corrupt)

    mismatch = copy_beton("mismatch")
    other = tmp_path / "other.beton"
    write_arrays(np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 0], other, options=RAW)
    sidecar_paths(mismatch)[0].write_text(sidecar_paths(other)[0].read_text())
    with pytest.raises(BetonError, match=f"{mismatch}: "):
        verify_beton(mismatch)

    relabelled = copy_beton("relabelled")
    labels = np.load(sidecar_paths(relabelled)[1])
    labels[3] = (labels[3] + 1) % 7
    np.save(sidecar_paths(relabelled)[1], labels)
    with pytest.raises(BetonError, match="labels.npy: does not match"):
        verify_beton(relabelled)

    lonely = copy_beton("lonely")
    sidecar_paths(lonely)[0].unlink()
    with pytest.raises(BetonError, match="sidecar missing"):
        verify_beton(lonely)


def test_verify_cli_exit_codes(raw_arrays, tmp_path, capsys):
    _, _, out, _ = raw_arrays
    assert cli_main(["verify", str(out)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"\0" * 100)
    assert cli_main(["verify", str(bad)]) == 2
    assert f"{tmp_path / 'bad.meta.json'}: sidecar missing" in capsys.readouterr().err


def test_cli_help_does_not_import_ffcv():
    code = (
        "import sys; from ffcv_transfer.cli import build_parser; build_parser().format_help(); "
        "import ffcv_transfer.writers; sys.exit('ffcv' in sys.modules or 'torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
