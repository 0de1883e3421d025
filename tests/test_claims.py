"""engine.claims.run_claims, the one claim loop, on a store with planted group functions: no training."""

from __future__ import annotations

import numpy as np
import pytest

from ffcv_transfer.engine.claims import GroupOutcome, run_claims
from ffcv_transfer.store.results import ResultStore


def make_store(path, rows: int = 7) -> ResultStore:
    return ResultStore.create(path, rows, {"x": ((2,), "float32")}, fixed={"masks": np.ones((rows, 3), bool)})


def test_groups_of_k_are_written_a_planted_failure_recorded_and_a_rerun_finds_nothing(tmp_path):
    """Rows 0..6 in groups of 3 (the last of 1); row 4 fails; every other row holds (row, row^2)."""
    store = make_store(tmp_path / "s")
    groups, stages = [], []

    def work(claimed: list[int], report) -> GroupOutcome:
        groups.append(list(claimed))
        report("epoch 1/1")
        stages.append(sorted(int(p.stem) for p in (store.path / "claims").glob("*.claim")))  # held while working
        done = [row for row in claimed if row != 4]
        values = {"x": np.array([[row, row * row] for row in done], np.float32)}
        return GroupOutcome(done, values, {4: "planted: non-finite loss"} if 4 in claimed else {})

    assert run_claims(store, 3, work, progress=False) == 6
    assert groups == [[0, 1, 2], [3, 4, 5], [6]] and stages == groups
    rows, values = store.read(["x"])
    assert rows.tolist() == [0, 1, 2, 3, 5, 6]
    np.testing.assert_array_equal(values["x"], [[r, r * r] for r in (0, 1, 2, 3, 5, 6)])
    assert store.failures() == {4: "planted: non-finite loss"}
    status = store.status()
    assert (status["completed"], status["failed"], status["pending"], status["claimed"]) == (6, 1, 0, 0)
    assert run_claims(store, 3, work, progress=False) == 0 and len(groups) == 3  # nothing pending: no group


def test_only_the_rows_asked_for_and_a_line_per_stage_without_a_bar(tmp_path, capsys):
    store = make_store(tmp_path / "s")

    def work(claimed: list[int], report) -> GroupOutcome:
        report("transfer (cached_features)")
        return GroupOutcome(claimed, {"x": np.zeros((len(claimed), 2), np.float32)})

    assert run_claims(store, 2, work, rows=[1, 3, 5], progress=False, label="gpu1") == 3
    assert store.completed_rows().tolist() == [1, 3, 5]
    assert capsys.readouterr().out.splitlines() == [
        "rows 1-3: transfer (cached_features)",
        "rows 5-5: transfer (cached_features)",
    ]
    assert [name.startswith("gpu1-") for name in store.status()["workers"]] == [True]


def test_a_group_that_raises_releases_its_claims_and_leaves_its_rows_pending(tmp_path):
    store = make_store(tmp_path / "s", rows=4)

    def work(claimed: list[int], report) -> GroupOutcome:
        if claimed[0] == 2:
            raise RuntimeError("planted crash")
        return GroupOutcome(claimed, {"x": np.ones((len(claimed), 2), np.float32)})

    with pytest.raises(RuntimeError, match="planted crash"):
        run_claims(store, 2, work, progress=False)
    status = store.status()
    assert (status["completed"], status["claimed"], status["pending"], status["failed"]) == (2, 0, 2, 0)
    assert not list((store.path / "claims").glob("*.claim"))
