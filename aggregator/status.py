"""`fedmt-aggregator status`: the devices, the open round (deadline, who is missing per task) and the recent
rounds, read from the ledger. The ledger is opened read-only, so this works while the aggregator runs; the
devices are as the aggregator last saw them (it records every status change)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from aggregator.ledger import RoundLedger, RoundRecord


def report(ledger: RoundLedger, tasks: Iterable[str], now: float, recent: int = 5) -> list[str]:
    """The status report, line by line."""
    devices = ledger.devices()
    online = {d.device for d in devices if d.online}
    lines = [
        f"devices: {len(online)} online, {len(devices) - len(online)} offline (as the aggregator last saw them)"
    ]
    for device in devices:
        state = "online" if device.online else "offline"
        lines.append(f"  {device.device:<24} {state:<8} since {_when(device.changed_at, now)}")
    lines.append(
        "global versions: "
        + ", ".join(
            f"{task} v{record.version if (record := ledger.latest_global(task)) else '-'}" for task in tasks
        )
    )
    current = ledger.current_round()
    if current is None:
        lines.append("no round opened yet")
    elif current.state == "open":
        lines += _open_round(ledger, current, online, now)
    rounds = [r for r in ledger.recent_rounds(recent) if r.state == "finalized"]
    if rounds:
        lines.append("recent rounds:")
        lines += [_finished_round(ledger, record) for record in rounds]
    return lines


def _open_round(ledger: RoundLedger, record: RoundRecord, online: set[str], now: float) -> list[str]:
    lines = [
        f"round {record.round}: open since {_when(record.opened_at, now)}, deadline {_when(record.deadline, now)}"
    ]
    participants = ledger.participants(record.round)
    for task, task_record in record.tasks.items():
        expected = participants.get(task, {})
        reported = {u.device for u in ledger.updates_for(task, record.round)}
        progress = f"  {task}: base v{task_record.base_version}, {len(reported & set(expected))}/{len(expected)} updates"
        if task_record.state == "finalized":
            lines.append(f"{progress}, finalized as v{task_record.new_version}")
            continue
        missing = [f"{d}{'' if d in online else ' (offline)'}" for d in sorted(set(expected) - reported)]
        lines.append(f"{progress}, missing: {', '.join(missing) or 'none'}")
    return lines


def _finished_round(ledger: RoundLedger, record: RoundRecord) -> str:
    ends = [t.finalized_at for t in record.tasks.values() if t.finalized_at is not None]
    took = f"{max(ends) - record.opened_at:.1f} s" if ends else "-"
    tasks = ", ".join(
        f"{task} v{t.new_version} ({len(ledger.updates_for(task, record.round))} updates)"
        for task, t in record.tasks.items()
    )
    return f"  round {record.round}: {took}, opened {_clock(record.opened_at)}: {tasks}"


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _when(ts: float, now: float) -> str:
    """E.g. '2025-05-01 12:00:00 (3m 5s ago)' or '... (in 40s)'."""
    delta = round(ts - now)
    span = _span(abs(delta))
    return f"{_clock(ts)} ({'in ' + span if delta > 0 else span + ' ago'})"


def _span(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes) + [f"{seconds}s"]
    return " ".join(parts)
