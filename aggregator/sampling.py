"""Client sampling: which of a task's eligible devices train in a round (a task's `sampling` table).

K devices' updates make a round (`clients`); ceil(K * (1 + over_selection)) are scheduled, so the round finalises
when the first K reported and the slowest of the selected are not waited for. Devices are taken least recently
selected first (ties broken by a seeded draw per task and round), so every device gets its turn; a device that
was slow in its last round (it did not report before the round finalised, or took more than `slow_factor` times
the median of the others' last round times) counts as selected one rotation more recently, so it trains about
half as often. A task with fewer than `min_clients` eligible devices sits the round out.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta


class SamplingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    clients: Annotated[int, Meta(ge=1)]  # K: the updates that finalise a round
    over_selection: Annotated[float, Meta(ge=0, le=10)] = 0.3  # schedule K * (1 + this), rounded up
    min_clients: Annotated[int, Meta(ge=1)] = 1  # fewer eligible devices: the task skips the round
    slow_factor: Annotated[float, Meta(gt=1)] | None = 2.0  # None: past round times do not matter
    seed: int = 0

    @property
    def selected(self) -> int:
        """How many devices a round schedules when enough are eligible."""
        return math.ceil(self.clients * (1 + self.over_selection) - 1e-9)


@dataclass(frozen=True)
class Participation:
    """A device's last round of a task: its number and how long after the round opened its update was recorded
    (None: not recorded, so far)."""

    round: int
    seconds: float | None = None


def select(
    sampling: SamplingConfig | None,
    task: str,
    round_: int,
    eligible: Sequence[str],
    history: Mapping[str, Participation],
) -> list[str]:
    """The devices that train `task` in round `round_` (sorted), from the eligible ones and their history."""
    if sampling is None:
        return sorted(eligible)
    if len(eligible) < sampling.min_clients:
        return []
    wanted = sampling.selected
    if len(eligible) <= wanted:
        return sorted(eligible)
    slow = _slow(sampling, round_, eligible, history)
    rotation = math.ceil(len(eligible) / wanted)  # rounds it takes every eligible device to get a turn
    draw = random.Random(f"{sampling.seed}:{task}:{round_}")
    ties = {device: draw.random() for device in sorted(eligible)}

    def key(device: str) -> tuple[int, float]:
        last = history[device].round if device in history else 0
        return last + (rotation if device in slow else 0), ties[device]

    return sorted(sorted(eligible, key=key)[:wanted])


def target(sampling: SamplingConfig | None, selected: int) -> int:
    """How many updates finalise a round that scheduled `selected` devices."""
    return selected if sampling is None else min(sampling.clients, selected)


def _slow(
    sampling: SamplingConfig, round_: int, eligible: Sequence[str], history: Mapping[str, Participation]
) -> set[str]:
    if sampling.slow_factor is None:
        return set()
    past = {d: history[d] for d in eligible if d in history and history[d].round < round_}
    late = {d for d, p in past.items() if p.seconds is None}
    times = [p.seconds for p in past.values() if p.seconds is not None]
    if not times:
        return late
    bound = sampling.slow_factor * statistics.median(times)
    return late | {d for d, p in past.items() if p.seconds is not None and p.seconds > bound}
