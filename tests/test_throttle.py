"""The slow-link proxy: bandwidth within 10% of its setting, latency added, bytes passed unchanged both ways."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from testbed.throttle import ThrottledLink


@pytest.fixture
def echo():
    """A TCP server that echoes what it receives."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def pump(c=conn) -> None:
                with c:
                    while data := c.recv(65536):
                        c.sendall(data)

            threading.Thread(target=pump, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.perf_counter()
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        while len(received) < len(payload):
            received += conn.recv(65536)
        sender.join()
        return bytes(received), time.perf_counter() - started


@pytest.mark.parametrize("mbps", [8, 40])
def test_bandwidth_is_within_ten_percent_of_the_setting(echo, mbps):
    payload = bytes(range(256)) * (mbps * 1_000_000 // 8 // 256)  # one second's worth at the setting
    with ThrottledLink("127.0.0.1", echo, mbps=mbps) as link:
        received, seconds = round_trip(link.port, payload)
    assert received == payload
    measured = len(payload) * 8 / seconds / 1e6  # both directions pipeline: the round trip takes ~1 s
    assert 0.9 * mbps <= measured <= 1.1 * mbps
    assert link.stats.up_bytes == link.stats.down_bytes == len(payload)


def test_latency_is_added_each_way(echo):
    with ThrottledLink("127.0.0.1", echo, latency_ms=50) as link:
        _, seconds = round_trip(link.port, b"ping")
    assert 0.1 <= seconds < 0.2


def test_an_unreachable_upstream_closes_the_client_connection():
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]
    with (
        ThrottledLink("127.0.0.1", dead_port) as link,
        socket.create_connection(("127.0.0.1", link.port)) as c,
    ):
        c.settimeout(5)
        assert c.recv(10) == b""
