"""Shared fixtures: a real Mosquitto broker per test (Docker when an engine answers, else the local binary)."""

from __future__ import annotations

import pytest

from testbed.broker import BrokerUnavailable, Mosquitto
from testbed.monitor import Monitor
from tests.federation import USERS, mqtt


@pytest.fixture
def broker(tmp_path):
    try:
        with Mosquitto(tmp_path / "broker", USERS) as mosquitto:
            yield mosquitto
    except BrokerUnavailable as exc:
        pytest.fail(f"integration tests need a Mosquitto broker: {exc}")


@pytest.fixture
def observer(tmp_path, broker):
    """A read-only client on the broker that reassembles every global model and update (the auditor: the
    monitor user may not read updates)."""
    monitor = Monitor(mqtt(broker, "auditor"), tmp_path / "observer")
    yield monitor
    monitor.close()
