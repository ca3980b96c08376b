"""What an aggregator made of a simulated fleet's updates, read from its state directory (the ledger, read-only,
and the checkpoints): per task round, which devices it recorded, which updates were lost, and whether the new
global version counts every recorded update exactly once.

A fleet device's update holds its own value in every floating-point tensor (testbed.fleet), so the new version
minus the base must be the weighted mean of the recorded devices' values; an update counted twice, or one
recorded but not counted, moves that mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.checkpoints import CheckpointStore
from aggregator.ledger import RoundLedger
from testbed.fleet import FleetStats


@dataclass(frozen=True)
class RoundAudit:
    task: str
    round: int
    recorded: int  # updates in the ledger
    lost: list[str]  # devices whose update was uploaded, not refused, and is not in the ledger
    aggregate_error: float | None  # largest |new - base - expected mean|; None: the task round is still open


def audit(state_dir: Path, task: str, values: dict[str, float], stats: FleetStats) -> list[RoundAudit]:
    """Every round of `task` in the aggregator's ledger, checked against what the fleet sent (`values`: each
    device's update value; `stats`: a copy of the fleet's records)."""
    checkpoints = CheckpointStore(Path(state_dir) / "checkpoints")
    audits = []
    with RoundLedger(Path(state_dir) / "ledger.sqlite", read_only=True) as ledger:
        current = ledger.current_round()
        for number in range(1, (current.round if current else 0) + 1):
            task_round = ledger.get_round(number).tasks.get(task)
            if task_round is None:
                continue
            updates = ledger.updates_for(task, number)
            recorded = {u.device for u in updates}
            record = stats.tasks.get((task, number))
            refused = (
                {d for d, (status, _) in record.receipts.items() if status == "rejected"} if record else set()
            )
            uploaded = set(record.uploaded) if record else set()
            error = None
            if task_round.new_version is not None:
                base = checkpoints.load(task, task_round.base_version)
                new = checkpoints.load(task, task_round.new_version)
                weights = np.array([u.weight for u in updates], dtype=np.float64)
                scaled = [values[u.device] * u.scale for u in updates]
                mean = float(np.dot(weights, scaled) / weights.sum())
                error = max(
                    float(np.max(np.abs(new[name].astype(np.float64) - base[name] - mean)))
                    for name in base
                    if base[name].dtype.kind == "f" and base[name].size
                )
            audits.append(
                RoundAudit(task, number, len(recorded), sorted(uploaded - refused - recorded), error)
            )
    return audits
