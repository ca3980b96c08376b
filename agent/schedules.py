"""A device's per-task schedules gathered into rounds.

Aggregators publish one retained schedule per device and task (`fedmt/v1/devices/{device}/schedule/{task}`), so
several of them, each owning some tasks, can drive one device. The agent still trains the tasks of one round
number together, under one plan: a round is handed out once every task the device holds data for has a
schedule for that round number, or `grace_s` after the first of them arrived (a task that was not sampled, or
whose aggregator is behind, does not hold the others up for long). Of the rounds ready, the lowest number goes
first; each task's schedule for a round is handed out once, so retained copies that arrive again change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec

from protocol import ProtocolError
from protocol.schemas import Schedule

log = logging.getLogger(__name__)


class RoundCollector:
    def __init__(self, tasks: Iterable[str], grace_s: float) -> None:
        self.tasks = frozenset(tasks)
        self.grace_s = grace_s
        self._latest: dict[str, Schedule | None] = {}  # task -> its retained schedule (None: cleared)
        self._taken: dict[str, int] = {}  # task -> the latest round handed out
        self._first_seen: dict[int, float] = {}  # round -> when its first schedule arrived

    def put(self, device: str, task: str, schedule: Schedule | None, now: float) -> None:
        """A schedule as it arrived on `task`'s topic (None: cleared); ProtocolError if it is not one schedule
        of `device` for exactly that task."""
        if schedule is not None:
            if schedule.device != device:
                raise ProtocolError(f"schedule for {schedule.device} arrived at {device}")
            if [a.task for a in schedule.tasks] != [task]:
                raise ProtocolError(f"schedule on {task}'s topic assigns {[a.task for a in schedule.tasks]}")
            if schedule.round > self._taken.get(task, 0):
                self._first_seen.setdefault(schedule.round, now)
        self._latest[task] = schedule

    def withdrawn(self, task: str, round_: int) -> bool:
        """Whether `task`'s work for round `round_` is no longer wanted: its schedule was cleared (the task round
        is final) or replaced by a later round's."""
        if task not in self._latest:
            return False
        latest = self._latest[task]
        return latest is None or latest.round > round_

    def next_round(self, now: float, wall: float) -> Schedule | None:
        """The next round to run, its tasks' schedules in one Schedule, or None (nothing new, or still within the
        grace): the lowest round number that is complete or whose grace has passed. `now` is monotonic time,
        `wall` the epoch time that schedules' deadlines are in; a schedule past its deadline is dropped."""
        waiting = {
            task: schedule
            for task, schedule in self._latest.items()
            if schedule is not None and schedule.round > self._taken.get(task, 0)
        }
        numbers = sorted({schedule.round for schedule in waiting.values()})
        self._first_seen = {r: t for r, t in self._first_seen.items() if r in numbers}  # replaced ones go
        for number in numbers:
            group = {task: s for task, s in waiting.items() if s.round == number}
            if not self.tasks <= group.keys() and now - self._first_seen.get(number, now) < self.grace_s:
                continue
            for task in group:
                self._taken[task] = number
            self._first_seen.pop(number, None)
            live = [group[task] for task in sorted(group) if group[task].deadline >= wall]
            if len(live) < len(group):
                late = sorted(set(group) - {s.tasks[0].task for s in live})
                log.info(
                    "round %d: deadline of %s passed before its schedule was taken; skipping", number, late
                )
            if live:
                return merged(live)
        return None


def merged(schedules: list[Schedule]) -> Schedule:
    """One round's task schedules as one: every task, the earliest issue time and deadline, the first policy set."""
    return msgspec.structs.replace(
        schedules[0],
        tasks=[assignment for schedule in schedules for assignment in schedule.tasks],
        issued_at=min(s.issued_at for s in schedules),
        deadline=min(s.deadline for s in schedules),
        policy=next((s.policy for s in schedules if s.policy is not None), None),
    )
