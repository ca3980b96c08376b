"""Giving a finished task's SM share to the tasks still training: the standby hand-over.

MPS fixes a process's SM share when it starts, so a task moves to a new share through a standby worker. When a
task of the round finishes, the round's reallocation rule (`Reallocate`, from agent/planning.py) names new
launches for tasks still training; for each, a standby worker is started at the new percentage and prepared
(model and data) while the running worker keeps training. Then the running worker is asked (SIGUSR1) to pause
before its next step: it writes the round's state (model, optimiser, step count, data position:
agent/checkpoint.py) to the Train command's `handover_path` and answers `HandedOver`; the standby continues the
same round from that file and the old worker ends. The task's pool key then holds the standby.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from agent import jobs
from agent.workers import Launch, Lease, TaskFailed, WorkerGone, WorkerPool, WorkerProcess

log = logging.getLogger(__name__)
SIGNAL_REPEAT_S = 0.5  # a pause asked for before the worker's round began is forgotten: asked again


@dataclass(frozen=True)
class Training:
    """A task still training, as the reallocation rule sees it."""

    task: str
    launch: Launch
    step: int  # steps done, as last reported
    total: int
    steps_per_s: float | None  # its pace so far (None before two progress reports)

    @property
    def remaining_s(self) -> float | None:
        """Its remaining training time at its pace so far."""
        return None if not self.steps_per_s else max(0, self.total - self.step) / self.steps_per_s


#: (the task that finished, the tasks still training) -> new launches for the tasks that should move
Reallocate = Callable[[str, list[Training]], Mapping[str, Launch]]


def standby_key(task: str) -> tuple[str, str]:
    """The pool key a task's standby worker gets ready under."""
    return (task, "standby")


class TaskControl:
    """One task's training in a round, shared by its runner thread and a hand-over under way."""

    def __init__(self, task: str, launch: Launch) -> None:
        self.task, self.launch = task, launch
        self.handovers = 0
        self.co_run_steps_per_s: float | None = None  # its pace while every task of its wave trained
        self._lock = threading.Lock()
        self._worker: WorkerProcess | None = None
        self._done = False
        self._moving = False
        self._standby: tuple[Lease, Launch] | None = None

    @property
    def worker(self) -> WorkerProcess | None:
        """The worker training the task now."""
        with self._lock:
            return self._worker

    def begin(self, worker: WorkerProcess) -> None:
        with self._lock:
            self._worker = worker

    def training(self) -> Training | None:
        """The task as the reallocation rule sees it; None unless it trains with no hand-over under way."""
        with self._lock:
            if self._worker is None or self._done or self._moving:
                return None
            step, total, _ = self._worker.progress or (0, 0, 0.0)
            return Training(self.task, self.launch, step, total, self._worker.pace())

    def move(self, pool: WorkerPool, launch: Launch, prepare: jobs.Prepare) -> None:
        """Start the hand-over to a standby worker under `launch` (in the background)."""
        with self._lock:
            if self._done or self._moving:
                return
            self._moving = True
        threading.Thread(
            target=self._move, args=(pool, launch, prepare), name=f"standby-{self.task}", daemon=True
        ).start()

    def take_standby(self) -> tuple[Lease, Launch]:
        """The ready standby and its launch, once the running worker handed its round over."""
        with self._lock:
            standby, self._standby = self._standby, None
        if standby is None:
            raise WorkerGone(f"worker {self.task} handed over with no standby ready")
        return standby

    def switched(self, worker: WorkerProcess, launch: Launch) -> None:
        """The standby continues the round."""
        with self._lock:
            self._worker, self.launch, self._moving = worker, launch, False
            self.handovers += 1

    def finish(self) -> bool:
        """The task's round ended; whether a standby it did not use holds its lease (to be discarded)."""
        with self._lock:
            self._done = True
            standby, self._standby = self._standby, None
            return standby is not None

    def _move(self, pool: WorkerPool, launch: Launch, prepare: jobs.Prepare) -> None:
        key = standby_key(self.task)
        try:
            lease = pool.acquire(key, launch, prepare)
        except (TaskFailed, WorkerGone) as exc:
            log.warning("task %s stays at its share: its standby failed (%s)", self.task, exc)
            with self._lock:
                self._moving = False
            return
        with self._lock:
            late = self._done
            if not late:
                self._standby = (lease, launch)
        if late:  # the task finished while its standby got ready
            pool.release(key, healthy=False)
            return
        log.info("task %s: standby ready at %s%% of the SMs; handing over", self.task, launch.percent)
        while True:
            with self._lock:
                if self._done or self._standby is None:
                    return
                worker = self._worker
            worker.request_handover()
            time.sleep(SIGNAL_REPEAT_S)


def continue_on_standby(
    control: TaskControl, pool: WorkerPool, train: jobs.Train, handed: jobs.HandedOver
) -> WorkerProcess:
    """Send the handed-over round to the standby, make it the task's worker and end the paused one; the caller
    holds the task's lease and reads the standby's answer."""
    standby, launch = control.take_standby()
    standby.worker.send(msgspec.structs.replace(train, resume_path=handed.path))
    pool.exchange(control.task, standby_key(control.task))
    pool.release(standby_key(control.task), healthy=False)  # the paused worker ends
    control.switched(standby.worker, launch)
    return standby.worker
