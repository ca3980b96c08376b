"""The production ACL enforced by a real Mosquitto: who may publish where (MQTT v5 PUBACK reason codes)."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from tests.federation import USERS

pytestmark = pytest.mark.broker


def publish_reason(broker, user: str, topic: str):
    """The broker's PUBACK reason code for a QoS 1 publish by `user`."""
    answered = threading.Event()
    reason: list = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, USERS[user])
    client.on_publish = lambda c, userdata, mid, code, props: (reason.append(code), answered.set())
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, b"x", qos=1)
        assert answered.wait(10), "no PUBACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reason[0]


@pytest.mark.parametrize(
    "user, topic, allowed",
    [
        ("dev1", "fedmt/v1/devices/dev1/status", True),
        ("dev1", "fedmt/v1/devices/dev1/events", True),
        ("dev1", "fedmt/v1/tasks/t/updates/dev1/manifest", True),
        ("dev1", "fedmt/v1/devices/dev2/status", False),  # another device's identity
        ("dev1", "fedmt/v1/tasks/t/updates/dev2/chunks/0", False),
        ("dev1", "fedmt/v1/devices/dev1/schedule", False),  # only the aggregator schedules
        ("dev1", "fedmt/v1/devices/dev1/receipts", False),
        ("dev1", "fedmt/v1/tasks/t/global/manifest", False),  # only the aggregator publishes models
        ("monitor", "fedmt/v1/devices/monitor/status", False),  # read-only, also under its own name
        ("monitor", "fedmt/v1/tasks/t/updates/monitor/manifest", False),
        ("auditor", "fedmt/v1/devices/auditor/status", False),  # reads updates, but publishes nothing
        ("auditor", "fedmt/v1/tasks/t/updates/auditor/manifest", False),
        ("aggregator", "fedmt/v1/tasks/t/global/manifest", True),
        ("aggregator", "fedmt/v1/devices/dev1/schedule", True),
    ],
)
def test_publish_permissions(broker, user, topic, allowed):
    reason = publish_reason(
        broker, user, topic
    )  # e.g. "No matching subscribers" (a success) or "Not authorized"
    assert (not reason.is_failure) is allowed, f"{user} -> {topic}: {reason}"
    if not allowed:
        assert str(reason) == "Not authorized"
