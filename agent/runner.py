"""A round's task launches, wave by wave, on warm workers.

Tasks of a wave run at once; the next wave starts when the previous one is done. Each task's outcome is reported
through a callback the moment that task finishes, so its update can be streamed while others train.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent import jobs
from agent.workers import Launch, Lease, TaskFailed, WorkerGone, WorkerPool


@dataclass(frozen=True)
class TaskWork:
    """What a round asks of one task: its worker's preparation and its training command."""

    prepare: jobs.Prepare
    train: jobs.Train


@dataclass(frozen=True)
class TaskOutcome:
    task: str
    trained: jobs.Trained | None = None
    failure: jobs.Failed | None = None


def run_round(
    launches: list[Launch],
    work: Mapping[str, TaskWork],
    pool: WorkerPool,
    on_outcome: Callable[[TaskOutcome], None],
    *,
    inputs_ready: Mapping[str, threading.Event] | None = None,
    on_started: Callable[[str, Lease], None] | None = None,
    stop: threading.Event | None = None,
    stall_timeout_s: float = 600.0,
) -> None:
    """Run every launch (wave by wave, tasks of a wave concurrently); block until all reported an outcome.
    Every worker is got ready at once, ahead: while the global models download and earlier waves train."""
    stop = stop or threading.Event()
    waves = sorted({launch.wave for launch in launches})
    for launch in launches:
        pool.prestart(launch.task, launch, work[launch.task].prepare)
    for wave in waves:
        threads = [
            threading.Thread(
                target=_run_task,
                args=(
                    launch,
                    work[launch.task],
                    pool,
                    on_outcome,
                    inputs_ready,
                    on_started,
                    stop,
                    stall_timeout_s,
                ),
                name=f"task-{launch.task}",
                daemon=True,
            )
            for launch in launches
            if launch.wave == wave
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _run_task(
    launch: Launch,
    work: TaskWork,
    pool: WorkerPool,
    on_outcome: Callable[[TaskOutcome], None],
    inputs_ready: Mapping[str, threading.Event] | None,
    on_started: Callable[[str, Lease], None] | None,
    stop: threading.Event,
    stall_timeout_s: float,
) -> None:
    task = launch.task
    ready = inputs_ready.get(task) if inputs_ready else None
    while ready is not None and not ready.wait(0.5):
        if stop.is_set():
            on_outcome(TaskOutcome(task, failure=jobs.Failed(code="stopped", error="stopped before start")))
            return
    try:
        lease = pool.acquire(task, launch, work.prepare)
    except (TaskFailed, WorkerGone) as exc:
        failure = exc.failure if isinstance(exc, TaskFailed) else jobs.Failed(code="error", error=str(exc))
        on_outcome(TaskOutcome(task, failure=failure))
        return
    if on_started is not None:
        on_started(task, lease)
    done = threading.Event()
    threading.Thread(target=_stop_on, args=(stop, done, lease.worker), daemon=True).start()
    healthy = True
    try:
        trained = lease.worker.call(work.train, jobs.Trained, timeout_s=stall_timeout_s)
        outcome = TaskOutcome(task, trained=trained)
    except TaskFailed as exc:
        outcome = TaskOutcome(task, failure=exc.failure)
    except WorkerGone as exc:  # exited, hung or answered nonsense: replaced on next use
        healthy = False
        outcome = TaskOutcome(task, failure=jobs.Failed(code="error", error=str(exc)))
    finally:
        done.set()
        pool.release(task, healthy=healthy)
    on_outcome(outcome)


def _stop_on(stop: threading.Event, done: threading.Event, worker) -> None:
    """Forward a round's stop to the worker until its command ends (a signal sent before the worker read the
    command would be forgotten, so it is repeated)."""
    while not done.wait(0.5):
        if stop.is_set():
            worker.request_stop()
