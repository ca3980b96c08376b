"""Where the time of each federated round goes, from the agents' events: pure functions, tables and a plot.

Inputs: the agents' `Event`s, the `issued_at` of each schedule per (device, round) and the wall time at which
each global model version was first seen per (task, version); global version r is the result of round r. All
times are wall-clock seconds on one shared clock. A missing event (a failed task, a lost message) leaves its
fields None and is explained in the round's "missing" list.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common.phases import AGGREGATION, MEASURED, PHASES
from protocol.schemas import Event

if TYPE_CHECKING:
    from rich.console import Group

#: per-task phases (common/phases.py), in the order they happen (and are stacked in the plot)
PHASE_LABELS = dict(
    zip(PHASES, ("plan", "wait for global", "worker start", "training", "upload", "aggregation"), strict=True)
)
#: short column headers of the printed tables, in PHASE_LABELS' order
TABLE_HEADERS = ("plan", "wait", "start", "train", "upload", "aggr")
TABLE_CAPTION = (
    "plan: round taken -> task threads run, wait: round taken -> global cached, start: worker start, "
    "aggr: last receipt -> global seen"
)

Key = tuple[str, int]  # (device, round) or (task, version)
#: what a task's round trained with and ended at, from its `finished` event (the worker's metrics)
TRAINING = ("batch_size", "lr", "images", "train_loss", "train_accuracy")


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """The total length the intervals cover, overlaps counted once (empty or reversed intervals count 0)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > max(start, reach):
            total += end - max(start, reach)
            reach = end
    return total


def round_wall_s(
    round_: int, tasks: Iterable[str], issued_at: Mapping[Key, float], seen_at: Mapping[Key, float]
) -> float | None:
    """First schedule of the round issued -> last of the tasks' global version `round_` seen; None if unknown."""
    opened = [at for (_, r), at in issued_at.items() if r == round_]
    done = [seen_at.get((task, round_)) for task in tasks]
    if not opened or not done or None in done:
        return None
    return max(done) - min(opened)


def round_ends_s(
    rounds: int, tasks: Iterable[str], issued_at: Mapping[Key, float], seen_at: Mapping[Key, float]
) -> list[float | None]:
    """Seconds from round 1's first schedule to the last of the tasks' global version r, for r = 1..rounds."""
    tasks = list(tasks)
    opened = [at for (_, r), at in issued_at.items() if r == 1]
    ends = []
    for r in range(1, rounds + 1):
        done = [seen_at.get((task, r)) for task in tasks]
        ends.append(None if not opened or None in done else round(max(done) - min(opened), 2))
    return ends


def round_detail(
    round_: int, events: Iterable[Event], issued_at: Mapping[Key, float], seen_at: Mapping[Key, float]
) -> dict:
    """One round: phases per device and task, each device's plan, the wall time and the non-training fractions,
    where a task's worker process was started, that start in its parts (`worker_starts`: the CUDA context,
    `init_s`, then the model and data, `prepare_s`), and what each task trained with and ended at (`training`:
    TRAINING, from the task's `finished` event).

    The round's `non_training_fraction` is that of the critical device: the one whose last `acknowledged`
    event came last. A device's fraction is 1 - (union of its tasks' training intervals) / wall time.
    """
    latest = _latest(e for e in events if e.round == round_)
    pairs = sorted({(device, task) for device, task, _ in latest if task is not None})
    tasks = sorted({task for _, task in pairs} | {task for task, version in seen_at if version == round_})
    missing: list[str] = []

    last_ack: dict[str, float] = {}  # task -> ts of its last acknowledged event
    device_last_ack: dict[str, float] = {}
    for (device, task, kind), event in latest.items():
        if kind == "acknowledged":
            last_ack[task] = max(last_ack.get(task, -math.inf), event.ts)
            device_last_ack[device] = max(device_last_ack.get(device, -math.inf), event.ts)

    phases: dict[str, dict[str, dict[str, float | None]]] = {}
    starts: dict[str, dict[str, dict[str, float | None]]] = {}
    training: dict[str, dict[str, dict[str, float | None]]] = {}
    intervals: dict[str, list[tuple[float, float]]] = {}
    for device, task in pairs:
        values = {
            phase: _metric(latest.get((device, task, kind)), metric)
            for phase, (kind, metric) in MEASURED.items()
        }
        global_seen = seen_at.get((task, round_))
        has_both = global_seen is not None and task in last_ack
        values[AGGREGATION] = global_seen - last_ack[task] if has_both else None
        phases.setdefault(device, {})[task] = values
        started = latest.get((device, task, "started"))
        if started is not None and "worker_init_s" in started.metrics:
            starts.setdefault(device, {})[task] = {
                "init_s": _metric(started, "worker_init_s"),
                "prepare_s": _metric(started, "worker_prepare_s"),
            }
        if unknown := [phase for phase, value in values.items() if value is None]:
            failed = latest.get((device, task, "failed"))
            reason = f" (failed: {failed.message})" if failed else ""
            missing.append(f"{device}/{task}: no {', '.join(unknown)}{reason}")
        if finished := latest.get((device, task, "finished")):
            training.setdefault(device, {})[task] = {key: _metric(finished, key) for key in TRAINING}
            start, end = _metric(finished, "train_started_at"), _metric(finished, "train_ended_at")
            if start is None or end is None:
                missing.append(f"{device}/{task}: finished event without train_started_at/train_ended_at")
            else:
                intervals.setdefault(device, []).append((start, end))

    wall_s = round_wall_s(round_, tasks, issued_at, seen_at)
    if wall_s is None:
        missing.append(
            f"wall time unknown: needs a schedule and global version {round_} of {', '.join(tasks)}"
        )
    fractions = {
        device: 1 - union_length(intervals.get(device, [])) / wall_s if wall_s else None for device in phases
    }
    critical = max(device_last_ack, key=device_last_ack.__getitem__) if device_last_ack else None
    if critical is None:
        missing.append("no acknowledged event: no critical device")
    return {
        "round": round_,
        "wall_s": wall_s,
        "non_training_fraction": fractions.get(critical),
        "critical_device": critical,
        "device_non_training_fraction": fractions,
        "phases": phases,
        "worker_starts": starts,
        "training": training,
        "plan": {device: dict(e.metrics) for (device, _, kind), e in latest.items() if kind == "plan"},
        "missing": missing,
    }


def _metric(event: Event | None, key: str) -> float | None:
    return None if event is None else event.metrics.get(key)


def _latest(events: Iterable[Event]) -> dict[tuple[str, str | None, str], Event]:
    """The last event (by ts) of each (device, task, kind)."""
    return {(e.device, e.task, e.kind): e for e in sorted(events, key=lambda e: e.ts)}


def format_seconds(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def round_title(rd: dict) -> str:
    """E.g. "round 2: wall 22.80 s, 14% not training (critical: edge-3)"."""
    return (
        f"round {rd['round']}: wall {format_seconds(rd['wall_s'])} s, "
        f"{_fraction(rd['non_training_fraction'])} not training (critical: {rd['critical_device'] or '-'})"
    )


def phase_tables(detail: Sequence[dict]) -> Group:
    """Rich tables, one per round, one row per device and task, the phases in seconds."""
    from rich.console import Group
    from rich.table import Table

    tables = []
    for index, rd in enumerate(detail, 1):
        caption = TABLE_CAPTION if index == len(detail) else None
        table = Table(title=round_title(rd), caption=caption, title_justify="left")
        table.add_column("device")
        table.add_column("task")
        for header in TABLE_HEADERS:
            table.add_column(header, justify="right")
        for device, tasks in rd["phases"].items():
            for task, values in tasks.items():
                table.add_row(device, task, *(format_seconds(values[p]) for p in PHASE_LABELS))
        tables.append(table)
    return Group(*tables)


def plot_phases(detail: Sequence[dict], path: Path) -> None:
    """Write a PNG: per round, one stacked horizontal bar per device x task; a dashed line marks the wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = [max(1, sum(len(tasks) for tasks in rd["phases"].values())) for rd in detail]
    figure, axes = plt.subplots(
        len(detail),
        1,
        sharex=True,
        squeeze=False,
        figsize=(10, 1.2 + 0.3 * sum(bars) + 0.5 * len(detail)),
        height_ratios=bars,
    )
    colors = dict(zip(PHASE_LABELS, plt.get_cmap("tab10").colors))
    for axis, rd in zip(axes[:, 0], detail):
        labels = [f"{device}  {task}" for device, tasks in rd["phases"].items() for task in tasks]
        rows = [values for tasks in rd["phases"].values() for values in tasks.values()]
        left = [0.0] * len(rows)
        for phase in PHASE_LABELS:
            widths = [values[phase] or 0.0 for values in rows]
            axis.barh(labels, widths, left=left, color=colors[phase])
            left = [a + b for a, b in zip(left, widths)]
        if rd["wall_s"] is not None:
            axis.axvline(rd["wall_s"], color="gray", linestyle="--", linewidth=1)
        axis.set_title(round_title(rd), fontsize=9, loc="left")
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=8)
        axis.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds")
    legend = [Patch(color=colors[phase], label=label) for phase, label in PHASE_LABELS.items()]
    figure.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / figure.get_figheight()))
    figure.savefig(path, dpi=120)
    plt.close(figure)
