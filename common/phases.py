"""The phases of a federated round as the agents measure them and report them in their events.

A phase is a key of an event's metrics: the agent puts `plan_s` (taking the round: its plan, until the task
threads run), `wait_global_s` and `worker_start_s` in a task's `started` event, `train_s` in its `finished` event
and `upload_s` in its `acknowledged` event. The aggregator measures the last phase itself (its last accepted
update of a task round -> the new global version).
"""

from __future__ import annotations

from protocol.schemas import Event

#: phase -> (event kind, metric) for the phases the agents measure themselves, in the order they happen
MEASURED = {
    "plan_s": ("started", "plan_s"),
    "wait_global_s": ("started", "wait_global_s"),
    "worker_start_s": ("started", "worker_start_s"),
    "train_s": ("finished", "train_s"),
    "upload_s": ("acknowledged", "upload_s"),
}
#: the phase no agent sees: from a task round's last update to its new global version
AGGREGATION = "aggregation_s"
#: every phase of a task's round, in order
PHASES = (*MEASURED, AGGREGATION)


def phases_of(event: Event) -> dict[str, float]:
    """The phases (seconds) an event reports."""
    return {
        phase: event.metrics[metric]
        for phase, (kind, metric) in MEASURED.items()
        if kind == event.kind and metric in event.metrics
    }
