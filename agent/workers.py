"""Task worker processes: starting them with their own environment, talking to them, keeping them warm.

`WorkerProcess` wraps one `python -m agent.worker` child. `WorkerPool` keeps workers by key (a task, or a
(model, R_i) pair when calibrating) across rounds: a worker is reused while its launch environment is unchanged
(MPS reads CUDA_MPS_ACTIVE_THREAD_PERCENTAGE once, when the process's CUDA driver initialises), restarted when
it changes, replaced when it died or hung, and ended cleanly when the pool closes. A pool may keep spares:
processes that loaded torch ahead of any launch and take their launch's environment at Init, so a worker start
(the first round's, or a restart at a new SM share) does not wait for the interpreter and its libraries; the
pool starts a new spare for each it hands out.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from agent import jobs

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkerGone(RuntimeError):
    """The worker process exited or stopped answering."""


class TaskFailed(Exception):
    def __init__(self, failure: jobs.Failed) -> None:
        super().__init__(f"{failure.code}: {failure.error}")
        self.failure = failure


@dataclass(frozen=True)
class Launch:
    """How one worker process is started: its wave, extra environment, MPS share and the SM count it must see."""

    task: str
    wave: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    percent: float | None = None  # R_i under MPS; None without MPS
    expected_sms: int | None = None

    @property
    def process_key(self) -> tuple:
        """What a running process cannot change: a worker is reused only for a launch with the same key."""
        return tuple(sorted(self.env.items())), self.expected_sms


class WorkerProcess:
    """One worker child; its events are read by a thread into a queue. The progress of its current command is
    kept as read by `expect`."""

    def __init__(self, name: str, log_path: Path | None = None, preload: Sequence[str] = ()) -> None:
        self.name = name
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        self._log = open(log_path, "ab") if log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.worker", *(["--preload", *preload] if preload else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log else None,
            env=child_env,
        )
        self._events: queue.Queue[jobs.WorkerEvent | None] = queue.Queue()
        self.loaded = threading.Event()  # set once the child has imported its code (or exited: it never will)
        # the first and the last (step, total, monotonic time) the current command reported
        self.first_progress: tuple[int, int, float] | None = None
        self.progress: tuple[int, int, float] | None = None
        threading.Thread(target=self._read, name=f"worker-{name}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, command: jobs._Line) -> None:
        self.first_progress = self.progress = None
        try:
            self.proc.stdin.write(jobs.encode_line(command))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise WorkerGone(f"worker {self.name} exited (code {self.proc.poll()})") from exc

    def expect(self, *kinds: type, timeout_s: float | None = None) -> jobs.WorkerEvent:
        """The next event of one of `kinds`; a Failed answer raises TaskFailed. `timeout_s` bounds the silence
        between two events: the Progress a training worker sends every half second keeps it from being cut off."""
        while True:
            try:
                event = self._events.get(timeout=timeout_s)
            except queue.Empty:
                raise WorkerGone(f"worker {self.name} sent nothing for {timeout_s:.0f} s") from None
            if event is None:
                raise WorkerGone(f"worker {self.name} exited with code {self.proc.wait()}")
            if isinstance(event, jobs.Progress):
                self.progress = (event.step, event.total, time.monotonic())
                self.first_progress = self.first_progress or self.progress
                continue
            if isinstance(event, jobs.Failed):
                raise TaskFailed(event)
            if isinstance(event, kinds):
                return event
            raise WorkerGone(
                f"worker {self.name} sent {type(event).__name__}, expected {[k.__name__ for k in kinds]}"
            )

    def call(self, command: jobs._Line, kind: type, timeout_s: float | None = None):
        """Send a command and return its answer of `kind`; a Failed answer raises TaskFailed."""
        self.send(command)
        return self.expect(kind, timeout_s=timeout_s)

    def request_stop(self) -> None:
        """Ask the current command to stop at its next step (SIGTERM, handled by the worker)."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    def pace(self) -> float | None:
        """Steps per second of the current command between its first and last progress report (None before two)."""
        if self.first_progress is None or self.progress is None:
            return None
        (s0, _, t0), (s1, _, t1) = self.first_progress, self.progress
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None

    def request_handover(self) -> None:
        """Ask the current round to pause before its next step and hand its state over (SIGUSR1)."""
        if self.alive:
            self.proc.send_signal(signal.SIGUSR1)

    def close(self, grace_s: float = 30.0) -> int:
        """Ask the worker to exit; SIGTERM after `grace_s`, SIGKILL only as a last resort."""
        if self.alive:
            try:
                self.send(jobs.Exit())
                self.proc.stdin.close()
            except (WorkerGone, OSError):
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
                event = jobs.decode_event(line)
            except ValueError:
                log.error("worker %s wrote a bad line: %r", self.name, line[:200])
                continue
            if isinstance(event, jobs.Loaded):
                self.loaded.set()
            else:
                self._events.put(event)
        self.loaded.set()
        self._events.put(None)


def start_worker(
    launch: Launch,
    init: jobs.Init,
    log_path: Path | None = None,
    timeout_s: float = 300.0,
    spare: WorkerProcess | None = None,
    preload: Sequence[str] = (),
) -> tuple[WorkerProcess, jobs.Ready]:
    """Start a worker for `launch` (importing `preload` first; or give it `spare`, which then logs to
    `log_path`), initialise it with the launch's environment and check the SM count it got; raise on any
    failure."""
    if spare is None:
        worker = WorkerProcess(launch.task, log_path, preload)
    else:
        worker, spare.name = spare, launch.task
        init = msgspec.structs.replace(init, log_path=str(log_path) if log_path else None)
    try:
        ready = worker.call(
            msgspec.structs.replace(init, env=dict(launch.env)), jobs.Ready, timeout_s=timeout_s
        )
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


@dataclass(frozen=True)
class Lease:
    """A worker handed out for one command: how long the caller waited for it to be ready (for a start ahead of
    time as well) and whether a process was started for it; `prepared`: what the lease's Prepare answered, or for
    a started process, what its first Prepare did (also when that ran ahead)."""

    worker: WorkerProcess
    ready: jobs.Ready
    prepared: jobs.Prepared | None
    start_s: float
    started_process: bool


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: WorkerProcess | None = None
    ready: jobs.Ready | None = None
    launch: Launch | None = None
    fresh: bool = False  # a process was started since the last lease
    first_prepared: jobs.Prepared | None = None  # what the process's first Prepare answered


class WorkerPool:
    """Warm workers by key; `acquire` hands one out exclusively until `release`. Spares (`keep_spares`) are
    given to the next worker starts that find one alive, and replaced as they are. Every process imports
    `preload` (the tasks' data modules, `DataSpecBase.imports`) before its first command."""

    def __init__(
        self,
        init: jobs.Init,
        log_dir: Path | None = None,
        timeout_s: float = 300.0,
        preload: Sequence[str] = (),
    ) -> None:
        self.init, self.log_dir, self.timeout_s, self.preload = init, log_dir, timeout_s, tuple(preload)
        self._slots: dict[Hashable, _Slot] = {}
        self._guard = threading.Lock()
        self._closed = False
        # recent process starts (Init + first Prepare), from a spare and from scratch
        self.start_seconds: dict[str, deque[float]] = {"spare": deque(maxlen=20), "cold": deque(maxlen=20)}
        self._spares: list[WorkerProcess] = []
        self._spares_started = 0
        self._spares_kept = 0

    def acquire(
        self, key: Hashable, launch: Launch, prepare: jobs.Prepare | None = None, *, ahead: bool = False
    ) -> Lease:
        """The worker for `key`, started or restarted as `launch` needs and prepared with `prepare`; blocks while
        another lease of the same key is out. Raises TaskFailed or WorkerGone (the worker is then discarded).
        A lease says whether a process was started for it, also when that happened `ahead` (see `prestart`)."""
        slot = self._slot(key)
        asked = time.perf_counter()
        slot.lock.acquire()  # a start ahead of time holds it: the caller waits for the worker it readies
        began = time.perf_counter()
        started_here = False
        try:
            if slot.worker is not None and (
                not slot.worker.alive or slot.launch.process_key != launch.process_key
            ):
                reason = "it exited" if not slot.worker.alive else "its launch environment changed"
                log.info("restarting worker %s: %s", launch.task, reason)
                self._discard(slot)
            if slot.worker is None:
                spare = self._take_spare()
                slot.worker, slot.ready = start_worker(
                    launch, self.init, self._log_path(launch.task), self.timeout_s, spare, self.preload
                )
                slot.launch, slot.fresh, started_here = launch, True, True
                kind = "cold" if spare is None else "spare"
                if self._closed:  # closed while it started: it would outlive the pool
                    raise WorkerGone("the worker pool closed while the worker started")
            prepared = slot.worker.call(prepare, jobs.Prepared, self.timeout_s) if prepare else None
            if started_here:
                slot.first_prepared = prepared
            if started_here and prepare is not None:
                seconds = time.perf_counter() - began
                self.start_seconds[kind].append(seconds)
                log.info(
                    "worker %s started in %.2f s from %s (initialised in %.2f s, prepared in %.2f s)",
                    launch.task,
                    seconds,
                    "a spare" if kind == "spare" else "scratch",
                    slot.ready.seconds,
                    prepared.seconds,
                )
            started = slot.fresh
            slot.fresh = slot.fresh and ahead
            if started:
                prepared = slot.first_prepared
            return Lease(slot.worker, slot.ready, prepared, time.perf_counter() - asked, started)
        except BaseException:
            self._discard(slot)
            slot.lock.release()
            raise

    def release(self, key: Hashable, healthy: bool = True) -> None:
        """End a lease; an unhealthy worker (it hung, or answered nonsense) is ended and replaced on next use."""
        slot = self._slots.get(key)
        if slot is None:  # the pool closed while the lease was out, and ended its worker
            return
        if not healthy:
            self._discard(slot)
        slot.lock.release()

    def prestart(
        self, key: Hashable, launch: Launch, prepare: jobs.Prepare | None = None
    ) -> threading.Thread:
        """Get the worker for `key` ready in the background (a later `acquire` waits for it)."""

        def run() -> None:
            try:
                self.acquire(key, launch, prepare, ahead=True)
            except (TaskFailed, WorkerGone) as exc:
                log.warning("could not start worker %s ahead of time: %s", launch.task, exc)
                return
            self.release(key)

        thread = threading.Thread(target=run, name=f"prestart-{launch.task}", daemon=True)
        thread.start()
        return thread

    def exchange(self, key: Hashable, other: Hashable) -> None:
        """Swap the workers of two keys; the caller holds the leases of both."""
        a, b = self._slots[key], self._slots[other]
        a.worker, b.worker = b.worker, a.worker
        a.ready, b.ready = b.ready, a.ready
        a.launch, b.launch = b.launch, a.launch
        a.fresh = b.fresh = False

    def request_stop(self) -> None:
        """Ask every worker's current command to stop at its next step."""
        with self._guard:
            workers = [slot.worker for slot in self._slots.values() if slot.worker is not None]
        for worker in workers:
            worker.request_stop()

    def end_idle(self, keep: Collection[Hashable] = ()) -> int:
        """End the workers that are neither leased out nor in `keep`, freeing their GPU memory (each starts again
        when next acquired); how many ended."""
        with self._guard:
            slots = [slot for key, slot in self._slots.items() if key not in keep]
        ended = 0
        for slot in slots:
            if slot.worker is not None and slot.lock.acquire(blocking=False):
                try:
                    if slot.worker is not None:  # still there, now that no lease can start
                        self._discard(slot)
                        ended += 1
                finally:
                    slot.lock.release()
        return ended

    def launch_of(self, key: Hashable) -> Launch | None:
        """The launch a live worker for `key` runs under, if any."""
        slot = self._slots.get(key)
        return slot.launch if slot is not None and slot.worker is not None and slot.worker.alive else None

    def close(self, grace_s: float = 10.0) -> None:
        """End every worker (cooperatively first); the pool starts none after."""
        with self._guard:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
            spares, self._spares = self._spares, []
        for slot in slots:
            if slot.worker is not None:
                slot.worker.close(grace_s)
        for spare in spares:
            spare.close(grace_s)

    def keep_spares(self, count: int) -> None:
        """Keep `count` spare processes from now on: each loads torch at once and takes its launch's environment
        later; one handed to a worker start is replaced, and spares beyond a lower count are ended."""
        with self._guard:
            if self._closed:
                raise WorkerGone("the worker pool is closed")
            self._spares_kept = count
            surplus, self._spares = self._spares[count:], self._spares[:count]
            self._refill()
        for spare in surplus:
            spare.close(grace_s=1)

    def expected_start_s(self, default: float) -> float:
        """What the next worker start should take: the mean of the recent starts of its kind (from a spare while
        the pool holds one, else from scratch), `default` before any."""
        with self._guard:
            starts = self.start_seconds["spare" if self._spares else "cold"]
        return sum(starts) / len(starts) if starts else default

    def wait_for_spares(self, timeout_s: float, stop: threading.Event) -> bool:
        """Wait until every spare has imported torch and the training code, at most `timeout_s` and only while
        `stop` is clear; whether they all did."""
        deadline = time.monotonic() + timeout_s
        with self._guard:
            spares = list(self._spares)
        for spare in spares:
            while not spare.loaded.wait(0.2):
                if stop.is_set() or time.monotonic() >= deadline:
                    return False
        return True

    @property
    def spares(self) -> int:
        """Spare processes not yet given to a worker start."""
        return len(self._spares)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_path(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def _take_spare(self) -> WorkerProcess | None:
        """A spare still alive (one that died is ended and skipped), or None; the pool starts one in its place."""
        while True:
            with self._guard:
                if not self._spares:
                    return None
                spare = self._spares.pop(0)
                if not self._closed:
                    self._refill()
            if spare.alive:
                return spare
            log.warning("spare worker %s exited (code %s); skipped", spare.name, spare.proc.returncode)
            spare.close(grace_s=1)

    def _refill(self) -> None:
        """Start spares up to the number kept (the caller holds the guard)."""
        while len(self._spares) < self._spares_kept:
            name = f"spare-{self._spares_started}"
            self._spares.append(WorkerProcess(name, self._log_path(name), self.preload))
            self._spares_started += 1

    def _slot(self, key: Hashable) -> _Slot:
        with self._guard:
            if self._closed:
                raise WorkerGone("the worker pool is closed")
            return self._slots.setdefault(key, _Slot())

    @staticmethod
    def _discard(slot: _Slot) -> None:
        if slot.worker is not None:
            slot.worker.close(grace_s=5)
        slot.worker = slot.ready = slot.launch = None
