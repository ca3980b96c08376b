"""A federation over TLS only: the broker serves just the shipped TLS listener (certificates made by
scripts/provision-certs.sh), the aggregator and an agent connect with their certificates, a round completes."""

from __future__ import annotations

import pytest

from agent.service import Agent
from aggregator.service import AggregatorService
from common.preflight import probe_broker
from protocol.transport import MqttSettings
from testbed.monitor import Monitor
from tests.federation import (
    SMALL_TASKS,
    agent_config,
    aggregator_config,
    digits,
    mqtt,
    reference_fedavg,
    running,
)
from tests.test_round_integration import assert_states_equal

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_one_round_over_tls_only_equals_reference_fedavg(tmp_path, tls_broker):
    assert not probe_broker(MqttSettings(host=tls_broker.host, port=tls_broker.port)).answers  # no plain MQTT
    monitor = Monitor(mqtt(tls_broker, "auditor"), tmp_path / "observer")  # a certificate too; reads updates
    tasks = {"mobile": SMALL_TASKS["mobile"]}
    try:
        with running(
            AggregatorService(aggregator_config(tmp_path, tls_broker, tasks=tasks, min_devices=1)),
            Agent(agent_config(tmp_path, tls_broker, "dev1", {"mobile": digits(0, partitions=1)})),
        ) as services:
            monitor.wait_for(lambda: ("mobile", 1) in monitor.globals, 240, "v1 over TLS", services)
    finally:
        monitor.close()
    sent = [(manifest.samples, delta) for manifest, delta in monitor.updates.values()]
    assert len(sent) == 1 and [r.status for r in monitor.receipts] == ["accepted"]
    assert_states_equal(
        monitor.globals[("mobile", 1)], reference_fedavg(monitor.globals[("mobile", 0)], sent)
    )
