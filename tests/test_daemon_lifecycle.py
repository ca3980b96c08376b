"""Both daemons as systemd runs them (Type=notify, WatchdogSec=): real `run` processes against a real broker
tell a notification socket READY=1, then WATCHDOG=1 from their main loop, and STOPPING=1 on SIGTERM; a missing
password file stops `run` with one line, a broker that does not answer is one warning line and no stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from common.daemon import SystemdNotifier
from tests.federation import USERS

REPO = Path(__file__).resolve().parent.parent
WATCHDOG_S = 1.0  # WATCHDOG_USEC for the daemon: it pings every 0.5 s


def aggregator_config(tmp_path: Path, port: int, password_file: Path) -> Path:
    weights = tmp_path / "tiny.safetensors"
    save_file({"w": np.ones((2, 3), np.float32)}, str(weights))  # no torch needed
    path = tmp_path / "aggregator.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\npassword_file = "{password_file}"\n'
        "[tasks.tiny]\nmodel = { name = 'resnet18', num_classes = 10, input_size = 32 }\n"
        f'init_weights = "{weights}"\n'
    )
    return path


def agent_config(tmp_path: Path, port: int, password_file: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device = "dev1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\npassword_file = "{password_file}"\n'
        '[execution]\ndevice = "cpu"\n'
    )
    return path


DAEMONS = {"aggregator": ("aggregator", aggregator_config), "agent": ("dev1", agent_config)}


class NotifySocket:
    """A datagram socket in the abstract namespace, like the one systemd passes in $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.name = f"@fedmt-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])

    def wait_for(self, assignment: str, timeout_s: float) -> list[str]:
        """Every assignment received until `assignment` arrives (fails the test on timeout)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while assignment not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {assignment} within {timeout_s} s; got {seen}"
            self.sock.settimeout(left)
            try:
                seen += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
        return seen

    def close(self) -> None:
        self.sock.close()


def start(daemon: str, config: Path, notify: NotifySocket) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": notify.name,
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
    }
    command = [sys.executable, "-m", f"{daemon}.cli", "run", "--config", str(config)]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.broker
@pytest.mark.parametrize("broker_answers", [True, False], ids=["broker", "no-broker"])
@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_notifies_ready_pings_the_watchdog_and_says_stopping(tmp_path, broker, daemon, broker_answers):
    user, make_config = DAEMONS[daemon]
    password_file = tmp_path / "password"
    password_file.write_text(USERS[user] + "\n")
    port = broker.port if broker_answers else _closed_port()
    notify = NotifySocket()
    process = start(daemon, make_config(tmp_path, port, password_file), notify)
    try:
        seen = notify.wait_for("READY=1", 60)
        assert f"MAINPID={process.pid}" in seen
        started = time.monotonic()
        pings = 0
        while pings < 3:
            notify.wait_for("WATCHDOG=1", 2 * WATCHDOG_S)
            pings += 1
        assert time.monotonic() - started < 3 * WATCHDOG_S
        process.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 10)
        assert process.wait(60) == 0
    finally:
        process.kill()
        notify.close()
    stderr = process.stderr.read()
    silent = [line for line in stderr.splitlines() if "does not answer" in line]
    if broker_answers:
        assert silent == [], stderr
    else:
        assert len(silent) == 1 and f"127.0.0.1:{port}" in silent[0] and "retrying" in silent[0], stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_missing_password_file_stops_run_with_one_line(tmp_path, daemon):
    _, make_config = DAEMONS[daemon]
    missing = tmp_path / "absent.password"
    result = subprocess.run(
        [sys.executable, "-m", f"{daemon}.cli", "run", "--config", str(make_config(tmp_path, 1883, missing))],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: mqtt.password_file: file {missing} does not exist"


def _closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notifier_reads_systemds_variables_and_keeps_them_from_child_processes(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environment()
    assert notifier.address == "\0x" and notifier.ping_every_s == 15.0
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # the watchdog is another process's
    assert SystemdNotifier.from_environment().ping_every_s is None


def test_notifier_outside_systemd_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier.from_environment()
    notifier.alive()
    notifier.stopping()  # no socket: no error, nothing sent
    assert notifier.address is None
