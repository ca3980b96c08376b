"""Identity against a real Mosquitto with the shipped settings: a device that claims another client's id (the
aggregator's, another agent's, or the ids they used before ids were bound to usernames) gets a session of its
own. It cannot kick the owner off the broker, nor receive the owner's messages, queued ones included."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.service import Agent
from aggregator.service import AggregatorService
from protocol import topics
from protocol.schemas import Status, decode
from protocol.transport import MqttLink
from tests.federation import agent_config, aggregator_config
from tests.federation import mqtt as settings_for

pytestmark = pytest.mark.broker

QUIET_S = 2.0  # how long a takeover would take to show (the broker acts on CONNECT at once)


class Intruder:
    """`user`, authenticated with its own credentials, connecting under another client's id and asking to resume
    that client's session."""

    def __init__(self, broker, user: str, claimed_id: str, subscribe: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=claimed_id, protocol=mqtt.MQTTv5)
        s = settings_for(broker, user)
        if s.tls:
            client.tls_set(ca_certs=s.tls.ca_file, certfile=s.tls.cert_file, keyfile=s.tls.key_file)
        client.username_pw_set(user, s.password)
        client.on_connect = lambda c, *a: (c.subscribe(subscribe, qos=1), self.connected.set())
        client.on_message = lambda c, userdata, message: self.messages.append(message)
        resume = Properties(PacketTypes.CONNECT)
        resume.SessionExpiryInterval = 3600
        client.connect(broker.host, broker.port, clean_start=False, properties=resume)
        client.loop_start()
        self.client = client
        assert self.connected.wait(10), f"{user} could not connect"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def count_disconnects(link: MqttLink) -> list:
    """Every disconnect the link's paho client reports from now on (the link still handles each one)."""
    seen: list = []
    handler = link.client.on_disconnect
    link.client.on_disconnect = lambda *args: (seen.append(args[3]), handler(*args))
    return seen


@pytest.fixture(params=["password", "tls"])
def any_broker(request):
    """The shipped settings on both listeners: passwords (localhost tools) and TLS identities (deployment)."""
    return request.getfixturevalue("broker" if request.param == "password" else "tls_broker")


def victim_link(kind: str, tmp_path, broker) -> MqttLink:
    """The MQTT link exactly as the aggregator or dev1's agent builds it."""
    if kind == "aggregator":
        return AggregatorService(aggregator_config(tmp_path, broker)).link
    return Agent(agent_config(tmp_path, broker, "dev1", {})).link


@pytest.mark.parametrize(
    "victim, claimed_id",
    [
        ("aggregator", "aggregator"),
        ("aggregator", "fedmt-aggregator"),  # the aggregator's fixed id before ids were bound to usernames
        ("dev1", "dev1"),
        ("dev1", "fedmt-agent-dev1"),
    ],
)
def test_a_device_claiming_another_clients_id_cannot_kick_it_off_or_read_its_messages(
    tmp_path, any_broker, victim, claimed_id
):
    link = victim_link(victim, tmp_path, any_broker)
    link.start()
    assert link.wait_connected(10)
    disconnects = count_disconnects(link)
    intruder = Intruder(any_broker, "dev2", claimed_id, subscribe="fedmt/v1/#")
    try:
        time.sleep(QUIET_S)
        assert disconnects == [] and link.connected.is_set(), f"{victim} was kicked off: {disconnects}"
        # The owner still gets its messages, the intruder none of them.
        sender = MqttLink(settings_for(any_broker, "dev1" if victim == "aggregator" else "aggregator"))
        sender.start()
        assert sender.wait_connected(10)
        topic = (
            topics.device("dev1", "status") if victim == "aggregator" else topics.device("dev1", "receipts")
        )
        sender.publish(topic, b"for the owner only").wait_for_publish(5)
        assert any(m.topic == topic for m in link.received(10)), f"{victim} did not get {topic}"
        sender.stop()
        time.sleep(0.5)
        assert [m.topic for m in intruder.messages if m.topic == topic] == []
        assert disconnects == []
    finally:
        intruder.close()
        link.stop()


def test_the_aggregators_queued_messages_wait_for_the_aggregator_not_for_a_device_claiming_its_id(
    tmp_path, any_broker
):
    """The aggregator's persistent session (client id = username) keeps what arrives while it is down; a device
    resuming "its" session gets none of it, and the aggregator's next start does."""
    config = aggregator_config(tmp_path, any_broker)
    first = AggregatorService(config).link
    device = MqttLink(settings_for(any_broker, "dev1"))
    first.start()
    device.start()
    assert first.wait_connected(10) and device.wait_connected(10)
    update = topics.manifest(topics.update("shuffle", "dev1"))
    for _ in range(10):  # until the aggregator's subscriptions are in place (they follow its CONNACK)
        device.publish(update, b"while the aggregator is up").wait_for_publish(5)
        handled = list(first.received(1.0))
        for message in handled:  # as the service does once a message is durable
            first.ack(message)
        if any(m.topic == update for m in handled):
            break
    else:
        pytest.fail("the aggregator's subscriptions never took effect")
    first.stop()  # a clean stop: the session stays for session_expiry_s
    device.publish(update, b"queued while the aggregator is down").wait_for_publish(5)
    device.stop()

    for claimed_id in ("aggregator", "fedmt-aggregator"):
        intruder = Intruder(any_broker, "dev2", claimed_id, subscribe="fedmt/v1/tasks/+/updates/#")
        time.sleep(QUIET_S)
        intruder.close()
        assert intruder.messages == [], f"{claimed_id}: the intruder received {intruder.messages[0].topic}"

    second = AggregatorService(config).link
    second.start()
    try:
        assert second.wait_connected(10)
        queued = next((m for m in second.received(10) if m.topic == update), None)
        assert queued is not None and queued.payload == b"queued while the aggregator is down"
    finally:
        second.stop()


def test_a_restarted_agent_replaces_its_dead_connection_and_ends_online(tmp_path, broker):
    """Same identity, new connection (the agent restarted before the broker noticed the old one die): Mosquitto
    closes the old connection and publishes its will ("offline") before the new connection's birth, so the
    retained status ends "online"."""
    status = topics.device("dev1", "status")
    watcher = MqttLink(settings_for(broker, "monitor"), [status])
    watcher.start()
    old = Agent(agent_config(tmp_path / "old", broker, "dev1", {})).link
    old.start()
    states = lambda timeout_s: [decode(m.payload, Status).state for m in watcher.received(timeout_s)]  # noqa: E731
    assert watcher.wait_connected(10) and old.wait_connected(10)
    assert "online" in states(QUIET_S)  # the old connection's birth (or, retained, on subscribing)
    old.client.loop_stop()  # the process froze or died: its socket stays open, nothing answers
    new = Agent(agent_config(tmp_path / "new", broker, "dev1", {})).link
    new.start()
    try:
        assert new.wait_connected(10)
        assert states(QUIET_S) == ["offline", "online"]
    finally:
        new.stop()
        watcher.stop()
