"""Debian packages that some tests need (SLURM, Chromium), installed with apt when missing so that
`make demo` never pays for them. Root only; callers skip with a message otherwise."""

import os
import shutil
import subprocess
import time
from collections.abc import Sequence


def apt_install(packages: Sequence[str], commands: Sequence[str]) -> float:
    """Install `packages` unless every one of `commands` is already on PATH; returns the seconds taken."""
    if all(shutil.which(command) for command in commands):
        return 0.0
    if os.geteuid() != 0:
        raise PermissionError(f"{', '.join(packages)} missing, and installing them with apt needs root")
    start = time.monotonic()
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    subprocess.run([*apt, "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*apt, "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return time.monotonic() - start
