"""Real archives from the shared data folder (--data-dir or $FFCV_TRANSFER_DATA) through the ImageFolder
writer, read back with ffcv's Loader and checked against the archive itself."""

import io
import tarfile
from pathlib import PurePosixPath

import numpy as np
import pytest
from PIL import Image

from ffcv_transfer.store.betons import read_sidecar, verify_beton
from ffcv_transfer.writers.common import ImageOptions
from ffcv_transfer.writers.imagefolder import write_imagefolder

from .conftest import read_with_loader

RAW = ImageOptions(write_mode="raw", num_workers=2)


def archive_truth(archive, subdir, classes=None):
    """(class folder, decoded RGB image) of every image under subdir, in ImageFolder order, read with
    tarfile and PIL independently of the writer."""
    found = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if member.isfile() and path.parent.parent == PurePosixPath(subdir):
                if classes is None or path.parent.name in classes:
                    image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    found.append((path.parent.name, path.name, image))
    found.sort(key=lambda item: (item[0], item[1]))
    return [c for c, _, _ in found], np.stack([im for _, _, im in found])


def test_cifar10_test_split_from_archive(data_dir, tmp_path):
    archive = data_dir / "cifar10-jpg.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} absent")
    out = tmp_path / "cifar10_test.beton"
    meta = write_imagefolder(archive, out, subdir="cifar10/test", options=RAW)
    folders, images = archive_truth(archive, "cifar10/test")
    names = sorted(set(folders))
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert meta["num_examples"] == 10_000 and meta["class_counts"] == [1000] * 10
    assert meta["class_names"] == names and meta["wnids"] is None
    loaded_images, loaded_labels = read_with_loader(out, batch_size=500)
    np.testing.assert_array_equal(loaded_labels, [names.index(f) for f in folders])
    np.testing.assert_array_equal(loaded_images, images)
    verify_beton(out, progress=False)


def test_tiny_imagenet_class_subset_from_archive(data_dir, tmp_path):
    archive = data_dir / "tiny-imagenet-200-300pc-jpg.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} absent")
    with tarfile.open(archive, "r:gz") as tar:
        all_wnids = tar.extractfile("tiny-imagenet/wnids.txt").read().decode().split()
    assert len(all_wnids) == 200
    subset = sorted(all_wnids)[::40]  # 5 classes spread over the index range
    out = tmp_path / "tiny_subset.beton"
    meta = write_imagefolder(archive, out, subdir="tiny-imagenet/train", classes=subset, options=RAW)
    folders, images = archive_truth(archive, "tiny-imagenet/train", set(subset))
    assert meta["wnids"] == subset and meta["num_examples"] == len(folders) == 1500
    assert meta["class_counts"] == [300] * 5
    assert meta["extra"]["imagenet1k_index"] == sorted(meta["extra"]["imagenet1k_index"])
    assert meta["class_names"][0] != subset[0]  # an ImageNet short name, not the wnid
    loaded_images, loaded_labels = read_with_loader(out, batch_size=250)
    np.testing.assert_array_equal(loaded_labels, [subset.index(f) for f in folders])
    np.testing.assert_array_equal(loaded_images, images)
    assert read_sidecar(out)["resolution"]["height"] == {"min": 64, "max": 64, "mean": 64.0}


@pytest.mark.slow
def test_demo_on_tiny_imagenet_runs_end_to_end(data_dir, tmp_path):
    """`ffcv-transfer demo --data tiny-imagenet`, shrunk to seconds of training: real ImageNet classes
    (named from their wnids) -> CIFAR-10, through to the report."""
    from ffcv_transfer.experiments.demo import TinySize, format_findings, run_demo

    settings = {
        "masks.num_models": 8,
        "masks.design": "orthogonal",
        "source.epochs": 1,
        "source.lr_peak_epoch": 0.5,
        "source.batch_size": 32,
        "source.per_model_batch": 16,  # 40 examples per model: 2 steps an epoch
        "run.models_per_process": 8,
        "transfer.head_max_iter": 20,
    }
    findings = run_demo(
        tmp_path,
        data="tiny-imagenet",
        overrides=settings,
        counterfactual_seeds=0,
        data_dir=data_dir,
        tiny=TinySize(classes=4, per_class=20, target_per_class=20),
        progress=False,
    )
    source = read_sidecar(tmp_path / "data" / "tiny_train.beton")
    target = read_sidecar(tmp_path / "data" / "cifar10_test.beton")
    assert source["num_classes"] == 4 and source["num_examples"] == 80 and target["num_examples"] == 100
    assert findings["models"] == 8 and set(findings["ranking"]) == set(target["class_names"])
    named = {entry["source"] for entry in findings["ranking"]["cat"]}
    assert named == set(source["class_names"]) and not any(name.startswith("n0") for name in named)
    assert (tmp_path / "report.html").stat().st_size > 10_000 and "cat" in format_findings(findings)
    # the classes are chosen for the WordNet check: with 4, one each under bird, dog, cat and automobile (each
    # in half the models of the orthogonal design, so every influence is finite)
    assert set(findings["wordnet_agreement"]["scored"]) == {"bird", "dog", "cat", "automobile"}
    assert findings["reliability"]["num_models"] == 8 and "WordNet agreement" in format_findings(findings)
    page = (tmp_path / "report.html").read_text()
    assert "Agreement with WordNet" in page and "How far the rankings can be trusted" in page
