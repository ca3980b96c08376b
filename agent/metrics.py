"""The agent's Prometheus metrics (`fedmt_agent_...`): rounds, what its own events say per task (outcomes,
training time and throughput, loss and accuracy, uploaded bytes, worker starts, phases), receipts, the outbox
and its telemetry. The agent feeds them from its own thread."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from common.metrics import EventMetrics, TelemetryCollector, new_registry

PREFIX = "fedmt_agent"


class AgentMetrics:
    def __init__(self, tasks: Iterable[str]) -> None:
        tasks = list(tasks)
        self.registry = registry = new_registry()
        self.events = EventMetrics(registry, PREFIX, per_device=False, tasks=tasks)
        self.telemetry = TelemetryCollector(registry, PREFIX, per_device=False)

        def metric(kind, name: str, doc: str, labels=()):
            return kind(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.broker_connected = metric(Gauge, "broker_connected", "1 while connected to the MQTT broker")
        self.round = metric(Gauge, "round", "the round of the latest schedule taken up (0: none yet)")
        self.rounds_trained = metric(Counter, "rounds_trained", "rounds whose task processes all ended")
        self.receipts = metric(
            Counter,
            "receipts",
            "aggregator receipts by status (accepted, duplicate, rejected, retry)",
            ["task", "status"],
        )
        self.outbox = metric(Gauge, "outbox_updates", "updates waiting for the aggregator's receipt")
        self.dropped = metric(Counter, "messages_dropped", "invalid messages dropped")
        self.download_bytes = metric(
            Counter, "global_download_bytes", "bytes of global models fetched, whole or as deltas", ["task"]
        )
        for task in tasks:
            for kind in ("finished", "failed"):
                self.events.events.labels(task, kind)

    def downloaded(self, task: str, size: int) -> None:
        self.download_bytes.labels(self.events.task_label(task)).inc(size)
