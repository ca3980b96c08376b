"""Prometheus metrics both daemons share: the `[metrics]` config, the HTTP endpoint, device telemetry and what
the agents' events say (task outcomes, training loss and accuracy, throughput, phase times).

Each daemon keeps its metrics in a registry of its own (several services may share a process in tests). Metric
values are set on the daemon's thread; prometheus_client serves them from its own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Annotated

import msgspec
from msgspec import Meta
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.config import ConfigError
from common.phases import phases_of
from protocol.schemas import Event, Telemetry

log = logging.getLogger(__name__)
#: round phases last from milliseconds (a hand-over) to minutes (training)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: telemetry of at most this many GPUs per device becomes series
MAX_GPUS = 16


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where the Prometheus endpoint listens; port 0 (the default) serves none."""

    address: str = "127.0.0.1"  # "0.0.0.0" (or a LAN address) lets a Prometheus server elsewhere scrape it
    port: Annotated[int, Meta(ge=0, le=65535)] = 0


class MetricsServer:
    """The HTTP endpoint serving a registry at http://address:port/metrics."""

    def __init__(self, config: MetricsConfig, registry: CollectorRegistry) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(config.port, config.address, registry)
        except OSError as exc:
            raise ConfigError(
                f"key 'metrics': cannot listen on {config.address}:{config.port}: {exc.strerror or exc}"
            ) from None
        host, port = self._server.server_address[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
        log.info("metrics at %s", self.url)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(config: MetricsConfig, registry: CollectorRegistry) -> MetricsServer | None:
    """Start the endpoint if the config asks for one; ConfigError if its port cannot be bound."""
    return MetricsServer(config, registry) if config.port else None


def new_registry() -> CollectorRegistry:
    """A registry with the process's own CPU, memory and file descriptor metrics (`process_...`)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class TelemetryCollector(Collector):
    """The latest `Telemetry` per device as gauges `{prefix}_cpu_percent`, `_memory_used_bytes`, ...; a device
    that is forgotten (it went offline) leaves no stale series. With `per_device` every series has a `device`
    label (the aggregator's view of all devices); without it, the agent's own readings."""

    def __init__(self, registry: CollectorRegistry, prefix: str, per_device: bool) -> None:
        self.prefix, self.per_device = prefix, per_device
        self._latest: dict[str, Telemetry] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def update(self, telemetry: Telemetry) -> None:
        with self._lock:
            self._latest[telemetry.device] = telemetry

    def forget(self, device: str) -> None:
        with self._lock:
            self._latest.pop(device, None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            latest = list(self._latest.values())
        base = ["device"] if self.per_device else []

        def family(name: str, doc: str, gpu: bool = False) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{self.prefix}_{name}", doc, labels=base + (["gpu"] if gpu else []))

        host = {
            "cpu_percent": family("cpu_percent", "CPU load of the device (percent of all cores)"),
            "memory_used_bytes": family("memory_used_bytes", "memory in use on the device"),
            "memory_total_bytes": family("memory_total_bytes", "memory of the device"),
            "ts": family(
                "telemetry_timestamp_seconds", "when the device took its latest reading (its clock)"
            ),
        }
        gpus = {
            "utilization_percent": family("gpu_utilization_percent", "GPU load", gpu=True),
            "memory_used_bytes": family("gpu_memory_used_bytes", "GPU memory in use", gpu=True),
            "power_w": family("gpu_power_watts", "GPU power draw", gpu=True),
            "temperature_c": family("gpu_temperature_celsius", "GPU temperature", gpu=True),
        }
        for reading in latest:
            labels = [reading.device] if self.per_device else []
            for field, metric in host.items():
                metric.add_metric(labels, getattr(reading, field))
            for gpu in reading.gpus[:MAX_GPUS]:
                for field, metric in gpus.items():
                    if (value := getattr(gpu, field)) is not None:
                        metric.add_metric([*labels, str(gpu.index)], value)
        yield from host.values()
        yield from gpus.values()


class EventMetrics:
    """What the agents' events report, per task (and per device on the aggregator): task outcomes, the last
    training loss, accuracy and throughput, training time, uploaded bytes, worker starts and phase times.

    The agent observes the events it emits; the aggregator those it receives, for the tasks it knows (`tasks`:
    other task names, which a device may invent, are counted under "other" so they cannot multiply series), and
    per device for the first `max_devices` devices it hears from (later ones under "other": a fleet of thousands
    would otherwise hold ~6 KB of series per device)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        prefix: str,
        per_device: bool,
        tasks: Sequence[str] | None = None,
        max_devices: int | None = None,
    ) -> None:
        self.per_device = per_device
        self.tasks = None if tasks is None else frozenset(tasks)
        self.max_devices = max_devices
        self._devices: set[str] = set()  # the devices with series of their own
        labels = ["device", "task"] if per_device else ["task"]

        def metric(kind, name: str, doc: str, extra: Sequence[str] = (), **options):
            return kind(f"{prefix}_{name}", doc, [*labels, *extra], registry=registry, **options)

        self.events = metric(
            Counter, "task_events", "task events by kind (started, finished, failed, ...)", ["kind"]
        )
        self.train_loss = metric(Gauge, "train_loss", "training loss of the task's last finished round")
        self.train_accuracy = metric(
            Gauge, "train_accuracy", "training accuracy (0-1) of the last finished round"
        )
        self.images_per_second = metric(Gauge, "images_per_second", "training throughput of the last round")
        self.training_seconds = metric(Counter, "training_seconds", "time spent training the task")
        self.uploaded_bytes = metric(Counter, "uploaded_bytes", "update bytes sent (resends included)")
        self.worker_starts = metric(
            Counter, "worker_starts", "task worker processes started (the first included; more mean restarts)"
        )
        # Phases are per task only: a histogram per device and task would multiply series by the fleet's size.
        self.phase_seconds = Histogram(
            f"{prefix}_phase_seconds",
            "round phases per task (plan, wait_global, worker_start, train, upload; aggregation on the aggregator)",
            ["task", "phase"],
            registry=registry,
            buckets=PHASE_BUCKETS,
        )

    def task_label(self, task: str | None) -> str:
        if task is None:
            return ""
        return task if self.tasks is None or task in self.tasks else "other"

    def device_label(self, device: str) -> str:
        if device not in self._devices:
            if self.max_devices is not None and len(self._devices) >= self.max_devices:
                return "other"
            self._devices.add(device)
        return device

    def observe(self, event: Event) -> None:
        task = self.task_label(event.task)
        labels = (self.device_label(event.device), task) if self.per_device else (task,)
        self.events.labels(*labels, event.kind).inc()
        values = event.metrics
        if event.kind == "finished":
            for gauge, key in (
                (self.train_loss, "train_loss"),
                (self.train_accuracy, "train_accuracy"),
                (self.images_per_second, "images_per_s"),
            ):
                if key in values:
                    gauge.labels(*labels).set(values[key])
            if values.get("train_s", -1) >= 0:
                self.training_seconds.labels(*labels).inc(values["train_s"])
        elif event.kind == "uploaded" and values.get("bytes", -1) >= 0:
            self.uploaded_bytes.labels(*labels).inc(values["bytes"])
        elif event.kind == "started" and values.get("worker_restarted"):
            self.worker_starts.labels(*labels).inc()
        for phase, seconds in phases_of(event).items():
            self.observe_phase(task, phase, seconds)

    def observe_phase(self, task: str, phase: str, seconds: float) -> None:
        if seconds >= 0:  # a negative or NaN time from the wire says nothing
            self.phase_seconds.labels(task, phase.removesuffix("_s")).observe(seconds)
