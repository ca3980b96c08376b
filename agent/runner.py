"""Task worker processes: starting them with their own environment, talking to them, stopping them politely.

`WorkerProcess` wraps one `python -m agent.worker` child. `run_round` executes a round's launches wave by wave
(tasks of a wave run at once; the next wave starts when the previous one is done) and reports each task's
outcome through a callback the moment that task finishes, so its update can be streamed while others train.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import jobs

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkerGone(RuntimeError):
    """The worker process exited or stopped answering."""


@dataclass(frozen=True)
class Launch:
    """How one task process is started: its wave, extra environment and the SM count it must see."""

    task: str
    wave: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    expected_sms: int | None = None


class WorkerProcess:
    """One worker child; its events are read by a thread into a queue."""

    def __init__(self, name: str, env: Mapping[str, str] | None = None, log_path: Path | None = None) -> None:
        self.name = name
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        self._log = open(log_path, "ab") if log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log else None,
            env=child_env,
        )
        self._events: queue.Queue[jobs.Event | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"worker-{name}", daemon=True).start()

    def send(self, command: jobs._Line) -> None:
        try:
            self.proc.stdin.write(jobs.encode_line(command))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerGone(f"worker {self.name} exited (code {self.proc.poll()})") from exc

    def expect(
        self,
        *kinds: type,
        timeout_s: float | None = None,
        on_progress: Callable[[jobs.Progress], None] | None = None,
    ) -> jobs.Event:
        """The next event of one of `kinds` (or Failed); Progress events go to `on_progress`."""
        while True:
            try:
                event = self._events.get(timeout=timeout_s)
            except queue.Empty:
                raise WorkerGone(f"worker {self.name} sent nothing for {timeout_s:.0f} s") from None
            if event is None:
                raise WorkerGone(f"worker {self.name} exited with code {self.proc.wait()}")
            if isinstance(event, jobs.Progress):
                if on_progress:
                    on_progress(event)
                continue
            if isinstance(event, (jobs.Failed, *kinds)):
                return event
            raise WorkerGone(
                f"worker {self.name} sent {type(event).__name__}, expected {[k.__name__ for k in kinds]}"
            )

    def request_stop(self) -> None:
        """Ask the current command to stop at its next step (SIGTERM, handled by the worker)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self, grace_s: float = 30.0) -> int:
        """Ask the worker to exit; SIGTERM after `grace_s`, SIGKILL only as a last resort."""
        if self.proc.poll() is None:
            try:
                self.send(jobs.Exit())
                self.proc.stdin.close()
            except WorkerGone:
                pass
            for action in (None, self.proc.terminate, self.proc.kill):
                if action:
                    log.warning("worker %s did not exit; %s", self.name, action.__name__)
                    action()
                try:
                    self.proc.wait(grace_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log:
            self._log.close()
        return self.proc.returncode

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._events.put(jobs.decode_event(line))
            except ValueError:
                log.error("worker %s wrote a bad line: %r", self.name, line[:200])
        self._events.put(None)


def start_worker(
    launch: Launch, init: jobs.Init, log_path: Path | None = None, timeout_s: float = 300.0
) -> tuple[WorkerProcess, jobs.Ready]:
    """Start a worker for `launch`, initialise it and check the SM count it got; raise on any failure."""
    worker = WorkerProcess(launch.task, launch.env, log_path)
    try:
        worker.send(init)
        ready = worker.expect(jobs.Ready, timeout_s=timeout_s)
        if isinstance(ready, jobs.Failed):
            raise TaskFailed(ready)
        if launch.expected_sms is not None and ready.sm_count != launch.expected_sms:
            raise TaskFailed(
                jobs.Failed(
                    code="mps",
                    error=f"task {launch.task} got {ready.sm_count} SMs, expected {launch.expected_sms} "
                    "(is the MPS daemon running for this user and pipe directory?)",
                )
            )
        return worker, ready
    except BaseException:
        worker.close(grace_s=5)
        raise


class TaskFailed(Exception):
    def __init__(self, failure: jobs.Failed) -> None:
        super().__init__(f"{failure.code}: {failure.error}")
        self.failure = failure


@dataclass(frozen=True)
class TaskOutcome:
    task: str
    trained: jobs.Trained | None = None
    failure: jobs.Failed | None = None


def run_round(
    launches: list[Launch],
    commands: Mapping[str, jobs.Train],
    init: jobs.Init,
    on_outcome: Callable[[TaskOutcome], None],
    *,
    inputs_ready: Mapping[str, threading.Event] | None = None,
    on_progress: Callable[[str, jobs.Progress], None] | None = None,
    stop: threading.Event | None = None,
    log_dir: Path | None = None,
    timeout_s: float = 24 * 3600,
) -> None:
    """Run every launch (wave by wave, tasks of a wave concurrently); block until all reported an outcome."""
    stop = stop or threading.Event()
    for wave in sorted({launch.wave for launch in launches}):
        threads = [
            threading.Thread(
                target=_run_task,
                args=(
                    launch,
                    commands[launch.task],
                    init,
                    on_outcome,
                    inputs_ready,
                    on_progress,
                    stop,
                    log_dir,
                    timeout_s,
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
    command: jobs.Train,
    init: jobs.Init,
    on_outcome: Callable[[TaskOutcome], None],
    inputs_ready: Mapping[str, threading.Event] | None,
    on_progress: Callable[[str, jobs.Progress], None] | None,
    stop: threading.Event,
    log_dir: Path | None,
    timeout_s: float,
) -> None:
    ready = inputs_ready.get(launch.task) if inputs_ready else None
    while ready is not None and not ready.wait(0.5):
        if stop.is_set():
            on_outcome(
                TaskOutcome(launch.task, failure=jobs.Failed(code="stopped", error="stopped before start"))
            )
            return
    log_path = log_dir / f"{launch.task}.log" if log_dir else None
    try:
        worker, _ = start_worker(launch, init, log_path)
    except (TaskFailed, WorkerGone) as exc:
        failure = exc.failure if isinstance(exc, TaskFailed) else jobs.Failed(code="error", error=str(exc))
        on_outcome(TaskOutcome(launch.task, failure=failure))
        return
    watcher = threading.Thread(target=_stop_on, args=(stop, worker), daemon=True)
    watcher.start()
    try:
        worker.send(command)
        event = worker.expect(
            jobs.Trained,
            timeout_s=timeout_s,
            on_progress=(lambda p: on_progress(launch.task, p)) if on_progress else None,
        )
        outcome = (
            TaskOutcome(launch.task, failure=event)
            if isinstance(event, jobs.Failed)
            else TaskOutcome(launch.task, trained=event)
        )
    except WorkerGone as exc:
        outcome = TaskOutcome(launch.task, failure=jobs.Failed(code="error", error=str(exc)))
    finally:
        worker.close()
    on_outcome(outcome)


def _stop_on(stop: threading.Event, worker: WorkerProcess) -> None:
    while worker.proc.poll() is None:
        if stop.wait(0.5):
            worker.request_stop()
            return
