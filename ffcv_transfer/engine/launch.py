"""Scale out: many workers over one store, on this machine's GPUs or CPU cores, or as a SLURM job array.

Every worker is `run_worker` on the same store: it claims K pending rows at a time, so no two workers
train the same row, and the rows of a worker that dies go back to the pool: at once for workers on the
same host (its pid is gone), else when its claims expire (`claim_ttl_s`), or as soon as the launcher sees
its SLURM job end. The launcher works in rounds: start the workers, wait until all have ended, and while
rows are still pending (a worker was killed, crashed or cancelled) start another round with no more
workers than there are batches of K pending rows. It stops when nothing is pending, after a round that
completed no row, or after `max_rounds`.

SLURM array tasks are requeued by submitit on a timeout or preemption signal and resume from the store
(StoreTask).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffcv_transfer.store.results import ResultStore

if TYPE_CHECKING:
    from ffcv_transfer.config import Experiment

Say = Callable[[str], None]


def _say(text: str) -> None:
    print(text, flush=True)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


class LaunchError(Exception):
    """Workers that cannot be launched, or a store left incomplete; the message says what to do."""


@dataclass(frozen=True)
class LocalWorker:
    label: str  # starts its name in `store status`; names its log file
    device: str
    env: dict[str, str]  # variables set for its process


def local_workers(
    gpus: Sequence[int] | None, workers: int | None, device: str, cores: int | None = None
) -> list[LocalWorker]:
    """One worker per GPU (CUDA_VISIBLE_DEVICES=g, device cuda), or else `workers` workers (default 1) on
    `device`, sharing this machine's cores: OMP_NUM_THREADS = cores // workers each."""
    if gpus is not None:
        if workers is not None:
            raise LaunchError("--workers counts CPU workers; with --gpus there is one worker per GPU")
        if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
            raise LaunchError(f"--gpus {','.join(map(str, gpus))}: expected distinct GPU indices like 0,1,2,3")
        return [LocalWorker(f"gpu{g}", "cuda", {"CUDA_VISIBLE_DEVICES": str(g)}) for g in gpus]
    workers = 1 if workers is None else workers
    if workers < 1:
        raise LaunchError(f"--workers {workers}: expected at least 1")
    threads = max(1, (cores or len(os.sched_getaffinity(0))) // workers)
    return [LocalWorker(f"worker{i}", device, {"OMP_NUM_THREADS": str(threads)}) for i in range(workers)]


@dataclass(frozen=True)
class SlurmOptions:
    tasks: int = 1  # array tasks, each one worker (looping over batches of K rows until none is pending)
    parallelism: int | None = None  # array tasks running at once (default: all)
    time_min: int = 60  # each task's time limit; submitit requeues a task that reaches it
    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int = 1  # also each task's OMP_NUM_THREADS
    sbatch: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {"account": "abc"}

    def __post_init__(self) -> None:
        counts = (self.tasks, 1 if self.parallelism is None else self.parallelism, self.time_min, self.cpus_per_task)
        if min(counts) < 1 or self.gpus_per_task < 0:
            raise LaunchError(
                f"{self}: tasks, parallelism, time_min and cpus_per_task must be >= 1, gpus_per_task >= 0"
            )

    def executor_parameters(self, tasks: int) -> dict[str, Any]:
        """submitit.SlurmExecutor parameters for an array of `tasks` tasks."""
        parameters = {
            "job_name": "ffcv-transfer",
            "time": self.time_min,
            "cpus_per_task": self.cpus_per_task,
            "array_parallelism": min(self.parallelism or tasks, tasks),
            "setup": [f"export OMP_NUM_THREADS={self.cpus_per_task}"],
            "additional_parameters": dict(self.sbatch),
        }
        if self.partition:
            parameters["partition"] = self.partition
        if self.gpus_per_task:
            parameters["gpus_per_task"] = self.gpus_per_task
        return parameters


class StoreTask:
    """What each SLURM array task runs: a worker on the store, named slurm-JOBID_TASK in `store status`.

    submitit requeues, on a timeout or preemption signal, a task whose callable has a `checkpoint` method
    (what submitit.helpers.Checkpointable provides) with the call that method returns. The store is the
    checkpoint, so that call is the same one: the requeued task skips the completed rows, and the rows it
    held were released when submitit ended it (a SystemExit through run_worker's cleanup). Being a plain
    class keeps submitit an optional dependency."""

    def __call__(self, store_dir: str, experiment: Experiment) -> int:
        import submitit

        from ffcv_transfer.engine.worker import run_worker

        return run_worker(store_dir, experiment, progress=False, label=f"slurm-{submitit.JobEnvironment().job_id}")

    def checkpoint(self, store_dir: str, experiment: Experiment) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, store_dir, experiment)


class ProgressLine:
    """Prints one line of store counts, and of each running worker's stage (its log's latest line) or how
    a finished one ended, whenever they change."""

    def __init__(self, store: ResultStore, say: Say):
        self.store, self.say, self.start, self.last = store, say, time.monotonic(), ""
        self.workers: dict[str, tuple[Path, subprocess.Popen]] = {}  # label -> its log and process, this round

    def __call__(self) -> None:
        s = self.store.status()
        holding = sum(1 for counts in s["workers"].values() if counts["claimed"])
        line = (
            f"{s['completed']}/{s['rows']} completed, {s['claimed']} claimed by {_count(holding, 'worker')}, "
            f"{s['pending']} pending, {s['failed']} failed"
        )
        stages = [
            f"{label}: {stage}"
            for label, (log, process) in self.workers.items()
            if (stage := worker_stage(log, process))
        ]
        line = "; ".join([line, *stages])
        if line != self.last:
            self.say(f"[{time.monotonic() - self.start:6.0f} s] {line}")
            self.last = line


def worker_stage(log: Path, process: subprocess.Popen) -> str:
    """A running worker's latest stage, the last line of its log; for one that has ended, how it ended (its
    log then ends in the store's status table, whose last line is some worker's row)."""
    returncode = process.poll()
    if returncode is None:
        return _last_line(log)
    return "done" if returncode == 0 else exit_text(returncode)


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 400))
            lines = file.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return lines[-1].strip() if lines else ""


def _wait_until(done: Callable[[], bool], poll_s: float, progress: ProgressLine) -> None:
    while not done():
        progress()
        time.sleep(poll_s)
    progress()


def _open(store_dir: str | Path, experiment: Experiment) -> ResultStore:
    """The store, checked against the experiment's betons before any worker starts."""
    from ffcv_transfer.store.experiment import check_inputs

    store = ResultStore(store_dir)
    check_inputs(store, experiment)
    return store


def _log_dir(store: ResultStore, log_dir: str | Path | None, executor: str) -> Path:
    path = Path(log_dir) if log_dir else store.path / "launches" / f"{time.strftime('%Y%m%d-%H%M%S')}-{executor}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_rounds(
    store: ResultStore,
    run_round: Callable[[int, int], list[str]],
    most_workers: int,
    k: int,
    max_rounds: int,
    log_dir: Path,
) -> dict[str, Any]:
    """Call run_round(round, workers), which starts that many workers, returns once all have ended and
    says how each that failed ended, while rows are pending, with no more workers than batches of `k`
    pending rows; returns the status of the complete store, or raises LaunchError after a round that
    completed no row (naming how its workers ended) or after `max_rounds`."""
    status = store.status()
    for round_no in range(1, max_rounds + 1):
        if not status["pending"]:
            break
        done_before = status["completed"] + status["failed"]
        ended_badly = run_round(round_no, min(most_workers, math.ceil(status["pending"] / k)))
        status = store.status()
        if status["pending"] and status["completed"] + status["failed"] == done_before:
            how = "".join(f"\n  {line}" for line in ended_badly)
            raise LaunchError(f"round {round_no} completed no row; see the worker logs in {log_dir}{how}")
    if status["pending"] or status["claimed"]:
        raise LaunchError(
            f"store {store.path} incomplete after {max_rounds} rounds: {status['pending']} rows "
            f"pending, {status['claimed']} claimed by live workers; launch again to go on"
        )
    return status


def launch_local(
    store_dir: str | Path,
    experiment: Experiment,
    *,
    gpus: Sequence[int] | None = None,
    workers: int | None = None,
    log_dir: str | Path | None = None,
    max_rounds: int = 3,
    poll_s: float = 10,
    say: Say = _say,
) -> dict[str, Any]:
    """Workers on this machine (`local_workers`), each an `ffcv-transfer train` process logging to
    LOG_DIR/roundR-LABEL.log, until the store is complete; returns its final status."""
    store = _open(store_dir, experiment)
    team = local_workers(gpus, workers, experiment.run.device)
    log_dir = _log_dir(store, log_dir, "local")
    config = log_dir / "experiment.yaml"
    experiment.save(config)
    progress = ProgressLine(store, say)

    def run_round(round_no: int, count: int) -> list[str]:
        started: list[tuple[LocalWorker, Path, subprocess.Popen]] = []
        try:
            for worker in team[:count]:
                log = log_dir / f"round{round_no}-{worker.label}.log"
                with open(log, "wb") as out:
                    command = [
                        sys.executable,
                        "-m",
                        "ffcv_transfer.cli",
                        "train",
                        "--store",
                        str(store.path),
                        "--config",
                        str(config),
                        "--no-progress",
                        "--label",
                        worker.label,
                        f"--run.device={worker.device}",
                    ]
                    started.append(
                        (
                            worker,
                            log,
                            subprocess.Popen(
                                command, env={**os.environ, **worker.env}, stdout=out, stderr=subprocess.STDOUT
                            ),
                        )
                    )
            say(
                f"round {round_no}: {_count(count, 'local worker')} ({', '.join(w.label for w in team[:count])}); "
                f"logs in {log_dir}"
            )
            progress.workers = {worker.label: (log, process) for worker, log, process in started}
            _wait_until(lambda: all(process.poll() is not None for _, _, process in started), poll_s, progress)
        finally:
            for _, _, process in started:
                if process.poll() is None:
                    process.terminate()
                    process.wait()
        ended_badly = [
            f"{worker.label} {exit_text(process.returncode)}: {log}"
            for worker, log, process in started
            if process.returncode
        ]
        for line in ended_badly:
            print(f"  {line}", file=sys.stderr, flush=True)  # also without progress output: a crash is news
        return ended_badly

    return run_rounds(store, run_round, len(team), experiment.run.models_per_process, max_rounds, log_dir)


def exit_text(returncode: int) -> str:
    """'exited with status 2', or for a process killed by a signal 'was killed by SIGSEGV (signal 11)'."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "an unknown signal"
    return f"was killed by {name} (signal {-returncode})"


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise LaunchError("the slurm executor needs submitit: pip install -e .[slurm]") from None
    if not shutil.which("sbatch"):
        raise LaunchError("the slurm executor needs SLURM's sbatch on PATH: run the launcher on a SLURM login node")
    return submitit


# task states after which a task never runs again (a requeued one is PENDING again)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _live_tasks(job_id: str) -> int:
    """Tasks of a job (array) that are pending, running or requeued."""
    result = subprocess.run(
        ["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    )
    if result.returncode:
        if "Invalid job id" in result.stderr:
            return 0  # long ended: slurmctld forgot it
        raise LaunchError(f"squeue -j {job_id} failed: {result.stderr.strip()}")
    return sum(1 for state in result.stdout.split() if state not in ENDED)


def _outcome(job: Any) -> tuple[bool, str]:
    """(whether the task ended well, what it did)."""
    if not job.paths.result_pickle.exists():
        return False, f"ended without a result (killed or cancelled); log {job.paths.stderr}"
    try:
        return True, f"wrote {job.result()} rows"
    except Exception as error:  # submitit's FailedJobError carries the task's traceback
        return False, f"failed ({str(error).strip().splitlines()[-1]}); log {job.paths.stderr}"


def launch_slurm(
    store_dir: str | Path,
    experiment: Experiment,
    options: SlurmOptions = SlurmOptions(),
    *,
    log_dir: str | Path | None = None,
    max_rounds: int = 3,
    poll_s: float = 10,
    wait: bool = True,
    say: Say = _say,
) -> dict[str, Any]:
    """A SLURM job array of `options.tasks` workers (submitit; its files in LOG_DIR/roundR). With `wait`,
    follow the store until every task has ended and submit further rounds until it is complete; without,
    return after the first submission. Returns the store's status."""
    submitit = _import_submitit()
    store = _open(store_dir, experiment)
    if options.gpus_per_task:
        experiment = replace(experiment, run=replace(experiment.run, device="cuda"))  # SLURM sets the GPUs visible
    log_dir = _log_dir(store, log_dir, "slurm")
    progress = ProgressLine(store, say)

    def submit(round_no: int, count: int) -> tuple[str, list]:
        """(SLURM job id, submitit job of each task); one task is a plain job, more an array JOB_0, JOB_1..."""
        executor = submitit.SlurmExecutor(folder=log_dir / f"round{round_no}")
        parameters = options.executor_parameters(count)
        executor.update_parameters(**parameters)
        jobs = executor.map_array(StoreTask(), [str(store.path)] * count, [experiment] * count)
        job_id = jobs[0].job_id.split("_")[0]
        say(
            f"round {round_no}: SLURM job {job_id}, {_count(count, 'task')} ({parameters['array_parallelism']} "
            f"at a time); logs in {executor.folder}"
        )
        return job_id, jobs

    def run_round(round_no: int, count: int) -> list[str]:
        job_id, jobs = submit(round_no, count)
        _wait_until(lambda: _live_tasks(job_id) == 0, poll_s, progress)
        ended_badly = []
        for job in jobs:  # all ended, on whatever hosts: their claims are stale now
            store.release_claims(f"slurm-{job.job_id}-")
            ok, outcome = _outcome(job)
            say(f"  task {job.job_id}: {outcome}")
            if not ok:
                ended_badly.append(f"task {job.job_id}: {outcome}")
        return ended_badly

    k = experiment.run.models_per_process
    if wait:
        return run_rounds(store, run_round, options.tasks, k, max_rounds, log_dir)
    status = store.status()
    if status["pending"]:
        submit(1, min(options.tasks, math.ceil(status["pending"] / k)))
        say(f"follow it with: ffcv-transfer store status {store.path}")
    return store.status()
