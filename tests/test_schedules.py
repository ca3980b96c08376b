"""Per-task schedules gathered into rounds (agent/schedules.py), and how the agent runs them: the tasks of one
round number together, a later round after the running one unless every task still training was withdrawn."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest

from agent import service as agent_service
from agent.config import AgentConfig, ExecutionConfig
from agent.data import DataSpec
from agent.schedules import RoundCollector
from protocol import ProtocolError, topics
from protocol.schemas import Schedule, encode
from protocol.transport import Incoming
from tests.fuzzing import RecordingLink, assignment

NOW = 1000.0  # monotonic
WALL = time.time()


def schedule(
    task: str, round_: int, device: str = "dev1", deadline: float | None = None, **fields
) -> Schedule:
    """A schedule due in ten minutes from now (the agent's tests read the clock when the suite is long past
    WALL)."""
    return Schedule(
        device=device,
        round=round_,
        issued_at=WALL - round_,
        deadline=time.time() + 600 if deadline is None else deadline,
        tasks=[assignment(task)],
        **fields,
    )


def tasks_of(merged: Schedule | None) -> list[str]:
    return [a.task for a in merged.tasks] if merged is not None else []


def test_a_round_starts_at_once_when_every_task_has_its_schedule():
    collector = RoundCollector(["a", "b"], grace_s=5.0)
    collector.put("dev1", "a", schedule("a", 1, policy="fedmt"), NOW)
    assert collector.next_round(NOW, WALL) is None  # b's may be on its way
    collector.put("dev1", "b", schedule("b", 1, deadline=WALL + 300), NOW + 0.1)
    merged = collector.next_round(NOW + 0.1, WALL)
    assert tasks_of(merged) == ["a", "b"] and merged.round == 1
    assert (merged.deadline, merged.issued_at, merged.policy) == (WALL + 300, WALL - 1, "fedmt")
    assert collector.next_round(NOW + 0.2, WALL) is None


def test_a_task_without_its_schedule_holds_the_round_only_for_the_grace():
    collector = RoundCollector(["a", "b"], grace_s=5.0)
    collector.put("dev1", "a", schedule("a", 1), NOW)
    assert collector.next_round(NOW + 4.9, WALL) is None
    assert tasks_of(collector.next_round(NOW + 5.0, WALL)) == ["a"]
    collector.put("dev1", "b", schedule("b", 1), NOW + 6)  # late: it runs as a round of its own
    assert collector.next_round(NOW + 6, WALL) is None
    assert tasks_of(collector.next_round(NOW + 11, WALL)) == ["b"]


def test_each_schedule_is_handed_out_once_whatever_arrives_again():
    collector = RoundCollector(["a"], grace_s=5.0)
    collector.put("dev1", "a", schedule("a", 1), NOW)
    assert tasks_of(collector.next_round(NOW, WALL)) == ["a"]
    collector.put("dev1", "a", schedule("a", 1), NOW + 1)  # retained again (a reconnect)
    collector.put("dev1", "a", None, NOW + 2)
    collector.put("dev1", "a", schedule("a", 1), NOW + 3)
    assert collector.next_round(NOW + 100, WALL) is None


def test_lower_round_numbers_go_first_and_rounds_past_their_deadline_are_skipped():
    collector = RoundCollector(["a", "b"], grace_s=1.0)
    collector.put("dev1", "a", schedule("a", 4), NOW)  # the aggregator of a is ahead
    collector.put("dev1", "b", schedule("b", 2, deadline=WALL - 1), NOW)
    assert collector.next_round(NOW, WALL) is None  # round 2 waits for a's schedule of round 2
    assert tasks_of(collector.next_round(NOW + 1, WALL)) == ["a"]  # b's round 2 is past its deadline
    collector.put("dev1", "b", schedule("b", 3), NOW + 2)
    assert collector.next_round(NOW + 3, WALL) is not None and collector.next_round(NOW + 9, WALL) is None


def test_a_complete_round_is_not_held_up_by_an_earlier_one_still_in_its_grace():
    collector = RoundCollector(["a"], grace_s=5.0)
    collector.put("dev1", "other", schedule("other", 2), NOW)  # a task this device holds no data for
    collector.put("dev1", "a", schedule("a", 3), NOW)
    assert tasks_of(collector.next_round(NOW, WALL)) == ["a"]
    assert collector.next_round(NOW + 1, WALL) is None
    assert tasks_of(collector.next_round(NOW + 5, WALL)) == ["other"]


def test_a_task_is_withdrawn_when_its_schedule_is_cleared_or_replaced_by_a_later_round():
    collector = RoundCollector(["a", "b"], grace_s=1.0)
    assert not collector.withdrawn("a", 1)
    collector.put("dev1", "a", schedule("a", 1), NOW)
    collector.put("dev1", "b", schedule("b", 1), NOW)
    assert not collector.withdrawn("a", 1)
    collector.put("dev1", "a", schedule("a", 2), NOW)
    collector.put("dev1", "b", None, NOW)
    assert collector.withdrawn("a", 1) and collector.withdrawn("b", 1) and not collector.withdrawn("a", 2)


@pytest.mark.parametrize(
    "message", [schedule("a", 1, device="dev2"), schedule("b", 1)], ids=["another device's", "another task's"]
)
def test_a_schedule_on_the_wrong_topic_is_refused(message):
    collector = RoundCollector(["a", "b"], grace_s=1.0)
    with pytest.raises(ProtocolError):
        collector.put("dev1", "a", message, NOW)
    assert collector.next_round(NOW + 10, WALL) is None


# --- the agent ----------------------------------------------------------------------------------------------


class BlockingRounds:
    """Stands in for the task processes: every round trains until it is stopped; records what each trained."""

    def __init__(self) -> None:
        self.rounds: list[list[str]] = []
        self.seeds: list[dict[str, int]] = []  # per round: the seed each task's training job was given
        self.running = threading.Event()

    def __call__(self, launches, work, pool, on_outcome, *, stop, **_) -> None:
        self.rounds.append(sorted(launch.task for launch in launches))
        self.seeds.append({task: item.train.seed for task, item in work.items()})
        self.running.set()
        stop.wait(30)
        self.running.clear()


@pytest.fixture
def agent(tmp_path, monkeypatch):
    rounds = BlockingRounds()
    monkeypatch.setattr(agent_service, "run_round", rounds)
    config = AgentConfig(
        device="dev1",
        state_dir=str(tmp_path / "dev1"),
        schedule_grace_s=5.0,
        execution=ExecutionConfig(device="cpu", policy="concurrent"),
        tasks={t: msgspec.convert({"kind": "synthetic", "samples": 40}, DataSpec) for t in ("a", "b")},
    )
    agent = agent_service.Agent(config)
    agent.link = RecordingLink()
    agent.rounds = rounds
    yield agent
    if agent.round is not None:
        agent.round.stop.set()
        agent.round.thread.join(10)


def send(agent, task: str, message: Schedule | None) -> None:
    agent.handle(Incoming(topics.schedule("dev1", task), b"" if message is None else encode(message), True))


def test_the_agent_trains_a_rounds_tasks_together_and_a_later_round_after_it(agent):
    send(agent, "a", schedule("a", 1))
    send(agent, "b", schedule("b", 1))
    assert agent.rounds.running.wait(10) and agent.rounds.rounds == [["a", "b"]]
    send(agent, "a", schedule("a", 2))  # a's aggregator moved on; b still trains round 1
    agent.tick(time.monotonic())
    assert agent.rounds.rounds == [["a", "b"]] and not agent.round.stop.is_set()
    send(agent, "b", None)  # b's round is final too: nothing of round 1 is wanted any more
    assert agent.round.stop.is_set() and agent.round.schedule.round == 1
    agent.tick(time.monotonic() + 5)  # b has no schedule for round 2: a's starts after the grace
    assert agent.round.schedule.round == 2 and [a.task for a in agent.round.schedule.tasks] == ["a"]
    deadline = time.monotonic() + 10
    while len(agent.rounds.rounds) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.rounds.rounds == [["a", "b"], ["a"]]


def test_a_task_trains_each_round_with_its_round_seed(agent):
    seeded = msgspec.structs.replace(assignment("a"), train_seed=2)
    send(agent, "a", msgspec.structs.replace(schedule("a", 3), tasks=[seeded]))
    send(agent, "b", schedule("b", 3))
    assert agent.rounds.running.wait(10)
    assert agent.rounds.seeds == [{"a": seeded.round_seed(3), "b": 3}]
    assert seeded.round_seed(3) != 3
