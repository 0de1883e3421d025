"""The claim loop every worker runs: claim K pending rows of a store, hand them to a group function, write
what it completed and record why the others failed, report progress; until no row is pending. It knows
nothing of training: the worker (train and transfer), transfer-only runs and removal runs pass their own
group function, as MadryLab/datamodels' worker keeps its store loop apart from the training it calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ffcv_transfer.store.results import ResultStore, worker_name


@dataclass
class GroupOutcome:
    """What a group function did with its claimed rows: `rows` completed, with `values` (each store field
    stacked over `rows` in their order), and `failures` (row -> reason); a claimed row in neither stays
    claimed by this writer until the loop ends, then is pending again."""

    rows: list[int] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


Report = Callable[[str], None]  # hears of each stage of a group's work; keeps the group's claims alive
GroupWork = Callable[[list[int], Report], GroupOutcome]


def run_claims(
    store: ResultStore,
    per_group: int,
    work: GroupWork,
    rows: Sequence[int] | None = None,
    progress: bool = True,
    label: str | None = None,
) -> int:
    """Claim up to `per_group` pending rows of `store` (from `rows`, default all) at a time and run
    `work(claimed, report)` on them until none is pending; returns how many rows were written. `label`
    starts this writer's name in the store. Every claim is released when the loop ends, by an error too.
    `progress`: a bar, else a line per stage (for logs; the local launcher shows each worker's latest)."""
    from tqdm import tqdm

    writer = store.writer(worker_name(label))
    done = set(store.completed_rows().tolist()) | set(store.failures())
    todo = [row for row in (range(store.num_rows) if rows is None else rows) if row not in done]
    bar = tqdm(total=len(todo), unit="model", disable=not progress, dynamic_ncols=True)
    start, written, failed, claimed = time.monotonic(), 0, 0, []

    def report(stage: str) -> None:
        writer.heartbeat()
        bar.set_description(f"rows {claimed[0]}-{claimed[-1]}: {stage}", refresh=True)
        if not progress:
            print(f"rows {claimed[0]}-{claimed[-1]}: {stage}", flush=True)

    try:
        while claimed := writer.claim(per_group, rows=rows):
            outcome = work(claimed, report)
            for row, reason in outcome.failures.items():
                writer.fail(row, reason)
            if outcome.rows:
                writer.write_many(outcome.rows, **outcome.values)
                written += len(outcome.rows)
            failed += len(outcome.failures)
            bar.update(len(claimed))
            per_hour = 3600 * bar.n / (time.monotonic() - start)
            bar.set_postfix_str(f"{per_hour:.1f} models/h, {failed} failed", refresh=True)
    finally:
        writer.close()
        bar.close()
    return written
