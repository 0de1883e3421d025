"""Planted synthetic data: deterministic, ground truth consistent, and the planted features present
but invisible to a linear model on raw pixels."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from ffcv_transfer.store.betons import BetonError, BetonRecords, read_sidecar, verify_beton
from ffcv_transfer.writers.common import ImageOptions
from ffcv_transfer.writers.synthetic import SPLITS, PlantedSpec, make_planted, motif_overlap, write_synthetic

SMALL = PlantedSpec(
    num_targets=4,
    num_unrelated=5,
    num_misleading=1,
    source_train_per_class=40,
    source_val_per_class=10,
    target_train_per_class=150,
    target_test_per_class=100,
)


@pytest.fixture(scope="module")
def planted():
    return make_planted(SMALL, seed=3)


def motif_scores(images, motifs):
    """Best match of each motif anywhere in each image: the oracle a trained detector approximates."""
    grey = images.astype(np.float64).sum(-1)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    windows = sliding_window_view(grey, motifs.shape[1:], axis=(1, 2))  # n, y, x, m, m
    return np.einsum("nyxij,kij->nkyx", windows, motifs).max(axis=(2, 3))


def test_seeded_and_deterministic():
    a, b, c = make_planted(SMALL, 3), make_planted(SMALL, 3), make_planted(SMALL, 4)
    for split in SPLITS:
        np.testing.assert_array_equal(a[split][0], b[split][0])
        assert not np.array_equal(a[split][0], c[split][0])
    assert a["design"] == b["design"]


def test_ground_truth_is_consistent(planted):
    design, T = planted["design"], SMALL.num_targets
    signs = np.array(design["expected_sign"])
    assert signs.shape == (SMALL.num_sources, T)
    for t in range(T):
        twin = design["twin"][str(t)]
        assert design["source_motif"][twin] == t and signs[twin, t] == 1
        assert design["source_names"][twin] == f"twin-of-target{t}"
    (mis,) = design["misleading"]
    assert signs[mis["source"], mis["target"]] == signs[mis["source"], mis["conflict_target"]] == -1
    assert (signs[design["unrelated"]] == 0).all() and (signs == 1).sum() == T
    labels = planted["source_train"][1]
    assert np.bincount(labels).tolist() == [SMALL.source_train_per_class] * SMALL.num_sources


def test_motifs_are_balanced_symmetric_and_distinct(planted):
    motifs = planted["motifs"]
    assert (motifs.sum(axis=(1, 2)) == 0).all() and (np.abs(motifs) == 1).all()
    np.testing.assert_array_equal(motifs, motifs[:, :, ::-1])  # flips keep every feature
    assert len({m.tobytes() for m in motifs}) == len(motifs)


def test_raw_pixels_do_not_separate_targets_but_the_planted_motif_does(planted):
    (train_x, train_y), (test_x, test_y) = planted["target_train"], planted["target_test"]
    T = SMALL.num_targets

    # the best ridge classifier on raw pixels (regularisation chosen on the test split itself) is near chance
    def pixels(x):
        return x.reshape(len(x), -1).astype(np.float64) / 255

    a, b = pixels(train_x), pixels(test_x)
    mean = a.mean(0)
    a, b = a - mean, b - mean
    onehot = np.eye(T)[train_y]
    best = max(
        ((b @ np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ onehot)).argmax(1) == test_y).mean()
        for lam in (1.0, 100.0, 10_000.0)
    )
    assert best < 1 / T + 0.1

    # matching the class motifs recovers the label almost always
    scores = motif_scores(test_x, planted["motifs"][:T])
    assert (scores.argmax(1) == test_y).mean() > 0.95


def test_motif_overlap_is_the_best_correlation_over_shifts(planted):
    checker = np.array([[1.0, -1.0], [-1.0, 1.0]])
    assert motif_overlap(checker, checker) == 1.0
    assert motif_overlap(checker, -checker) == 0.5  # shifted by one pixel, one column of two matches
    motifs = planted["motifs"]
    assert all(motif_overlap(m, m) == 1.0 for m in motifs)
    assert motif_overlap(motifs[0], motifs[1]) == pytest.approx(motif_overlap(motifs[1], motifs[0]))
    assert max(motif_overlap(motifs[0], m) for m in motifs[1:]) < 1.0


def test_misleading_cue_holds_on_train_and_conflicts_on_test(planted):
    (mis,) = planted["design"]["misleading"]
    T, U = SMALL.num_targets, SMALL.num_unrelated
    cue = planted["motifs"][T + U : T + U + 1]
    threshold = 0.5 * motif_scores(planted["target_train"][0][:50], cue).max()
    for split, carriers in (("target_train", mis["target"]), ("target_test", mis["conflict_target"])):
        images, labels = planted[split]
        has_cue = motif_scores(images, cue)[:, 0] > threshold
        assert has_cue[labels == carriers].mean() > 0.95
        assert has_cue[labels != carriers].mean() < 0.05


@pytest.mark.parametrize("conflict", ["none", "background"])
def test_background_class_and_where_the_cue_conflicts(conflict):
    spec = PlantedSpec(
        num_targets=3,
        num_unrelated=2,
        num_misleading=1,
        source_train_per_class=10,
        source_val_per_class=5,
        target_train_per_class=60,
        target_test_per_class=60,
        background_class=True,
        misleading_conflict=conflict,
    )
    planted = make_planted(spec, seed=5)
    design, T = planted["design"], spec.num_targets
    assert design["target_names"][-1] == "background" and np.array(design["expected_sign"]).shape == (6, T + 1)
    (mis,) = design["misleading"]
    carrier = {"none": None, "background": T}[conflict]
    assert mis["conflict_target"] == carrier
    assert np.array(design["expected_sign"])[mis["source"]].tolist() == [-1, 0, 0, -(carrier == T)]
    class_motifs, cue = planted["motifs"][:T], planted["motifs"][T + 2 : T + 3]
    train_x, test_x, test_y = planted["target_train"][0], *planted["target_test"]
    threshold = 0.5 * motif_scores(train_x[:50], cue).max()
    # the cue (found by template matching, which a pasted motif overlapping it can spoil) on target 0's
    # training images only, and on the test images of the carriers only (none, or the background's)
    for (images, labels), carriers in ((planted["target_train"], 0), (planted["target_test"], carrier)):
        has_cue = motif_scores(images, cue)[:, 0] > threshold
        assert carriers is None or has_cue[labels == carriers].mean() > 0.95
        assert has_cue[labels != carriers].mean() < 0.05
    best = motif_scores(test_x, class_motifs).max(1)
    assert best[test_y == T].max() < best[test_y < T].min()  # background images carry no class motif
    assert np.bincount(test_y).tolist() == [60] * (T + 1)


def test_source_background_class_carries_no_class_motif():
    spec = PlantedSpec(
        num_targets=3,
        num_unrelated=0,
        num_misleading=1,
        source_train_per_class=40,
        source_val_per_class=5,
        target_train_per_class=5,
        target_test_per_class=5,
        source_background=True,
    )
    planted = make_planted(spec, seed=2)
    design, T = planted["design"], spec.num_targets
    assert spec.num_sources == T + 2 and sorted(design["source_names"]) == sorted(
        ["background", "misleading-for-target0"] + [f"twin-of-target{t}" for t in range(T)]
    )
    background = design["source_names"].index("background")
    assert design["source_motif"][background] == -1 and design["unrelated"] == []
    assert not np.array(design["expected_sign"])[background].any()
    images, labels = planted["source_train"]
    assert np.bincount(labels).tolist() == [40] * spec.num_sources
    scores = motif_scores(images, planted["motifs"][: T + 1])  # every class motif: the twins' and the cue
    best = scores.max(1)
    assert best[labels == background].max() < best[labels != background].min()
    own = np.asarray(design["source_motif"])[labels]
    assert (scores.argmax(1) == own)[labels != background].mean() > 0.95


def test_cue_decoys_put_the_cues_sibling_on_every_image_without_the_cue():
    spec = PlantedSpec(
        num_targets=3,
        num_unrelated=2,
        num_misleading=1,
        source_train_per_class=10,
        source_val_per_class=5,
        target_train_per_class=60,
        target_test_per_class=60,
        background_class=True,
        misleading_conflict="background",
        sibling_flips=4,
        cue_decoys=True,
    )
    planted = make_planted(spec, seed=5)
    T = spec.num_targets
    cue, decoy = planted["motifs"][T + 2 : T + 3], planted["motifs"][-1:]
    assert (cue != decoy).sum() == 4 * spec.sibling_flips  # a near-copy: 2 x flips pixels swapped, mirrored
    for (images, labels), carriers in ((planted["target_train"], 0), (planted["target_test"], T)):
        scores = motif_scores(images, np.concatenate([cue, decoy]))
        cue_wins = scores[:, 0] > scores[:, 1]  # a random distractor can be the decoy too: not always
        assert cue_wins[labels == carriers].mean() > 0.85 and cue_wins[labels != carriers].mean() < 0.02


def test_write_synthetic_betons_carry_the_ground_truth(tmp_path, planted):
    paths = write_synthetic(tmp_path, seed=3, spec=SMALL, options=ImageOptions(write_mode="raw", num_workers=2))
    assert set(paths) == set(SPLITS)
    for split, beton in paths.items():
        meta = read_sidecar(beton)
        assert meta["extra"]["planted"]["twin"] == planted["design"]["twin"]
        assert meta["extra"]["planted"]["seed"] == 3 and meta["extra"]["split"] == split
        verify_beton(beton, progress=False)
    records = BetonRecords(paths["target_test"])
    np.testing.assert_array_equal(records.image(17), planted["target_test"][0][17])
    assert read_sidecar(paths["source_train"])["class_names"] == planted["design"]["source_names"]


def test_pixel_scale_draws_smooth_images_that_resampling_barely_changes(planted):
    """pixel_scale 2: everything drawn at half resolution and upsampled, so the motifs are 2 px cells and
    a copy downsampled to 3/4 and back stays far closer to its image than at pixel_scale 1."""
    from dataclasses import replace

    from ffcv_transfer.writers.synthetic import copy_image

    smooth = make_planted(replace(SMALL, pixel_scale=2), seed=3)
    assert smooth["motifs"].shape[1:] == (4, 4)
    images, labels = smooth["target_test"]
    enlarged = np.kron(smooth["motifs"][: SMALL.num_targets], np.ones((2, 2)))
    assert (motif_scores(images, enlarged).argmax(1) == labels).mean() > 0.95

    def resampling_change(images):
        rng = np.random.default_rng(0)
        return np.mean([np.abs(copy_image(x, "downsampled", rng, 0.75).astype(float) - x).mean() for x in images])

    assert resampling_change(images[:100]) < 0.5 * resampling_change(planted["target_test"][0][:100])


def test_bad_spec_is_rejected():
    with pytest.raises(BetonError, match="resolution 28"):
        PlantedSpec(resolution=28)
    with pytest.raises(BetonError, match="need more distinct motifs"):
        PlantedSpec(resolution=16, num_unrelated=70)
    with pytest.raises(BetonError, match="misleading_conflict 'sideways' must be one of next, background, none"):
        PlantedSpec(misleading_conflict="sideways")
    with pytest.raises(BetonError, match="'background' needs background_class"):
        PlantedSpec(misleading_conflict="background")
    with pytest.raises(BetonError, match="cue_decoys needs sibling_flips > 0"):
        PlantedSpec(cue_decoys=True)
    for resolution, scale in ((24, 2), (32, 4), (32, 0)):
        with pytest.raises(BetonError, match=f"pixel_scale {scale}: resolution / pixel_scale"):
            PlantedSpec(resolution=resolution, pixel_scale=scale)
    with pytest.raises(BetonError, match=">= 0 unrelated"):
        PlantedSpec(num_unrelated=-1)
    with pytest.raises(BetonError, match="num_misleading 6"):
        PlantedSpec(num_targets=5, num_misleading=6)
