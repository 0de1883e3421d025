"""Reliability statistics and the WordNet check, against simulations whose truth is known.

Simulated models: random 50% class masks (masks.random_class_masks, as the engine draws them); a model's
output on target example j is the sum of the true effects truth[c, j] of the classes it includes plus
Gaussian noise. Influence rankings from N models then carry noise of variance ~1/N, from the noise and
from the other classes' random inclusion, as real ones do."""

import json
import tarfile

import numpy as np
import pytest
from scipy.stats import binom, f, mannwhitneyu, norm, spearmanr

from ffcv_transfer.findings.evidence import Evidence, planted_evidence
from ffcv_transfer.findings.kernel import class_influence
from ffcv_transfer.findings.rankings import influence_by_target_class, ranking_means, ranking_stderr
from ffcv_transfer.findings.reliability import (
    Reliability,
    assess,
    benjamini_hochberg,
    f_sf,
    joint_signal,
    models_needed,
    seeds_to_resolve,
    significance,
    spearman_brown,
    split_half,
)
from ffcv_transfer.findings.wordnet import (
    CIFAR10_CONCEPTS,
    Hierarchy,
    concept_members,
    load_hierarchy,
    wordnet_agreement,
)
from ffcv_transfer.store.masks import random_class_masks

PER_CLASS = 20  # test examples per target class


class World:
    """A source->target pair with known class effects: truth (C, T) = a per-(source, target class) effect,
    scaled per target class, plus a small per-example deviation."""

    def __init__(self, num_sources: int, scales: np.ndarray, noise: float, seed: int, deviation: float = 0.3):
        rng = np.random.default_rng(seed)
        self.num_classes, self.noise = len(scales), noise
        self.labels = np.repeat(np.arange(self.num_classes), PER_CLASS)
        self.effects = rng.standard_normal((num_sources, self.num_classes)) * scales
        self.truth = self.effects[:, self.labels] + deviation * rng.standard_normal((num_sources, len(self.labels)))

    def models(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        masks = random_class_masks(n, len(self.truth), 0.5, seed=int(rng.integers(2**31)))
        return masks, masks @ self.truth + self.noise * rng.standard_normal((n, len(self.labels)))

    def by_class(self, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """(C, K + 1) float64: the per-class influence vectors, then the overall one."""
        influence = class_influence(masks, outputs).astype(np.float64)
        return np.column_stack([influence_by_target_class(influence, self.labels, self.num_classes), influence.mean(1)])

    def replicate_correlation(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(K + 1,): the Spearman correlation (scipy's) between two independent n-model replicates: the
        reliability that split-half reliability estimates."""
        first, second = self.by_class(*self.models(n, rng)), self.by_class(*self.models(n, rng))
        return np.array([spearmanr(first[:, k], second[:, k])[0] for k in range(first.shape[1])])


# 50 source classes, 5 target classes whose signal-to-noise ratios span reliabilities ~0.2 to ~0.6 at 100 models
CALIBRATION = dict(num_sources=50, scales=np.array([0.3, 0.5, 0.8, 1.2, 2.0]), noise=10.0, seed=1)


def test_split_half_predicts_the_replicate_correlation_and_the_models_needed():
    world, rng, n, reps = World(**CALIBRATION), np.random.default_rng(7), 100, 30
    predicted = np.array(
        [
            split_half(*world.models(n, rng), world.labels, world.num_classes, splits=20, seed=r).full
            for r in range(reps)
        ]
    )
    measured = np.array([world.replicate_correlation(n, rng) for _ in range(reps)])
    gap = predicted.mean(0) - measured.mean(0)
    print(
        f"\nN={n}: predicted {predicted.mean(0).round(3)} (single-run sd {predicted.std(0).round(3)}), "
        f"measured {measured.mean(0).round(3)}, gap max {np.abs(gap).max():.3f} mean {gap.mean():.3f}"
    )
    assert 0.15 < measured.mean(0).min() and measured.mean(0).max() < 0.7  # the range the check is meant for
    assert np.abs(gap).max() < 0.08 and abs(gap.mean()) < 0.04

    goal = 0.8
    needed = [models_needed(rho, n, goal) for rho in predicted.mean(0)]
    reached = np.array(
        [np.mean([world.replicate_correlation(need, rng)[k] for _ in range(12)]) for k, need in enumerate(needed)]
    )
    print(f"models for {goal}: {needed}, measured there: {reached.round(3)}")
    assert all(need > 2 * n for need in needed)  # far beyond the models at hand: a real extrapolation
    assert np.abs(reached - goal).max() < 0.07 and abs(reached.mean() - goal) < 0.03


def test_models_needed_and_spearman_brown_by_hand():
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(spearman_brown(0.3, 2), 0.5) == pytest.approx(0.3)
    assert models_needed(0.5, 100, 0.8) == 400  # 100 * 0.8 * 0.5 / (0.5 * 0.2)
    assert models_needed(0.5, 100, 0.9) == 900
    assert models_needed(0.9, 100, 0.8) == 45  # 44.4...: fewer than at hand
    assert models_needed(0.0, 100, 0.8) is None and models_needed(-0.2, 100, 0.8) is None
    assert models_needed(float("nan"), 100, 0.8) is None


def test_significance_and_benjamini_hochberg_by_hand():
    tests = significance(np.array([[2.0], [0.0], [-4.0], [np.nan]]), np.ones((4, 1)), q=0.05)
    expected_p = 2 * norm.sf([2.0, 0.0, 4.0])
    np.testing.assert_allclose(tests.p[:3, 0], expected_p, rtol=1e-12)
    # three tests (the NaN is none): sorted p * 3 / rank, then running minimum from the largest
    np.testing.assert_allclose(tests.q[:3, 0], [expected_p[0] * 3 / 2, 1.0, expected_p[2] * 3], rtol=1e-12)
    assert np.isnan(tests.q[3, 0]) and tests.significant[:, 0].tolist() == [False, False, True, False]
    assert tests.counts.tolist() == [1]
    # the running minimum: a larger p-value's bound can lower a smaller one's
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.01, 0.02, 0.03, 0.5])), [0.04, 0.04, 0.04, 0.5])


def test_benjamini_hochberg_controls_the_false_discovery_rate():
    """20 of 100 source classes matter to each of 4 target classes (effects +-2, balanced, so that the other
    classes' random inclusion leaves the 80 nulls exactly null), 200 models, 40 simulations."""
    rng, num_sources, q = np.random.default_rng(3), 100, 0.05
    labels = np.repeat(np.arange(4), PER_CLASS)
    rates, raw_rates, power, null_p = [], [], [], []
    for _ in range(40):
        effects = np.zeros((num_sources, 4))
        for k in range(4):
            effects[rng.choice(num_sources, 20, replace=False), k] = np.repeat([2.0, -2.0], 10)
        masks = random_class_masks(200, num_sources, 0.5, seed=int(rng.integers(2**31)))
        outputs = masks @ effects[:, labels] + 10 * rng.standard_normal((200, len(labels)))
        by_class = influence_by_target_class(class_influence(masks, outputs).astype(np.float64), labels, 4)
        tests = significance(by_class, ranking_stderr(masks, outputs, labels, 4)[:, :4], q)
        real = effects != 0
        for found in (tests.significant, tests.p <= q):
            false = (found & ~real).sum(0) / np.maximum(found.sum(0), 1)
            (rates if found is tests.significant else raw_rates).extend(false)
        power.extend((tests.significant & real).sum(0) / 20)
        null_p.append(tests.p[~real])
    fdr, raw_fdr, power = np.mean(rates), np.mean(raw_rates), np.mean(power)
    null_below = np.mean(np.concatenate(null_p) <= q)
    print(
        f"\nFDR {fdr:.3f} (BH at q {q}; uncorrected p <= {q}: {raw_fdr:.3f}), power {power:.2f}, "
        f"null p <= {q}: {null_below:.4f}"
    )
    assert 0.04 <= null_below <= 0.06  # the z-test's p-values are calibrated (12,800 null p-values)
    assert fdr <= q + 0.02
    assert raw_fdr > 2 * q and power > 0.3  # without the correction it fails, and the test has power


def test_banner_until_enough_models():
    rng = np.random.default_rng(5)
    names = ["a", "b", "c"]
    null = World(30, np.zeros(3), noise=1.0, seed=2, deviation=0.0)
    summary = assess(*null.models(40, rng), null.labels, names)
    # every ranking without a (false) discovery is flagged; BH allows about one in 20 such nulls one
    assert summary.banner() is not None and len(summary.flagged()) >= 3
    assert summary.flagged() == [k for k in range(4) if not summary.significant[k]]
    assert summary.to_json()["reliable"] is False and sum(map(len, summary.significant)) <= 1  # BH: FWER q

    strong = World(20, np.ones(3), noise=1.0, seed=2)
    few = assess(*strong.models(12, rng), strong.labels, names)
    needed = [n for n, rho in zip(few.models_needed[0.8], few.reliability) if rho < 0.5]
    # rho(12) ~ 1 / (1 + 20 / 12) from the other classes' inclusion alone: about 80 models for 0.8
    assert needed and all(40 < n < 200 for n in needed)
    many = assess(*strong.models(800, rng), strong.labels, names)
    assert many.banner() is None and min(many.reliability) > 0.9
    report = json.loads(json.dumps(many.to_json()))
    assert report["reliable"] and report["banner"] is None
    assert all(
        column["significant"] > 0 and column["models_needed"]["0.8"] < 800 for column in report["columns"].values()
    )
    assert list(report["columns"]) == names + ["overall"]


def test_banner_text_by_hand():
    summary = Reliability(
        columns=("cat", "dog", "ship", "overall"),
        num_models=100,
        half_models=50,
        splits=20,
        split_half=(-0.05, 0.18, 0.9, 0.82),
        reliability=(-0.1, 0.3, 0.95, 0.9),
        significant=((), (4,), (), (1, 2)),
        models_needed={0.8: (None, 934, 22, 45), 0.9: (None, 2100, 48, 100)},
    )
    # dog: an irreproducible order, but a significant class; ship: nothing significant, but a reproducible order
    assert summary.flagged() == [0]
    assert summary.banner() == (
        "No signal shown yet: with 100 models these rankings neither reproduce between halves of the models "
        "(split-half reliability below 0.5) nor name a source class significant at BH q <= 0.05: cat -0.10, 0 "
        "significant, its order not reproducible yet, and no test shows the influences differ from noise. Train "
        "more models and check again before reading those rankings."
    )
    # the same rankings beside a WordNet check at p = 0.0008 (or a joint test at p <= 0.01): signal, not "none"
    wordnet = Evidence("WordNet agreement", 0.0008, "mean AUC 0.730")
    verdict = summary.verdict([wordnet, Evidence("planted twins", 0.2, "1 of 4 planted twins on top")])
    assert verdict.level == "signal" and "No signal" not in verdict.text
    assert verdict.text.startswith(
        "The influences carry signal (WordNet agreement: mean AUC 0.730, p = 0.0008), but with 100 models"
    )
    assert summary.to_json([wordnet])["banner"] == verdict.text
    joint = Reliability(**{**summary.__dict__, "joint_p": (0.5, 0.002, 0.5, 0.5)})
    assert joint.verdict().level == "signal"
    assert "joint test of every class on the dog ranking: p = 0.008, Bonferroni over 4 rankings" in joint.banner()
    assert Reliability(**{**summary.__dict__, "joint_p": (0.5, 0.003, 0.5, 0.5)}).verdict().level == "no signal"
    columns = summary.to_json()["columns"]
    assert columns["cat"]["models_needed"] == {"0.8": None, "0.9": None} and columns["overall"]["reliable"]


def test_seeds_to_resolve_by_hand():
    differences = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sample variance 2.5
    assert seeds_to_resolve(differences) == 2  # 4 * 2.5 / 9 = 1.1, and a standard error needs two
    assert seeds_to_resolve(differences, effect=1.0) == 10  # 4 * 2.5 / 1, exactly
    assert seeds_to_resolve(differences, effect=-0.5, z=3.0) == 90
    # the demo's "-0.0143 +- 0.0274 (7 seeds)", taking 0.0274 as the per-seed sd: 4 * 0.0274^2 / 0.0143^2 = 14.7
    spread = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    demo = -0.0143 + 0.0274 * spread / spread.std(ddof=1)
    assert seeds_to_resolve(demo) == 15
    with pytest.raises(ValueError):
        seeds_to_resolve([0.1])
    with pytest.raises(ValueError):
        seeds_to_resolve(differences, effect=0.0)


def planted_hierarchy(members: np.ndarray) -> tuple[Hierarchy, list[str], dict[str, tuple[str, ...]]]:
    """Sources s0.. under concept k<j> when members[s, j]; target t<j> named by concept k<j>."""
    sources = [f"s{c}" for c in range(len(members))]
    concepts = {f"t{j}": (f"k{j}",) for j in range(members.shape[1])}
    names = {name: name for name in sources + [f"k{j}" for j in range(members.shape[1])]}
    parents = {sources[c]: tuple(f"k{j}" for j in np.flatnonzero(members[c])) for c in range(len(members))}
    return Hierarchy(names, parents), sources, concepts


def test_auc_by_hand_and_as_mann_whitney():
    members = np.array([[1], [0], [0], [1], [0]], bool)
    hierarchy, sources, concepts = planted_hierarchy(members)
    values = np.array([[0.9], [0.1], [0.5], [0.5], [0.3]])
    result = wordnet_agreement(values, sources, ["t0"], concepts, hierarchy, permutations=2000)
    # member pairs won: 0.9 beats all 3; 0.5 beats 0.1 and 0.3 and ties 0.5: 5.5 of 6
    assert result["classes"]["t0"]["auc"] == pytest.approx(5.5 / 6)
    # the permutation p against the exact one: of the 10 possible member pairs, 2 do as well (0.9 with either 0.5)
    exact = np.mean([_auc(values[:, 0], np.isin(np.arange(5), pair)) >= 5.5 / 6 - 1e-12 for pair in _pairs(5)])
    assert exact == 0.2 and result["p_value"] == pytest.approx(exact, abs=0.03)

    rng = np.random.default_rng(0)
    members = rng.random((60, 3)) < 0.2
    hierarchy, sources, concepts = planted_hierarchy(members)
    values = np.round(rng.standard_normal((60, 3)), 1)  # ties on purpose
    result = wordnet_agreement(values, sources, list(concepts), concepts, hierarchy, permutations=100)
    for j, target in enumerate(concepts):
        inside, outside = values[members[:, j], j], values[~members[:, j], j]
        u = mannwhitneyu(inside, outside).statistic
        assert result["classes"][target]["auc"] == pytest.approx(u / (len(inside) * len(outside)), rel=1e-12)
        assert result["classes"][target]["members"] == len(inside)


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(n) for b in range(a + 1, n)]


def _auc(values: np.ndarray, inside: np.ndarray) -> float:
    """The pairwise definition: the share of (member, non-member) pairs the member wins, ties half."""
    diff = values[inside][:, None] - values[~inside][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_permutation_p_is_uniform_under_the_null_and_small_under_agreement():
    rng = np.random.default_rng(11)
    members = rng.random((40, 4)) < 0.15
    members[0] = False  # a source under no concept, as most are
    hierarchy, sources, concepts = planted_hierarchy(members)
    targets = list(concepts) + ["no concept"]
    nulls = [
        wordnet_agreement(
            rng.standard_normal((40, 5)), sources, targets, concepts, hierarchy, permutations=200, seed=s
        )["p_value"]
        for s in range(200)
    ]
    below = np.mean(np.array(nulls) < 0.05)
    print(f"\nnull: fraction of p < 0.05 over 200 nulls: {below:.3f}")
    assert 0.02 <= below <= 0.09 and 0.4 < np.mean(nulls) < 0.6

    planted = rng.standard_normal((40, 5)) + 1.0 * np.column_stack([members, np.zeros(40, bool)])
    result = wordnet_agreement(planted, sources, targets, concepts, hierarchy, permutations=10_000)
    assert result["p_value"] < 0.001 and result["mean_auc"] > 0.7
    assert result["unscored"] == ["no concept"] and result["classes"]["no concept"]["auc"] is None
    assert result["sources"] == 40 and result["permutations"] == 10_000


def test_missing_hierarchy_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="imagenet1k_wordnet_hierarchy.json"):
        load_hierarchy(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        wordnet_agreement(np.zeros((1, 1)), ["n02123045"], ["cat"], hierarchy=tmp_path)


# ImageNet-1k classes under each concept, and Tiny-ImageNet-200's: the figures docs/reliability.md states
IMAGENET_COUNTS = {
    "airplane": 2,
    "automobile": 10,
    "bird": 59,
    "cat": 5,
    "deer": 0,
    "dog": 118,
    "frog": 3,
    "horse": 1,
    "ship": 15,
    "truck": 5,
}
TINY_COUNTS = {
    "airplane": 0,
    "automobile": 4,
    "bird": 4,
    "cat": 3,
    "deer": 0,
    "dog": 6,
    "frog": 2,
    "horse": 0,
    "ship": 2,
    "truck": 1,
}


def test_cifar10_concepts_on_the_real_hierarchy(data_dir):
    meta = data_dir / "imagenet-meta"
    hierarchy = load_hierarchy(meta)
    imagenet = [entry["wnid"] for entry in json.loads((meta / "imagenet1k_classes.json").read_text())]
    members = concept_members(imagenet, CIFAR10_CONCEPTS, hierarchy)
    assert dict(zip(CIFAR10_CONCEPTS, members.sum(0).tolist())) == IMAGENET_COUNTS
    assert members.sum(1).max() == 1  # no ImageNet class under two CIFAR-10 concepts
    named = {w: [name for name, m in zip(CIFAR10_CONCEPTS, row) if m] for w, row in zip(imagenet, members)}
    for wnid, concept in [
        ("n02123045", "cat"),
        ("n02690373", "airplane"),
        ("n02099601", "dog"),
        ("n04273569", "ship"),
        ("n03770679", "automobile"),
        ("n03417042", "truck"),
    ]:
        assert named[wnid] == [concept], wnid
    # left out on purpose: lion, zebra, pickup, police van, airship, impala
    for wnid in ["n02129165", "n02391049", "n03930630", "n03977966", "n02692877", "n02422699"]:
        assert named[wnid] == [], wnid

    with tarfile.open(data_dir / "tiny-imagenet-200-300pc-jpg.tar.gz") as archive:
        # by iteration: it stops at the list (the first member); a lookup by name would read all 95 MB
        listing = next(member for member in archive if member.name == "tiny-imagenet/wnids.txt")
        tiny = archive.extractfile(listing).read().decode().split()
    assert len(tiny) == 200
    counts = dict(zip(CIFAR10_CONCEPTS, concept_members(tiny, CIFAR10_CONCEPTS, hierarchy).sum(0).tolist()))
    assert counts == TINY_COUNTS and sum(n > 0 for n in counts.values()) >= 6


def test_findings_check_wordnet_when_the_sources_are_imagenet_classes(data_dir, monkeypatch):
    """report.semantic_check: ImageNet wnids as source classes and CIFAR-10 names as target classes give
    the WordNet agreement (planted: each concept's classes the most positive); other sources give None."""
    from ffcv_transfer.findings.report import semantic_check

    monkeypatch.setenv("FFCV_TRANSFER_DATA", str(data_dir))
    wnids = [
        "n02099601",
        "n02123045",
        "n02690373",
        "n01443537",
        "n01530575",
        "n03000134",
        "n04552348",
        "n02085620",
        "n02124075",
        "n07714571",
    ]  # retriever, tabby, airliner, goldfish, brambling, fence, warplane, chihuahua, Egyptian cat, cabbage
    targets = ["dog", "cat", "airplane"]
    members = {"dog": [0, 7], "cat": [1, 8], "airplane": [2, 6]}
    labels = np.repeat(np.arange(3), 4)
    influence = np.zeros((len(wnids), len(labels)))
    for t, name in enumerate(targets):
        influence[np.ix_(members[name], np.flatnonzero(labels == t))] = 1.0
    influence += np.random.default_rng(0).normal(0, 0.01, influence.shape)
    agreement = semantic_check(influence, labels, wnids, targets)
    assert agreement["mean_auc"] == 1.0 and agreement["scored"] == targets
    assert agreement["classes"]["dog"]["members"] == 2
    assert semantic_check(influence, labels, None, targets) is None
    assert semantic_check(influence, labels, wnids, ["apple", "pear", "plum"]) is None


def test_f_sf_matches_scipy():
    for df1, df2 in ((1, 1), (1, 30), (3, 7), (7, 24), (29, 34), (48, 15), (999, 6540)):
        for value in (0.01, 0.3, 0.9, 1.0, 1.2, 2.0, 5.0, 30.0):
            assert f_sf(value, df1, df2) == pytest.approx(f.sf(value, df1, df2), rel=1e-7, abs=1e-14), (value, df1, df2)
    assert f_sf(0.0, 3, 5) == 1.0


def test_joint_test_is_calibrated_under_the_null_and_finds_many_small_effects():
    """Null: 400 replicates of 64 random-mask models on 30 classes with no effect; the joint p-value of each
    column is near uniform (p <= 0.05 in 5% of 1,600; random masks correlate the classes' estimates, which
    the F-test allows for). Many small effects (40 classes, 128 models): the joint test shows them where no
    class is significant, and the verdict says signal."""
    rng = np.random.default_rng(11)
    null = World(30, np.zeros(3), noise=1.0, seed=3, deviation=0.0)
    ps = []
    for _ in range(400):
        masks, outputs = null.models(64, rng)
        ps.append(joint_signal(masks, ranking_means(outputs, null.labels, null.num_classes)))
    below = np.mean(np.concatenate(ps) <= 0.05)
    assert 0.03 <= below <= 0.07, below
    weak = World(40, np.full(3, 0.03), noise=1.0, seed=4, deviation=0.0)
    masks, outputs = weak.models(128, np.random.default_rng(11))
    summary = assess(masks, outputs, weak.labels, ["a", "b", "c"])
    assert sum(map(len, summary.significant)) == 0 and min(summary.joint_p) * 4 <= 0.01, summary.joint_p
    verdict = summary.verdict()
    assert verdict.level == "signal" and "joint test of every class on the b ranking" in verdict.text


def test_planted_evidence_is_the_binomial_tail_of_twins_on_top():
    planted = {"twin": {"0": 2, "1": 0, "2": 1, "3": 4}}
    by_class = np.zeros((7, 4))
    by_class[[2, 0, 1], [0, 1, 2]] = 1.0  # three twins on top; target 3's top is class 5, not its twin 4
    by_class[5, 3] = 1.0
    evidence = planted_evidence(by_class, planted)
    assert evidence.detail == "3 of 4 planted twins on top"
    assert evidence.p_value == pytest.approx(binom.sf(2, 4, 1 / 7), rel=1e-12)
