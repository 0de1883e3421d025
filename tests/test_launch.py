"""`ffcv-transfer launch`: several workers over one store, on this machine (CPU workers here) and as SLURM
job arrays on a real single-node SLURM cluster started for the test (tests/slurm_cluster.py), with one
array task killed mid-run and one requeued by a preemption signal. Each case asserts that the store ends
complete with every row written exactly once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ffcv_transfer.cli import main as cli_main
from ffcv_transfer.config import load_experiment
from ffcv_transfer.engine.launch import (
    LaunchError,
    ProgressLine,
    SlurmOptions,
    exit_text,
    local_workers,
    run_rounds,
)
from ffcv_transfer.store.experiment import create_class_store
from ffcv_transfer.store.results import ResultStore

from .conftest import DEMO_CONFIG, tiny_settings
from .slurm_cluster import SlurmUnavailable, start_cluster


def make_store(data: Path, path: Path, models: int, k: int, epochs: int = 1) -> ResultStore:
    settings = {"masks.num_models": models, "run.models_per_process": k, "source.epochs": epochs}
    experiment = load_experiment(DEMO_CONFIG, tiny_settings(data, **settings))
    return create_class_store(path, experiment)


def assert_complete_once(store: ResultStore, masks: np.ndarray) -> dict:
    """Every row completed, none failed, claimed or written twice; outputs finite, masks as drawn."""
    status = store.status()
    assert (status["completed"], status["failed"], status["claimed"], status["pending"]) == (store.num_rows, 0, 0, 0)
    assert status["duplicates"] == 0
    assert sum(counts["written"] for counts in status["workers"].values()) == store.num_rows
    rows, values = store.read(["masks", "margins", "source_acc", "target_acc"])
    assert rows.tolist() == list(range(store.num_rows))
    np.testing.assert_array_equal(values["masks"], masks)
    assert all(np.isfinite(values[name]).all() for name in ("margins", "source_acc", "target_acc"))
    return status


def test_local_workers_one_per_gpu_or_cpu_workers_sharing_the_cores():
    gpus = local_workers([2, 3], None, "cpu")
    assert [(w.label, w.device, w.env) for w in gpus] == [
        ("gpu2", "cuda", {"CUDA_VISIBLE_DEVICES": "2"}),
        ("gpu3", "cuda", {"CUDA_VISIBLE_DEVICES": "3"}),
    ]
    cpus = local_workers(None, 3, "cpu", cores=16)
    assert [(w.label, w.device, w.env["OMP_NUM_THREADS"]) for w in cpus] == [
        ("worker0", "cpu", "5"),
        ("worker1", "cpu", "5"),
        ("worker2", "cpu", "5"),
    ]
    assert local_workers(None, 4, "cpu", cores=2)[0].env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(LaunchError, match="one worker per GPU"):
        local_workers([0, 1], 2, "cpu")
    with pytest.raises(LaunchError, match="distinct GPU indices"):
        local_workers([0, 0], None, "cpu")


def test_rounds_go_on_while_rows_are_pending_with_no_more_workers_than_batches(tmp_path):
    calls = []

    def rounds_writing(store, rows_per_round):
        def run_round(round_no, workers):  # as if each round's workers were killed after writing a few rows
            calls.append((round_no, workers))
            writer = store.writer()
            for row in writer.claim(rows_per_round):
                writer.write(row, x=np.float32(row))
            writer.close()
            return [] if rows_per_round else [f"worker0 {exit_text(-signal.SIGABRT)}: round{round_no}.log"]

        return run_round

    store = ResultStore.create(tmp_path / "a", 10, {"x": ((), "float32")})
    status = run_rounds(store, rounds_writing(store, 3), most_workers=4, k=2, max_rounds=5, log_dir=tmp_path)
    assert status["completed"] == 10 and calls == [(1, 4), (2, 4), (3, 2), (4, 1)]  # 10, 7, 4, 1 rows pending
    assert run_rounds(store, rounds_writing(store, 3), 4, 2, 5, tmp_path)["completed"] == 10 and len(calls) == 4
    store = ResultStore.create(tmp_path / "b", 10, {"x": ((), "float32")})
    with pytest.raises(LaunchError, match="incomplete after 2 rounds: 4 rows pending, 0 claimed"):
        run_rounds(store, rounds_writing(store, 3), most_workers=4, k=2, max_rounds=2, log_dir=tmp_path)
    with pytest.raises(
        LaunchError,
        match=f"round 1 completed no row; see the worker logs in {tmp_path}\n"
        "  worker0 was killed by SIGABRT \\(signal 6\\): round1.log",
    ):
        run_rounds(store, rounds_writing(store, 0), most_workers=4, k=2, max_rounds=2, log_dir=tmp_path)


def test_exit_text_names_the_signal():
    assert exit_text(2) == "exited with status 2"
    assert exit_text(-11) == "was killed by SIGSEGV (signal 11)"
    assert exit_text(-200) == "was killed by an unknown signal (signal 200)"


def test_progress_line_gives_each_worker_its_own_stage_or_how_it_ended(tmp_path):
    """A worker's stage is its log's last line while it runs; an ended worker's log ends in the store's
    status table, whose last line is another worker's row, so for it the line says how it ended."""
    store = ResultStore.create(tmp_path / "s", 6, {"x": ((), "float32")})
    store.writer("worker0-host-1").write_many([0, 1], x=np.zeros(2, np.float32))
    store.writer("worker2-host-3").fail(5, "NaN loss at epoch 1")
    running = store.writer("worker1-host-2")
    assert running.claim(1, rows=[2]) == [2]
    table_end = "  workers 2 (1 holding claims): claimed / written rows\n    worker1-host-2      1        0\n"
    logs = {
        "worker0": table_end,
        "worker1": "round 1: 1 rows\nepoch 1/2: loss 0.93\n",
        "worker2": "Traceback (most recent call last):\nValueError: boom\n" + table_end,
    }
    for label, text in logs.items():
        (tmp_path / f"{label}.log").write_text(text)
    ended = [subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"]) for code in (0, 3)]
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    said = []
    try:
        for process in ended:
            process.wait()
        progress = ProgressLine(store, said.append)
        progress.workers = {
            label: (tmp_path / f"{label}.log", process) for label, process in zip(logs, [ended[0], live, ended[1]])
        }
        progress()
        progress()  # nothing changed: nothing said
        live.kill()
        live.wait()
        progress()
    finally:
        live.kill()
        live.wait()
    counts = "2/6 completed, 1 claimed by 1 worker, 2 pending, 1 failed"
    assert [line.split("] ", 1)[1] for line in said] == [
        f"{counts}; worker0: done; worker1: epoch 1/2: loss 0.93; worker2: exited with status 3",
        f"{counts}; worker0: done; worker1: was killed by SIGKILL (signal 9); worker2: exited with status 3",
    ]


def test_slurm_options_become_sbatch_lines(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string  # what submitit writes for these parameters

    options = SlurmOptions(
        tasks=8,
        parallelism=3,
        time_min=30,
        partition="gpu",
        gpus_per_task=1,
        cpus_per_task=6,
        sbatch={"account": "abc"},
    )
    parameters = options.executor_parameters(tasks=8)
    text = _make_sbatch_string(command="run", folder=tmp_path, map_count=8, **parameters)
    for line in (
        "#SBATCH --array=0-7%3",
        "#SBATCH --time=30",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --account=abc",
        "export OMP_NUM_THREADS=6",
    ):
        assert line in text
    assert SlurmOptions(tasks=8).executor_parameters(tasks=2)["array_parallelism"] == 2  # later rounds: fewer
    with pytest.raises(LaunchError, match="must be >= 1"):
        SlurmOptions(parallelism=0)


def test_launch_refuses_bad_options_with_clear_errors(tiny_data, tmp_path, capsys, monkeypatch):
    store = make_store(tiny_data, tmp_path / "store", models=2, k=2)
    cases = [
        (
            ["--executor", "slurm", "--gpus", "0,1"],
            "--gpus: not an option of --executor slurm (a SLURM task gets its GPUs with --gpus-per-task)",
        ),
        (["--tasks", "4", "--no-wait"], "--tasks, --no-wait: not an option of --executor local"),
        (["--gpus", "0,x"], "--gpus '0,x': expected ranges"),
        (["--gpus", "0", "--workers", "2"], "with --gpus there is one worker per GPU"),
        (["--executor", "slurm", "--sbatch", "account"], "expected KEY=VALUE"),
        (["--source.epochz=2"], "did you mean source.epochs"),
    ]
    for extra, message in cases:
        assert cli_main(["launch", "--store", str(store.path), *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli_main(["launch", "--store", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/spec.json: no store here" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert cli_main(["launch", "--executor", "slurm", "--store", str(store.path)]) == 2
    assert "pip install -e .[slurm]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["launch", "--executor", "kubernetes", "--store", str(store.path)])
    assert "invalid choice: 'kubernetes'" in capsys.readouterr().err


@pytest.mark.slow
def test_local_launcher_two_cpu_workers_complete_the_store_once(tiny_data, tmp_path, capsys):
    store = make_store(tiny_data, tmp_path / "store", models=4, k=2)
    masks = np.array(store.fixed("masks"))
    assert cli_main(["launch", "--store", str(store.path), "--workers", "2", "--poll-s", "1"]) == 0
    out = capsys.readouterr().out
    assert "round 1: 2 local workers (worker0, worker1)" in out and "round 2" not in out
    status = assert_complete_once(store, masks)
    # both workers trained at once, two rows each (one claim of K=2): no row trained twice, none lost
    assert sorted((name.split("-")[0], counts["written"]) for name, counts in status["workers"].items()) == [
        ("worker0", 2),
        ("worker1", 2),
    ]
    logs = sorted((store.path / "launches").glob("*-local/round1-worker*.log"))
    assert len(logs) == 2 and all("this worker wrote 2 rows" in log.read_text() for log in logs)


# ------------------------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_cluster()
    except SlurmUnavailable as reason:
        pytest.skip(str(reason))
    yield cluster
    cluster.stop()


def launch_on_slurm(cluster, store: ResultStore, log: Path, *options: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ffcv_transfer.cli",
                "launch",
                "--executor",
                "slurm",
                "--store",
                str(store.path),
                "--time-min",
                "30",
                "--poll-s",
                "1",
                *options,
            ],
            env=cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_worker(store: ResultStore, launcher: subprocess.Popen, written: int, timeout_s: float = 400) -> str:
    """The name of a SLURM worker that has written `written` rows and holds claims on more (mid-run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and launcher.poll() is None:
        for name, counts in store.status()["workers"].items():
            if name.startswith("slurm-") and counts["written"] >= written and counts["claimed"]:
                return name
        time.sleep(0.5)
    raise AssertionError(
        f"no SLURM worker with {written} rows written and claims on more "
        f"(launcher {'exited' if launcher.poll() is not None else 'still running'})"
    )


def finish(launcher: subprocess.Popen, log: Path, cluster, timeout_s: float = 600) -> str:
    try:
        launcher.wait(timeout=timeout_s)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    out = log.read_text()
    assert launcher.returncode == 0, f"launcher exited with {launcher.returncode}:\n{out}\n{cluster.logs()}"
    return out


@pytest.mark.system
def test_slurm_array_completes_the_store_when_a_task_is_killed_mid_run(slurm, tiny_data, tmp_path):
    """2 array tasks over 6 rows, K=2: once a task has written its first 2 rows and claimed 2 more, it is
    killed mid-group through SLURM (scancel --signal=KILL). Its written rows stay; the rows it held are
    taken over by the other task or by the launcher's next round.

    The victim is frozen (SIGSTOP, on this host) the moment its claim shows, then killed: scancel's round
    trip through slurmctld can outlast a tiny group, so without the freeze the kill may land after the
    group is written and the test would not be testing a mid-group kill."""
    store = make_store(tiny_data, tmp_path / "store", models=6, k=2, epochs=10)
    masks = np.array(store.fixed("masks"))
    log = tmp_path / "launch.log"
    launcher = launch_on_slurm(slurm, store, log, "--tasks", "2", "--cpus-per-task", "1")
    try:
        victim = wait_for_worker(store, launcher, written=2)
        job, pid = victim.split("-")[1], int(victim.split("-")[-2])  # slurm-JOB_TASK-host-pid-uid
        os.kill(pid, signal.SIGSTOP)
        frozen = store.status()["workers"][victim]
        assert frozen["written"] == 2 and frozen["claimed"], f"victim not frozen mid-group: {frozen}"
        slurm.run("scancel", "--signal=KILL", job)
    finally:
        out = finish(launcher, log, slurm)
    assert f"task {job}: ended without a result (killed or cancelled)" in out
    status = assert_complete_once(store, masks)
    assert status["workers"][victim]["written"] == 2  # written before the kill, kept, never trained again


@pytest.mark.system
def test_slurm_task_requeued_by_preemption_resumes_from_the_store(slurm, tiny_data, tmp_path):
    """1 task over 4 rows, K=2: after its first 2 rows, SIGUSR2 (what SLURM sends before a time limit or a
    preemption; submitit's job._interrupt()) makes submitit checkpoint and requeue it; the requeued task
    skips the 2 stored rows and trains the other 2, in the same launcher round."""
    store = make_store(tiny_data, tmp_path / "store", models=4, k=2)
    masks = np.array(store.fixed("masks"))
    log = tmp_path / "launch.log"
    launcher = launch_on_slurm(slurm, store, log, "--tasks", "1", "--cpus-per-task", "2")
    try:
        first = wait_for_worker(store, launcher, written=2)
        job = first.split("-")[1]
        slurm.run("scancel", "--signal=USR2", job)
    finally:
        out = finish(launcher, log, slurm)
    assert "round 2" not in out and f"task {job}: wrote 2 rows" in out
    status = assert_complete_once(store, masks)
    incarnations = {name: counts["written"] for name, counts in status["workers"].items()}
    assert len(incarnations) == 2 and all(name.startswith(f"slurm-{job}-") for name in incarnations)
    assert incarnations[first] == 2
    task_log = "".join(path.read_text() for path in (store.path / "launches").glob(f"*-slurm/round1/{job}_*.out"))
    assert "Calling checkpoint method" in task_log and f"Requeued job {job}" in task_log
