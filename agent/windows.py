"""Synchronised measurement windows over warm workers: the harness behind calibration and the benchmarks.

Every member of a window is a pool worker prepared with its model and data (the same `TaskRuntime` rounds train
on). They warm up, report `Warm`, and the members of a wave start together on `Go` (waves run one after another,
for `temporal`). Workers stay in the pool across windows, so batch sizes change without a restart; the SM
percentage cannot (MPS reads it once, at process start).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec

from agent import jobs
from agent.workers import Launch, Lease, TaskFailed, WorkerGone, WorkerPool


@dataclass(frozen=True)
class Member:
    """One worker of a window: its pool key, how it is launched and prepared, and what it measures."""

    key: Hashable
    launch: Launch
    prepare: jobs.Prepare
    measure: jobs.Measure


@dataclass(frozen=True)
class Window:
    """Each member's result (in member order), the SM count each saw, and the wall time from first start to
    last end over all waves."""

    results: list[jobs.Measured]
    sm_counts: list[int | None]
    wall_s: float

    @property
    def images(self) -> int:
        return sum(r.images for r in self.results)


def measure_window(
    pool: WorkerPool,
    members: Sequence[Member],
    waves: Sequence[Sequence[int]] | None = None,
    timeout_s: float = 600.0,
) -> Window:
    """Acquire every member's worker (missing ones start in parallel), warm all up, then start each wave (indices
    into `members`; default: all at once) together."""
    if len({m.key for m in members}) != len(members):
        raise ValueError("a worker can appear only once in a window")
    leases = _acquire_all(pool, members)
    try:
        for lease, member in zip(leases, members):
            lease.worker.send(msgspec.structs.replace(member.measure, wait_go=True))
        for lease in leases:
            lease.worker.expect(jobs.Warm, timeout_s=timeout_s)
        results: list[jobs.Measured | None] = [None] * len(members)
        wall = 0.0
        for wave in waves or [range(len(members))]:
            for i in wave:
                leases[i].worker.send(jobs.Go())
            for i in wave:
                results[i] = leases[i].worker.expect(jobs.Measured, timeout_s=timeout_s)
            wall += max(results[i].ended_at for i in wave) - min(results[i].started_at for i in wave)
    except (TaskFailed, WorkerGone):  # the workers may be mid-window: start them afresh next time
        for member in members:
            pool.release(member.key, healthy=False)
        raise
    for member in members:
        pool.release(member.key)
    return Window(results, [lease.ready.sm_count for lease in leases], wall)


def _acquire_all(pool: WorkerPool, members: Sequence[Member]) -> list[Lease]:
    with ThreadPoolExecutor(max(1, len(members))) as executor:
        futures = [executor.submit(pool.acquire, m.key, m.launch, m.prepare) for m in members]
    leases, errors, codes = [], [], set()
    for member, future in zip(members, futures):
        try:
            leases.append(future.result())
        except (TaskFailed, WorkerGone) as exc:
            errors.append(f"{member.launch.task}: {exc}")
            codes.add(exc.failure.code if isinstance(exc, TaskFailed) else "error")
            leases.append(None)
    if errors:
        for member, lease in zip(members, leases):
            if lease is not None:
                pool.release(member.key)
        code = "oom" if "oom" in codes else "error"  # out of memory: the caller may free some and retry
        raise TaskFailed(jobs.Failed(code=code, error="; ".join(errors)))
    return leases
