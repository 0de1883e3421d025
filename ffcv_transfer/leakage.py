"""Example-level influence and leakage: which single source images move which target test images.

Masks over source *examples* (each model trains on a random alpha-fraction of the source images, every
class present) and the same kernel as for classes (`influence.example_influence`) give an (E, T) matrix:
the mean margin of target test image j over the models whose training set held source image e, minus
over the models without it. Two findings come out of it, each confirmed on the pixels:

- **leakage**: a source image among the `top` most positive for a target image that is also a near-duplicate
  of it: the target image is (a copy of) a training image of the source models.
- **mislabelled copy**: a near-duplicate among the `top` most negative: a copy of the target image under a
  label that pulls it away from its class. The most negative pairs that are *not* near-duplicates are
  listed too, unconfirmed, as candidates for misleading source images.

Near-duplicates: both images in grey at 32 x 32 (area resampling), then the best correlation between the
16 x 16 thumbnail of one and those of every crop of the other (crop sides 24..32 px of 32, every integer
offset, with and without a left-right flip), in both directions, so exact, resampled and cropped-and-
resized copies all score close to 1 while unrelated images do not (tests/test_leakage.py,
docs/findings.md#example-level-influence-and-leakage). A DCT perceptual hash distance (64 bits) is the
second test: a pair is a near-duplicate when either passes.

The store: `experiment_store.create_example_store` draws the masks (packed bits, fixed array
`example_masks`; `masks` holds, per model, the classes it has examples of, which is what the worker's
input checks read) and the worker trains each model on its examples (train.py routes on example indices). `find_leaks` is the
entry point: it reads the store, writes leaks.json and image grids, and returns the findings.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

WORK_SIZE = 32  # images are compared in grey at this size
THUMB_SIZE = 16  # ... through thumbnails of this size
CROP_SIDES = (32, 30, 28, 26, 24)  # crops of the 32 px image tried when aligning two images
MIN_SIMILARITY = 0.9  # aligned-thumbnail correlation at or above which two images are near-duplicates
MAX_HASH_DISTANCE = 8  # perceptual-hash bits at or below which two images are near-duplicates
DEFAULT_TOP = 10  # source images examined per target image, at each end of its influence ranking


# ------------------------------------------------------------------ example influence

def example_influence_from_store(store_dir: str | Path, num_examples: int, key: str = "margins",
                                 backend: str = "auto") -> tuple[np.ndarray, int]:
    """(influence (E, T) float32, number of models used) over the completed, non-failed rows."""
    from .experiment_store import EXAMPLE_MASKS
    from .influence import InfluenceError, example_influence
    from .store import ResultStore

    store = ResultStore(store_dir)
    rows, values = store.read([EXAMPLE_MASKS, key])
    if not len(rows):
        raise InfluenceError(f"{store_dir}: no completed rows yet")
    outputs = values[key].reshape(len(rows), -1).astype(np.float64)
    return example_influence(values[EXAMPLE_MASKS], outputs, num_examples, backend=backend), len(rows)


# ------------------------------------------------------------------ near-duplicates

def _grey(image: np.ndarray) -> np.ndarray:
    """H x W x 3 (or H x W) uint8 -> WORK_SIZE x WORK_SIZE float grey, area-resampled."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(picture.convert("L").resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX), np.float64)


@lru_cache(maxsize=None)
def _area_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) matrix averaging a length-`source` signal into `target` equal bins (box filter)."""
    edges = np.linspace(0, source, target + 1)
    matrix = np.zeros((target, source))
    for i in range(target):
        for j in range(source):
            matrix[i, j] = max(0.0, min(edges[i + 1], j + 1) - max(edges[i], j))
    return matrix / matrix.sum(1, keepdims=True)


def _normalised(thumbs: np.ndarray) -> np.ndarray:
    flat = thumbs.reshape(len(thumbs), -1)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-9)


def thumbnails(image: np.ndarray) -> np.ndarray:
    """(1, THUMB_SIZE**2): the normalised (zero-mean, unit-norm) grey thumbnail of the whole image."""
    grey = _grey(image)
    matrix = _area_matrix(WORK_SIZE, THUMB_SIZE)
    return _normalised((matrix @ grey @ matrix.T)[None])


def crop_bank(image: np.ndarray) -> np.ndarray:
    """(B, THUMB_SIZE**2): normalised thumbnails of every crop of the image in CROP_SIDES, at every integer
    offset, unflipped and flipped left-right."""
    grey = _grey(image)
    thumbs = []
    for side in CROP_SIDES:
        matrix = _area_matrix(side, THUMB_SIZE)
        windows = np.lib.stride_tricks.sliding_window_view(grey, (side, side))  # (n, n, side, side)
        thumbs.append(np.einsum("is,yxst,jt->yxij", matrix, windows, matrix, optimize=True)
                      .reshape(-1, THUMB_SIZE, THUMB_SIZE))
    thumbs = np.concatenate(thumbs)
    return _normalised(np.concatenate([thumbs, thumbs[:, :, ::-1]]))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Aligned-thumbnail correlation in [-1, 1]: the best match of either image's thumbnail among the
    crops (and flips) of the other. 1 for exact copies; cropped-and-resized copies come close to 1."""
    return float(max((crop_bank(a) @ thumbnails(b)[0]).max(), (crop_bank(b) @ thumbnails(a)[0]).max()))


@lru_cache(maxsize=None)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """64-bit DCT hash (bool): the 8 x 8 lowest frequencies of the 32 x 32 grey image (DC replaced by the
    next one), each above or below their median."""
    dct = _dct_matrix(WORK_SIZE)
    low = (dct @ _grey(image) @ dct.T)[:8, :8].reshape(-1)
    low[0] = low[1]
    return low > np.median(low)


def hash_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Bits in which the perceptual hashes differ, the better of b and its mirror image."""
    ha = perceptual_hash(a)
    return int(min((ha != perceptual_hash(b)).sum(), (ha != perceptual_hash(b[:, ::-1])).sum()))


def near_duplicate(a: np.ndarray, b: np.ndarray, min_similarity: float = MIN_SIMILARITY,
                   max_hash_distance: int = MAX_HASH_DISTANCE) -> dict[str, Any]:
    """{"similarity", "hash_distance", "duplicate"}: a duplicate when either test passes."""
    return _verdict(similarity(a, b), hash_distance(a, b), min_similarity, max_hash_distance)


def _verdict(score: float, bits: int, min_similarity: float, max_hash_distance: int) -> dict[str, Any]:
    return {"similarity": round(score, 4), "hash_distance": bits,
            "duplicate": bool(score >= min_similarity or bits <= max_hash_distance)}


# ------------------------------------------------------------------ flagging

def robust_z(influence: np.ndarray) -> np.ndarray:
    """Each column's values as robust z-scores: (value - median) / (1.4826 * MAD), over the source images."""
    influence = np.asarray(influence, np.float64)
    median = np.median(influence, axis=0)
    mad = np.median(np.abs(influence - median), axis=0) * 1.4826
    return (influence - median) / np.maximum(mad, 1e-12)


class _Pixels:
    """Near-duplicate checks between source image e and target image j, with each image's thumbnail,
    hash and crop bank computed once (banks, the costly part, are kept for the most recent images)."""

    def __init__(self, source_image: Callable[[int], np.ndarray], target_image: Callable[[int], np.ndarray],
                 min_similarity: float, max_hash_distance: int, cached: int = 512):
        self.min_similarity, self.max_hash_distance = min_similarity, max_hash_distance
        self.image = {"source": source_image, "target": target_image}
        self.summary = lru_cache(maxsize=None)(self._summary)
        self.bank = lru_cache(maxsize=cached)(lambda side, i: crop_bank(self.image[side](i)).astype(np.float32))
        self.checked: dict[tuple[int, int], dict] = {}

    def _summary(self, side: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = self.image[side](i)
        return thumbnails(image)[0].astype(np.float32), perceptual_hash(image), perceptual_hash(image[:, ::-1])

    def check(self, e: int, j: int) -> dict:
        if (e, j) not in self.checked:
            (s_thumb, s_hash, _), (t_thumb, t_hash, t_mirror) = self.summary("source", e), self.summary("target", j)
            score = float((self.bank("target", j) @ s_thumb).max())
            if score < self.min_similarity:  # the other direction: the target a crop of the source image
                score = max(score, float((self.bank("source", e) @ t_thumb).max()))
            bits = int(min((s_hash != t_hash).sum(), (s_hash != t_mirror).sum()))
            self.checked[e, j] = _verdict(score, bits, self.min_similarity, self.max_hash_distance)
        return self.checked[e, j]


def flag_examples(influence: np.ndarray, source_image: Callable[[int], np.ndarray],
                  target_image: Callable[[int], np.ndarray], *, top: int = DEFAULT_TOP,
                  min_similarity: float = MIN_SIMILARITY, max_hash_distance: int = MAX_HASH_DISTANCE,
                  targets: Sequence[int] | None = None, candidates: int = 20) -> dict[str, list[dict]]:
    """Flag (source image, target image) pairs from an (E, T) example-influence matrix.

    For each target image j (all, or `targets`): its `top` most positive source images are checked for
    near-duplicates of it (`near_duplicate`); those that are become "leakage"; its `top` most negative,
    likewise, "mislabelled" copies. "misleading" lists the `candidates` most negative pairs overall by
    robust z-score that are not near-duplicates: unconfirmed candidates only. Each entry: source,
    target, influence, z (robust z-score within the target's column), rank (1 = most extreme),
    similarity (the first direction that passes), hash_distance. NaN influences (a source image in every model or in none) are skipped."""
    influence = np.asarray(influence, np.float64)
    finite = np.isfinite(influence)
    z = np.nan_to_num(robust_z(np.where(finite, influence, np.nanmedian(influence, axis=0))))
    targets = list(range(influence.shape[1]) if targets is None else targets)
    pixels = _Pixels(source_image, target_image, min_similarity, max_hash_distance)
    found: dict[str, list[dict]] = {"leakage": [], "mislabelled": [], "misleading": []}

    def entry(e: int, j: int, rank: int) -> dict:
        match = pixels.check(e, j)
        return {"source": int(e), "target": int(j), "influence": float(influence[e, j]), "z": round(float(z[e, j]), 2),
                "rank": rank, "similarity": match["similarity"], "hash_distance": match["hash_distance"]}

    for j in targets:
        column = influence[:, j]
        for finding, sign in (("leakage", 1), ("mislabelled", -1)):
            ranked = np.argsort(np.where(finite[:, j], -sign * column, np.inf), kind="stable")[:top]
            for rank, e in enumerate(ranked, 1):
                if finite[e, j] and sign * column[e] > 0 and pixels.check(int(e), j)["duplicate"]:
                    found[finding].append(entry(int(e), j, rank))
    if candidates:
        picked = np.asarray(targets)
        for index in np.argsort(z[:, picked], axis=None, kind="stable")[: 4 * candidates]:
            e, k = np.unravel_index(index, (z.shape[0], len(picked)))
            e, j = int(e), int(picked[k])
            if finite[e, j] and influence[e, j] < 0 and not pixels.check(e, j)["duplicate"]:
                found["misleading"].append(entry(e, j, int((influence[:, j] < influence[e, j]).sum()) + 1))
            if len(found["misleading"]) == candidates:
                break
    for finding in ("leakage", "mislabelled"):
        found[finding].sort(key=lambda item: -abs(item["z"]))
    return found


def score_against_planted(found: dict[str, list[dict]], planted: Sequence[dict]) -> dict[str, Any]:
    """Recall and false flags against planted copies (`extra.planted.leaks` of a planted data set):
    per role ("leak" -> leakage, "mislabelled" -> mislabelled), the planted pairs flagged and missed, and
    the flagged pairs that no copy of that role explains."""
    result: dict[str, Any] = {}
    for role, finding in (("leak", "leakage"), ("mislabelled", "mislabelled")):
        truth = {(p["source"], p["target_test"]) for p in planted if p["role"] == role}
        flagged = {(f["source"], f["target"]) for f in found[finding]}
        result[finding] = {"planted": len(truth), "flagged": len(flagged), "recall": len(truth & flagged) / len(truth)
                           if truth else None, "missed": sorted(truth - flagged),
                           "false_flags": sorted(flagged - truth)}
    return result


# ------------------------------------------------------------------ the command

def find_leaks(store_dir: str | Path, out_dir: str | Path | None = None, *, top: int = DEFAULT_TOP,
               min_similarity: float = MIN_SIMILARITY, max_hash_distance: int = MAX_HASH_DISTANCE,
               key: str = "margins", candidates: int = 20, grid_rows: int = 12, backend: str = "auto"
               ) -> dict[str, Any]:
    """Example-level findings of a store made by `experiment_store.create_example_store` and filled by the worker:
    leakage (positive influence + near-duplicate), mislabelled copies (negative + near-duplicate) and
    unconfirmed misleading candidates (`flag_examples`). Writes OUT_DIR/leaks.json (the findings, the
    thresholds, and, on planted data, recall and false flags against the planted copies) and
    OUT_DIR/leaks.png / mislabelled.png (target image beside each flagged source image); OUT_DIR defaults
    to STORE/leakage. Returns the JSON's content."""
    from beton_writers.common import read_labels, read_sidecar
    from beton_writers.verify import BetonRecords

    from .experiment_store import open_experiment

    store_dir = Path(store_dir)
    out_dir = Path(out_dir) if out_dir is not None else store_dir / "leakage"
    experiment = open_experiment(store_dir)
    source_beton, target_beton = experiment.data.path("source_train"), experiment.data.path("target_test")
    source_labels, target_labels = read_labels(source_beton), read_labels(target_beton)
    influence, models = example_influence_from_store(store_dir, len(source_labels), key, backend)
    sources, targets = BetonRecords(source_beton), BetonRecords(target_beton)
    found = flag_examples(influence, sources.image, targets.image, top=top, min_similarity=min_similarity,
                          max_hash_distance=max_hash_distance, candidates=candidates)
    source_names = read_sidecar(source_beton)["class_names"]
    target_names = read_sidecar(target_beton)["class_names"]
    for entries in found.values():
        for item in entries:
            item["source_class"] = source_names[source_labels[item["source"]]]
            item["target_class"] = target_names[target_labels[item["target"]]]
    result: dict[str, Any] = {
        "store": str(store_dir), "models": models, "source_examples": len(source_labels),
        "target_examples": len(target_labels), "key": key,
        "thresholds": {"top": top, "min_similarity": min_similarity, "max_hash_distance": max_hash_distance},
        **found}
    planted = read_sidecar(source_beton).get("extra", {}).get("planted", {}).get("leaks")
    if planted:
        result["planted"] = score_against_planted(found, planted)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "leaks.json").write_text(json.dumps(result, indent=1) + "\n")
    result["figures"] = [str(p) for p in _grids(found, sources.image, targets.image, out_dir, grid_rows)]
    return result


def _grids(found: dict[str, list[dict]], source_image: Callable[[int], np.ndarray],
           target_image: Callable[[int], np.ndarray], out_dir: Path, rows: int) -> list[Path]:
    """One PNG per confirmed finding: pairs of (target image, flagged source image), four pairs a row."""
    from .plots import image_grid

    paths = []
    for finding, title in (("leakage", "leakage: target test image, then a near-duplicate source image with "
                                       "large positive influence"),
                           ("mislabelled", "mislabelled copies: target test image, then a near-duplicate source "
                                           "image with large negative influence")):
        shown = found[finding][: 4 * rows]
        if not shown:
            continue
        images, captions = [], []
        for item in shown:
            images += [target_image(item["target"]), source_image(item["source"])]
            captions += [f"target {item['target']}", f"src {item['source']} {item['influence']:+.2f} "
                                                     f"z{item['z']:+.1f}"]
        name = "leaks.png" if finding == "leakage" else "mislabelled.png"
        paths.append(image_grid(out_dir / name, images, captions, title, columns=8))
    return paths
