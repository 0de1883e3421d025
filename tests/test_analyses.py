"""Mask designs, counterfactual designs and their summaries, and class names: checked against hand-computed
cases and brute-force references (no training)."""

import gzip
import itertools

import numpy as np
import pytest

from ffcv_transfer.experiments.removals import balanced_draws, removal_design, without_class_design
from ffcv_transfer.findings.counterfactual import (
    KINDS,
    accuracy_by_arm,
    accuracy_by_removal,
    changes_against_all,
    correct_by_removal,
    format_gain,
    paired_gain,
)
from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.findings.names import display_names, read_names_file
from ffcv_transfer.findings.plots import accuracy_versus_removed
from ffcv_transfer.findings.rankings import influence_by_target_class, rank_sources, ranking_stderr, top_and_bottom
from ffcv_transfer.store.experiment import create_store
from ffcv_transfer.store.masks import orthogonal_class_masks

from .conftest import row_values


@pytest.mark.parametrize("models,classes", [(16, 7), (16, 8), (32, 20), (64, 63)])
def test_orthogonal_masks_balance_every_class_and_pair(models, classes):
    signs = orthogonal_class_masks(models, classes, seed=models).astype(float) * 2 - 1
    np.testing.assert_array_equal(signs.sum(0), 0)  # each class in exactly half the models
    np.testing.assert_array_equal(signs.T @ signs, models * np.eye(classes))  # every pair balanced
    if classes <= models // 2:  # resolution IV: no main effect aliased with a two-class interaction
        worst = max(
            abs((signs[:, i] * signs[:, j]) @ signs[:, k])
            for i, j in itertools.combinations(range(classes), 2)
            for k in range(classes)
        )
        assert worst == 0
    assert len({row.tobytes() for row in signs}) == models  # no model trained twice
    sizes = (signs > 0).sum(1)
    assert 0 < sizes.min() and sizes.max() < classes  # no model on no class, none on all of them


def test_orthogonal_design_removes_the_other_classes_from_each_estimate():
    """Outputs additive in the classes: included-minus-excluded means give each effect exactly."""
    masks = orthogonal_class_masks(16, 9, seed=3)
    effects = np.random.default_rng(0).normal(size=9)
    outputs = masks @ effects
    estimate = [outputs[masks[:, c]].mean() - outputs[~masks[:, c]].mean() for c in range(9)]
    np.testing.assert_allclose(estimate, effects, atol=1e-12)


def test_orthogonal_design_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="power of two"):
        orthogonal_class_masks(24, 5, seed=0)
    with pytest.raises(ValueError, match="at most 15 classes"):
        orthogonal_class_masks(16, 16, seed=0)


def test_removal_design_removes_the_chosen_classes():
    scores = np.array([0.3, -2.0, 1.5, -0.5, 0.0, 2.5])
    masks, removals = removal_design(scores, [1, 2], seeds=2)
    assert len(masks) == len(removals) == 2 * (1 + 3 * 2)
    removed = {tuple(r): set(np.flatnonzero(~m).tolist()) for m, r in zip(masks, removals)}
    for seed in range(2):
        assert removed[(0, 0, seed)] == set()
        assert removed[(KINDS.index("most_negative"), 1, seed)] == {1}
        assert removed[(KINDS.index("most_negative"), 2, seed)] == {1, 3}
        assert removed[(KINDS.index("most_positive"), 2, seed)] == {5, 2}
        assert len(removed[(KINDS.index("random"), 2, seed)]) == 2
    masks, removals = removal_design(scores, [1], seeds=2, kinds=["random"], chosen=[4, 0])
    assert [tuple(r) for r in removals] == [
        (0, 0, 0),
        (KINDS.index("random"), 1, 0),
        (KINDS.index("chosen"), 2, 0),
        (0, 0, 1),
        (KINDS.index("random"), 1, 1),
        (KINDS.index("chosen"), 2, 1),
    ]
    assert np.flatnonzero(~masks[2]).tolist() == np.flatnonzero(~masks[5]).tolist() == [0, 4]
    lean, lean_removals = removal_design(scores, [1], seeds=2, kinds=["random"], chosen=[4, 0], baseline=False)
    np.testing.assert_array_equal(lean, masks[removals[:, 0] != 0])  # the same rows, less the all-classes ones
    np.testing.assert_array_equal(lean_removals, removals[removals[:, 0] != 0])
    with pytest.raises(ValueError, match="1..5"):
        removal_design(scores, [6], seeds=1)
    with pytest.raises(ValueError, match="unknown removal kinds"):
        removal_design(scores, [1], seeds=1, kinds=["worst"])


def test_random_removals_are_dealt_evenly_over_the_seeds():
    for classes, k, draws in ((7, 1, 14), (7, 3, 10), (5, 4, 9), (6, 5, 40)):
        dealt = balanced_draws(classes, k, draws, np.random.default_rng(3))
        assert dealt.shape == (draws, k) and all(len(set(hand)) == k for hand in dealt.tolist())
        counts = np.bincount(dealt.ravel(), minlength=classes)
        assert counts.max() - counts.min() <= 1, (classes, k, counts)
        np.testing.assert_array_equal(balanced_draws(classes, k, 3, np.random.default_rng(3)), dealt[:3])
    first_cycle = balanced_draws(7, 1, 7, np.random.default_rng(0))[:, 0]
    assert sorted(first_cycle.tolist()) == list(range(7)) and first_cycle.tolist() != list(range(7))
    masks, removals = removal_design(np.zeros(7), [1], seeds=14, kinds=["random"])
    random_rows = removals[:, 0] == KINDS.index("random")
    assert (np.bincount(np.nonzero(~masks[random_rows])[1], minlength=7) == 2).all()  # each class twice


def test_accuracy_by_removal_groups_the_completed_rows(tmp_path):
    masks, removals = removal_design(np.arange(5.0), [1, 3], seeds=2, kinds=["most_negative", "random"])
    store = create_store(tmp_path / "cf", masks, 4, extra_fixed={"removal": removals})
    accuracy = np.arange(len(masks), dtype=np.float32) / 100
    writer = store.writer()
    done = [r for r in range(len(masks)) if r != 3]  # one row unfinished: left out
    writer.write_many(done, **row_values(store, len(done), target_acc=accuracy[done]))
    arms = accuracy_by_arm(store)
    baseline, curves = accuracy_by_removal(arms)
    expected = {}
    for row in done:
        kind, k, _ = removals[row]
        expected.setdefault((KINDS[kind], int(k)), []).append(float(accuracy[row]))
    assert sorted(baseline) == sorted(expected.pop(("none", 0)))
    assert {(kind, k): sorted(v) for kind, by_k in curves.items() for k, v in by_k.items()} == {
        key: sorted(v) for key, v in expected.items()
    }
    # rows per seed: none, most_negative 1 and 3, random 1 and 3; row 3 (random 1, seed 0) is unfinished
    gain = paired_gain(arms, ("random", 1), ("none", 0))
    assert gain["per_seed"] == {1: pytest.approx(accuracy[8] - accuracy[5])} and gain["stderr"] is None
    gain = paired_gain(arms, ("most_negative", 1), ("random", 3))
    assert gain["per_seed"] == pytest.approx({0: accuracy[1] - accuracy[4], 1: accuracy[6] - accuracy[9]})
    assert gain["mean"] == pytest.approx(-0.03) and gain["stderr"] == pytest.approx(0, abs=1e-7)
    assert paired_gain(arms, ("chosen", 1), ("none", 0)) == {"per_seed": {}, "mean": None, "stderr": None}
    assert format_gain(gain) == "-0.0300 ± 0.0000 (2 seeds)"
    assert format_gain(paired_gain(arms, ("random", 1), ("none", 0))) == "+0.0300 (1 seed)"
    assert format_gain(paired_gain(arms, ("chosen", 1), ("none", 0))) == ""
    changes = changes_against_all(arms)
    assert {kind: sorted(by_k) for kind, by_k in changes.items()} == {"most_negative": [1, 3], "random": [1, 3]}
    assert changes["most_negative"][3]["per_seed"] == pytest.approx(
        {0: accuracy[2] - accuracy[0], 1: accuracy[7] - accuracy[5]}
    )
    assert changes["random"][1]["per_seed"] == pytest.approx({1: accuracy[8] - accuracy[5]})
    plot = accuracy_versus_removed(tmp_path / "cf.png", curves, baseline, "counterfactuals", changes)
    assert plot.stat().st_size > 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_correct_by_removal_compares_models_with_and_without_the_class(tmp_path):
    masks, removals = without_class_design(5, 2, repeats=3)
    assert masks[:3].all() and (masks[3:].sum(1) == 4).all() and not masks[3:, 2].any()
    store = create_store(tmp_path / "check", masks, 2, extra_fixed={"removal": removals})
    correct = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [0, 1], [1, 1]], bool)  # example 0: 2/3 with, 1/3 without
    store.writer().write_many(range(6), **row_values(store, 6, is_correct=correct))
    assert correct_by_removal(store, 0) == {"with": 2 / 3, "without": 1 / 3, "models": 6}
    assert correct_by_removal(store, 1) == {"with": 1 / 3, "without": 1.0, "models": 6}


def test_display_names_prefer_the_users_file_then_wordnet(tmp_path, monkeypatch):
    meta = tmp_path / "imagenet-meta"
    meta.mkdir()
    with gzip.open(meta / "wordnet30_words.txt.gz", "wt") as f:
        f.write("n00000001\tthing one, first thing\nn00000002\tthing two\n")
    monkeypatch.setenv("FFCV_TRANSFER_DATA", str(tmp_path))
    names = ["goldfish", "n00000001", "n00000002", "cat"]
    assert display_names(names, ["n01443537", "n00000001", "n00000002", None]) == [
        "goldfish",
        "thing one",
        "thing two",
        "cat",
    ]
    user = tmp_path / "names.tsv"
    user.write_text("# my names\ncat\tkitty\nn00000002\tsecond\n")
    assert display_names(names, names_file=user) == ["goldfish", "thing one", "second", "kitty"]
    user.write_text("cat kitty\n")
    with pytest.raises(ValueError, match=r"names.tsv:1: expected KEY<TAB>NAME"):
        read_names_file(user)


def test_ranking_stderr_against_group_statistics():
    """Each (source class, target class) error is the two-group standard error of the models' mean margin
    over that target class's examples, computed here by hand in float64; the last column is the same over
    all examples. Those means' influences are the class means of the per-example influences."""
    rng = np.random.default_rng(5)
    masks = rng.random((24, 6)) < 0.5
    labels = rng.integers(0, 3, 40)
    margins = rng.normal(size=(24, 40)) + masks[:, [0]] * (labels == 1)  # class 0 helps target class 1
    stderr = ranking_stderr(masks, margins.astype(np.float32), labels, 3)
    assert stderr.shape == (6, 4)
    columns = [labels == t for t in range(3)] + [np.ones(40, bool)]
    for c in range(6):
        for k, members in enumerate(columns):
            means = margins[:, members].mean(1)
            inside, outside = means[masks[:, c]], means[~masks[:, c]]
            expected = np.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
            assert stderr[c, k] == pytest.approx(expected, rel=1e-4)
    per_example = class_influence(masks, margins)
    means = np.column_stack([margins[:, m].mean(1) for m in columns])
    np.testing.assert_allclose(
        class_influence(masks, means)[:, :3], influence_by_target_class(per_example, labels, 3), rtol=1e-4, atol=1e-5
    )
    ranked = rank_sources(
        influence_by_target_class(per_example, labels, 3), list("abcdef"), ["x", "y", "z"], stderr[:, :3]
    )
    assert ranked["y"][0]["source"] == "a" and ranked["y"][0]["stderr"] == pytest.approx(float(stderr[0, 1]))
    best = top_and_bottom(per_example.mean(1), list("abcdef"), 2, stderr[:, 3])
    assert all(
        entry["stderr"] == pytest.approx(float(stderr[entry["index"], 3]))
        for entries in best.values()
        for entry in entries
    )
    assert "stderr" not in top_and_bottom(per_example.mean(1), list("abcdef"), 2)["positive"][0]
