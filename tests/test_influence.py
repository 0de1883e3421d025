"""Influence kernel against float64 references, hand-computed cases and closed forms."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.findings.influence import influence_from_store, write_influence
from ffcv_transfer.findings.kernel import (
    TABLE_CLASSES,
    TABLE_COLUMNS,
    InfluenceAccumulator,
    InfluenceBackend,
    InfluenceError,
    NumbaBackend,
    available_backends,
    class_influence,
    example_influence,
    example_influence_blocks,
    plan_blocks,
)
from ffcv_transfer.store.results import ResultStore

BACKENDS = available_backends()


def reference(masks, outputs):
    """The definition, in float64, one class at a time."""
    m, y = np.asarray(masks, bool), np.asarray(outputs, np.float64)
    return np.stack([y[m[:, c]].mean(0) - y[~m[:, c]].mean(0) for c in range(m.shape[1])])


def relative_error(result, expected):
    return np.linalg.norm(result - expected) / np.linalg.norm(expected)


def random_case(rng, n, classes, width, dtype=np.float16):
    masks = rng.random((n, classes)) < 0.5
    # margins-like outputs: a large common mean makes the naive difference of means lose precision
    outputs = 3.0 + rng.normal(size=(n, width)) + 0.3 * masks[:, :1]
    return masks, outputs.astype(dtype)


def test_hand_computed_three_models_two_classes():
    masks = np.array([[1, 0], [0, 1], [1, 1]])
    outputs = np.array([[1.0, 0.0], [2.0, 3.0], [4.0, -1.0]], np.float32)
    # class 0: in = models 0, 2; out = model 1.  class 1: in = models 1, 2; out = model 0.
    expected = np.array([[(1 + 4) / 2 - 2, (0 - 1) / 2 - 3], [(2 + 4) / 2 - 1, (3 - 1) / 2 - 0]])
    for backend in BACKENDS:
        np.testing.assert_allclose(class_influence(masks, outputs, backend=backend), expected, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_random_cases_match_float64_reference(backend, dtype):
    rng = np.random.default_rng(0)
    for n, classes, width, chunk in [(101, 7, 13, 1000), (257, 33, 5, 64), (300, 3, 40, 299), (96, 11, 17, 7)]:
        masks, outputs = random_case(rng, n, classes, width, dtype)
        result = class_influence(masks, outputs, backend=backend, chunk=chunk)
        assert result.dtype == np.float32 and result.shape == (classes, width)
        assert relative_error(result, reference(masks, outputs)) < 1e-6


def test_chunk_boundaries_and_streaming_agree():
    rng = np.random.default_rng(1)
    masks, outputs = random_case(rng, 200, 9, 6, np.float32)
    expected = reference(masks, outputs)
    for chunk in (1, 2, 199, 200, 201):
        assert relative_error(class_influence(masks, outputs, chunk=chunk, backend="numpy"), expected) < 1e-6
    accumulator = InfluenceAccumulator(9, 6, backend="numpy")
    for start, stop in [(0, 3), (3, 3), (3, 150), (150, 200)]:  # uneven pieces, one empty
        accumulator.update(masks[start:stop].astype(np.uint8), outputs[start:stop])
    assert relative_error(accumulator.result(), expected) < 1e-6


def test_class_in_every_model_or_none_gives_nan_and_one_warning():
    rng = np.random.default_rng(2)
    masks, outputs = random_case(rng, 50, 6, 4)
    masks[:, 1], masks[:, 4] = True, False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = class_influence(masks, outputs, backend="numpy")
    assert len(caught) == 1 and "2 class(es)" in str(caught[0].message) and ": 1, 4" in str(caught[0].message)
    assert np.isnan(result[[1, 4]]).all() and np.isfinite(result[[0, 2, 3, 5]]).all()


def test_non_finite_outputs_name_the_model_rows():
    rng = np.random.default_rng(3)
    masks, outputs = random_case(rng, 30, 4, 5, np.float32)
    outputs[7, 2], outputs[21, 0] = np.nan, np.inf
    with pytest.raises(InfluenceError, match=r"2 model row\(s\): 7, 21"):
        class_influence(masks, outputs, chunk=10)


def test_finite_outputs_whose_sums_overflow_are_an_error_not_a_dropped_chunk():
    masks = np.array([[1, 0], [0, 1], [1, 1]], bool)
    outputs = np.full((3, 2), 1e308)
    with pytest.raises(InfluenceError, match=r"rows 0..2 are finite but their sums overflow .*1e\+308"):
        class_influence(masks, outputs, backend="numpy")


def test_shape_and_dtype_errors_are_clear():
    masks, outputs = np.ones((5, 3), bool), np.zeros((5, 2), np.float32)
    with pytest.raises(InfluenceError, match="5 mask rows but 4 output rows"):
        class_influence(masks, outputs[:4])
    with pytest.raises(InfluenceError, match="must be 2-D"):
        class_influence(masks[0], outputs)
    with pytest.raises(InfluenceError, match="float16/32/64"):
        class_influence(masks, outputs.astype(np.int32))
    with pytest.raises(InfluenceError, match="only 0 and 1"):
        class_influence(np.full((5, 3), 2), outputs)
    with pytest.raises(InfluenceError, match="backend 'gpu'"):
        class_influence(masks, outputs, backend="gpu")
    accumulator = InfluenceAccumulator(3, 2)
    with pytest.raises(InfluenceError, match=r"expected masks \(n, 3\) and outputs \(n, 2\)"):
        accumulator.update(np.ones((2, 4), bool), np.zeros((2, 2)))


def test_standard_error_matches_closed_form_and_bootstrap():
    rng = np.random.default_rng(4)
    masks, outputs = random_case(rng, 400, 3, 2, np.float64)
    influence, stderr = class_influence(masks, outputs, stderr=True, chunk=150)
    y = outputs.astype(np.float64)
    for c in range(3):
        inside, outside = y[masks[:, c]], y[~masks[:, c]]
        closed = np.sqrt(inside.var(0, ddof=1) / len(inside) + outside.var(0, ddof=1) / len(outside))
        np.testing.assert_allclose(stderr[c], closed, rtol=1e-5)
    boot = []
    for _ in range(1000):
        pick = rng.integers(0, 400, 400)
        boot.append(class_influence(masks[pick], outputs[pick], backend="numpy"))
    np.testing.assert_allclose(np.std(boot, axis=0), stderr, rtol=0.15)


def test_example_influence_from_packed_masks_matches_unpacked():
    rng = np.random.default_rng(5)
    masks, outputs = random_case(rng, 120, 45, 6, np.float32)  # 45 examples: not a multiple of 8
    packed = np.packbits(masks, axis=1)
    expected = reference(masks, outputs)
    assert relative_error(example_influence(packed, outputs, 45, backend="numpy"), expected) < 1e-6
    # 3 example blocks x 2 blocks of 3 output columns, one model at a time: the same numbers
    assert plan_blocks(16, 6, 120, max_bytes=1500, row_bytes=2 + 6 * 4) == (1, 3)
    pieces = list(example_influence_blocks(packed, outputs, 45, block=16, max_bytes=1500, backend="numpy"))
    assert len(pieces) == 3 * 2
    result = np.full_like(expected, np.nan)
    for examples, columns, values in pieces:
        assert np.isnan(result[examples, columns]).all()  # each piece once
        result[examples, columns] = values
    assert relative_error(result, expected) < 1e-6
    with pytest.raises(InfluenceError, match="45 examples need 6 packed bytes"):
        example_influence(packed[:, :5], outputs, 45)


def test_influence_from_store_streams_completed_rows(tmp_path):
    rng = np.random.default_rng(6)
    masks, outputs = random_case(rng, 60, 8, 10)
    store = ResultStore.create(tmp_path / "store", 60, {"margins": ((10,), np.float16)}, fixed={"masks": masks})
    writers = [store.writer(), store.writer()]
    done = [r for r in rng.permutation(60) if r % 7]  # rows 0, 7, 14, ... never finish
    for k, row in enumerate(done):
        writers[k % 2].write(int(row), margins=outputs[row])
    writers[0].fail(int(done[0]), "NaN loss at epoch 3")
    used = np.array(sorted(done[1:]))
    expected = reference(masks[used], outputs[used])
    result = influence_from_store(tmp_path / "store", "margins", chunk=16, backend="numpy")
    assert relative_error(result, expected) < 1e-6
    # 1.5 KB holds one model and 2 of the 10 columns a pass: five passes over the store, the same numbers
    assert plan_blocks(8, 10, len(used), max_bytes=1500, stderr=True, row_bytes=20) == (1, 2)
    blocked, blocked_stderr = influence_from_store(
        tmp_path / "store", "margins", backend="numpy", stderr=True, max_bytes=1500
    )
    whole, whole_stderr = class_influence(masks[used], outputs[used], stderr=True)
    assert relative_error(blocked, expected) < 1e-6 and relative_error(blocked_stderr, whole_stderr) < 1e-6
    with pytest.raises(InfluenceError, match="cannot hold one column"):
        influence_from_store(tmp_path / "store", "margins", max_bytes=100)
    out = tmp_path / "infl.npy"
    assert (
        cli_main(
            [
                "influence",
                str(tmp_path / "store"),
                "--backend",
                "numpy",
                "--stderr",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert relative_error(np.load(out), expected) < 1e-6 and np.load(tmp_path / "infl.stderr.npy").shape == (8, 10)


def test_write_influence_writes_whole_files_or_leaves_the_earlier_ones(tmp_path):
    rng = np.random.default_rng(10)
    masks, outputs = random_case(rng, 40, 5, 7)
    store = ResultStore.create(tmp_path / "store", 40, {"margins": ((7,), np.float16)}, fixed={"masks": masks})
    store.writer().write_many(range(40), margins=outputs)
    out = tmp_path / "infl.npy"
    written = write_influence([tmp_path / "store"], out, stderr=True, backend="numpy", max_bytes=1500)
    assert written == [out, tmp_path / "infl.stderr.npy"]
    influence, stderr = np.load(written[0]), np.load(written[1])
    assert relative_error(influence, reference(masks, outputs)) < 1e-6
    np.testing.assert_allclose(stderr, class_influence(masks, outputs, stderr=True)[1], rtol=1e-5)
    for row in range(40):  # now the computation fails after the files were opened
        store.writer().fail(row, "diverged")
    with pytest.raises(InfluenceError, match="every completed row is marked failed"):
        write_influence([tmp_path / "store"], out, stderr=True, backend="numpy")
    np.testing.assert_array_equal(np.load(written[0]), influence)
    np.testing.assert_array_equal(np.load(written[1]), stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infl.npy", "infl.stderr.npy", "store"]


numba_only = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")


@numba_only
def test_numba_table_sums_equal_float64_sums_across_tiles():
    """The table kernel against float64 numpy on the same inputs: class tiles (more than TABLE_CLASSES
    columns), a partial column tile, and an odd number of eight-model groups (the last one short)."""
    rng = np.random.default_rng(7)
    backend = NumbaBackend()
    for models, classes, width in [
        (21, TABLE_CLASSES + 100, TABLE_COLUMNS + 5),
        (8, 3, 1),
        (70, 45, 2 * TABLE_COLUMNS),
    ]:
        masks = rng.random((models, classes)) < 0.5
        values = rng.normal(size=(models, width))
        expected = masks.T.astype(np.float64) @ values
        for put in (backend.put_masks(masks), backend.put_packed_masks(np.packbits(masks, axis=1), classes)):
            np.testing.assert_allclose(backend.masked_sums(put, values), expected, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(backend.mask_counts(put), masks.sum(0))


@numba_only
def test_numba_example_influence_from_packed_bytes_matches_numpy_and_the_reference():
    rng = np.random.default_rng(8)
    masks, outputs = random_case(rng, 83, 203, 37, np.float16)  # 203 examples: a partial last byte
    packed = np.packbits(masks, axis=1)
    numba, numpy = (example_influence(packed, outputs, 203, backend=name, block=64) for name in ("numba", "numpy"))
    np.testing.assert_allclose(numba, numpy, rtol=1e-5, atol=1e-6)
    assert relative_error(numba, reference(masks, outputs)) < 1e-6
    accumulator = InfluenceAccumulator(203, 37, backend="numba")
    with pytest.raises(InfluenceError, match=r"203 classes need packed masks \(n, 26\) uint8"):
        accumulator.update_packed(packed[:, :25], outputs)


def test_any_influence_backend_subclass_drives_the_accumulator():
    """A backend is the seven abstract methods; one written here (float64 numpy, masks as 0/1 floats)
    gives the definition's numbers, and a class that leaves one out cannot be made."""

    class Plain(InfluenceBackend):
        def put(self, array):
            return np.array(array)

        def host(self, array):
            return array

        def zeros(self, shape):
            return np.zeros(shape)

        def center(self, outputs):
            mean = outputs.astype(np.float64).mean(0)
            return outputs - mean, mean

        def colsum(self, array):
            return array.sum(0, dtype=np.float64)

        def finite(self, array):
            return bool(np.isfinite(array).all())

        def masked_sums(self, masks, values):
            return masks.T.astype(np.float64) @ values

    rng = np.random.default_rng(9)
    masks, outputs = random_case(rng, 90, 6, 4, np.float64)
    accumulator = InfluenceAccumulator(6, 4, backend=Plain())
    accumulator.update(masks[:40], outputs[:40])
    accumulator.update_packed(np.packbits(masks[40:], axis=1), outputs[40:])
    assert relative_error(accumulator.result(), reference(masks, outputs)) < 1e-6  # float32 results

    class Incomplete(InfluenceBackend):
        def put(self, array):
            return array

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_kernel_and_store_import_without_torch_or_ffcv():
    code = (
        "import sys, ffcv_transfer.findings.kernel, ffcv_transfer.findings.influence, ffcv_transfer.store.results; "
        "sys.exit(bool({'torch', 'ffcv', 'cupy'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def least_squares_reference(masks, outputs):
    """Ordinary least squares in float64 with an intercept: each class's inclusion coefficient and its
    textbook standard error sqrt(diag((X'X)^-1) RSS / (N - p)), X = [1, masks]."""
    design = np.column_stack([np.ones(len(masks)), np.asarray(masks, np.float64)])
    y = np.asarray(outputs, np.float64)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = np.square(y - design @ beta).sum(0)
    covariance = np.linalg.inv(design.T @ design)
    stderr = np.sqrt(np.diag(covariance)[1:, None] * rss[None, :] / (len(design) - design.shape[1]))
    return beta[1:], stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_least_squares_matches_ols_in_chunks_and_packed(backend):
    rng = np.random.default_rng(21)
    masks, outputs = random_case(rng, 200, 12, 30, np.float32)
    outputs = outputs + masks[:, 3:4] * 0.8 - masks[:, 5:6] * 0.5  # planted effects on top of noise
    expected, expected_stderr = least_squares_reference(masks, outputs)
    result, stderr = class_influence(masks, outputs, backend=backend, stderr=True, chunk=37, estimator="least_squares")
    assert relative_error(result, expected) < 1e-5 and relative_error(stderr, expected_stderr) < 1e-5
    packed = InfluenceAccumulator(12, 30, backend=backend, estimator="least_squares")
    for start in range(0, 200, 64):
        packed.update_packed(np.packbits(masks[start : start + 64], axis=1), outputs[start : start + 64])
    assert relative_error(packed.result(), expected) < 1e-5


def test_least_squares_is_the_difference_of_means_on_an_orthogonal_design_and_refuses_too_few_models():
    from ffcv_transfer.store.masks import orthogonal_class_masks

    rng = np.random.default_rng(22)
    masks = orthogonal_class_masks(32, 7, seed=0)
    outputs = rng.normal(size=(32, 9)) + masks[:, :1] * 2.0
    np.testing.assert_allclose(
        class_influence(masks, outputs, estimator="least_squares"), reference(masks, outputs), atol=1e-5
    )
    with pytest.warns(RuntimeWarning, match="included in every model or in none"):
        everywhere = np.column_stack([masks, np.ones(32, bool)])
        result = class_influence(everywhere, outputs, estimator="least_squares")
    assert np.isnan(result[7]).all() and np.allclose(result[:7], reference(masks, outputs), atol=1e-5)
    with pytest.raises(InfluenceError, match="more models than classes"):
        class_influence(masks[:8], outputs[:8], estimator="least_squares")
    with pytest.raises(InfluenceError, match="estimator 'median'"):
        class_influence(masks, outputs, estimator="median")


def test_influence_command_estimates_by_least_squares(tmp_path, capsys):
    rng = np.random.default_rng(23)
    masks, outputs = random_case(rng, 40, 6, 10, np.float32)
    store = ResultStore.create(tmp_path / "store", 40, {"margins": ((10,), np.float32)}, fixed={"masks": masks})
    store.writer().write_many(range(40), margins=outputs)
    out = tmp_path / "ls.npy"
    command = ["influence", str(tmp_path / "store"), "--estimator", "least_squares", "--out", str(out)]
    assert cli_main(command) == 0
    assert relative_error(np.load(out), least_squares_reference(masks, outputs)[0]) < 1e-5
    few = ResultStore.create(tmp_path / "few", 6, {"margins": ((10,), np.float32)}, fixed={"masks": masks[:6]})
    few.writer().write_many(range(6), margins=outputs[:6])
    capsys.readouterr()
    assert cli_main(["influence", str(tmp_path / "few"), "--estimator", "least_squares", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs more models than classes + 1; 6 models, 6 classes" in err and len(err.splitlines()) == 1
    assert relative_error(np.load(out), least_squares_reference(masks, outputs)[0]) < 1e-5  # kept
