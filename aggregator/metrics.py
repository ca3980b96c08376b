"""The aggregator's Prometheus metrics (`fedmt_aggregator_...`): rounds, updates and their outcomes, bytes,
devices online, and what the devices report (telemetry, task events, phase times). The service feeds them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from common.metrics import PHASE_BUCKETS, EventMetrics, TelemetryCollector, new_registry
from common.phases import AGGREGATION
from protocol.schemas import Event, Receipt, Telemetry

if TYPE_CHECKING:
    from aggregator.rounds import Coordinator

PREFIX = "fedmt_aggregator"


class AggregatorMetrics:
    def __init__(self, tasks: Iterable[str], device_series: int | None = None) -> None:
        self.registry = registry = new_registry()
        self.tasks = frozenset(tasks)
        self.events = EventMetrics(
            registry, PREFIX, per_device=True, tasks=self.tasks, max_devices=device_series
        )
        self.telemetry = TelemetryCollector(registry, f"{PREFIX}_device", per_device=True)

        def metric(kind, name: str, doc: str, labels=(), **options):
            return kind(f"{PREFIX}_{name}", doc, labels, registry=registry, **options)

        self.broker_connected = metric(Gauge, "broker_connected", "1 while connected to the MQTT broker")
        self.round = metric(Gauge, "round", "the latest round opened (0: none yet)")
        self.round_open = metric(Gauge, "round_open", "1 while that round is open")
        self.round_deadline = metric(
            Gauge, "round_deadline_timestamp_seconds", "deadline of the open round (Unix time)"
        )
        self.rounds_completed = metric(Counter, "rounds_completed", "rounds completed since the start")
        self.round_duration = metric(
            Histogram,
            "round_duration_seconds",
            "round opened -> its last task finalised",
            buckets=PHASE_BUCKETS,
        )
        self.global_version = metric(Gauge, "global_version", "the task's latest global version", ["task"])
        self.expected = metric(Gauge, "round_expected_devices", "devices scheduled for the task", ["task"])
        self.reported = metric(Gauge, "round_updates", "updates folded into the task's open round", ["task"])
        self.waiting = metric(Gauge, "round_waiting_devices", "scheduled devices yet to report", ["task"])
        self.devices_online = metric(Gauge, "devices_online", "devices whose status is online")
        self.device_online = metric(
            Gauge, "device_online", "1 online, 0 offline (the devices with series of their own)", ["device"]
        )
        self.updates = metric(
            Counter,
            "updates",
            "update receipts by outcome (accepted, duplicate, rejected)",
            ["task", "outcome"],
        )
        self.rejected = metric(Counter, "updates_rejected", "rejected updates by reason", ["task", "reason"])
        self.received_bytes = metric(Counter, "update_received_bytes", "update messages received", ["task"])
        self.published_bytes = metric(
            Counter, "global_published_bytes", "global model bytes published (chunks)", ["task"]
        )
        self.dropped = metric(
            Counter, "messages_dropped", "messages dropped as invalid, by topic kind", ["kind"]
        )
        self.transfers_expired = metric(Counter, "transfers_expired", "update transfers dropped incomplete")
        for task in self.tasks:
            for outcome in ("accepted", "duplicate", "rejected"):
                self.updates.labels(task, outcome)
        self._completed: int | None = None
        self._last_update_at: dict[str, float] = {}

    def task_label(self, task: str | None) -> str:
        return self.events.task_label(task)

    # --- what arrives -------------------------------------------------------------------------------------

    def event(self, event: Event) -> None:
        self.events.observe(event)

    def device_telemetry(self, telemetry: Telemetry) -> None:
        self.telemetry.update(telemetry)

    def device_status(self, device: str, online: bool) -> None:
        if self.events.device_label(device) == device:  # one of the devices with series of their own; the
            self.device_online.labels(device).set(online)  # rest count in devices_online only
        if not online:
            self.telemetry.forget(device)

    def update_bytes(self, task: str, size: int) -> None:
        self.received_bytes.labels(self.task_label(task)).inc(size)

    # --- what the aggregator does -------------------------------------------------------------------------

    def receipt(self, receipt: Receipt) -> None:
        self.updates.labels(self.task_label(receipt.task), receipt.status).inc()
        if receipt.status == "accepted":
            self._last_update_at[receipt.task] = time.monotonic()

    def rejection(self, task: str, reason: str) -> None:
        self.rejected.labels(self.task_label(task), reason).inc()

    def global_published(self, task: str, size: int) -> None:
        self.published_bytes.labels(self.task_label(task)).inc(size)

    def finalized(self, task: str) -> None:
        """A task round produced its new global version: observe its aggregation phase (last update -> now)."""
        last = self._last_update_at.pop(task, None)
        if last is not None:
            self.events.observe_phase(task, AGGREGATION, time.monotonic() - last)

    def rounds(self, coordinator: Coordinator) -> None:
        """Round, deadline, per-task progress and devices online, from the coordinator (after every tick)."""
        record = coordinator.round
        number = record.round if record else 0
        is_open = record is not None and record.state == "open"
        completed = number if not is_open else number - 1
        if self._completed is not None and completed > self._completed:
            self.rounds_completed.inc(completed - self._completed)
            finished = coordinator.ledger.get_round(completed)
            ends = [t.finalized_at for t in finished.tasks.values() if t.finalized_at is not None]
            if ends:
                self.round_duration.observe(max(ends) - finished.opened_at)
        self._completed = completed
        self.round.set(number)
        self.round_open.set(is_open)
        self.round_deadline.set(record.deadline if is_open else 0)
        for task, model in coordinator.globals.items():
            self.global_version.labels(task).set(model.manifest.version)
        task_rounds: Mapping = coordinator.task_rounds if is_open else {}
        for task in self.tasks:
            task_round = task_rounds.get(task)
            self.expected.labels(task).set(len(task_round.expected) if task_round else 0)
            self.reported.labels(task).set(len(task_round.reported) if task_round else 0)
            waiting = task_round.waiting_for if task_round and not task_round.final else ()
            self.waiting.labels(task).set(len(waiting))
        self.devices_online.set(len(coordinator.online))
