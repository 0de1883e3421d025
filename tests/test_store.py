"""Results store: round trips, crash safety under SIGKILL with 8 processes, clear errors."""
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.store import ResultStore, StoreError, format_status

SCHEMA = {"margins": ((50,), np.float16), "predictions": ((50,), np.int16), "source_acc": ((), np.float32)}


def values_of(row):
    """What a worker writes for a row: a deterministic function of the row, to check every byte later."""
    rng = np.random.default_rng(row)
    return {"margins": rng.normal(size=50).astype(np.float16), "predictions": rng.integers(0, 10, 50).astype(np.int16),
            "source_acc": np.float32(row / 1000)}


def make_store(path, rows=20, ttl=1800.0):
    masks = np.random.default_rng(0).random((rows, 12)) < 0.5
    return ResultStore.create(path, rows, SCHEMA, fixed={"masks": masks}, claim_ttl_s=ttl), masks


def test_round_trip_and_status(tmp_path, capsys):
    store, masks = make_store(tmp_path / "s")
    writer = store.writer()
    assert writer.claim(3) == [0, 1, 2]
    assert store.writer().claim(2) == [3, 4]  # a second writer skips claimed rows
    for row in (2, 0):
        writer.write(row, **values_of(row))
    writer.fail(1, "NaN loss at epoch 3")
    status = store.status()
    assert (status["completed"], status["claimed"], status["failed"], status["pending"]) == (2, 2, 1, 15)
    assert status["failure_reasons"] == {"NaN loss at epoch 3": 1}
    rows, values = ResultStore(tmp_path / "s").read(["masks", "margins", "predictions", "source_acc"])
    assert rows.tolist() == [0, 2]
    for k, row in enumerate(rows):
        for name, value in values_of(row).items():
            np.testing.assert_array_equal(values[name][k], value)
        np.testing.assert_array_equal(values["masks"][k], masks[row])
    assert 1 not in store.writer().claim(20)  # failed rows are not claimed again
    assert cli_main(["store", "status", str(tmp_path / "s")]) == 0
    assert "NaN loss at epoch 3" in capsys.readouterr().out


def test_write_rejects_bad_fields(tmp_path):
    store, _ = make_store(tmp_path / "s")
    writer = store.writer()
    good = values_of(0)
    with pytest.raises(StoreError, match="missing"):
        writer.write(0, margins=good["margins"])
    with pytest.raises(StoreError, match=r"shape \(49,\), expected \(50,\)"):
        writer.write(0, **{**good, "margins": good["margins"][:49]})
    with pytest.raises(StoreError, match="row 99 outside"):
        writer.write(99, **good)
    with pytest.raises(StoreError, match="already exists"):
        make_store(tmp_path / "s")


def test_torn_and_corrupt_records_are_invisible_and_rows_reclaimable(tmp_path):
    store, _ = make_store(tmp_path / "s", ttl=0.2)
    writer = store.writer("w1")
    for row in range(4):  # no reader has checked these records yet
        writer.write(row, **values_of(row))
    shard = tmp_path / "s" / "shards" / "w1.rows"
    size = store.record_dtype.itemsize
    blob = bytearray(shard.read_bytes())
    blob[2 * size + 40] ^= 0xFF  # corrupt row 2's payload
    shard.write_bytes(bytes(blob) + bytes(blob[3 * size: 3 * size + size // 2]))  # and a torn tail
    assert store.completed_rows().tolist() == [0, 1, 3]
    other = store.writer("w2")
    other.claim(1, rows=[5])  # then dies without writing: its claim expires
    time.sleep(0.3)
    assert store.writer("w3").claim(10) == [2, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_heartbeats_keep_claims_alive_and_silence_lets_them_expire(tmp_path):
    store, _ = make_store(tmp_path / "s", ttl=1.0)
    owner, other = store.writer("owner"), store.writer("other")
    assert owner.claim(1) == [0]
    for _ in range(3):  # heartbeats 0.4 s apart keep a 1 s claim alive for 1.2 s in all
        time.sleep(0.4)
        owner.heartbeat()
        assert 0 not in other.claim(1, rows=[0])
    time.sleep(1.3)  # the owner went silent
    assert other.claim(1, rows=[0]) == [0]
    assert store.claims()[0]["worker"] == "other"


def test_claims_of_dead_processes_on_this_host_are_taken_over_at_once(tmp_path):
    store, _ = make_store(tmp_path / "s", ttl=3600)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    owner = store.writer("killed")
    assert owner.claim(2) == [0, 1]
    claim = tmp_path / "s" / "claims" / "0.claim"
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "pid": dead_pid}))  # as if its owner had died
    assert store.claims()[0]["stale"] and not store.claims()[1]["stale"]
    assert store.writer("next").claim(2) == [0, 2]  # row 1's owner (this process) is alive: not taken
    other_host = tmp_path / "s" / "claims" / "3.claim"
    other_host.write_text(json.dumps({"worker": "far", "host": "elsewhere", "pid": dead_pid, "since": "now"}))
    assert 3 not in store.writer("third").claim(5)  # another host's claim can only expire


def test_status_counts_rows_written_twice(tmp_path):
    store, _ = make_store(tmp_path / "s")
    store.writer("a").write(4, **values_of(4))
    store.writer("b").write(4, **values_of(4))
    status = store.status()
    assert status["completed"] == 1 and status["duplicates"] == 1
    assert "duplicate records 1" in format_status(status, tmp_path / "s")


def worker(path, seed):
    rng = np.random.default_rng(seed)
    writer = ResultStore(path).writer()
    while True:
        rows = writer.claim(1, rows=rng.permutation(300))
        if not rows:
            return
        time.sleep(rng.uniform(0.03, 0.1))  # 'training'
        writer.write(rows[0], **values_of(rows[0]))


@pytest.mark.slow
def test_eight_processes_with_random_sigkills_complete_every_row_intact(tmp_path):
    path = tmp_path / "s"
    ResultStore.create(path, 300, SCHEMA, claim_ttl_s=0.5)
    ctx = multiprocessing.get_context("fork")
    rng = np.random.default_rng(7)
    seed, kills = 0, 0
    procs = []
    deadline = time.time() + 120
    while time.time() < deadline:
        procs = [p for p in procs if p.is_alive()]
        if len(ResultStore(path).completed_rows()) == 300:
            break
        while len(procs) < 8:
            seed += 1
            procs.append(ctx.Process(target=worker, args=(path, seed)))
            procs[-1].start()
        time.sleep(rng.uniform(0.03, 0.08))
        if kills < 25:
            victim = procs[rng.integers(len(procs))]
            with contextlib.suppress(ProcessLookupError):  # it may have just finished
                os.kill(victim.pid, signal.SIGKILL)
                kills += 1
    for p in procs:
        p.join(10)
    store = ResultStore(path)
    rows, values = store.read(["margins", "predictions", "source_acc"])
    assert rows.tolist() == list(range(300)) and kills >= 15
    for k, row in enumerate(rows):
        for name, value in values_of(row).items():
            np.testing.assert_array_equal(values[name][k], value)
    status = store.status()
    assert status["completed"] == 300 and status["pending"] == 0


def test_missing_and_corrupt_store_files_are_named(tmp_path):
    with pytest.raises(StoreError, match="spec.json missing"):
        ResultStore(tmp_path)
    store, _ = make_store(tmp_path / "s")
    (tmp_path / "s" / "spec.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"spec.json: not a valid store spec"):
        ResultStore(tmp_path / "s")
    store, _ = make_store(tmp_path / "t")
    (tmp_path / "t" / "fixed" / "masks.npy").write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"masks.npy: unreadable"):
        store.fixed("masks")
    (tmp_path / "t" / "failed" / "3.json").write_text("[")
    with pytest.raises(StoreError, match=r"3.json: unreadable failure record"):
        store.status()
    assert cli_main(["store", "status", str(tmp_path / "nowhere")]) == 2


def test_status_per_worker_and_releasing_the_claims_of_ended_workers(tmp_path):
    store, _ = make_store(tmp_path / "s", ttl=3600)
    first, second, later = store.writer("slurm-7_0"), store.writer("slurm-7_1"), store.writer("slurm-8_0")
    assert first.claim(3) == [0, 1, 2] and second.claim(2) == [3, 4] and later.claim(1) == [5]
    first.write(0, **values_of(0))
    status = store.status()
    assert status["workers"] == {"slurm-7_0": {"written": 1, "claimed": 2}, "slurm-7_1": {"written": 0, "claimed": 2},
                                 "slurm-8_0": {"written": 0, "claimed": 1}}
    text = format_status(status, tmp_path / "s", max_workers=2)
    assert "workers 3 (3 holding claims)" in text and "... 1 more: 1 claimed, 0 written" in text
    assert text.index("slurm-7_0") < text.index("slurm-7_1") and "slurm-8_0" not in text
    # job array 7 has ended (its tasks were killed on some host): its claims go, array 8's stay
    assert store.release_claims("slurm-7_") == 4
    after = store.status()
    assert (after["completed"], after["claimed"], after["pending"]) == (1, 1, 18)
    assert store.writer("next").claim(5) == [1, 2, 3, 4, 6]
