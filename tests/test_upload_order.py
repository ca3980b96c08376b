"""The agent's upload order: Algorithm 1's (each update as its task finishes, while the others train) or the naive
one kept for measurement (every update once the round's training is over)."""

from __future__ import annotations

import queue
import time

import msgspec
import numpy as np
import pytest

from agent import jobs
from agent import service as agent_service
from agent.config import AgentConfig, ExecutionConfig
from agent.data import DataSpec
from agent.runner import TaskOutcome
from agent.service import RoundDone, RoundOutcome
from protocol import topics
from protocol.chunking import sha256_hex
from protocol.schemas import Schedule, encode
from protocol.tensors import encode_state
from protocol.transport import Incoming
from tests.fuzzing import RecordingLink, assignment

TASKS = ("a", "b")


class OneByOne:
    """Stands in for the task processes: each task of the round writes an update and finishes, in turn."""

    def __call__(self, launches, work, pool, on_outcome, **_) -> None:
        for launch in launches:
            train = work[launch.task].train
            payload = encode_state({"w": np.full(4, 0.5, np.float32)})
            with open(train.output_path, "wb") as file:
                file.write(payload)
            metrics = {"images": 8.0, "train_s": 0.1}
            trained = jobs.Trained(
                samples=8,
                steps=2,
                seconds=0.1,
                metrics=metrics,
                output_path=train.output_path,
                size=len(payload),
                sha256=sha256_hex(payload),
            )
            on_outcome(TaskOutcome(launch.task, trained=trained))


@pytest.fixture(params=["on_finish", "after_round"])
def agent(request, tmp_path, monkeypatch):
    monkeypatch.setattr(agent_service, "run_round", OneByOne())
    config = AgentConfig(
        device="dev1",
        state_dir=str(tmp_path / "dev1"),
        execution=ExecutionConfig(device="cpu", policy="temporal", upload=request.param),
        tasks={t: msgspec.convert({"kind": "synthetic", "samples": 40}, DataSpec) for t in TASKS},
    )
    agent = agent_service.Agent(config)
    agent.link = RecordingLink()
    agent.uploads.link = agent.link
    return agent


def round_events(agent) -> list:
    """The events of the round the agent started, in order, up to its end."""
    events = []
    while not events or not isinstance(events[-1], RoundDone):
        try:
            events.append(agent.events.get(timeout=10))
        except queue.Empty:
            pytest.fail(f"the round did not end; events so far: {events}")
    return events


def uploaded_tasks(agent) -> list[str]:
    return [manifest.task for manifest in agent.link.updates_sent()]


def test_updates_upload_as_each_task_finishes_or_all_once_the_round_is_over(agent):
    for task in TASKS:
        message = Schedule(
            device="dev1",
            round=1,
            issued_at=time.time(),
            deadline=time.time() + 600,
            tasks=[assignment(task)],
        )
        agent.handle(Incoming(topics.schedule("dev1", task), encode(message), True))
    events = round_events(agent)
    outcomes = [e for e in events if isinstance(e, RoundOutcome)]
    assert [e.outcome.task for e in outcomes] == list(TASKS)
    agent.handle(outcomes[0])
    agent.tick(time.monotonic())  # the outbox's resend timer holds back a held update too
    naive = agent.config.execution.upload == "after_round"
    assert uploaded_tasks(agent) == ([] if naive else ["a"])  # the first update goes while `b` trains
    agent.handle(outcomes[1])
    agent.tick(time.monotonic())
    assert uploaded_tasks(agent) == ([] if naive else ["a", "b"])
    agent.handle(events[-1])
    assert sorted(uploaded_tasks(agent)) == ["a", "b"]
    assert len(agent.outbox.pending()) == 2  # durable until receipts come, whatever the order
