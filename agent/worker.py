"""A task worker process: `python -m agent.worker`, driven by JSON lines (agent.jobs) on stdin/stdout.

The parent sets the environment (e.g. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) before starting it; the worker
reports the SM count it actually got so the parent can check it. It keeps one `TaskRuntime` (model and data on
the device) across commands, so a round costs only its training. Stray prints go to stderr; stdout carries
only protocol lines. SIGTERM asks the current command to stop at the next step, SIGUSR1 to hand its round over
(agent/handover.py); a parent that went away (a closed stdout) ends the worker quietly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec

from agent import jobs
from agent.compression import write_update
from protocol.chunking import sha256_hex
from protocol.tensors import decode_state

PARENT_GONE = 4  # exit status when the parent closed our stdout


class CalledOff(Exception):
    """The parent ended a window this worker was warmed up for (it sent Exit, or went away, instead of Go)."""


class Worker:
    def __init__(self, commands: BinaryIO, out: BinaryIO) -> None:
        self.commands = commands
        self.out = out
        self.device = "cpu"
        self.cuda_graphs = False
        self.stop_requested = False
        self.handover_requested = False
        self._last_progress = 0.0
        self._prepared: jobs.Prepare | None = None
        self._runtime = None  # agent.training.TaskRuntime, once prepared

    def emit(self, event: jobs._Line) -> None:
        self.out.write(jobs.encode_line(event))
        self.out.flush()

    def serve(self) -> int:
        for line in self.commands:
            if not line.strip():
                continue
            try:
                command = jobs.decode_command(line)
            except msgspec.MsgspecError as exc:
                self.emit(jobs.Failed(code="protocol", error=f"bad command: {exc}"))
                return 2
            if isinstance(command, jobs.Exit):
                return 0
            # a stop or hand-over asked for during an earlier command does not carry over
            self.stop_requested = self.handover_requested = False
            try:
                self.run(command)
            except BrokenPipeError:  # the parent is gone (main ends the worker quietly)
                raise
            except CalledOff:  # e.g. a co-runner of the window failed: nothing to report
                return 0
            except Exception as exc:  # reported to the parent, which decides what happens next
                code = classify(exc)
                traceback.print_exc(file=sys.stderr)  # in the log before the parent hears of it
                self.emit(jobs.Failed(code=code, error=f"{type(exc).__name__}: {exc}"))
                if code == "mps":  # the CUDA context is unusable after an MPS fault
                    return 3
        return 0

    def run(self, command: jobs.WorkerCommand) -> None:
        if isinstance(command, jobs.Init):
            self.init(command)
        elif isinstance(command, jobs.Prepare):
            self.prepare(command)
        elif isinstance(command, jobs.Train):
            self.train(command)
        elif isinstance(command, jobs.Measure):
            self.measure(command)
        else:
            raise ValueError(f"unexpected command {type(command).__name__}")

    def init(self, command: jobs.Init) -> None:
        started = time.perf_counter()
        if command.log_path:
            with open(command.log_path, "ab") as log:
                os.dup2(log.fileno(), 2)
        os.environ.update(command.env)  # before the CUDA driver initialises (torch.cuda below)
        import torch

        torch.set_num_threads(command.threads)
        self.device, self.cuda_graphs = command.device, command.cuda_graphs
        if command.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA requested but torch sees no GPU")
            torch.backends.cudnn.benchmark = command.cudnn_benchmark
            props = torch.cuda.get_device_properties(0)
            torch.zeros(1, device="cuda")  # create the context now, so MPS errors surface here
            device_name, sm_count = props.name, props.multi_processor_count
        else:
            device_name, sm_count = "cpu", None
        seconds = time.perf_counter() - started
        self.emit(jobs.Ready(device_name=device_name, sm_count=sm_count, pid=os.getpid(), seconds=seconds))

    def prepare(self, command: jobs.Prepare) -> None:
        started = time.perf_counter()
        reused = command == self._prepared
        if not reused:
            from agent.training import TaskRuntime

            self.close()
            release_cached_memory(self.device)
            self._runtime = TaskRuntime(
                command.model,
                command.data,
                device=self.device,
                precision=command.precision,
                budget_bytes=command.budget_bytes,
                loader_workers=command.loader_workers,
                seed=command.seed,
                cuda_graphs=self.cuda_graphs,
            )
            self._prepared = command
        data = self._runtime.data
        self.emit(
            jobs.Prepared(
                samples=data.samples,
                placement=data.placement,
                seconds=time.perf_counter() - started,
                reused=reused,
            )
        )

    def train(self, command: jobs.Train) -> None:
        from agent.training import TrainingPaused

        started = time.perf_counter()
        runtime = self._prepared_runtime()
        try:
            base = decode_state(Path(command.base_path).read_bytes())
            result = runtime.train(
                command.assignment,
                base,
                seed=command.seed,
                reference_batch=command.reference_batch_size,
                resume_from=Path(command.resume_path) if command.resume_path else None,
                pause_to=Path(command.handover_path) if command.handover_path else None,
                progress=self._progress,
                should_stop=lambda: self.stop_requested,
                should_pause=lambda: self.handover_requested,
            )
        except TrainingPaused as paused:
            self.emit(jobs.HandedOver(path=command.handover_path, steps=paused.position.steps))
            return
        output = Path(command.output_path)
        residual = command.residual_path or output.with_name(f"{command.assignment.task}.residual")
        batch_size = command.assignment.batch_size
        payload = write_update(
            result.delta,
            command.assignment.codec,
            output,
            Path(residual),
            restate=lambda sent: runtime.restated_statistics(base, sent, batch_size, command.seed),
        )
        stats = result.stats
        if command.release_memory:
            release_cached_memory(self.device)
        self.emit(
            jobs.Trained(
                samples=result.samples,
                steps=stats.steps,
                seconds=time.perf_counter() - started,
                metrics={
                    "train_loss": stats.train_loss,
                    "train_accuracy": stats.train_accuracy,
                    "images": float(stats.images),
                    "train_s": stats.seconds,
                    "train_started_at": stats.started_at,
                    "train_ended_at": stats.ended_at,
                    f"precision_{command.assignment.precision}": 1.0,
                    "lr": result.recipe.lr,
                    "update_bytes": float(len(payload)),
                    "resumed": float(command.resume_path is not None),
                },
                output_path=command.output_path,
                size=len(payload),
                sha256=sha256_hex(payload),
            )
        )

    def measure(self, command: jobs.Measure) -> None:
        def before_window() -> None:
            if command.wait_go:
                self.emit(jobs.Warm())
                self._wait_for_go()

        stats = self._prepared_runtime().measure(
            command.batch,
            images=command.images,
            seconds=command.seconds,
            warmup_steps=command.warmup_steps,
            optimizer=command.optimizer,
            before_window=before_window,
            should_stop=lambda: self.stop_requested,
        )
        release_cached_memory(
            self.device
        )  # an idle worker keeps its model and data, not this window's activations
        self.emit(
            jobs.Measured(
                batch=command.batch,
                images=stats.images,
                seconds=stats.seconds,
                started_at=stats.started_at,
                ended_at=stats.ended_at,
            )
        )

    def close(self) -> None:
        """Let go of the prepared task (its data's reader processes end now)."""
        if self._runtime is not None:
            self._runtime.close()
        self._runtime = self._prepared = None

    def _prepared_runtime(self):
        if self._runtime is None:
            raise RuntimeError("no task prepared: send prepare first")
        return self._runtime

    def _wait_for_go(self) -> None:
        line = self.commands.readline()
        command = jobs.decode_command(line) if line.strip() else jobs.Exit()
        if isinstance(command, jobs.Exit):
            raise CalledOff
        if not isinstance(command, jobs.Go):
            raise ValueError(f"expected a go command after warm-up, got {type(command).__name__}")

    def _progress(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step == total or now - self._last_progress >= 0.5:
            self._last_progress = now
            self.emit(jobs.Progress(step=step, total=total))


def release_cached_memory(device: str) -> None:
    if device == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def classify(exc: BaseException) -> jobs.FailureCode:
    """Map an exception to the failure code the parent acts on."""
    name = type(exc).__name__
    text = str(exc)
    if name == "TrainingStopped":
        return "stopped"
    if name == "TrainingDiverged":
        return "diverged"
    if name == "OutOfMemoryError" or "out of memory" in text:
        return "oom"
    if "MPS" in text or "error 807" in text or "error 805" in text:
        return "mps"
    return "error"


def preload(modules: Sequence[str] = ()) -> None:
    """Load torch, torchvision, the training code and `modules` (those the tasks' data kinds import) before the
    first command: what a spare worker waits with (the CUDA driver is not initialised by this, so Init's
    environment still applies). A module that does not import is logged and left to the command that needs it."""
    import importlib

    import torchvision.models  # noqa: F401

    import agent.training  # noqa: F401

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - whatever a broken install raises, the task reports it later
            print(f"worker: could not preload {module}: {exc!r}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.worker", description="a task worker (agent.jobs)")
    parser.add_argument("--preload", nargs="*", default=[], help="modules to import before the first command")
    args = parser.parse_args(argv)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by libraries goes to stderr
    sys.stdout = sys.stderr
    preload(args.preload)
    worker = Worker(sys.stdin.buffer, out)

    def request_stop(signum, frame) -> None:
        worker.stop_requested = True

    def request_handover(signum, frame) -> None:
        worker.handover_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGUSR1, request_handover)
    try:
        worker.emit(jobs.Loaded())
        code = worker.serve()
    except BrokenPipeError:  # the parent is gone: nobody is left to report to, nothing to flush
        os._exit(PARENT_GONE)
    worker.close()
    # Everything a command produced is on disk and reported: skip the interpreter's teardown. On the H200,
    # workers streaming an image folder hung in it (threads and CUDA libraries torn down in no fixed order),
    # and a worker that the parent must kill can wedge the MPS server.
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
