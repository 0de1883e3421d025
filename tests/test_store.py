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
from ffcv_transfer.store.results import ResultStore, StoreError, format_status

from .conftest import influence_reference

SCHEMA = {"margins": ((50,), np.float16), "predictions": ((50,), np.int16), "source_acc": ((), np.float32)}


def values_of(row):
    """What a worker writes for a row: a deterministic function of the row, to check every byte later."""
    rng = np.random.default_rng(row)
    return {
        "margins": rng.normal(size=50).astype(np.float16),
        "predictions": rng.integers(0, 10, 50).astype(np.int16),
        "source_acc": np.float32(row / 1000),
    }


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
    for row in range(4):
        writer.write(row, **values_of(row))
    shard = tmp_path / "s" / "shards" / "w1.rows"
    size = store.record_dtype.itemsize
    blob = bytearray(shard.read_bytes())
    blob[2 * size + 40] ^= 0xFF  # corrupt row 2's payload
    shard.write_bytes(bytes(blob) + bytes(blob[3 * size : 3 * size + size // 2]))  # and a torn tail
    assert store.completed_rows().tolist() == [0, 1, 3]
    other = store.writer("w2")
    other.claim(1, rows=[5])  # then dies without writing: its claim expires
    time.sleep(0.3)
    assert store.writer("w3").claim(10) == [2, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def flip(shard, offset):
    blob = bytearray(shard.read_bytes())
    blob[offset] ^= 0x01
    shard.write_bytes(bytes(blob))


def test_every_flipped_byte_of_every_record_is_rejected_and_its_row_pending_again(tmp_path):
    """Fault injection: one bit flipped in each byte of a small store's records in turn (magic, crc, row
    index, payload). Never is a flipped record served as data: its row is no longer completed (so a worker
    recomputes it), the other rows read back exactly, and status reports one rejected record. Before the
    crc covered the row index, a flip there served row 2's data as row 18."""
    store = ResultStore.create(tmp_path / "s", 4, {"x": ((3,), np.float32)})
    writer = store.writer("w")
    for row in range(3):
        writer.write(row, x=np.full(3, row, np.float32))
    shard = tmp_path / "s" / "shards" / "w.rows"
    size, pristine = store.record_dtype.itemsize, shard.read_bytes()
    for offset in range(len(pristine)):
        flip(shard, offset)
        rows, values = store.read(["x"])
        hit = offset // size
        assert rows.tolist() == [r for r in range(3) if r != hit], offset
        np.testing.assert_array_equal(values["x"], np.repeat(rows[:, None], 3, 1).astype(np.float32))
        status = store.status()
        assert (status["rejected"], status["pending"], status["completed"]) == (1, 2, 2), offset
        assert store.verify() == {"w": {"intact": 2, "rejected": 1, "torn_bytes": 0}}
        shard.write_bytes(pristine)
    assert store.status()["rejected"] == 0


def test_a_record_read_before_is_checked_again(tmp_path):
    """No verdict is cached: bytes that change after a read are caught at the next read."""
    store, _ = make_store(tmp_path / "s")
    store.writer("w").write(2, **values_of(2))
    assert store.completed_rows().tolist() == [2] and store.status()["completed"] == 1
    flip(tmp_path / "s" / "shards" / "w.rows", store.record_dtype.itemsize - 1)
    assert store.completed_rows().tolist() == [] and store.status()["rejected"] == 1


def test_store_verify_names_the_shards_with_rejected_records(tmp_path, capsys):
    store, _ = make_store(tmp_path / "s")
    store.writer("good").write(0, **values_of(0))
    store.writer("bad").write(1, **values_of(1))
    assert cli_main(["store", "verify", str(tmp_path / "s")]) == 0
    flip(tmp_path / "s" / "shards" / "bad.rows", 20)
    assert cli_main(["store", "verify", str(tmp_path / "s")]) == 2
    out = capsys.readouterr()
    assert "bad: 0 intact, 1 rejected" in out.out and "good: 1 intact, 0 rejected" in out.out
    assert "1 rejected record" in out.err
    assert "rejected records 1" in format_status(store.status(), tmp_path / "s")


def test_version_1_stores_are_still_read_and_unknown_versions_refused(tmp_path):
    store, _ = make_store(tmp_path / "s")
    spec_path = tmp_path / "s" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "version": 1}))
    old = ResultStore(tmp_path / "s")
    old.writer("w").write(3, **values_of(3))  # FTR1 records, crc over the payload
    assert ResultStore(tmp_path / "s").completed_rows().tolist() == [3]
    assert (tmp_path / "s" / "shards" / "w.rows").read_bytes()[:4] == b"FTR1"
    spec_path.write_text(json.dumps({**spec, "version": 9}))
    with pytest.raises(StoreError, match="format version 9"):
        ResultStore(tmp_path / "s")


def test_torn_claims_block_a_row_only_briefly(tmp_path, monkeypatch):
    """A claim file left empty or half-written by a crash: while younger than the grace it may still be
    being written (the row is left alone); older, it is stale: status counts the row pending and a writer
    takes it. Claims are written whole (linked into place), so no live writer leaves one."""
    store, _ = make_store(tmp_path / "s")
    torn = tmp_path / "s" / "claims" / "5.claim"
    torn.write_text('{"worker": "w')
    assert store.writer("a").claim(1, rows=[5]) == []
    old = time.time() - 60
    os.utime(torn, (old, old))
    assert store.status()["pending"] == 20 and store.claims()[5]["stale"]
    assert store.writer("b").claim(1, rows=[5]) == [5]
    assert json.loads(torn.read_text())["worker"] == store.claims()[5]["worker"]
    assert not [f for f in (tmp_path / "s" / "claims").iterdir() if f.name.startswith(".")]  # no temp files left


def test_a_row_finished_while_being_claimed_is_let_go(tmp_path):
    """The race a listing leaves open: row 0 is completed (and its claim released) after a writer has
    listed the done rows but before it claims. Its second look lets row 0 go and takes the next row."""
    store, _ = make_store(tmp_path / "s")
    late = store.writer("late")
    listed = store.completed_rows

    def stale_listing():  # the first listing misses row 0, which another writer completes just after it
        result = listed()
        if not stale_listing.done:
            stale_listing.done = True
            store.writer("fast").write(0, **values_of(0))
        return result

    stale_listing.done = False
    store.completed_rows = stale_listing
    assert late.claim(1) == [1] and late.held == {1}


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


def racing_writer(path, seed, per_claim):
    """A writer as fast as a store allows: claim, write at once, until nothing is pending."""
    writer = ResultStore(path).writer(f"racer{seed}")
    rng = np.random.default_rng(seed)
    while rows := writer.claim(per_claim, rows=rng.permutation(2000) if seed % 2 else None):
        writer.write_many(rows, **{name: np.stack([values_of(r)[name] for r in rows]) for name in SCHEMA})


@pytest.mark.slow
def test_eight_racing_writers_over_2000_rows_train_no_row_twice(tmp_path):
    """8 processes that do nothing but claim and write (the race is widest when training takes no time),
    half of them in row order and half in random orders: every row written once, no duplicate record."""
    path = tmp_path / "s"
    ResultStore.create(path, 2000, SCHEMA)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=racing_writer, args=(path, seed, 1 + seed % 3)) for seed in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    status = ResultStore(path).status()
    assert (status["completed"], status["duplicates"], status["rejected"]) == (2000, 0, 0), status


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


def test_command_line_mistakes_are_one_line_errors(tmp_path, capsys):
    """Each gives `ffcv-transfer: error: ...` and exit 2, before any work."""
    store, masks = make_store(tmp_path / "s")
    store.writer().write_many(
        range(20),
        margins=np.zeros((20, 50), np.float16),
        predictions=np.zeros((20, 50), np.int16),
        source_acc=np.zeros(20, np.float32),
    )
    cases = [
        (["train", "--store", str(tmp_path / "s"), "--config", "x.yaml", "--models", "3-1"], "3-1 is no range"),
        (["influence", str(tmp_path / "s"), "--chunk", "0"], "--chunk 0: expected at least 1"),
        (["influence", str(tmp_path / "s"), "--out", str(tmp_path / "missing" / "i.npy")], "does not exist"),
        (["influence", str(tmp_path / "s"), "--max-memory", "0"], "--max-memory 0.0: expected a positive"),
        (["leakage", str(tmp_path / "s"), "--max-memory", "-1"], "--max-memory -1.0: expected a positive"),
        (["rankings", str(tmp_path / "nowhere")], "spec.json missing"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ffcv-transfer: error: ") and message in err and err.count("\n") == 1, err
    # an influence that fails midway (every completed row marked failed) leaves the earlier result as it was
    earlier = tmp_path / "earlier.npy"
    np.save(earlier, np.arange(3.0))
    for row in range(20):
        store.writer().fail(row, "diverged")
    assert cli_main(["influence", str(tmp_path / "s"), "--out", str(earlier)]) == 2
    assert "every completed row is marked failed" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(earlier), np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.npy", "s"]


def test_status_into_a_closed_pipe_stops_quietly(tmp_path):
    make_store(tmp_path / "s")
    shell = f"{sys.executable} -m ffcv_transfer.cli store status {tmp_path / 's'} | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("store ") and done.stderr == "" and done.returncode == 0, done.stderr


def test_status_per_worker_and_releasing_the_claims_of_ended_workers(tmp_path):
    store, _ = make_store(tmp_path / "s", ttl=3600)
    first, second, later = store.writer("slurm-7_0"), store.writer("slurm-7_1"), store.writer("slurm-8_0")
    assert first.claim(3) == [0, 1, 2] and second.claim(2) == [3, 4] and later.claim(1) == [5]
    first.write(0, **values_of(0))
    status = store.status()
    assert status["workers"] == {
        "slurm-7_0": {"written": 1, "claimed": 2},
        "slurm-7_1": {"written": 0, "claimed": 2},
        "slurm-8_0": {"written": 0, "claimed": 1},
    }
    text = format_status(status, tmp_path / "s", max_workers=2)
    assert "workers 3 (3 holding claims)" in text and "... 1 more: 1 claimed, 0 written" in text
    assert text.index("slurm-7_0") < text.index("slurm-7_1") and "slurm-8_0" not in text
    # job array 7 has ended (its tasks were killed on some host): its claims go, array 8's stay
    assert store.release_claims("slurm-7_") == 4
    after = store.status()
    assert (after["completed"], after["claimed"], after["pending"]) == (1, 1, 18)
    assert store.writer("next").claim(5) == [1, 2, 3, 4, 6]


def test_a_store_grows_and_stores_pool_into_the_influence_of_the_union(tmp_path):
    """Rows added to a store (next week's models) and a second store read with it give the influence of
    all their models together, against float64; an `add_rows` cut off before its spec leaves the store
    as it was, and the next one starts over."""
    from ffcv_transfer.findings.influence import influence_from_store
    from ffcv_transfer.store.results import StorePool, open_stores

    rng = np.random.default_rng(9)
    masks, outputs = rng.random((75, 6)) < 0.5, rng.standard_normal((75, 12)).astype(np.float16)
    schema = {"margins": ((12,), np.float16)}
    first = ResultStore.create(tmp_path / "a", 30, schema, fixed={"masks": masks[:30]})
    first.writer().write_many(range(30), margins=outputs[:30])
    # a grow cut off after its fixed array was rewritten, before the spec: invisible
    np.save(tmp_path / "a" / "fixed" / "masks.npy", np.concatenate([masks[:30], ~masks[:7]]))
    assert ResultStore(tmp_path / "a").num_rows == 30 and np.array_equal(
        ResultStore(tmp_path / "a").fixed("masks"), masks[:30]
    )
    assert np.allclose(influence_from_store(tmp_path / "a"), influence_reference(masks[:30], outputs[:30]), atol=1e-5)
    grown = ResultStore(tmp_path / "a")
    assert grown.add_rows({"masks": masks[30:50]}) == range(30, 50)
    assert ResultStore(tmp_path / "a").status()["pending"] == 20
    np.testing.assert_array_equal(ResultStore(tmp_path / "a").fixed("masks"), masks[:50])
    grown.writer().write_many(range(30, 50), margins=outputs[30:50])
    np.testing.assert_allclose(
        influence_from_store(tmp_path / "a"), influence_reference(masks[:50], outputs[:50]), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(StoreError, match="new rows need every fixed array"):
        grown.add_rows({"other": masks[:2]})
    with pytest.raises(StoreError, match="holds bool rows of shape"):
        grown.add_rows({"masks": masks[:2, :3]})

    second = ResultStore.create(tmp_path / "b", 25, schema, fixed={"masks": masks[50:]})
    second.writer().write_many(range(25), margins=outputs[50:])
    second.writer().fail(3, "diverged")  # pooled row 53
    pool = open_stores([tmp_path / "a", tmp_path / "b"])
    assert isinstance(pool, StorePool) and pool.num_rows == 75 and pool.failures() == {53: "diverged"}
    assert pool.completed_rows().tolist() == list(range(75))
    used = np.array([r for r in range(75) if r != 53])
    np.testing.assert_allclose(
        influence_from_store([tmp_path / "a", tmp_path / "b"]),
        influence_reference(masks[used], outputs[used]),
        rtol=1e-5,
        atol=1e-6,
    )
    ResultStore.create(tmp_path / "c", 5, {"margins": ((13,), np.float16)}, fixed={"masks": masks[:5]})
    with pytest.raises(StoreError, match="its fields differ"):
        open_stores([tmp_path / "a", tmp_path / "c"])


def test_masks_add_grows_an_experiment_store_and_pooling_checks_the_recipe(tmp_path, tiny_data, capsys):
    """`masks --store S --add N`: new random subsets of the experiment's alpha (another draw than the
    first rows'), init seeds the new row indices, experiment.yaml's num_models updated; stores read as
    one must share their recipe and differ in masks.seed."""
    from ffcv_transfer.config import ConfigError
    from ffcv_transfer.store.experiment import INIT_SEEDS, MASKS, open_experiment, pooled_experiment

    from .conftest import DEMO_CONFIG, tiny_settings

    settings = [f"--{key}={value}" for key, value in tiny_settings(tiny_data).items()]
    assert cli_main(["masks", "--config", str(DEMO_CONFIG), "--store", str(tmp_path / "s"), *settings]) == 0
    before = ResultStore(tmp_path / "s").fixed(MASKS).copy()
    assert cli_main(["masks", "--store", str(tmp_path / "s"), "--add", "6"]) == 0
    assert "added rows 4-9" in capsys.readouterr().out
    store = ResultStore(tmp_path / "s")
    masks = store.fixed(MASKS)
    assert store.num_rows == 10 and np.array_equal(masks[:4], before)
    assert (masks.sum(1) == masks[0].sum()).all() and not (masks[4:8] == before).all(axis=1).all()
    assert store.fixed(INIT_SEEDS).tolist() == list(range(10))
    assert open_experiment(tmp_path / "s").masks.num_models == 10
    assert cli_main(["masks", "--store", str(tmp_path / "s"), "--add", "2", "--config", str(DEMO_CONFIG)]) == 2
    assert "--add grows a store with its own experiment" in capsys.readouterr().err
    assert cli_main(["masks", "--store", str(tmp_path / "t")]) == 2
    assert "--config is required" in capsys.readouterr().err

    same_seed = tmp_path / "same"
    assert cli_main(["masks", "--config", str(DEMO_CONFIG), "--store", str(same_seed), *settings]) == 0
    with pytest.raises(ConfigError, match="masks.seed 0 is also that of"):
        pooled_experiment([tmp_path / "s", same_seed])
    longer = tmp_path / "longer"
    assert (
        cli_main(
            [
                "masks",
                "--config",
                str(DEMO_CONFIG),
                "--store",
                str(longer),
                *settings,
                "--masks.seed=1",
                "--source.epochs=2",
            ]
        )
        == 0
    )
    with pytest.raises(ConfigError, match="source.epochs is 2 but"):
        pooled_experiment([tmp_path / "s", longer])
    other = tmp_path / "other"
    assert (
        cli_main(
            [
                "masks",
                "--config",
                str(DEMO_CONFIG),
                "--store",
                str(other),
                *settings,
                "--masks.seed=1",
                "--run.device=cpu",
            ]
        )
        == 0
    )
    assert pooled_experiment([tmp_path / "s", other]).masks.seed == 0
