"""A throw-away single-node SLURM cluster on this machine, for the launcher's SLURM tests.

Debian's SLURM 22.05 daemons (slurmctld, slurmd, slurm-client: the parts of slurm-wlm used here) and
munge are installed with apt when missing (root only). munged, slurmctld and slurmd then run in the
foreground as children of this process, with a minimal slurm.conf (one node named after `hostname -s`,
proctrack/linuxproc, task/none, select/cons_tres, no accounting) and every socket, state and spool
folder under one temporary folder: nothing in /etc or /run is touched and a system munged or SLURM, if
any, is left alone. Clients reach this cluster through `cluster.env` (SLURM_CONF). `stop()` cancels the
jobs and ends the three daemons by their pids.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .system_packages import apt_install

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")
MUNGE_KEY = Path("/etc/munge/munge.key")  # made by munge's package


class SlurmUnavailable(Exception):
    """This machine cannot run the cluster (the message says why); tests skip with it."""


def install_packages() -> float:
    """apt-get install the daemons unless present (as root); returns the seconds it took (0 when present)."""
    return apt_install(PACKAGES, COMMANDS)


def _config(folder: Path, node: str, munge_socket: Path) -> str:
    """slurm.conf for one node (the `slurmd -C` line of this machine) on non-default ports."""
    return f"""\
ClusterName=ffcv-transfer-test
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire + 1 s before they start again (default 121 s)
AuthInfo=socket={munge_socket},cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=5
MailProg=/bin/true
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    folder: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *command: str, check: bool = True) -> str:
        """A client command (squeue, scancel, ...) against this cluster; its stdout."""
        return subprocess.run(command, env=self.env, check=check, capture_output=True, text=True).stdout

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "".join(log.read_text().splitlines(True)[-20:])
            for log in sorted(self.folder.glob("*.log"))
        )

    def stop(self) -> None:
        """Cancel every job (their slurmstepd would outlive slurmd), end the daemons by pid, and remove
        the cluster's folder (tests that fail put `logs()` in their message)."""
        slurm_is_up = len(self.daemons) == 3 and all(daemon.poll() is None for daemon in self.daemons)
        if slurm_is_up:
            self.run("scancel", "--full", "--quiet", f"--user={os.getuid()}", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", "-t", "R,CG,S", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, munged
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster(timeout_s: float = 60) -> SlurmCluster:
    """Install what is missing, start munged, slurmctld and slurmd, and wait until the node is idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            "a SLURM test cluster needs root: it installs SLURM and munge with apt and runs "
            "slurmctld, slurmd and munged (as user munge)"
        )
    install_packages()
    # in /tmp: munged, as user munge, must reach its socket (pytest's temporary folders are root's alone),
    # and short: slurmd's per-step unix sockets live in the spool folder (108-byte path limit)
    folder = Path(tempfile.mkdtemp(prefix="slurm-"))
    folder.chmod(0o755)
    munge = folder / "munge"
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir()
    shutil.chown(munge, "munge", "munge")
    munge_socket = munge / "munge.socket"
    node = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout.splitlines()[0]
    (folder / "slurm.conf").write_text(_config(folder, node, munge_socket))
    cluster = SlurmCluster(folder, {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")})
    log = open(folder / "daemons.out", "ab")
    try:
        cluster.daemons.append(
            subprocess.Popen(
                [
                    "munged",
                    "--foreground",
                    f"--socket={munge_socket}",
                    f"--pid-file={munge}/munged.pid",
                    f"--log-file={munge}/munged.log",
                    f"--seed-file={munge}/munged.seed",
                    f"--key-file={MUNGE_KEY}",
                ],
                user="munge",
                group="munge",
                extra_groups=[],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        _wait_for(lambda: munge_socket.exists(), timeout_s, "munged socket", cluster)
        for daemon in ("slurmctld", "slurmd"):
            cluster.daemons.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", cluster.env["SLURM_CONF"]],
                    env=cluster.env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
        _wait_for(
            lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle",
            timeout_s,
            "an idle node",
            cluster,
        )
    except BaseException:
        cluster.stop()
        raise
    finally:
        log.close()
    return cluster


def _wait_for(ready, timeout_s: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [d.args[0] for d in cluster.daemons if d.poll() is not None]
        if dead or time.monotonic() > deadline:
            reason = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout_s:.0f} s"
            raise RuntimeError(
                f"SLURM test cluster in {cluster.folder}: {reason}\n{cluster.logs()}\n"
                + (cluster.folder / "daemons.out").read_text()[-2000:]
            )
        time.sleep(0.25)
