"""Example-level influence and leakage: which single source images move which target test images.

Masks over source *examples* (each model trains on a random alpha-fraction of the source images, every
class present) and the same kernel as for classes give an (E, T) matrix: the mean margin of target test
image j over the models whose training set held source image e, minus over the models without it. At the
paper's sizes it is never held whole: `influence.example_influence_blocks` streams it and
`ExtremeExamples` keeps what the findings read (each target's most extreme source images and its robust
scale). Two findings come out of it, each confirmed on the pixels:

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
input checks read) and the worker trains each model on its examples (train.py routes on example indices).
`find_leaks` is the entry point: it reads the store, writes leaks.json and image grids, and returns the findings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.findings.kernel import DEFAULT_MAX_BYTES

WORK_SIZE = 32  # images are compared in grey at this size
THUMB_SIZE = 16  # ... through thumbnails of this size
CROP_SIDES = (32, 30, 28, 26, 24)  # crops of the 32 px image tried when aligning two images
MIN_SIMILARITY = 0.9  # aligned-thumbnail correlation at or above which two images are near-duplicates
MAX_HASH_DISTANCE = 8  # perceptual-hash bits at or below which two images are near-duplicates
DEFAULT_TOP = 10  # source images examined per target image, at each end of its influence ranking


# ------------------------------------------------------------------ example influence, kept in part

Z_SAMPLE = 4096  # source examples (evenly spaced) behind each target's median and MAD for robust z-scores
MERGE_COLUMNS = 512  # target columns ranked at a time when merging a block into the extremes


@dataclass
class ExtremeExamples:
    """What the findings need of an (E, T) example influence, in O(T x keep) memory: per target image
    (column) the `keep` most positive and most negative source images (indices, influences; most extreme
    first, ties to the lower index, -1 / NaN past the finite ones) and the column's median and scaled MAD
    for robust z-scores, from at most Z_SAMPLE evenly spaced source images (all of them when E is smaller,
    which makes the scores exact)."""

    num_examples: int
    positive: np.ndarray  # (T, keep) int64
    positive_values: np.ndarray  # (T, keep) float32
    negative: np.ndarray
    negative_values: np.ndarray
    median: np.ndarray  # (T,) float64
    mad: np.ndarray  # (T,) float64: 1.4826 x MAD, at least 1e-12

    @classmethod
    def from_blocks(
        cls, blocks: Iterable[tuple[slice, slice, np.ndarray]], num_examples: int, num_targets: int, keep: int
    ) -> ExtremeExamples:
        """Merge (example slice, target slice, float32 values) pieces (`influence.example_influence_blocks`)."""
        sample = np.unique(np.linspace(0, num_examples - 1, min(num_examples, Z_SAMPLE)).round().astype(np.int64))
        sampled = np.full((len(sample), num_targets), np.nan, np.float32)
        ends = {
            sign: (np.full((num_targets, keep), -1, np.int64), np.full((num_targets, keep), np.nan, np.float32))
            for sign in (1, -1)
        }  # per target, sign x influence, largest first
        for examples, block_columns, block in blocks:
            here = (sample >= examples.start) & (sample < examples.stop)
            sampled[here, block_columns] = block[sample[here] - examples.start]
            for first in range(0, block.shape[1], MERGE_COLUMNS):  # bounds the sort's temporaries
                values = block[:, first : first + MERGE_COLUMNS]
                columns = slice(block_columns.start + first, block_columns.start + first + values.shape[1])
                for sign, (index, kept) in ends.items():
                    ranked = np.where(np.isfinite(values), sign * values, -np.inf)
                    order = _best_rows(ranked, keep)
                    both_index = np.concatenate([index[columns], (order + examples.start).T], 1)
                    both_values = np.concatenate(
                        [np.where(index[columns] >= 0, kept[columns], -np.inf), np.take_along_axis(ranked, order, 0).T],
                        1,
                    )
                    best = np.lexsort((both_index, -both_values), axis=1)[:, :keep]
                    best_values = np.take_along_axis(both_values, best, 1)
                    found = np.isfinite(best_values)
                    index[columns] = np.where(found, np.take_along_axis(both_index, best, 1), -1)
                    kept[columns] = np.where(found, best_values, np.nan)
        median, mad = _robust_scale(sampled)
        (positive, positive_values), (negative, negative_values) = ends[1], ends[-1]
        return cls(num_examples, positive, positive_values, negative, -negative_values, median, mad)

    @classmethod
    def from_dense(cls, influence: np.ndarray, keep: int) -> ExtremeExamples:
        influence = np.asarray(influence, np.float32)
        whole = (slice(0, influence.shape[0]), slice(0, influence.shape[1]), influence)
        return cls.from_blocks([whole], influence.shape[0], influence.shape[1], keep)

    def z(self, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Robust z-scores of influences `values` on target images `targets` (broadcast)."""
        return (np.asarray(values, np.float64) - self.median[targets]) / self.mad[targets]


def _best_rows(ranked: np.ndarray, keep: int) -> np.ndarray:
    """Per column, the rows of the `keep` largest values, largest first and ties to the lower row: what a
    stable descending argsort gives, by partition (a full sort of each block cost more than its GEMM).
    Columns where the partition may have cut through a tie are sorted whole."""
    if keep >= len(ranked):
        return np.argsort(-ranked, axis=0, kind="stable")
    part = np.argpartition(-ranked, keep - 1, axis=0)[:keep]
    values = np.take_along_axis(ranked, part, 0)
    part = np.take_along_axis(part, np.lexsort((part, -values), axis=0), 0)
    edge = values.min(0)
    cut = np.flatnonzero((ranked == edge).sum(0) != (values == edge).sum(0))
    if len(cut):
        part[:, cut] = np.argsort(-ranked[:, cut], axis=0, kind="stable")[:keep]
    return part


def _robust_scale(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the median and 1.4826 x MAD (at least 1e-12), non-finite values counted at the median.
    MERGE_COLUMNS columns at a time, so that the float64 temporaries stay small beside `values`."""
    median, mad = np.empty(values.shape[1]), np.empty(values.shape[1])
    for first in range(0, values.shape[1], MERGE_COLUMNS):
        columns = slice(first, first + MERGE_COLUMNS)
        part = np.asarray(values[:, columns], np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its scale is NaN, its z 0
            part = np.where(np.isfinite(part), part, np.nanmedian(part, axis=0))
        median[columns] = np.median(part, axis=0)
        mad[columns] = np.median(np.abs(part - median[columns]), axis=0) * 1.4826
    return median, np.maximum(mad, 1e-12)


def extreme_examples_from_store(
    store_dir: str | Path,
    num_examples: int,
    keep: int,
    key: str = "margins",
    backend: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    spill_dir: str | Path | None = None,
) -> tuple[ExtremeExamples, int]:
    """(ExtremeExamples, number of models used) over the completed, non-failed rows, streamed: the masks
    stay in the store's file and are read a block of examples at a time; the outputs are gathered once,
    onto disk (a file in `spill_dir`, removed after) when they would take more than a quarter of
    `max_bytes`, else in memory."""
    import tempfile

    from ffcv_transfer.findings.kernel import InfluenceError, example_influence_blocks
    from ffcv_transfer.store.experiment import EXAMPLE_MASKS
    from ffcv_transfer.store.results import ResultStore

    store = ResultStore(store_dir)
    store.require([EXAMPLE_MASKS, key])
    rows = np.setdiff1d(store.completed_rows(), list(store.failures()))
    if not len(rows):
        raise InfluenceError(f"{store_dir}: no completed rows yet")
    shape, dtype = store.schema[key]
    width = int(np.prod(shape))
    with tempfile.TemporaryDirectory(dir=spill_dir, prefix="outputs-") as spill:
        if len(rows) * width * np.dtype(dtype).itemsize > max_bytes // 4:
            outputs = np.lib.format.open_memmap(Path(spill) / "outputs.npy", "w+", dtype, (len(rows), width))
        else:
            outputs = np.empty((len(rows), width), dtype)
        done = 0
        for part, values in store.iter_chunks([key]):
            outputs[done : done + len(part)] = values[key].reshape(len(part), width)
            done += len(part)
        blocks = example_influence_blocks(
            store.fixed(EXAMPLE_MASKS), outputs, num_examples, rows=rows, backend=backend, max_bytes=max_bytes
        )
        extremes = ExtremeExamples.from_blocks(blocks, num_examples, width, keep)
        del outputs
    return extremes, len(rows)


# ------------------------------------------------------------------ near-duplicates


def _grey(image: np.ndarray) -> np.ndarray:
    """H x W x 3 (or H x W) uint8 -> WORK_SIZE x WORK_SIZE float grey, area-resampled."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(picture.convert("L").resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX), np.float64)


@cache
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
        thumbs.append(
            np.einsum("is,yxst,jt->yxij", matrix, windows, matrix, optimize=True).reshape(-1, THUMB_SIZE, THUMB_SIZE)
        )
    thumbs = np.concatenate(thumbs)
    return _normalised(np.concatenate([thumbs, thumbs[:, :, ::-1]]))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Aligned-thumbnail correlation in [-1, 1]: the best match of either image's thumbnail among the
    crops (and flips) of the other. 1 for exact copies; cropped-and-resized copies come close to 1."""
    return float(max((crop_bank(a) @ thumbnails(b)[0]).max(), (crop_bank(b) @ thumbnails(a)[0]).max()))


@cache
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


def near_duplicate(
    a: np.ndarray, b: np.ndarray, min_similarity: float = MIN_SIMILARITY, max_hash_distance: int = MAX_HASH_DISTANCE
) -> dict[str, Any]:
    """{"similarity", "hash_distance", "duplicate"}: a duplicate when either test passes."""
    return _verdict(similarity(a, b), hash_distance(a, b), min_similarity, max_hash_distance)


def _verdict(score: float, bits: int, min_similarity: float, max_hash_distance: int) -> dict[str, Any]:
    return {
        "similarity": round(score, 4),
        "hash_distance": bits,
        "duplicate": bool(score >= min_similarity or bits <= max_hash_distance),
    }


# ------------------------------------------------------------------ flagging


class _Pixels:
    """Near-duplicate checks between source image e and target image j, with each image's thumbnail,
    hash and crop bank computed once (banks, the costly part, are kept for the most recent images)."""

    def __init__(
        self,
        source_image: Callable[[int], np.ndarray],
        target_image: Callable[[int], np.ndarray],
        min_similarity: float,
        max_hash_distance: int,
        cached: int = 512,
    ):
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


def flag_examples(
    influence: np.ndarray | ExtremeExamples,
    source_image: Callable[[int], np.ndarray],
    target_image: Callable[[int], np.ndarray],
    *,
    top: int = DEFAULT_TOP,
    min_similarity: float = MIN_SIMILARITY,
    max_hash_distance: int = MAX_HASH_DISTANCE,
    targets: Sequence[int] | None = None,
    candidates: int = 20,
) -> dict[str, list[dict]]:
    """Flag (source image, target image) pairs from an (E, T) example influence, whole or as its
    `ExtremeExamples` (which must keep at least max(top, 4 x candidates) a side).

    For each target image j (all, or `targets`): its `top` most positive source images are checked for
    near-duplicates of it (`near_duplicate`); those that are become "leakage"; its `top` most negative,
    likewise, "mislabelled" copies. "misleading" lists the `candidates` most negative pairs overall by
    robust z-score that are not near-duplicates: unconfirmed candidates only. Each entry: source,
    target, influence, z (robust z-score within the target's column), rank (1 = most extreme),
    similarity (the first direction that passes), hash_distance. NaN influences (a source image in every
    model or in none) are skipped."""
    keep = max(top, 4 * candidates)
    extremes = influence if isinstance(influence, ExtremeExamples) else ExtremeExamples.from_dense(influence, keep)
    if extremes.positive.shape[1] < keep:
        raise ValueError(
            f"the extremes keep {extremes.positive.shape[1]} source images a side; top={top} and "
            f"candidates={candidates} need {keep}"
        )
    targets = np.arange(len(extremes.median)) if targets is None else np.asarray(targets, np.int64)
    pixels = _Pixels(source_image, target_image, min_similarity, max_hash_distance)
    found: dict[str, list[dict]] = {"leakage": [], "mislabelled": [], "misleading": []}

    def entry(e: int, j: int, value: float, rank: int) -> dict:
        match = pixels.check(e, j)
        return {
            "source": e,
            "target": j,
            "influence": float(value),
            "z": round(float(extremes.z(value, j)), 2),
            "rank": rank,
            "similarity": match["similarity"],
            "hash_distance": match["hash_distance"],
        }

    for j in targets.tolist():
        for finding, sign, index, values in (
            ("leakage", 1, extremes.positive, extremes.positive_values),
            ("mislabelled", -1, extremes.negative, extremes.negative_values),
        ):
            for rank, (e, value) in enumerate(zip(index[j, :top].tolist(), values[j, :top].tolist()), 1):
                if e >= 0 and sign * value > 0 and pixels.check(e, j)["duplicate"]:
                    found[finding].append(entry(e, j, value, rank))
    if candidates:
        index, values = extremes.negative[targets], extremes.negative_values[targets]  # (targets, keep)
        z = extremes.z(values, targets[:, None])
        which = np.broadcast_to(np.arange(len(targets))[:, None], index.shape)
        listed = index >= 0
        order = np.lexsort((which[listed], index[listed], z[listed]))[: 4 * candidates]  # z, then (e, j)
        for k, e, value in zip(
            which[listed][order].tolist(), index[listed][order].tolist(), values[listed][order].tolist()
        ):
            j = int(targets[k])
            if value < 0 and not pixels.check(e, j)["duplicate"]:
                found["misleading"].append(entry(e, j, value, int((values[k] < value).sum()) + 1))
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
        result[finding] = {
            "planted": len(truth),
            "flagged": len(flagged),
            "recall": len(truth & flagged) / len(truth) if truth else None,
            "missed": sorted(truth - flagged),
            "false_flags": sorted(flagged - truth),
        }
    return result


# ------------------------------------------------------------------ the command


def find_leaks(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    top: int = DEFAULT_TOP,
    min_similarity: float = MIN_SIMILARITY,
    max_hash_distance: int = MAX_HASH_DISTANCE,
    key: str = "margins",
    candidates: int = 20,
    grid_rows: int = 12,
    backend: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    mode: str | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """Example-level findings of a store made by `experiment_store.create_example_store` and filled by the worker:
    leakage (positive influence + near-duplicate), mislabelled copies (negative + near-duplicate) and
    unconfirmed misleading candidates (`flag_examples`). Writes OUT_DIR/leaks.json (the findings, the
    thresholds, and, on planted data, recall and false flags against the planted copies) and
    OUT_DIR/leaks.png / mislabelled.png (target image beside each flagged source image); OUT_DIR defaults
    to STORE/leakage. Returns the JSON's content."""
    from ffcv_transfer.store.betons import BetonRecords, read_labels, read_sidecar
    from ffcv_transfer.store.experiment import open_experiment, transfer_field

    store_dir = Path(store_dir)
    out_dir = Path(out_dir) if out_dir is not None else store_dir / "leakage"
    experiment = open_experiment(store_dir)
    key = transfer_field(key, experiment, target, mode)
    source_beton = experiment.data.path("source_train")
    target_beton = experiment.target(target).path(experiment.data.root, "target_test")
    source_labels, target_labels = read_labels(source_beton), read_labels(target_beton)
    out_dir.mkdir(parents=True, exist_ok=True)
    extremes, models = extreme_examples_from_store(
        store_dir, len(source_labels), max(top, 4 * candidates), key, backend, max_bytes, spill_dir=out_dir
    )
    sources, targets = BetonRecords(source_beton), BetonRecords(target_beton)
    found = flag_examples(
        extremes,
        sources.image,
        targets.image,
        top=top,
        min_similarity=min_similarity,
        max_hash_distance=max_hash_distance,
        candidates=candidates,
    )
    source_names = read_sidecar(source_beton)["class_names"]
    target_names = read_sidecar(target_beton)["class_names"]
    for entries in found.values():
        for item in entries:
            item["source_class"] = source_names[source_labels[item["source"]]]
            item["target_class"] = target_names[target_labels[item["target"]]]
    result: dict[str, Any] = {
        "store": str(store_dir),
        "models": models,
        "source_examples": len(source_labels),
        "target_examples": len(target_labels),
        "key": key,
        "thresholds": {"top": top, "min_similarity": min_similarity, "max_hash_distance": max_hash_distance},
        **found,
    }
    planted = read_sidecar(source_beton).get("extra", {}).get("planted", {}).get("leaks")
    if planted:
        result["planted"] = score_against_planted(found, planted)
    (out_dir / "leaks.json").write_text(json.dumps(result, indent=1) + "\n")
    result["figures"] = [str(p) for p in _grids(found, sources.image, targets.image, out_dir, grid_rows)]
    return result


def _grids(
    found: dict[str, list[dict]],
    source_image: Callable[[int], np.ndarray],
    target_image: Callable[[int], np.ndarray],
    out_dir: Path,
    rows: int,
) -> list[Path]:
    """One PNG per confirmed finding: pairs of (target image, flagged source image), four pairs a row."""
    from ffcv_transfer.findings.plots import image_grid

    paths = []
    for finding, title in (
        ("leakage", "leakage: target test image, then a near-duplicate source image with large positive influence"),
        (
            "mislabelled",
            "mislabelled copies: target test image, then a near-duplicate source image with large negative influence",
        ),
    ):
        shown = found[finding][: 4 * rows]
        if not shown:
            continue
        images, captions = [], []
        for item in shown:
            images += [target_image(item["target"]), source_image(item["source"])]
            captions += [f"target {item['target']}", f"src {item['source']} {item['influence']:+.2f} z{item['z']:+.1f}"]
        name = "leaks.png" if finding == "leakage" else "mislabelled.png"
        paths.append(image_grid(out_dir / name, images, captions, title, columns=8))
    return paths
