"""Prometheus metrics move with the daemons' real handlers (no broker: messages go straight to `handle`), and the
endpoint serves them over HTTP."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import uuid

import msgspec
import numpy as np
import pytest
from safetensors.numpy import save_file

from agent.config import AgentConfig, ExecutionConfig
from agent.data import DataSpec
from agent.service import Agent
from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from aggregator.service import AggregatorService
from common.config import ConfigError, load_toml, to_toml
from common.metrics import MetricsConfig, MetricsServer, serve
from protocol import topics
from protocol.chunking import split, transfer_info
from protocol.schemas import (
    DeviceProfile,
    Event,
    GpuTelemetry,
    HostInfo,
    ModelSpec,
    Receipt,
    Status,
    TaskData,
    Telemetry,
    UpdateManifest,
    encode,
)
from protocol.tensors import encode_state
from protocol.transport import Incoming, LinkEvent
from testbed.broker import free_port
from testbed.scrape import scrape
from tests.federation import digits

BASE = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
HOST = HostInfo(hostname="h", os="linux", machine="x86_64", python="3.11", cpu_count=2, memory_bytes=1)


def value(registry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


# --- the aggregator ------------------------------------------------------------------------------------------


@pytest.fixture
def aggregator(tmp_path) -> AggregatorService:
    weights = tmp_path / "init.safetensors"
    save_file(BASE, str(weights))
    task = TaskConfig(model=ModelSpec(name="tiny", num_classes=10, input_size=8), init_weights=str(weights))
    config = AggregatorConfig(
        state_dir=str(tmp_path / "state"),
        rounds=RoundsConfig(rounds=2, min_devices=2, round_timeout_s=100.0),
        tasks={"t": task},
    )
    service = AggregatorService(config)
    service.coordinator.start()
    yield service
    service.coordinator.ledger.close()


def deliver(service: AggregatorService, topic: str, message) -> None:
    service.handle(Incoming(topic, message if isinstance(message, bytes) else encode(message), False))


def join(service: AggregatorService, device: str) -> None:
    deliver(service, topics.device(device, "status"), Status(state="online", ts=1.0))
    profile = DeviceProfile(
        device=device, ts=1.0, agent_version="x", host=HOST, tasks={"t": TaskData(samples=10)}
    )
    deliver(service, topics.device(device, "profile"), profile)


def update_manifest(device: str, payload: bytes, *, round_: int = 1, base_version: int = 0) -> UpdateManifest:
    """The manifest of a 10-sample update of task t, cut in 16-byte chunks."""
    update_id = uuid.uuid4().hex
    return UpdateManifest(
        task="t",
        round=round_,
        device=device,
        update_id=update_id,
        base_version=base_version,
        samples=10,
        codec="dense",
        transfer=transfer_info(update_id, payload, 16),
    )


def send_update(
    service: AggregatorService, device: str, *, named: str | None = None, **fields
) -> UpdateManifest:
    """An update of `device` on its own topics (the manifest may name another device), manifest then chunks."""
    payload = encode_state({"w": np.full((3, 4), 0.5, np.float32)})
    manifest = update_manifest(named or device, payload, **fields)
    resend(service, device, manifest, payload)
    return manifest


def resend(
    service: AggregatorService, device: str, manifest: UpdateManifest, payload: bytes | None = None
) -> None:
    base = topics.update("t", device)
    deliver(service, topics.manifest(base), manifest)
    for chunk in split(payload, manifest.transfer) if payload else ():
        deliver(service, topics.chunk(base, chunk.index), chunk)


def test_aggregator_metrics_follow_a_round(aggregator):
    registry = aggregator.metrics.registry
    aggregator.handle(LinkEvent(True, "Success"))
    assert value(registry, "fedmt_aggregator_broker_connected") == 1
    aggregator.tick(time.monotonic())
    assert value(registry, "fedmt_aggregator_round") == 0
    assert value(registry, "fedmt_aggregator_global_version", task="t") == 0
    assert value(registry, "fedmt_aggregator_global_published_bytes_total", task="t") > 0  # v0 went out

    join(aggregator, "d1")
    join(aggregator, "d2")
    aggregator.tick(time.monotonic())
    assert value(registry, "fedmt_aggregator_round") == 1
    assert value(registry, "fedmt_aggregator_round_open") == 1
    assert value(registry, "fedmt_aggregator_round_deadline_timestamp_seconds") == pytest.approx(
        aggregator.coordinator.round.deadline
    )
    assert value(registry, "fedmt_aggregator_devices_online") == 2
    assert value(registry, "fedmt_aggregator_round_waiting_devices", task="t") == 2

    first = send_update(aggregator, "d1")
    resend(aggregator, "d1", first)  # a resend of a recorded update: a duplicate receipt
    aggregator.tick(time.monotonic())
    assert value(registry, "fedmt_aggregator_updates_total", task="t", outcome="accepted") == 1
    assert value(registry, "fedmt_aggregator_updates_total", task="t", outcome="duplicate") == 1
    assert value(registry, "fedmt_aggregator_update_received_bytes_total", task="t") > first.transfer.size
    assert value(registry, "fedmt_aggregator_round_updates", task="t") == 1
    assert value(registry, "fedmt_aggregator_round_waiting_devices", task="t") == 1
    assert value(registry, "fedmt_aggregator_rounds_completed_total") == 0

    send_update(aggregator, "d2")
    aggregator.tick(time.monotonic())  # finalises round 1 and opens round 2
    assert value(registry, "fedmt_aggregator_rounds_completed_total") == 1
    assert value(registry, "fedmt_aggregator_round") == 2
    assert value(registry, "fedmt_aggregator_global_version", task="t") == 1
    assert value(registry, "fedmt_aggregator_round_duration_seconds_count") == 1
    assert value(registry, "fedmt_aggregator_phase_seconds_count", task="t", phase="aggregation") == 1


@pytest.mark.parametrize(
    "mistake, reason",
    [
        ({"named": "d2"}, "wrong_sender"),  # the manifest names another device than its topic
        ({"base_version": 5}, "stale_base"),
        ({"round_": 7}, "round_not_open"),
    ],
)
def test_rejected_updates_are_counted_by_reason(aggregator, mistake, reason):
    join(aggregator, "d1")
    join(aggregator, "d2")
    aggregator.tick(time.monotonic())
    send_update(aggregator, "d1", **mistake)
    registry = aggregator.metrics.registry
    assert value(registry, "fedmt_aggregator_updates_total", task="t", outcome="rejected") == 1
    assert value(registry, "fedmt_aggregator_updates_rejected_total", task="t", reason=reason) == 1
    assert value(registry, "fedmt_aggregator_updates_total", task="t", outcome="accepted") == 0


def test_the_sender_check_rejects_before_any_transfer(aggregator):
    """One check (Coordinator.screen): a manifest naming another device gets its receipt at once."""
    join(aggregator, "d1")
    join(aggregator, "d2")
    aggregator.tick(time.monotonic())
    manifest = update_manifest("d2", encode_state({"w": np.zeros((3, 4), np.float32)}))
    receipt = aggregator.coordinator.screen(manifest, "d1", "t")
    assert receipt.status == "rejected" and "names device d2" in receipt.reason
    assert aggregator.coordinator.screen(manifest, "d2", "other") is not None  # another task's topic
    assert aggregator.coordinator.screen(manifest, "d2", "t") is None  # its own topic: receive it


def test_device_events_telemetry_and_bad_messages(aggregator, caplog):
    registry = aggregator.metrics.registry
    join(aggregator, "d1")
    caplog.set_level(logging.INFO, logger="aggregator.service")
    finished = Event(
        device="d1",
        ts=1.0,
        kind="finished",
        round=1,
        task="t",
        metrics={"train_loss": 0.25, "train_accuracy": 0.9, "train_s": 4.0, "images_per_s": 120.0},
    )
    deliver(aggregator, topics.device("d1", "events"), finished)
    invented = Event(device="d1", ts=1.0, kind="failed", round=1, task="made-up-task")
    deliver(aggregator, topics.device("d1", "events"), invented)
    # a fleet's events are counted, not logged one by one; a failure is a warning
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if "round 1" in r.getMessage()]
    assert logged == [(logging.WARNING, "d1: failed made-up-task round 1 ")]
    assert value(registry, "fedmt_aggregator_train_loss", device="d1", task="t") == 0.25
    assert value(registry, "fedmt_aggregator_train_accuracy", device="d1", task="t") == 0.9
    assert value(registry, "fedmt_aggregator_images_per_second", device="d1", task="t") == 120.0
    assert value(registry, "fedmt_aggregator_training_seconds_total", device="d1", task="t") == 4.0
    assert value(registry, "fedmt_aggregator_phase_seconds_sum", task="t", phase="train") == 4.0
    # a task name the aggregator does not know is counted, under one label
    assert (
        value(registry, "fedmt_aggregator_task_events_total", device="d1", task="other", kind="failed") == 1
    )

    telemetry = Telemetry(
        device="d1",
        ts=5.0,
        cpu_percent=37.5,
        memory_used_bytes=1 << 30,
        memory_total_bytes=8 << 30,
        gpus=[GpuTelemetry(index=0, utilization_percent=80.0, power_w=150.0, temperature_c=61.0)],
    )
    deliver(aggregator, topics.device("d1", "telemetry"), telemetry)
    assert value(registry, "fedmt_aggregator_device_cpu_percent", device="d1") == 37.5
    assert value(registry, "fedmt_aggregator_device_gpu_power_watts", device="d1", gpu="0") == 150.0
    assert value(registry, "fedmt_aggregator_device_gpu_temperature_celsius", device="d1", gpu="0") == 61.0
    assert value(registry, "fedmt_aggregator_device_gpu_memory_used_bytes", device="d1", gpu="0") is None

    deliver(aggregator, topics.device("d1", "status"), Status(state="offline", ts=6.0))
    assert value(registry, "fedmt_aggregator_device_online", device="d1") == 0
    assert value(registry, "fedmt_aggregator_device_cpu_percent", device="d1") is None  # no stale readings

    deliver(aggregator, topics.device("d1", "events"), b"\xc1 not msgpack")
    deliver(aggregator, topics.device("d2", "telemetry"), telemetry)  # names d1 on d2's topic
    assert value(registry, "fedmt_aggregator_messages_dropped_total", kind="events") == 1
    assert value(registry, "fedmt_aggregator_messages_dropped_total", kind="telemetry") == 1


def test_the_first_devices_heard_get_series_of_their_own_and_later_ones_count_as_other(tmp_path):
    from aggregator.metrics import AggregatorMetrics

    metrics = AggregatorMetrics(["t"], device_series=2)
    for device in ("d1", "d2", "d3", "d1", "d4"):
        metrics.event(Event(device=device, ts=1.0, kind="started", round=1, task="t"))
    registry = metrics.registry

    def started(device: str) -> float | None:
        return value(registry, "fedmt_aggregator_task_events_total", device=device, task="t", kind="started")

    assert (started("d1"), started("d2"), started("other")) == (2, 1, 2)
    assert started("d3") is None and started("d4") is None
    for device in ("d1", "d3"):
        metrics.device_status(device, online=True)
    online = [value(registry, "fedmt_aggregator_device_online", device=d) for d in ("d1", "d3", "other")]
    assert online == [1, None, None], "an online gauge only for a device with series of its own"
    model = '{ name = "tiny", num_classes = 10, input_size = 8 }'
    (tmp_path / "aggregator.toml").write_text(f"[metrics]\ndevice_series = 5\n[tasks.t]\nmodel = {model}\n")
    assert load_toml(tmp_path / "aggregator.toml", AggregatorConfig).metrics.device_series == 5
    (tmp_path / "agent.toml").write_text('device = "d1"\n[metrics]\ndevice_series = 5\n')
    with pytest.raises(ConfigError, match="device_series"):  # an agent exports no device series
        load_toml(tmp_path / "agent.toml", AgentConfig)


# --- the agent -----------------------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path) -> Agent:
    config = AgentConfig(
        device="d1",
        state_dir=str(tmp_path / "agent"),
        execution=ExecutionConfig(device="cpu"),
        tasks={"t": msgspec.convert(digits(0), DataSpec)},
    )
    return Agent(config)


def test_agent_metrics_follow_its_handlers(agent, tmp_path):
    registry = agent.metrics.registry
    agent.handle(LinkEvent(True, "Success"))
    assert value(registry, "fedmt_agent_broker_connected") == 1
    agent.tick(time.monotonic())
    assert value(registry, "fedmt_agent_memory_total_bytes") > 0  # its own telemetry
    assert value(registry, "fedmt_agent_outbox_updates") == 0

    payload = tmp_path / "update.bin"
    payload.write_bytes(b"delta")
    manifest = update_manifest("d1", b"delta")
    agent.publish_update(agent.outbox.put(manifest, payload))  # publishes and emits its `uploaded` event
    agent.tick(time.monotonic())
    assert value(registry, "fedmt_agent_outbox_updates") == 1
    assert value(registry, "fedmt_agent_uploaded_bytes_total", task="t") == 5

    receipt = Receipt(update_id=manifest.update_id, task="t", round=1, status="accepted")
    agent.handle(Incoming(topics.device("d1", "receipts"), encode(receipt), False))
    agent.tick(time.monotonic())
    assert value(registry, "fedmt_agent_receipts_total", task="t", status="accepted") == 1
    assert value(registry, "fedmt_agent_outbox_updates") == 0
    assert value(registry, "fedmt_agent_phase_seconds_count", task="t", phase="upload") == 1

    agent.emit_event(
        "started", 1, "t", metrics={"wait_global_s": 0.5, "worker_start_s": 3.0, "worker_restarted": 1}
    )
    agent.emit_event("finished", 1, "t", metrics={"train_loss": 1.5, "train_s": 9.0, "images_per_s": 50.0})
    agent.emit_event("failed", 2, "t", "boom")
    assert value(registry, "fedmt_agent_worker_starts_total", task="t") == 1
    assert value(registry, "fedmt_agent_train_loss", task="t") == 1.5
    assert value(registry, "fedmt_agent_training_seconds_total", task="t") == 9.0
    assert value(registry, "fedmt_agent_task_events_total", task="t", kind="finished") == 1
    assert value(registry, "fedmt_agent_task_events_total", task="t", kind="failed") == 1
    assert value(registry, "fedmt_agent_phase_seconds_sum", task="t", phase="worker_start") == 3.0

    agent.handle(Incoming(topics.schedule("d1", "t"), b"\xc1", False))
    assert value(registry, "fedmt_agent_messages_dropped_total") == 1
    agent.handle(LinkEvent(False, "Unspecified error"))
    assert value(registry, "fedmt_agent_broker_connected") == 0


# --- the endpoint and its config -----------------------------------------------------------------------------


def test_the_endpoint_serves_the_registry_over_http(aggregator):
    server = MetricsServer(MetricsConfig(port=free_port()), aggregator.metrics.registry)
    try:
        samples = scrape(server.url)
    finally:
        server.close()
    assert samples["fedmt_aggregator_round"] == 0
    assert samples['fedmt_aggregator_updates_total{outcome="accepted",task="t"}'] == 0
    assert "process_resident_memory_bytes" in samples


def test_metrics_are_off_by_default_and_a_taken_port_is_a_config_error(tmp_path, aggregator):
    path = tmp_path / "agent.toml"
    path.write_text('device = "d1"\n')
    assert load_toml(path, AgentConfig).metrics.port == 0
    assert serve(MetricsConfig(), aggregator.metrics.registry) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"key 'metrics': cannot listen on 127.0.0.1:{port}"):
            serve(MetricsConfig(port=port), aggregator.metrics.registry)


def test_a_taken_metrics_port_stops_the_daemon_with_one_clear_line(tmp_path, aggregator):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = msgspec.structs.replace(aggregator.config.metrics, port=port)
        config = msgspec.structs.replace(aggregator.config, metrics=metrics)
        path = tmp_path / "aggregator.toml"
        path.write_text(to_toml(config))
        done = subprocess.run(
            [sys.executable, "-m", "aggregator.cli", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    *before, last = done.stderr.strip().splitlines()
    assert last == f"config error: key 'metrics': cannot listen on 127.0.0.1:{port}: Address already in use"
    assert all("does not answer" in line for line in before), before  # no broker runs in this test
