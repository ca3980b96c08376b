"""Measuring co-located training throughput with real task processes.

Every measurement is a synchronised window: the chosen workers warm up, report `Warm`, and the workers of a
wave start together on `Go` (waves run one after another, for `temporal`). Workers stay alive across windows,
so batch sizes change without a restart; the SM percentage cannot (MPS reads it once, at process start).

- `WorkerGroup`: the processes of one policy run (one per task).
- `WorkerPool`: long-lived workers keyed by (model, R_i); any co-location of them is measured without a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agent import jobs
from agent.runner import Launch, TaskFailed, WorkerGone, WorkerProcess, start_worker


@dataclass(frozen=True)
class Window:
    """One synchronised measurement: each task's result and the wall time from first start to last end."""

    results: dict[str, jobs.Measured]
    wall_s: float

    @property
    def images(self) -> int:
        return sum(r.images for r in self.results.values())

    def throughput(self, task: str) -> float:
        return self.results[task].images_per_s


def run_window(
    members: Sequence[tuple[WorkerProcess, jobs.Measure]],
    waves: Sequence[Sequence[int]],
    timeout_s: float = 600.0,
) -> tuple[list[jobs.Measured], float]:
    """Warm all members up, then start each wave (indices into `members`) together; return results and wall time."""
    for worker, command in members:
        worker.send(msgspec.structs.replace(command, wait_go=True))
    for worker, _ in members:
        _expect(worker, jobs.Warm, timeout_s)
    results: list[jobs.Measured | None] = [None] * len(members)
    wall = 0.0
    for wave in waves:
        for i in wave:
            members[i][0].send(jobs.Go())
        for i in wave:
            results[i] = _expect(members[i][0], jobs.Measured, timeout_s)
        wall += max(results[i].ended_at for i in wave) - min(results[i].started_at for i in wave)
    return results, wall


def start_workers(
    launches: Sequence[Launch], init: jobs.Init, log_dir: Path | None
) -> list[tuple[WorkerProcess, jobs.Ready]]:
    """Start and check all launches at once; on any failure stop the others and raise TaskFailed."""
    with ThreadPoolExecutor(max(1, len(launches))) as pool:
        futures = [
            pool.submit(start_worker, launch, init, log_dir / f"{launch.task}.log" if log_dir else None)
            for launch in launches
        ]
    started, errors = [], []
    for launch, future in zip(launches, futures):
        try:
            started.append(future.result())
        except (TaskFailed, WorkerGone) as exc:
            errors.append(f"{launch.task}: {exc}")
    if errors:
        for worker, _ in started:
            worker.close(grace_s=10)
        raise TaskFailed(jobs.Failed(code="error", error="; ".join(errors)))
    return started


class _Workers:
    """Worker processes closed together: `close()` or a `with` block."""

    workers: dict

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close(grace_s=10)
        self.workers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerGroup(_Workers):
    """The processes of one policy run, one per launch."""

    def __init__(self, launches: Sequence[Launch], init: jobs.Init, log_dir: Path | None = None) -> None:
        self.launches = list(launches)
        started = start_workers(self.launches, init, log_dir)
        self.workers = {launch.task: worker for launch, (worker, _) in zip(self.launches, started)}
        self.ready = {launch.task: ready for launch, (_, ready) in zip(self.launches, started)}

    def measure(
        self, commands: dict[str, jobs.Measure], waves: Sequence[Sequence[str]] | None = None
    ) -> Window:
        tasks = list(commands)
        order = {task: i for i, task in enumerate(tasks)}
        results, wall = run_window(
            [(self.workers[t], commands[t]) for t in tasks],
            [[order[t] for t in wave] for wave in waves or [tasks]],
        )
        return Window(dict(zip(tasks, results)), wall)


PoolKey = tuple[str, float]  # (model name, R_i in percent)


class WorkerPool(_Workers):
    """Workers keyed by (model, R_i), started on first use and kept for the pool's life."""

    def __init__(
        self, launch_for: Callable[[str, float], Launch], init: jobs.Init, log_dir: Path | None = None
    ) -> None:
        self._launch_for = launch_for
        self._init = init
        self._log_dir = log_dir
        self.workers: dict[PoolKey, WorkerProcess] = {}
        self.ready: dict[PoolKey, jobs.Ready] = {}

    def start(self, keys: Sequence[PoolKey]) -> None:
        missing = [key for key in dict.fromkeys(keys) if key not in self.workers]
        if missing:
            for key, (worker, ready) in zip(
                missing, start_workers([self._launch_for(*k) for k in missing], self._init, self._log_dir)
            ):
                self.workers[key], self.ready[key] = worker, ready

    def measure(self, picks: Sequence[tuple[PoolKey, jobs.Measure]]) -> list[jobs.Measured]:
        """One synchronised window over the picked workers; results in the order of `picks`."""
        keys = [key for key, _ in picks]
        if len(set(keys)) != len(keys):
            raise ValueError("a worker can appear only once in a window")
        self.start(keys)
        results, _ = run_window([(self.workers[k], c) for k, c in picks], [list(range(len(picks)))])
        return results


def _expect(worker: WorkerProcess, kind: type, timeout_s: float):
    event = worker.expect(kind, timeout_s=timeout_s)
    if isinstance(event, jobs.Failed):
        raise TaskFailed(event)
    return event
