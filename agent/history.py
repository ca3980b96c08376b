"""What this device measured in its own rounds: the records (predictor.records) of its data file.

Each round appends one record per co-location (the round's tasks with their B_i, R_i, measured and predicted
throughput, and the policy its plan chose) to the GPU's data file in the agent's state directory, the file that
calibration appends its windows to, so a later fit learns from both. The history answers what a configuration
measured here (the median of its rounds) and how far the recent predictions were off.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import msgspec

from predictor.records import Record, load_records, task_spec

#: one task of a configuration: (model, input size, batch size, R_i percent)
TaskKey = tuple[str, int, int, float]
KEEP_ROUNDS = 2000  # round records held in memory


def record_keys(record: Record) -> list[TaskKey]:
    return [
        (t.model, task_spec(record, t).input_size, t.batch, round(float(t.resource), 1)) for t in record.tasks
    ]


class DeviceHistory:
    """The round records of one data file; appended durably as rounds end."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        rounds = [r for r in load_records(self.path) if r.round is not None] if self.path.exists() else []
        self.rounds: deque[Record] = deque(rounds[-KEEP_ROUNDS:], maxlen=KEEP_ROUNDS)

    def add(self, record: Record) -> None:
        """Append a round's record to the data file (fsynced) and to the history."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(msgspec.json.encode(record) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.rounds.append(record)

    def measured(self, keys: Sequence[TaskKey]) -> list[float] | None:
        """Per task (in the order of `keys`), the median throughput this device measured for exactly this
        configuration in its rounds; None if it never ran it."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        wanted = [keys[i] for i in order]
        runs = []
        for record in self.rounds:
            found = sorted(zip(record_keys(record), (t.throughput for t in record.tasks)))
            if [k for k, _ in found] == wanted:
                runs.append([v for _, v in found])
        if not runs:
            return None
        result = [0.0] * len(keys)
        for position, i in enumerate(order):
            result[i] = statistics.median(run[position] for run in runs)
        return result

    def recent(self, rounds: int) -> list[Record]:
        """The last `rounds` distinct rounds' records that carry predictions, oldest first."""
        numbers: list[int] = []
        for record in reversed(self.rounds):
            if all(t.predicted for t in record.tasks) and record.round not in numbers:
                numbers.append(record.round)
                if len(numbers) == rounds:
                    break
        return [r for r in self.rounds if r.round in numbers and all(t.predicted for t in r.tasks)]

    def recent_error(self, rounds: int) -> float | None:
        """Mean absolute percentage error of the predictions of the last `rounds` rounds (None: no such round)."""
        errors = [
            abs(t.predicted - t.throughput) / t.throughput
            for r in self.recent(rounds)
            for t in r.tasks
            if t.throughput > 0
        ]
        return 100 * statistics.fmean(errors) if errors else None
