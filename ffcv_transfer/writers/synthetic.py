"""Planted synthetic source/target data whose source->target influence is known by construction.

Every image is smooth coloured noise with a few *motifs* pasted at random places. A motif is a fixed
m x m pattern of +1/-1 with exactly as many of each, drawn in a random colour: all motifs share the same
pixel statistics and a motif at a uniform random place adds nothing to any pixel's mean, so raw pixels
(and any linear model on them) cannot tell classes apart; a network must learn to detect the pattern.

- Target class t (T classes): motif f_t, plus one distractor motif. Every image of every class gets a
  distractor drawn from a small bank that defines no class, so no class is recognised by motif count.
- Source "twin" of t: motif f_t plus a distractor. A backbone trained on it detects f_t, which the
  target head needs: the twin's influence on target class t is positive.
- Source "unrelated" classes: their own motif g_k plus a distractor: no planted influence.
- Source "background" class (optional, `source_background`): two distractors and no class motif, the
  source's counterpart of the target's background class: a source model then has a class of its own for
  an image that shows no class motif, instead of assigning it to whichever class it happens to resemble.
- Source "misleading" class for target t (optional): a cue motif a_t. On the target, a_t is a shortcut
  that holds on the training split (every class-t training image carries it) and conflicts on the test
  split: class-t test images lack it, and with `misleading_conflict` "next" class-(t+1) test images carry
  it ("background": the background class's test images, the K cues in turn; "none": no test image). A
  backbone that has learned a_t lets the head lean on the shortcut, which lowers the test margins of
  class t and of the carriers: negative influence on both, and wrong predictions on the carriers.

Siblings (optional, `sibling_flips` > 0): each target motif f_t, and each misleading cue a_t, gets a
near-copy (a few pixels swapped) that joins the distractor bank, so it appears on images of every
class, the background included. Telling f_t from its sibling then takes a detector trained for it (the
twin's), not generic motif features: without its twin a target class is hard to recognise, and without
the misleading class the cue is no shortcut. Both influences then stand out from the noise of training
(docs/planted-data.md). With `cue_decoys` every target image that carries no cue carries a cue's sibling
instead, so that generic features, which cannot tell a cue from its sibling, find no shortcut at all: the
shortcut, and the harm it does on the test split, come only with the misleading class's detector.

Leaked copies (optional, for example-level influence): `leaks` target test images of the target classes
are copied into the source training set, labelled with the twin of their own class (a leak: expected to
raise that test image's margin), and `mislabelled_leaks` more labelled with the twin of another target
class (expected to lower it). Copy kinds cycle through `leak_kinds`: "exact", "downsampled" (to half
size by area averaging, then bilinear back up; `leak_downsample` sets the fraction) and "crop" (a random
crop of `leak_crop` of each side, resized back up). The copies are appended after the regular source
training images (their indices are unchanged), and
`extra.planted.leaks` lists them: source index, target test index, kind, role, source class. With
`atypical_leaks` the leaked test images are first re-rendered without their class motif (two distractors
instead, of those least like the motif of the class their copy is labelled with): atypical images of their
class that only a model trained on their copy can place. With a source background class too, a model
without the copy places such an image there, not in the copy's class by chance, so that the copy always
has something to change (docs/planted-data.md).

With `pixel_scale` s > 1 every image is drawn at 1/s of the resolution (motifs, noise and all) and
upsampled bilinearly: smooth images, whose content, like a natural image's, survives being resampled, so
that a model which memorised a resized copy also knows the original (docs/planted-data.md).

The ground truth lies in every sidecar's `extra.planted`, with source class indices in beton order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.store.betons import BetonError
from ffcv_transfer.writers.common import ImageOptions, write_arrays

NO_MOTIF = -1
SPLITS = ("source_train", "source_val", "target_train", "target_test")
LEAK_KINDS = ("exact", "downsampled", "crop")
CONFLICTS = ("next", "background", "none")  # misleading cue of target t also on: t+1's test images, background's, none


@dataclass(frozen=True)
class PlantedSpec:
    num_targets: int = 5
    num_unrelated: int = 10
    num_misleading: int = 1
    num_distractors: int = 4
    resolution: int = 32
    source_train_per_class: int = 200
    source_val_per_class: int = 50
    target_train_per_class: int = 200
    target_test_per_class: int = 100
    motif_amplitude: float = 0.8
    noise: float = 0.08
    background_class: bool = False  # an extra, last target class "background" without a class motif
    source_background: bool = False  # an extra source class "background" without a class motif
    misleading_conflict: str = "next"  # which test images also carry the cue of target t (CONFLICTS)
    sibling_flips: int = 0  # > 0: each target motif and cue gets a near-copy distractor (this many +/- swaps)
    cue_decoys: bool = False  # every target image without a cue carries a cue's near-copy (needs sibling_flips)
    leaks: int = 0  # target test images copied into source_train, labelled with their own class's twin
    mislabelled_leaks: int = 0  # more copies, labelled with the twin of another target class
    leak_kinds: tuple[str, ...] = LEAK_KINDS  # how the copies are made, in turn
    atypical_leaks: bool = False  # the leaked test images lose their class motif (before being copied)
    leak_downsample: float = 0.5  # "downsampled" copies: side fraction of the intermediate image
    leak_crop: float = 0.875  # "crop" copies: side fraction of the crop
    pixel_scale: int = 1  # > 1: images drawn at resolution / pixel_scale, then bilinearly upsampled (smooth)

    def __post_init__(self) -> None:
        if not 16 <= self.resolution <= 64 or self.resolution % 8:
            raise BetonError(f"resolution {self.resolution} must be a multiple of 8 in 16..64")
        if self.pixel_scale < 1 or self.resolution % (8 * self.pixel_scale) or self.drawn_resolution < 16:
            raise BetonError(
                f"pixel_scale {self.pixel_scale}: resolution / pixel_scale must be a multiple of 8, "
                f"at least 16 (resolution {self.resolution})"
            )
        if self.num_targets < 2 or self.num_unrelated < 0 or self.num_distractors < 1:
            raise BetonError("need at least 2 target classes, >= 0 unrelated source classes and 1 distractor")
        if self.misleading_conflict not in CONFLICTS:
            raise BetonError(f"misleading_conflict {self.misleading_conflict!r} must be one of {', '.join(CONFLICTS)}")
        if self.misleading_conflict == "background" and not self.background_class:
            raise BetonError("misleading_conflict 'background' needs background_class")
        if not 0 <= self.num_misleading <= self.num_targets:
            raise BetonError(f"num_misleading {self.num_misleading} must be in 0..{self.num_targets}")
        if not 0 <= self.sibling_flips <= self.motif_size**2 // 4:
            raise BetonError(f"sibling_flips {self.sibling_flips} must be in 0..{self.motif_size**2 // 4}")
        if self.cue_decoys and not (self.sibling_flips and self.num_misleading):
            raise BetonError(
                "cue_decoys needs sibling_flips > 0 and a misleading class (the decoys are the cues' siblings)"
            )
        if not (0 <= self.noise < math.inf and 0 <= self.motif_amplitude < math.inf):
            raise BetonError(
                f"noise {self.noise} and motif_amplitude {self.motif_amplitude} must be finite and >= 0 "
                "(--noise, --motif-amplitude)"
            )
        per_class = (
            self.source_train_per_class,
            self.source_val_per_class,
            self.target_train_per_class,
            self.target_test_per_class,
        )
        if min(per_class) < 1:
            raise BetonError(
                f"images per class {per_class} (source train, source val, target train, test) must be >= 1"
            )
        if self.leaks < 0 or self.mislabelled_leaks < 0:
            raise BetonError("leaks and mislabelled_leaks must be >= 0")
        if self.leaks + self.mislabelled_leaks > self.num_targets * self.target_test_per_class:
            raise BetonError(
                f"{self.leaks + self.mislabelled_leaks} leaked copies, but only "
                f"{self.num_targets * self.target_test_per_class} target test images of target classes"
            )
        if not (0 < self.leak_downsample < 1 and 0 < self.leak_crop < 1):
            raise BetonError(
                f"leak_downsample {self.leak_downsample} and leak_crop {self.leak_crop} must lie in (0, 1)"
            )
        if not self.leak_kinds or set(self.leak_kinds) - set(LEAK_KINDS):
            raise BetonError(f"leak_kinds {self.leak_kinds} must be a non-empty selection of {', '.join(LEAK_KINDS)}")
        half = self.motif_size * self.motif_size // 2
        if math.comb(half, half // 2) < self.num_motifs:
            raise BetonError(
                f"{self.num_motifs} classes and distractors need more distinct motifs than "
                f"{self.resolution} px allows; raise the resolution"
            )

    @property
    def drawn_resolution(self) -> int:
        return self.resolution // self.pixel_scale

    @property
    def motif_size(self) -> int:
        return self.drawn_resolution // 4

    @property
    def num_motifs(self) -> int:
        return self.num_targets + self.num_unrelated + self.num_misleading + self.num_distractor_bank

    @property
    def num_distractor_bank(self) -> int:
        return self.num_distractors + ((self.num_targets + self.num_misleading) if self.sibling_flips else 0)

    @property
    def distractor_bank(self) -> np.ndarray:
        """The distractors' motif ids: the last `num_distractor_bank`."""
        return np.arange(self.num_motifs - self.num_distractor_bank, self.num_motifs)

    @property
    def num_sources(self) -> int:
        return self.num_targets + self.num_unrelated + self.num_misleading + self.source_background


def make_motifs(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct size x size patterns (size even) with equal numbers of +1 and -1, left-right symmetric
    so that random flips (a standard augmentation) keep every class feature intact."""
    half = size * (size // 2)
    base = np.array([1.0] * (half // 2) + [-1.0] * (half // 2))
    motifs: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(motifs) < count:
        left = rng.permutation(base).reshape(size, size // 2)
        if left.tobytes() not in seen:
            seen.add(left.tobytes())
            motifs.append(np.concatenate([left, left[:, ::-1]], axis=1))
    return np.stack(motifs)


def sibling(motif: np.ndarray, flips: int, rng: np.random.Generator) -> np.ndarray:
    """A near-copy of a motif: `flips` +1 and `flips` -1 pixels of its left half swapped (mirrored on the
    right), so it keeps the balance and the symmetry of every motif."""
    size = motif.shape[0]
    left = motif[:, : size // 2].ravel().copy()
    plus = rng.choice(np.flatnonzero(left > 0), flips, replace=False)
    minus = rng.choice(np.flatnonzero(left < 0), flips, replace=False)
    left[plus], left[minus] = -1.0, 1.0
    left = left.reshape(size, size // 2)
    return np.concatenate([left, left[:, ::-1]], axis=1)


def render(slots: np.ndarray, motifs: np.ndarray, spec: PlantedSpec, rng: np.random.Generator) -> np.ndarray:
    """Images (n, R, R, 3) uint8; slots[i] lists the motif ids pasted into image i (NO_MOTIF: none)."""
    n, res, m = len(slots), spec.drawn_resolution, motifs.shape[1]
    coarse = rng.normal(0.0, 0.15, size=(n, res // 4, res // 4, 3))
    images = coarse.repeat(4, axis=1).repeat(4, axis=2)
    images += rng.uniform(0.25, 0.75, size=(n, 1, 1, 3)) + rng.normal(0.0, spec.noise, size=images.shape)
    rows = np.arange(n)[:, None, None]
    offsets = np.arange(m)
    for ids in slots.T:
        present = ids != NO_MOTIF
        y, x = rng.integers(0, res - m + 1, size=(2, n))
        colour = rng.uniform(0.5, 1.0, size=(n, 1, 1, 3)) * spec.motif_amplitude
        patch = motifs[np.where(present, ids, 0)][..., None] * colour * present[:, None, None, None]
        images[rows, (y[:, None] + offsets)[:, :, None], (x[:, None] + offsets)[:, None, :]] += patch
    if spec.pixel_scale > 1:
        up = _bilinear_matrix(res, spec.resolution)
        images = np.einsum("Yy,nyxc,Xx->nYXc", up, images, up, optimize=True)
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def motif_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """The largest correlation of two m x m motifs over all their relative shifts (over m * m): 1 for the
    same motif, as a shift-invariant detector of one sees the other."""
    m = len(a)
    padded = np.pad(b, m - 1)
    shifts = range(2 * m - 1)
    return max(float((a * padded[y : y + m, x : x + m]).sum()) for y in shifts for x in shifts) / a.size


def _bilinear_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) bilinear interpolation with pixel centres aligned (edges clamped), as PIL's."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    matrix = np.zeros((target, source))
    matrix[np.arange(target), low] += 1 - (position - low)
    matrix[np.arange(target), high] += position - low
    return matrix


def _planted_design(spec: PlantedSpec, rng: np.random.Generator) -> dict[str, Any]:
    """Source classes in a shuffled order, with their motifs, and the ground truth."""
    T, U, K = spec.num_targets, spec.num_unrelated, spec.num_misleading
    # motif ids: targets' features 0..T-1, unrelated T..T+U-1, cues T+U..T+U+K-1
    kinds = (
        [("twin", t) for t in range(T)]
        + [("unrelated", k) for k in range(U)]
        + [("background", 0)] * spec.source_background
        + [("misleading", t) for t in range(K)]
    )
    order = rng.permutation(len(kinds))
    sources = [kinds[i] for i in order]
    motif_of = {
        "twin": lambda t: t,
        "unrelated": lambda k: T + k,
        "misleading": lambda t: T + U + t,
        "background": lambda _: NO_MOTIF,
    }
    names = {
        "twin": "twin-of-target{}",
        "unrelated": "unrelated{}",
        "misleading": "misleading-for-target{}",
        "background": "background",
    }
    expected_sign = np.zeros((len(sources), T + spec.background_class), np.int64)
    for s, (kind, i) in enumerate(sources):
        if kind == "twin":
            expected_sign[s, i] = 1
        elif kind == "misleading":
            expected_sign[s, [i, _conflict_target(spec, i)] if spec.misleading_conflict != "none" else i] = -1
    return {
        "source_names": [names[kind].format(i) for kind, i in sources],
        "source_motif": [motif_of[kind](i) for kind, i in sources],
        "target_names": [f"target{t}" for t in range(T)] + (["background"] if spec.background_class else []),
        "twin": {str(t): sources.index(("twin", t)) for t in range(T)},
        "misleading": [
            {"source": sources.index(("misleading", t)), "target": t, "conflict_target": _conflict_target(spec, t)}
            for t in range(K)
        ],
        "unrelated": [sources.index(("unrelated", k)) for k in range(U)],
        "expected_sign": expected_sign.tolist(),
    }


def _conflict_target(spec: PlantedSpec, t: int) -> int | None:
    """The target class whose test images also carry target t's misleading cue."""
    return {"next": (t + 1) % spec.num_targets, "background": spec.num_targets, "none": None}[spec.misleading_conflict]


def _slots(
    labels: np.ndarray, feature: np.ndarray, extra: np.ndarray, spec: PlantedSpec, rng: np.random.Generator
) -> np.ndarray:
    """Per image: its class feature, a random distractor, and an extra motif (or none)."""
    bank = spec.distractor_bank
    distractors = rng.integers(bank[0], bank[-1] + 1, size=(2, len(labels)))
    # an image without a class motif (background) gets a second distractor in its place
    return np.stack([np.where(feature[labels] == NO_MOTIF, distractors[1], feature[labels]), distractors[0], extra], 1)


def make_planted(spec: PlantedSpec, seed: int) -> dict[str, Any]:
    """All four splits as arrays, {split: (images, labels)}, plus 'design' (the ground truth) and
    'motifs' (by id: targets' features 0..T-1, unrelated T..T+U-1, then cues, then distractors)."""
    rng = np.random.default_rng(seed)
    T, U, K = spec.num_targets, spec.num_unrelated, spec.num_misleading
    motifs = make_motifs(spec.num_motifs, spec.motif_size, rng)
    if spec.sibling_flips:  # the last T + K motifs: near-copies of the targets' features and of the cues
        originals = list(range(T)) + list(range(T + U, T + U + K))
        motifs[-(T + K) :] = [sibling(motifs[i], spec.sibling_flips, rng) for i in originals]
    design = _planted_design(spec, rng)
    cue_of_target = np.full(T, NO_MOTIF)
    cue_of_target[:K] = T + U + np.arange(K)
    # class (t+1)'s test images carry the cue that class t's training images carry (or none does)
    conflict_cue = np.roll(cue_of_target, 1) if spec.misleading_conflict == "next" else np.full(T, NO_MOTIF)

    splits: dict[str, Any] = {"design": design, "motifs": motifs}
    source_feature = np.asarray(design["source_motif"])
    for split, per_class in (("source_train", spec.source_train_per_class), ("source_val", spec.source_val_per_class)):
        labels = np.repeat(np.arange(spec.num_sources), per_class)
        slots = _slots(labels, source_feature, np.full(len(labels), NO_MOTIF), spec, rng)
        splits[split] = (render(slots, motifs, spec, rng), labels)
    # a background class (optional, label T) has neither a class motif nor a cue, so a target class
    # cannot be recognised by elimination (none of the other targets' motifs), only by its own motif
    classes = T + spec.background_class
    target_feature = np.append(np.arange(T), NO_MOTIF)
    cue_of_target, conflict_cue = np.append(cue_of_target, NO_MOTIF), np.append(conflict_cue, NO_MOTIF)
    for split, per_class, cue in (
        ("target_train", spec.target_train_per_class, cue_of_target),
        ("target_test", spec.target_test_per_class, conflict_cue),
    ):
        labels = np.repeat(np.arange(classes), per_class)
        extra = cue[labels]
        if split == "target_test" and spec.misleading_conflict == "background" and K:  # the cues in turn
            background = np.flatnonzero(labels == T)
            extra[background] = T + U + np.arange(len(background)) % K
        if spec.cue_decoys:  # the cues' siblings (the last K motifs), in turn, on every image without a cue
            plain = np.flatnonzero(extra == NO_MOTIF)
            extra[plain] = len(motifs) - K + np.arange(len(plain)) % K
        slots = _slots(labels, target_feature, extra, spec, rng)
        splits[split] = (render(slots, motifs, spec, rng), labels)
    design["leaks"] = []
    if spec.leaks or spec.mislabelled_leaks:  # its own random stream: the other images stay as without leaks
        splits["source_train"], splits["target_test"], design["leaks"] = _plant_leaks(
            splits["source_train"], splits["target_test"], design, motifs, spec, np.random.default_rng([seed, 1])
        )
    return splits


def copy_image(
    image: np.ndarray, kind: str, rng: np.random.Generator, downsample: float = 0.5, crop: float = 0.875
) -> np.ndarray:
    """A near-duplicate of an H x W x 3 uint8 image: "exact", "downsampled" (to `downsample` of each side
    by area averaging, bilinear back up) or "crop" (a random crop of `crop` of each side, bilinear back up)."""
    from PIL import Image

    height, width = image.shape[:2]
    if kind == "exact":
        return image.copy()
    picture = Image.fromarray(image)
    if kind == "downsampled":
        small = picture.resize((round(width * downsample), round(height * downsample)), Image.Resampling.BOX)
        return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    if kind == "crop":
        h, w = round(height * crop), round(width * crop)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        return np.asarray(picture.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BILINEAR))
    raise BetonError(f"unknown copy kind {kind!r} (one of {', '.join(LEAK_KINDS)})")


def _plant_leaks(
    source: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    design: dict[str, Any],
    motifs: np.ndarray,
    spec: PlantedSpec,
    rng: np.random.Generator,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[dict]]:
    """Source training images and labels with the copies appended, the target test split (its leaked
    images re-rendered without their class motif if `atypical_leaks`), and the record of each copy."""
    (images, labels), (test_images, test_labels) = source, test
    T = spec.num_targets
    chosen = rng.choice(np.flatnonzero(test_labels < T), spec.leaks + spec.mislabelled_leaks, replace=False)
    targets = test_labels[chosen].astype(int)
    twin_of = [int(t) if n < spec.leaks else int(t + 1 + rng.integers(T - 1)) % T for n, t in enumerate(targets)]
    if spec.atypical_leaks:
        # two distractors of those least like the motif of the class the copy is labelled with, so that a
        # model that has not seen the copy has no reason to place the original in that class
        bank = spec.distractor_bank
        slots = np.full((len(chosen), 3), NO_MOTIF)
        for n, t in enumerate(twin_of):
            overlaps = np.array([motif_overlap(motifs[t], motifs[d]) for d in bank])
            slots[n, :2] = rng.choice(bank[overlaps == overlaps.min()], 2)
        test_images = test_images.copy()
        test_images[chosen] = render(slots, motifs, spec, rng)
    copies, copy_labels, records = [], [], []
    for n, (j, target) in enumerate(zip(chosen, targets)):
        kind = spec.leak_kinds[n % len(spec.leak_kinds)]
        copies.append(copy_image(test_images[j], kind, rng, spec.leak_downsample, spec.leak_crop))
        copy_labels.append(design["twin"][str(twin_of[n])])
        records.append(
            {
                "source": len(images) + n,
                "target_test": int(j),
                "kind": kind,
                "role": "leak" if n < spec.leaks else "mislabelled",
                "source_class": copy_labels[-1],
                "target_class": int(target),
                "twin_of": twin_of[n],
                "atypical": spec.atypical_leaks,
            }
        )
    return (
        (np.concatenate([images, np.stack(copies)]), np.concatenate([labels, copy_labels])),
        (test_images, test_labels),
        records,
    )


def write_synthetic(
    outdir: str | Path,
    *,
    seed: int = 0,
    spec: PlantedSpec = PlantedSpec(),
    options: ImageOptions = ImageOptions(write_mode="raw"),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write OUTDIR/{source_train,source_val,target_train,target_test}.beton; returns their paths."""
    outdir = Path(outdir)
    data = make_planted(spec, seed)
    design = data["design"]
    planted = {"seed": seed, "spec": asdict(spec), **design}
    paths = {}
    for split in SPLITS:
        images, labels = data[split]
        names = design["source_names"] if split.startswith("source") else design["target_names"]
        paths[split] = outdir / f"{split}.beton"
        write_arrays(
            images,
            labels,
            paths[split],
            class_names=names,
            options=options,
            origin=f"planted-synthetic(seed={seed}):{split}",
            extra={"planted": planted, "split": split},
            overwrite=overwrite,
        )
    return paths
