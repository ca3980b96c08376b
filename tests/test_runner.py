"""Task processes: the SM check, a crashed task while others finish, cooperative stop, waves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from agent import jobs
from agent.dataspec import SyntheticData
from agent.runner import Launch, TaskFailed, run_round, start_worker
from agent.worker import PARENT_GONE
from protocol.chunking import sha256_hex
from common.models import build_model, state_to_numpy
from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment
from protocol.tensors import encode_state

pytestmark = pytest.mark.slow
MODEL = ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=16)
CPU = jobs.Init(device="cpu", threads=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    payload = encode_state(state_to_numpy(build_model(MODEL, seed=0)))
    path = tmp_path_factory.mktemp("base") / "v0.state"
    path.write_bytes(payload)
    return path, sha256_hex(payload)


def train_command(base, tmp_path, task: str, samples: int) -> jobs.Train:
    path, sha = base
    assignment = TaskAssignment(
        task=task, model=MODEL, optimizer=OptimizerSpec(), base_version=0, base_sha256=sha, batch_size=8
    )
    return jobs.Train(
        assignment=assignment,
        data=SyntheticData(samples=samples),
        base_path=str(path),
        output_path=str(tmp_path / f"{task}.update"),
    )


def collect(launches, commands, **kwargs) -> dict:
    outcomes = {}
    run_round(launches, commands, CPU, lambda o: outcomes.__setitem__(o.task, o), **kwargs)
    return outcomes


def test_a_worker_that_sees_the_wrong_sm_count_is_an_error_not_a_fallback():
    with pytest.raises(TaskFailed) as failure:
        start_worker(Launch("t", expected_sms=66), CPU)
    assert failure.value.failure.code == "mps"
    assert "got None SMs, expected 66" in str(failure.value)


def test_a_crashed_task_is_reported_while_the_other_task_finishes(base, tmp_path):
    marker = f"crash-{os.getpid()}"
    killed = threading.Event()

    def kill_marked_worker(task: str, progress: jobs.Progress) -> None:
        if task != "doomed" or killed.is_set():
            return
        for child in psutil.Process().children(recursive=True):
            try:
                if child.environ().get("FEDMT_TEST_MARKER") == marker:
                    child.send_signal(signal.SIGKILL)
                    killed.set()
            except psutil.Error:
                continue

    launches = [Launch("doomed", env={"FEDMT_TEST_MARKER": marker}), Launch("healthy")]
    commands = {
        "doomed": train_command(base, tmp_path, "doomed", samples=4000),
        "healthy": train_command(base, tmp_path, "healthy", samples=64),
    }
    outcomes = collect(launches, commands, on_progress=kill_marked_worker)
    assert killed.is_set()
    assert outcomes["doomed"].failure is not None and outcomes["doomed"].trained is None
    assert "exited with code -9" in outcomes["doomed"].failure.error
    assert outcomes["healthy"].trained is not None and outcomes["healthy"].trained.samples == 64
    assert (tmp_path / "healthy.update").stat().st_size > 0


def test_stop_asks_the_task_to_end_cooperatively(base, tmp_path):
    stop = threading.Event()
    started = time.monotonic()
    outcomes = collect(
        [Launch("long")],
        {"long": train_command(base, tmp_path, "long", samples=100_000)},
        stop=stop,
        on_progress=lambda task, progress: stop.set(),
    )
    assert outcomes["long"].failure.code == "stopped"
    assert time.monotonic() - started < 60  # a 100k-sample epoch would take far longer
    assert not (tmp_path / "long.update").exists()


def test_waves_run_one_after_another(base, tmp_path):
    finished: dict[str, float] = {}
    started: dict[str, float] = {}

    def on_progress(task: str, progress: jobs.Progress) -> None:
        started.setdefault(task, time.monotonic())

    def on_outcome(outcome) -> None:
        finished[outcome.task] = time.monotonic()

    launches = [Launch("first", wave=0), Launch("second", wave=1)]
    commands = {t: train_command(base, tmp_path, t, samples=64) for t in ("first", "second")}
    run_round(launches, commands, CPU, on_outcome, on_progress=on_progress)
    assert set(finished) == {"first", "second"}
    assert started["second"] > finished["first"]


def test_a_worker_whose_parent_is_gone_ends_quietly():
    worker = subprocess.Popen(
        [sys.executable, "-m", "agent.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    worker.stdout.close()  # the parent stops listening (as when it is killed)
    _, stderr = worker.communicate(jobs.encode_line(CPU), timeout=60)
    assert worker.returncode == PARENT_GONE
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr
