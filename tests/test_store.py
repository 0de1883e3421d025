"""Results store: round trips, crash safety under SIGKILL with 8 processes, clear errors."""

import contextlib
import errno
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
    backdate(tmp_path / "s" / "claims" / "5.claim", 1.0)
    assert store.writer("w3").claim(10) == [2, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def backdate(path, seconds: float) -> None:
    """Age a claim file by `seconds` (its mtime is the claim's last sign of life), instead of sleeping."""
    then = time.time() - seconds
    os.utime(path, (then, then))


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


def killed_claimer(path, rows):
    """A worker killed after claiming every row: what a killed job leaves (claims of a dead process)."""
    ResultStore(path).writer("killed").claim(rows)
    os.kill(os.getpid(), signal.SIGKILL)


def racer_after_a_killed_job(path, seed, rows, work_s):
    """Claim (1-3 rows, in row order or a random one), 'train' for work_s, write; until nothing is pending."""
    writer = ResultStore(path).writer(f"racer{seed}")
    rng = np.random.default_rng(seed)
    while claimed := writer.claim(1 + seed % 3, rows=rng.permutation(rows) if seed % 2 else None):
        time.sleep(work_s)
        writer.write_many(claimed, **{name: np.stack([values_of(r)[name] for r in claimed]) for name in SCHEMA})


def race_over_a_killed_jobs_claims(path, rows, work_s):
    """8 writers in separate processes over a store whose every row starts with a killed worker's claim:
    (status, exit codes of the writers, files left in claims/)."""
    ResultStore.create(path, rows, SCHEMA, claim_ttl_s=3600)
    ctx = multiprocessing.get_context("fork")
    killed = ctx.Process(target=killed_claimer, args=(path, rows))
    killed.start()
    killed.join(60)
    claims = ResultStore(path).claims()
    assert killed.exitcode == -signal.SIGKILL and len(claims) == rows and all(c["stale"] for c in claims.values())
    procs = [ctx.Process(target=racer_after_a_killed_job, args=(path, seed, rows, work_s)) for seed in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    left = sorted(p.name for p in (path / "claims").iterdir()) + sorted(
        p.name for p in (path / "claims" / "tokens").iterdir()
    )
    return ResultStore(path).status(), [p.exitcode for p in procs], left


@pytest.mark.parametrize("work_s", [0.0, 0.005])
def test_eight_writers_take_over_a_killed_jobs_claims_each_row_once(tmp_path, work_s):
    """Taking over a dead worker's claim is exclusive: no row trained twice and no writer crashes, whether
    the writers work on a row for a while (a long window for a race) or not at all (the tightest race)."""
    status, exit_codes, left = race_over_a_killed_jobs_claims(tmp_path / "s", 40, work_s)
    assert (status["completed"], status["duplicates"], status["rejected"], status["claimed"]) == (40, 0, 0, 0)
    assert exit_codes == [0] * 8 and left == ["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("work_s", [0.0, 0.02])
def test_eight_writers_over_600_rows_of_a_killed_job_train_no_row_twice(tmp_path, work_s):
    status, exit_codes, left = race_over_a_killed_jobs_claims(tmp_path / "s", 600, work_s)
    assert (status["completed"], status["duplicates"], status["rejected"], status["claimed"]) == (600, 0, 0, 0)
    assert exit_codes == [0] * 8 and left == ["tokens"]


def test_release_and_heartbeats_leave_another_writers_claim_alone(tmp_path):
    """A writer whose claim expired while it worked, and was taken over, neither refreshes nor deletes the
    new owner's claim; nor does a writer that writes a row it never claimed."""
    store, _ = make_store(tmp_path / "s", ttl=0.3)
    slow, other = store.writer("slow"), store.writer("other")
    assert slow.claim(1) == [0] and other.claim(1) == [1]
    claim = tmp_path / "s" / "claims" / "0.claim"
    backdate(claim, 1.0)
    assert store.writer("next").claim(1, rows=[0]) == [0]  # slow's claim expired: taken over
    backdate(claim, 100)
    slow.heartbeat()
    assert store.claims()[0]["worker"] == "next" and store.claims()[0]["age_s"] > 99
    slow.release(0)
    slow.write(1, **values_of(1))  # row 1 was never slow's: other's claim stays
    assert slow.held == set() and store.claims()[0]["worker"] == "next" and store.claims()[1]["worker"] == "other"
    assert store.release_claims("other") == 1 and sorted(store.claims()) == [0]


def shard_fd_faults(monkeypatch, shard, write=None, fsync=None):
    """Replace os.write / os.fsync for the file descriptors of `shard` only (others see the real calls)."""
    real_write, real_fsync = os.write, os.fsync

    def targets(fd):
        return os.readlink(f"/proc/self/fd/{fd}") == str(shard)

    monkeypatch.setattr(os, "write", lambda fd, data: (write if write and targets(fd) else real_write)(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsync if fsync and targets(fd) else real_fsync)(fd))
    return real_write


def write_rows(writer, rows):
    writer.write_many(rows, **{name: np.stack([values_of(r)[name] for r in rows]) for name in SCHEMA})


@pytest.mark.parametrize("fault", ["short write, then ENOSPC", "ENOSPC at the fsync"])
def test_a_full_disk_is_one_store_error_and_leaves_no_torn_record_and_the_rows_pending(tmp_path, monkeypatch, fault):
    """A full disk mid-record (as Linux reports it: a short write, then ENOSPC; NFS: at the fsync): one line
    naming the shard, the shard cut back to its whole records, the rows pending (not completed, not failed,
    not claimed), and the next write, with space again, appends whole records."""
    store, _ = make_store(tmp_path / "s", rows=6)
    writer = store.writer("w")
    assert writer.claim(2) == [0, 1]
    write_rows(writer, [0, 1])
    shard, size = tmp_path / "s" / "shards" / "w.rows", store.record_dtype.itemsize
    assert writer.claim(3) == [2, 3, 4]
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data)[: size + size // 2])

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        if fault.startswith("short"):
            real_write = shard_fd_faults(patch, shard, write=short_then_full)
        else:
            shard_fd_faults(patch, shard, fsync=full)
        with pytest.raises(StoreError) as error:
            write_rows(writer, [2, 3, 4])
    message = str(error.value)
    assert message.startswith(f"{shard}: rows [2, 3, 4] not written (No space left on device)") and "\n" not in message
    if fault.startswith("short"):
        assert calls == [3 * size, 3 * size - (size + size // 2)]  # the short write was continued
    assert shard.stat().st_size == 2 * size and store.verify() == {"w": {"intact": 2, "rejected": 0, "torn_bytes": 0}}
    status = store.status()
    assert (status["completed"], status["failed"], status["claimed"], status["pending"]) == (2, 0, 0, 4)
    assert writer.held == set() and writer.claim(3) == [2, 3, 4]
    write_rows(writer, [2, 3, 4])
    rows, values = store.read(list(SCHEMA))
    assert rows.tolist() == [0, 1, 2, 3, 4]
    for k, row in enumerate(rows):
        for name, value in values_of(row).items():
            np.testing.assert_array_equal(values[name][k], value)


def test_a_failure_record_that_cannot_be_written_leaves_the_row_pending(tmp_path, monkeypatch):
    from ffcv_transfer.store import results

    store, _ = make_store(tmp_path / "s", rows=3)
    writer = store.writer("w")
    assert writer.claim(1) == [0]

    def full(final, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "atomic_write", full)
    with pytest.raises(StoreError, match=r"0.json: not written \(No space left on device\); row 0 is pending again"):
        writer.fail(0, "NaN loss")
    status = store.status()
    assert (status["failed"], status["claimed"], status["pending"]) == (0, 0, 3)


@pytest.mark.slow
def test_a_store_on_a_small_filesystem_that_fills_loses_nothing(tmp_path):
    """A real full disk: a 1 MiB tmpfs (mounted as root; skipped otherwise), filled while writing 3 rows of
    16 KiB at a time. The error is one line, every row written before it reads back exactly, the shard
    holds whole records only, nothing is claimed, and with space again the rows left are written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        schema = {"x": ((4096,), np.float32)}
        store = ResultStore.create(disk / "s", 48, schema)
        (disk / "filler").write_bytes(bytes(400 * 1024))
        writer = store.writer("w")
        with pytest.raises(StoreError) as error:
            while rows := writer.claim(3):
                writer.write_many(rows, x=np.stack([np.full(4096, r, np.float32) for r in rows]))
        assert "No space left on device" in str(error.value) and "\n" not in str(error.value)
        size = store.record_dtype.itemsize
        assert (disk / "s" / "shards" / "w.rows").stat().st_size % size == 0
        status = store.status()
        assert 0 < status["completed"] < 48 and status["claimed"] == status["failed"] == status["rejected"] == 0
        (disk / "filler").unlink()
        while rows := writer.claim(3):
            writer.write_many(rows, x=np.stack([np.full(4096, r, np.float32) for r in rows]))
        rows, values = store.read(["x"])
        assert rows.tolist() == list(range(48)) and (values["x"] == rows[:, None]).all()
        assert store.verify() == {"w": {"intact": 48, "rejected": 0, "torn_bytes": 0}}
        writer.close()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a file a failed assert left open


def killed_after_writing(path):
    writer = ResultStore(path).writer("killed")
    assert writer.claim(3) == [0, 1, 2]
    writer.release = lambda row: os.kill(os.getpid(), signal.SIGKILL)  # killed after the write, before releasing
    write_rows(writer, [0, 1])


def test_claims_and_files_left_by_killed_writers_are_cleared_and_never_counted(tmp_path, monkeypatch):
    """A writer killed after writing rows 0-1 but before releasing them leaves claims on completed rows;
    a claim's temporary file (a kill between writing and linking it) and a token never linked to a claim
    are left by kills too, and a stray file sits among the claims. Status counts none of them; a writer
    that finds nothing to claim clears all but the claim of the pending row 2 (taken over by the next
    claim), and once every row is done the claims folder is empty."""
    from ffcv_transfer.store import results

    store, _ = make_store(tmp_path / "s", rows=6, ttl=3600)
    ctx = multiprocessing.get_context("fork")
    killed = ctx.Process(target=killed_after_writing, args=(tmp_path / "s",))
    killed.start()
    killed.join(60)
    claims = tmp_path / "s" / "claims"
    (claims / ".4.claim.tmp-99999-0a1b2c3d").write_text('{"worker"')
    (claims / "tokens" / "5.0123456789abcdef").write_text('{"worker": "half-made"}')
    (claims / "notes.claim").write_text("a stray file")
    status = store.status()
    assert (status["completed"], status["claimed"], status["pending"]) == (2, 0, 4)
    assert "claimed          0" in format_status(status, tmp_path / "s")
    monkeypatch.setattr(results, "CLAIM_WRITE_GRACE_S", 0.0)
    time.sleep(0.01)
    assert store.writer("idle").claim(1, rows=[0, 1]) == []
    assert sorted(p.name for p in claims.iterdir()) == ["2.claim", "notes.claim", "tokens"]
    assert len(list((claims / "tokens").iterdir())) == 1  # the token of row 2's claim
    writer = store.writer("next")
    while rows := writer.claim(2):
        write_rows(writer, rows)
    assert writer.claim(1) == [] and sorted(p.name for p in claims.iterdir()) == ["notes.claim", "tokens"]
    assert not list((claims / "tokens").iterdir()) and store.status()["completed"] == 6


def test_rejected_records_stop_being_reported_once_every_row_is_recomputed(tmp_path):
    store = ResultStore.create(tmp_path / "s", 4, {"x": ((3,), np.float32)})
    writer = store.writer("w")
    for row in range(3):
        writer.write(row, x=np.full(3, row, np.float32))
    flip(tmp_path / "s" / "shards" / "w.rows", store.record_dtype.itemsize + 20)  # row 1's payload
    assert store.status()["rejected"] == 1 and "rejected records 1" in format_status(store.status(), "s")
    assert writer.claim(4) == [1, 3]
    for row in (1, 3):
        writer.write(row, x=np.full(3, row, np.float32))
    status = store.status()
    assert (status["completed"], status["rejected"]) == (4, 0) and "rejected" not in format_status(status, "s")
    assert store.verify() == {"w": {"intact": 4, "rejected": 1, "torn_bytes": 0}}  # still listed for an audit


def test_stores_of_other_class_counts_or_one_store_twice_do_not_pool(tmp_path, capsys):
    """influence over stores that are not one experiment: one-line errors, not a numpy traceback or every
    model counted twice."""
    from ffcv_transfer.cli import main as cli_main
    from ffcv_transfer.store.results import open_stores

    schema = {"margins": ((4,), np.float16)}
    rng = np.random.default_rng(0)
    for name, classes in (("a", 5), ("b", 6)):
        store = ResultStore.create(tmp_path / name, 8, schema, fixed={"masks": rng.random((8, classes)) < 0.5})
        store.writer().write_many(range(8), margins=rng.normal(size=(8, 4)))
    with pytest.raises(StoreError, match=r"'masks' holds bool rows of shape \(6,\).*not one experiment"):
        open_stores([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(StoreError, match="given twice"):
        open_stores([tmp_path / "a", tmp_path / "a"])
    assert cli_main(["influence", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "i.npy")]) == 2
    assert "not one experiment" in capsys.readouterr().err and not (tmp_path / "i.npy").exists()


def test_rejected_records_are_reported_until_their_own_rows_are_recomputed(tmp_path, capsys):
    """While other rows are still pending: a rejected record stops counting in status, and verify exits 0,
    once the row it was written for has a valid record again; verify still lists it. A flip in the row
    index is undone by the crc32 (row 1 stored as row 0, a completed row, is still row 1's record); a torn
    last record counts by the row in its header, or, without a whole header, until every row is settled."""
    store = ResultStore.create(tmp_path / "s", 6, {"x": ((3,), np.float32)})
    size = store.record_dtype.itemsize
    writer = store.writer("w")
    for row in range(4):
        writer.write(row, x=np.full(3, row, np.float32))
    flip(tmp_path / "s" / "shards" / "w.rows", size + 8)  # row 1's row index: 1 -> 0
    flip(tmp_path / "s" / "shards" / "w.rows", 2 * size + 20)  # row 2's payload
    store.writer("t").write(4, x=np.full(3, 4, np.float32))
    os.truncate(tmp_path / "s" / "shards" / "t.rows", 20)  # killed while writing row 4: header and 4 bytes
    (tmp_path / "s" / "shards" / "u.rows").write_bytes(b"FT")  # killed before a whole header
    verified = {
        "t": {"intact": 0, "rejected": 0, "torn_bytes": 20},
        "u": {"intact": 0, "rejected": 0, "torn_bytes": 2},
        "w": {"intact": 2, "rejected": 2, "torn_bytes": 0},
    }

    def verify_cli() -> tuple[int, str, str]:
        code = cli_main(["store", "verify", str(tmp_path / "s")])
        out = capsys.readouterr()
        return code, out.out, out.err

    status = store.status()
    assert (status["completed"], status["pending"], status["rejected"]) == (2, 4, 4)
    assert store.rejected_not_recomputed() == {"rejected": 2, "torn": 2} and store.verify() == verified
    code, out, err = verify_cli()
    assert code == 2 and "w: 2 intact, 2 rejected" in out
    assert err == (
        f"ffcv-transfer: error: {tmp_path / 's'}: 2 rejected records not recomputed yet (their rows are "
        "pending again; `ffcv-transfer train` recomputes them)\n"
    )

    recompute = store.writer("r")
    assert recompute.claim(2, rows=[1, 2]) == [1, 2]
    for row in (1, 2):
        recompute.write(row, x=np.full(3, row, np.float32))
    status = store.status()
    assert (status["completed"], status["pending"], status["rejected"]) == (4, 2, 2)  # the two torn records
    assert "  rejected records 2 (torn or corrupt" in format_status(status, "s")
    assert store.rejected_not_recomputed() == {"rejected": 0, "torn": 2}
    assert store.verify() == verified | {"r": {"intact": 2, "rejected": 0, "torn_bytes": 0}}
    code, out, err = verify_cli()
    assert code == 0 and err == "" and "w: 2 intact, 2 rejected" in out
    assert "2 rejected records: every row they were written for has been recomputed since" in out
    assert "2 shard(s) end in a torn record (a writer killed mid-write): 0 of their rows recomputed since" in out

    recompute.write(4, x=np.full(3, 4, np.float32))
    assert store.status()["rejected"] == 1  # the headerless one, while row 5 is pending
    recompute.write(5, x=np.full(3, 5, np.float32))
    status = store.status()
    assert (status["completed"], status["rejected"]) == (6, 0) and "rejected" not in format_status(status, "s")
    rows, values = store.read(["x"])
    assert rows.tolist() == list(range(6))
    np.testing.assert_array_equal(values["x"], np.repeat(np.arange(6, dtype=np.float32)[:, None], 3, 1))
    code, out, _ = verify_cli()
    assert code == 0 and "2 shard(s) end in a torn record (a writer killed mid-write): 2 of their rows" in out
