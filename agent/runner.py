"""A round's task launches, wave by wave, on warm workers.

Tasks of a wave run at once; the next wave starts when the previous one is done. Each task's outcome is reported
through a callback the moment that task finishes, so its update can be streamed while others train; its SM share
may then move to the tasks still training (agent/handover.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import jobs
from agent.handover import Reallocate, TaskControl, continue_on_standby, standby_key
from agent.workers import Launch, Lease, TaskFailed, WorkerGone, WorkerPool

log = logging.getLogger(__name__)


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
    handovers: int = 0  # times the round moved to a standby worker at another SM share
    #: its images/s while every task of its wave trained (None for the first to finish: its whole round was)
    co_run_images_per_s: float | None = None


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
    reallocate: Reallocate | None = None,
) -> None:
    """Run every launch (wave by wave, tasks of a wave concurrently); block until all reported an outcome.
    Every worker is got ready at once, ahead: while the global models download and earlier waves train.
    With `reallocate`, each task that finishes offers its share to the tasks still training (agent/handover.py;
    their Train commands need a `handover_path`)."""
    stop = stop or threading.Event()
    waves = sorted({launch.wave for launch in launches})
    controls = {launch.task: TaskControl(launch.task, launch) for launch in launches}

    waves_ended: set[int] = set()  # waves where a task finished

    def finished(task: str) -> None:
        wave = controls[task].launch.wave
        others = [c for c in controls.values() if c.task != task and c.launch.wave == wave]
        training = [t for c in others if (t := c.training()) is not None]
        if wave not in waves_ended:
            waves_ended.add(wave)
            for t in training:
                controls[t.task].co_run_steps_per_s = t.steps_per_s
        if reallocate is None or not training:
            return
        try:
            moves = reallocate(task, training)
        except Exception:  # noqa: BLE001 - a reallocation that fails leaves the round as planned
            log.exception("reallocating the share of task %s failed", task)
            return
        for moved, launch in moves.items():
            controls[moved].move(pool, launch, work[moved].prepare)

    for launch in launches:
        pool.prestart(launch.task, launch, work[launch.task].prepare)
    for wave in waves:
        threads = [
            threading.Thread(
                target=_run_task,
                args=(
                    controls[launch.task],
                    work[launch.task],
                    pool,
                    on_outcome,
                    finished,
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
    control: TaskControl,
    work: TaskWork,
    pool: WorkerPool,
    on_outcome: Callable[[TaskOutcome], None],
    finished: Callable[[str], None],
    inputs_ready: Mapping[str, threading.Event] | None,
    on_started: Callable[[str, Lease], None] | None,
    stop: threading.Event,
    stall_timeout_s: float,
) -> None:
    task = control.task
    ready = inputs_ready.get(task) if inputs_ready else None
    while ready is not None and not ready.wait(0.5):
        if stop.is_set():
            on_outcome(TaskOutcome(task, failure=jobs.Failed(code="stopped", error="stopped before start")))
            return
    try:
        lease = pool.acquire(task, control.launch, work.prepare)
    except (TaskFailed, WorkerGone) as exc:
        failure = exc.failure if isinstance(exc, TaskFailed) else jobs.Failed(code="error", error=str(exc))
        on_outcome(TaskOutcome(task, failure=failure))
        return
    if on_started is not None:
        on_started(task, lease)
    control.begin(lease.worker)
    done = threading.Event()
    threading.Thread(target=_stop_on, args=(stop, done, control), daemon=True).start()
    healthy = True
    try:
        worker = lease.worker
        worker.send(work.train)
        answer = worker.expect(jobs.Trained, jobs.HandedOver, timeout_s=stall_timeout_s)
        while isinstance(answer, jobs.HandedOver):
            worker = continue_on_standby(control, pool, work.train, answer)
            answer = worker.expect(jobs.Trained, jobs.HandedOver, timeout_s=stall_timeout_s)
        pace = control.co_run_steps_per_s
        co_run = pace * work.train.assignment.batch_size if pace else None
        outcome = TaskOutcome(task, trained=answer, handovers=control.handovers, co_run_images_per_s=co_run)
    except TaskFailed as exc:
        outcome = TaskOutcome(task, failure=exc.failure, handovers=control.handovers)
    except WorkerGone as exc:  # exited, hung or answered nonsense: replaced on next use
        healthy = False
        outcome = TaskOutcome(task, failure=jobs.Failed(code="error", error=str(exc)))
    finally:
        done.set()
        if control.finish():
            pool.release(standby_key(task), healthy=False)  # a standby that came too late
        pool.release(task, healthy=healthy)
        if work.train.handover_path:
            Path(work.train.handover_path).unlink(missing_ok=True)
    on_outcome(outcome)
    if outcome.trained is not None:
        finished(task)


def _stop_on(stop: threading.Event, done: threading.Event, control: TaskControl) -> None:
    """Forward a round's stop to the task's current worker until its command ends (a signal sent before the
    worker read the command would be forgotten, so it is repeated)."""
    while not done.wait(0.5):
        if stop.is_set() and (worker := control.worker) is not None:
            worker.request_stop()
