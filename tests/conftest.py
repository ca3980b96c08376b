"""Shared fixtures: a real Mosquitto broker per test (Docker when an engine answers, else the local binary),
with passwords or, as `tls_broker`, TLS-only with certificates from scripts/provision-certs.sh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.broker import BrokerUnavailable, Mosquitto
from testbed.monitor import Monitor
from tests.examples import EXAMPLE_DEVICE, PROVISION
from tests.federation import USERS, mqtt


def _started(workdir: Path, certs: Path | None = None):
    try:
        with Mosquitto(workdir, USERS, certs=certs) as mosquitto:
            yield mosquitto
    except BrokerUnavailable as exc:
        pytest.fail(f"integration tests need a Mosquitto broker: {exc}")


@pytest.fixture
def broker(tmp_path):
    yield from _started(tmp_path / "broker")


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A CA, the broker's certificate (localhost, 127.0.0.1) and a client certificate per test user and for the
    device of examples/agent.toml."""
    out = tmp_path_factory.mktemp("certs")
    hosts = ["--server-host", "localhost", "--server-host", "127.0.0.1"]
    subprocess.run(
        [PROVISION, "--out", out, *hosts, *USERS, EXAMPLE_DEVICE],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture
def tls_broker(tmp_path, certs):
    yield from _started(tmp_path / "tls-broker", certs)


@pytest.fixture
def observer(tmp_path, broker):
    """A read-only client on the broker that reassembles every global model and update (the auditor: the
    monitor user may not read updates)."""
    monitor = Monitor(mqtt(broker, "auditor"), tmp_path / "observer")
    yield monitor
    monitor.close()
