"""glibc's heap consistency checks for a child process: how the CPU-crash tests and the full-length
heap-checked benchmark run `ffcv-transfer`, and how a user checks another torch build the same way
(docs/engine.md#cpu-layout).

glibc checks a chunk's neighbours on every free and aborts with SIGABRT ("free(): invalid next size",
"corrupted size vs. prev_size") when a write ran past its chunk into the next one's header;
MALLOC_PERTURB_ fills freed and new memory with a pattern, so reads of freed memory go wrong visibly. The
debugging allocator (MALLOC_CHECK_=3 with libc_malloc_debug preloaded) is left out on purpose: on glibc
2.36 it let a 2-byte overflow from Python pass that the default allocator aborts on
(tests/test_cpu_safety.py plants one)."""

from __future__ import annotations

DEBUG_ALLOCATOR = ("MALLOC_CHECK_", "LD_PRELOAD")


def heap_checked(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child whose heap corruption aborts it: glibc's default checks, freed memory perturbed,
    and no debugging allocator (which hides what the default one catches)."""
    kept = {key: value for key, value in env.items() if key not in DEBUG_ALLOCATOR}
    preload = " ".join(lib for lib in env.get("LD_PRELOAD", "").split() if "malloc_debug" not in lib)
    return {**kept, "MALLOC_PERTURB_": "165", **({"LD_PRELOAD": preload} if preload else {})}
