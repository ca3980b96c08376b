"""Observability against a real Mosquitto: both daemons' Prometheus endpoints scraped over HTTP while a federation
runs, `fedmt-aggregator status` while the aggregator runs, and what the MQTT link logs."""

from __future__ import annotations

import logging
import re
import time

import msgspec
import numpy as np
import pytest

from agent.service import Agent
from aggregator.cli import main as aggregator_main
from aggregator.service import AggregatorService
from common.config import to_toml
from protocol import topics
from protocol.schemas import Status, encode
from protocol.transport import MqttLink
from testbed.broker import free_port
from testbed.scrape import scrape
from tests.federation import (
    SMALL_TASKS,
    RawDevice,
    Running,
    agent_config,
    aggregator_config,
    digits,
    mqtt,
    running,
)

pytestmark = pytest.mark.broker
ONE_TASK = {"shuffle": SMALL_TASKS["shuffle"]}


def with_metrics(config):
    return msgspec.structs.replace(config, metrics=msgspec.structs.replace(config.metrics, port=free_port()))


def url(config) -> str:
    return f"http://127.0.0.1:{config.metrics.port}/metrics"


def poll(condition, timeout_s: float, what: str, watch=()):
    """Call `condition()` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for check in watch:
            check()
        time.sleep(0.2)
    return result


@pytest.mark.slow
def test_both_endpoints_show_the_round_advancing(tmp_path, broker, observer):
    """Scraped once while round 1 trains (150 steps: seconds of margin) and once after round 2."""
    task = {"shuffle": msgspec.structs.replace(SMALL_TASKS["shuffle"], local_steps=150)}
    aggregator = with_metrics(aggregator_config(tmp_path, broker, task, rounds=2, min_devices=1))
    agent = with_metrics(agent_config(tmp_path, broker, "dev1", {"shuffle": digits(0)}))

    def both() -> tuple[dict[str, float], dict[str, float]]:
        return scrape(url(aggregator)), scrape(url(agent))

    def after_round_2():
        samples = both()
        return samples if samples[1]["fedmt_agent_rounds_trained_total"] == 2 else None

    with running(AggregatorService(aggregator), Agent(agent)) as services:
        observer.wait_for(
            lambda: any(e.kind == "started" and e.round == 1 for e in observer.events),
            120,
            "round 1",
            services,
        )
        during = both()
        observer.wait_for(lambda: ("shuffle", 2) in observer.globals, 240, "global v2", services)
        after = poll(after_round_2, 30, "the agent's second round", services)

    for (aggregator_samples, agent_samples), rounds_done in ((during, 0), (after, 2)):
        assert aggregator_samples["fedmt_aggregator_rounds_completed_total"] == rounds_done
        assert agent_samples["fedmt_agent_rounds_trained_total"] == rounds_done
        assert aggregator_samples["fedmt_aggregator_broker_connected"] == 1
        assert aggregator_samples["fedmt_aggregator_devices_online"] == 1
        assert agent_samples["fedmt_agent_broker_connected"] == 1
    assert during[0]["fedmt_aggregator_round"] == 1 and during[0]["fedmt_aggregator_round_open"] == 1
    assert during[1]["fedmt_agent_round"] == 1
    aggregator_samples, agent_samples = after
    assert aggregator_samples["fedmt_aggregator_round"] == 2
    assert aggregator_samples["fedmt_aggregator_round_open"] == 0  # the last round is done
    assert aggregator_samples['fedmt_aggregator_global_version{task="shuffle"}'] == 2
    assert aggregator_samples['fedmt_aggregator_updates_total{outcome="accepted",task="shuffle"}'] == 2
    assert aggregator_samples['fedmt_aggregator_update_received_bytes_total{task="shuffle"}'] > 0
    assert (
        aggregator_samples['fedmt_aggregator_task_events_total{device="dev1",kind="finished",task="shuffle"}']
        == 2
    )
    assert 0 <= aggregator_samples['fedmt_aggregator_train_accuracy{device="dev1",task="shuffle"}'] <= 1
    assert aggregator_samples['fedmt_aggregator_device_memory_total_bytes{device="dev1"}'] > 0
    assert aggregator_samples['fedmt_aggregator_phase_seconds_count{phase="train",task="shuffle"}'] == 2
    assert aggregator_samples['fedmt_aggregator_phase_seconds_count{phase="aggregation",task="shuffle"}'] == 2
    assert agent_samples['fedmt_agent_receipts_total{status="accepted",task="shuffle"}'] == 2
    assert agent_samples['fedmt_agent_uploaded_bytes_total{task="shuffle"}'] > 0
    assert agent_samples['fedmt_agent_training_seconds_total{task="shuffle"}'] > 0
    assert agent_samples["fedmt_agent_outbox_updates"] == 0


def test_status_shows_devices_the_open_round_and_who_is_missing_while_the_aggregator_runs(
    tmp_path, broker, capsys
):
    config = aggregator_config(tmp_path, broker, ONE_TASK, rounds=2, min_devices=2)
    path = tmp_path / "aggregator.toml"
    path.write_text(to_toml(config))

    def status() -> str:
        capsys.readouterr()
        assert aggregator_main(["status", "--config", str(path)]) == 0
        return capsys.readouterr().out

    dev1, dev2 = RawDevice(broker, "dev1", {"shuffle": 100}), RawDevice(broker, "dev2", {"shuffle": 50})
    aggregator = Running(AggregatorService(config))
    try:
        dev1.wait(lambda: dev1.schedules, 30, "round 1")
        text = status()
        assert "devices: 2 online, 0 offline" in text and "dev1" in text and "dev2" in text
        assert "round 1: open since" in text and re.search(r"deadline \S+ \S+ \(in [12]m \d+s\)", text), text
        assert "shuffle: base v0, 0/2 updates, missing: dev1, dev2" in text

        base = aggregator.service.coordinator.globals["shuffle"].state
        delta = {name: np.zeros_like(array) for name, array in base.items()}
        assert dev1.receipt_for(dev1.send_update("shuffle", delta, samples=100)).status == "accepted"
        dev2.link.publish(
            topics.device("dev2", "status"), encode(Status(state="offline", ts=time.time())), retain=True
        )
        poll(lambda: "1 offline" in status(), 10, "dev2 offline")
        assert "shuffle: base v0, 1/2 updates, missing: dev2 (offline)" in status()

        dev2.link.publish(
            topics.device("dev2", "status"), encode(Status(state="online", ts=time.time())), retain=True
        )
        assert dev2.receipt_for(dev2.send_update("shuffle", delta, samples=50)).status == "accepted"
        poll(lambda: "round 2: open" in status(), 10, "round 2")
        text = status()
        assert "recent rounds:" in text and "round 1: " in text and "shuffle v1 (2 updates)" in text
    finally:
        aggregator.stop()
        dev1.close()
        dev2.close()


def test_the_link_logs_connected_refused_lost_and_unreachable(tmp_path, broker, caplog):
    caplog.set_level(logging.INFO, logger="protocol.transport")
    wrong = msgspec.structs.replace(mqtt(broker, "dev1"), password="not-the-password")
    refused = MqttLink(wrong)
    refused.start()
    try:
        poll(lambda: "refused user 'dev1'" in caplog.text, 10, "the refusal")
    finally:
        refused.stop()
    assert "wrong credentials? check [mqtt] username and password or password_file" in caplog.text
    assert "connected to broker" not in caplog.text

    link = MqttLink(mqtt(broker, "dev1"))
    link.start()
    try:
        assert link.wait_connected(10)
        assert f"connected to broker {broker.host}:{broker.port} as 'dev1' (new session)" in caplog.text
        broker.stop()
        poll(lambda: "lost the connection to broker" in caplog.text, 10, "the lost connection")
        poll(
            lambda: f"cannot reach broker {broker.host}:{broker.port}; retrying" in caplog.text, 10, "a retry"
        )
    finally:
        link.stop()
    assert "reason code" in caplog.text
    retries = [r for r in caplog.records if "cannot reach" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(retries) == 1  # repeated attempts log at DEBUG


def test_the_monitor_user_gets_no_update_payloads(broker, observer):
    """The `monitor` user subscribes to everything, updates explicitly too; the broker delivers it the device's
    events and profile, never its update (which the auditor, the observer, does get)."""
    monitor = MqttLink(mqtt(broker, "monitor"), [f"{topics.PREFIX}/#", "fedmt/v1/tasks/+/updates/#"])
    monitor.start()
    assert monitor.wait_connected(10)
    device = RawDevice(broker, "dev1", {"t": 10})
    try:
        seen = poll(lambda: [m.topic for m in monitor.received(0.5)], 10, "the device's retained profile")
        device.send_update("t", {"w": np.ones(40_000, np.float32)}, samples=10)  # 3 chunks of 64 KiB
        device.link.publish(topics.device("dev1", "events"), b"not even msgpack")
        observer.wait_for(
            lambda: observer.malformed >= 1 and len(observer.updates) == 1, 10, "the auditor's copy"
        )
        seen += [m.topic for m in monitor.received(2.0)]
    finally:
        device.close()
        monitor.stop()
    assert topics.device("dev1", "profile") in seen and topics.device("dev1", "events") in seen
    assert not [topic for topic in seen if "/updates/" in topic], seen
