"""The WordNet check for ImageNet-derived sources: do the source classes that WordNet files under a target
class's own word (e.g. the dog breeds for CIFAR-10's "dog") rank high in that class's influence ranking?

Per target class with members, the AUC of members against the other source classes by influence; their
mean; and a one-sided permutation p-value of the mean under a joint relabelling of the source classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_transfer.findings.names import DATA_ENV

HIERARCHY_FILE = "imagenet1k_wordnet_hierarchy.json"

# CIFAR-10 class -> WordNet synsets; a source class is a member when one of them is it or its hypernym. The
# aim: the ImageNet-1k classes CIFAR-10 would file under that word. CIFAR-10's own page says "automobile"
# is sedans, SUVs and the like, "truck" only big trucks, and neither holds pickups; the rest take the
# word's everyday sense, checked against CIFAR-10's test images. No ImageNet class falls under two.
CIFAR10_CONCEPTS: dict[str, tuple[str, ...]] = {
    # airplane (its one ImageNet class: airliner) and warplane, which WordNet files beside it under
    # heavier-than-air craft; not airship or balloon (lighter-than-air), not wing (a part)
    "airplane": ("n02691156", "n04552348"),
    # car: all 10 of its ImageNet classes, minivan and jeep (an SUV) included, ambulance too (WordNet's car,
    # and no big truck)
    "automobile": ("n02958343",),
    "bird": ("n01503061",),  # bird: all 59 classes under it
    # domestic cat (tabby, tiger cat, Persian, Siamese, Egyptian): CIFAR-10's cats are house cats; not the
    # wild cats (cougar, lynx) that "cat, true cat" adds, nor lion or tiger under feline
    "cat": ("n02121808",),
    # ImageNet-1k has no class under deer (n02430045); antelopes (impala, gazelle, hartebeest) look alike
    # but are bovids, and CIFAR-10's deer images show deer, elk, moose, reindeer
    "deer": (),
    "dog": ("n02084071",),  # dog, domestic dog: the 118 breeds; not wolves, foxes or wild dogs (dingo, dhole)
    "frog": ("n01639765",),  # frog, toad, anuran: bullfrog, tree frog, tailed frog
    "horse": ("n02374451",),  # horse: sorrel alone; not zebra, an equine no one calls a horse
    # vessel, watercraft: ships and boats alike (speedboat, lifeboat, canoe, sailboats): CIFAR-10 has no boat
    # class and its ship images hold motorboats, yachts and sailboats as much as ships
    "ship": ("n04530566",),
    # big trucks: fire engine, garbage truck, tow truck, trailer truck, moving van (a box truck); not
    # pickup (CIFAR-10 excludes it), minivan (a car too in WordNet) or police van (a van)
    "truck": ("n03345487", "n03417042", "n04461696", "n04467665", "n03796401"),
}


@dataclass(frozen=True)
class Hierarchy:
    """WordNet's is-a hierarchy: words per synset, and each synset's hypernyms (some have two)."""

    names: Mapping[str, str]  # wnid -> WordNet words
    parents: Mapping[str, tuple[str, ...]]  # wnid -> its hypernyms

    def ancestors(self, wnid: str) -> set[str]:
        """The synset itself and all its hypernyms, up to the root."""
        found, stack = set(), [wnid]
        while stack:
            node = stack.pop()
            if node not in found:
                found.add(node)
                stack.extend(self.parents.get(node, ()))
        return found

    def short_name(self, wnid: str) -> str:
        """The synset's first word (the wnid itself when unknown)."""
        return self.names.get(wnid, wnid).split(",")[0]


def load_hierarchy(meta_dir: str | Path | None = None) -> Hierarchy:
    """The hierarchy from an imagenet-meta folder's imagenet1k_wordnet_hierarchy.json (default:
    $FFCV_TRANSFER_DATA/imagenet-meta); ValueError naming the file when it is not there."""
    if meta_dir is None:
        if not os.environ.get(DATA_ENV):
            raise ValueError(f"no imagenet-meta folder given and ${DATA_ENV} is not set")
        meta_dir = Path(os.environ[DATA_ENV]) / "imagenet-meta"
    path = Path(meta_dir) / HIERARCHY_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no WordNet hierarchy file (the WordNet check needs {HIERARCHY_FILE})")
    data = json.loads(path.read_text())
    parents: dict[str, tuple[str, ...]] = {}
    for parent, child in data["is_a"]:
        parents[child] = parents.get(child, ()) + (parent,)
    return Hierarchy(dict(data["nodes"]), parents)


def concept_members(
    source_wnids: Sequence[str], concepts: Mapping[str, Sequence[str]], hierarchy: Hierarchy
) -> np.ndarray:
    """(C, K) bool, K in the order of `concepts`: whether source class c lies under one of concept k's synsets.
    Sources unknown to the hierarchy are members of nothing; an unknown concept synset is a ValueError."""
    unknown = sorted({w for synsets in concepts.values() for w in synsets} - set(hierarchy.names))
    if unknown:
        raise ValueError(f"concept synsets not in the hierarchy: {', '.join(unknown)}")
    ancestry = [hierarchy.ancestors(wnid) for wnid in source_wnids]
    return np.array(
        [[not ancestors.isdisjoint(synsets) for synsets in concepts.values()] for ancestors in ancestry], bool
    ).reshape(len(source_wnids), len(concepts))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share their mean rank (the Mann-Whitney convention)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def wordnet_agreement(
    by_class: np.ndarray,
    source_wnids: Sequence[str],
    target_names: Sequence[str],
    concepts: Mapping[str, Sequence[str]] = CIFAR10_CONCEPTS,
    hierarchy: Hierarchy | str | Path | None = None,
    permutations: int = 10_000,
    seed: int = 0,
) -> dict:
    """How high the source classes under each target class's concept rank in its influence ranking.

    by_class: (C, K) influence of each source class (wnids `source_wnids`) per target class (`target_names`,
    looked up in `concepts`); hierarchy: a Hierarchy or an imagenet-meta folder (default: load_hierarchy()).
    Returns {"classes": {target: {"synsets", "members", "member_names", "auc", "p_value"}}, "mean_auc",
    "p_value", "permutations", "scored", "unscored", "sources"}. AUC: the chance that a member out-ranks a
    non-member (ties half), (rank sum of members - n1 (n1 + 1)/2) / (n1 n0), i.e. Mann-Whitney U / (n1 n0).
    p-values, one-sided: (1 + #{permutations with AUC >= observed}) / (1 + permutations); a permutation
    relabels the source classes jointly, the same for every target class, so the mean AUC's null keeps the
    dependence between target classes. Classes without members (or with only members) are "unscored", with
    auc and p_value None. Source classes with a non-finite influence are left out."""
    if not isinstance(hierarchy, Hierarchy):
        hierarchy = load_hierarchy(hierarchy)
    by_class = np.asarray(by_class, np.float64)
    if by_class.shape != (len(source_wnids), len(target_names)):
        raise ValueError(f"by_class has shape {by_class.shape}, expected ({len(source_wnids)}, {len(target_names)})")
    finite = np.isfinite(by_class).all(1)
    by_class, wnids = by_class[finite], [w for w, keep in zip(source_wnids, finite) if keep]
    synsets = [tuple(concepts.get(name, ())) for name in target_names]
    members = concept_members(wnids, dict(enumerate(synsets)), hierarchy).astype(np.float64)
    n1 = members.sum(0)
    scored = np.flatnonzero((n1 > 0) & (n1 < len(wnids)))
    classes = {
        name: {
            "synsets": list(synsets[k]),
            "members": int(n1[k]),
            "member_names": [hierarchy.short_name(wnids[c]) for c in np.flatnonzero(members[:, k])],
            "auc": None,
            "p_value": None,
        }
        for k, name in enumerate(target_names)
    }
    result = {
        "classes": classes,
        "mean_auc": None,
        "p_value": None,
        "permutations": permutations,
        "scored": [target_names[k] for k in scored],
        "unscored": [name for k, name in enumerate(target_names) if k not in scored],
        "sources": len(wnids),
    }
    if not len(scored):
        return result
    ranks = np.column_stack([_average_ranks(by_class[:, k]) for k in scored])  # (C, S)
    members, n1 = members[:, scored], n1[scored]
    offset, pairs = n1 * (n1 + 1) / 2, n1 * (len(wnids) - n1)
    observed = ((ranks * members).sum(0) - offset) / pairs
    exceed, exceed_mean = np.zeros(len(scored)), 0
    rng = np.random.default_rng(seed)
    block = max(1, 4_000_000 // ranks.size)  # permutations at a time: (block, C, S) float64 within ~32 MB
    for start in range(0, permutations, block):
        count = min(block, permutations - start)
        relabel = rng.permuted(np.tile(np.arange(len(wnids)), (count, 1)), axis=1)
        null = (np.einsum("pcs,cs->ps", ranks[relabel], members) - offset) / pairs
        # the tolerance lets a permutation equal to the observed labelling count despite summation order
        exceed += (null >= observed - 1e-9).sum(0)
        exceed_mean += int((null.mean(1) >= observed.mean() - 1e-9).sum())
    for k, auc, above in zip(scored, observed, exceed):
        classes[target_names[k]].update(auc=float(auc), p_value=float((1 + above) / (1 + permutations)))
    result.update(mean_auc=float(observed.mean()), p_value=(1 + exceed_mean) / (1 + permutations))
    return result


def describe_agreement(agreement: dict) -> str:
    """`wordnet_agreement`'s result in one line."""
    if agreement["mean_auc"] is None:
        return "WordNet agreement: no target class has source classes under its concept"
    return (
        f"WordNet agreement: mean AUC {agreement['mean_auc']:.3f} over {', '.join(agreement['scored'])} "
        f"(permutation p = {agreement['p_value']:.4f}; 0.5: chance)"
    )
