"""glibc's heap consistency checks for a child process: how the CPU-crash tests and the full-length
heap-checked benchmark run `ffcv-transfer`, and how a user checks another torch build the same way
(docs/engine.md#cpu-layout). MALLOC_CHECK_=3 aborts on the first corrupted chunk instead of letting a
run go on with damaged memory; since glibc 2.34 it needs libc_malloc_debug preloaded."""

from __future__ import annotations

from pathlib import Path

MALLOC_DEBUG = next(
    (
        p
        for p in ("/lib/x86_64-linux-gnu/libc_malloc_debug.so.0", "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0")
        if Path(p).exists()
    ),
    None,
)


def heap_checked(env: dict[str, str]) -> dict[str, str]:
    """`env` with glibc's heap consistency checks on (libc_malloc_debug preloaded where there is one)."""
    preload = " ".join(filter(None, [MALLOC_DEBUG, env.get("LD_PRELOAD")]))
    return {**env, "MALLOC_CHECK_": "3", **({"LD_PRELOAD": preload} if preload else {})}
