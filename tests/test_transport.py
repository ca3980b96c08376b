"""The MQTT link against a real Mosquitto: a bounded queue that holds the broker back, acknowledgements only when
the service says so (and then redelivery of what it did not acknowledge), the broker's window, TCP_NODELAY, and
publishes paho refuses reported as PublishError."""

from __future__ import annotations

import queue
import socket
import threading
import time

import pytest

from protocol.transport import Incoming, LinkEvent, MqttLink, MqttSettings, PayloadQueue, PublishError
from tests.federation import mqtt

TOPIC = "fedmt/v1/devices/dev1/events"  # dev1 may write it, the aggregator reads it


def started(link: MqttLink) -> MqttLink:
    link.start()
    assert link.wait_connected(10)
    return link


def publish(broker, count: int, first: int = 0) -> None:
    sender = started(MqttLink(mqtt(broker, "dev1")))
    try:
        infos = [sender.publish(TOPIC, b"%d" % i) for i in range(first, first + count)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        sender.stop()


def messages(items) -> list[Incoming]:
    return [item for item in items if isinstance(item, Incoming)]


def take_messages(link: MqttLink, count: int, timeout_s: float = 10.0) -> list[Incoming]:
    taken: list[Incoming] = []
    deadline = time.monotonic() + timeout_s
    while len(taken) < count and time.monotonic() < deadline:
        taken += messages(link.take(0.2, count - len(taken)))
    return taken


def aggregator_link(broker, **options) -> MqttLink:
    return MqttLink(mqtt(broker, "aggregator"), [TOPIC], persistent_session=True, manual_ack=True, **options)


def test_a_link_is_connected_once_the_broker_acknowledged_its_subscriptions(broker):
    """What another client publishes right after wait_connected reaches the link, even when its SUBSCRIBE travels
    slowly (a CI run lost every message when the link counted as connected at CONNACK)."""
    import msgspec

    from testbed.throttle import ThrottledLink

    with ThrottledLink(broker.host, broker.port, latency_ms=300) as slow:
        settings = msgspec.structs.replace(mqtt(broker, "aggregator"), host="127.0.0.1", port=slow.port)
        link = MqttLink(settings, [TOPIC], manual_ack=True)
        link.start()
        try:
            assert link.connected.wait(10)
            assert not link.subscribed.is_set()  # CONNACK came; the SUBACK is still 600 ms away
            assert link.wait_connected(10)
            publish(broker, 3)  # straight to the broker
            assert [m.payload for m in take_messages(link, 3)] == [b"0", b"1", b"2"]
        finally:
            link.stop()


def test_a_full_queue_holds_the_broker_back_and_nothing_is_lost(broker):
    inbox: queue.Queue = queue.Queue(4)
    link = started(MqttLink(mqtt(broker, "aggregator"), [TOPIC], inbox=inbox))
    sizes = []
    try:
        sender = threading.Thread(target=publish, args=(broker, 300))
        sender.start()
        got = []
        while len(got) < 300:
            time.sleep(0.002)  # a slow reader
            sizes.append(inbox.qsize())
            got += messages([inbox.get(timeout=10)])
        sender.join(10)
    finally:
        link.stop()
    assert [m.payload for m in got] == [b"%d" % i for i in range(300)]
    assert max(sizes) <= 4 and sizes.count(4) > 10, "the queue never filled: the test did not test anything"


def test_unacknowledged_messages_come_again_and_acknowledged_ones_do_not(broker):
    link = started(aggregator_link(broker))
    publish(broker, 5)
    first = take_messages(link, 5)
    assert [m.payload for m in first] == [b"%d" % i for i in range(5)]
    for message in first[:2]:
        link.ack(message)
    time.sleep(0.3)  # the acknowledgements are on their way before the link goes
    link.stop()  # as if the service had stopped before its group was durable

    again = started(aggregator_link(broker))
    try:
        redelivered = take_messages(again, 3)
        assert [m.payload for m in redelivered] == [b"2", b"3", b"4"]
        assert messages(again.take(1.0)) == []
    finally:
        again.stop()


def test_the_broker_sends_at_most_receive_maximum_unacknowledged_messages(broker):
    link = started(aggregator_link(broker, receive_maximum=5))
    try:
        publish(broker, 12)
        window = take_messages(link, 12, timeout_s=2.0)
        assert [m.payload for m in window] == [b"%d" % i for i in range(5)]
        for message in window:
            link.ack(message)
        rest = take_messages(link, 7)  # acknowledged: the broker sends the rest
        assert [m.payload for m in rest] == [b"%d" % i for i in range(5, 12)]
    finally:
        link.stop()


def test_an_acknowledgement_from_before_a_reconnect_is_not_sent(broker):
    link = started(aggregator_link(broker))
    try:
        publish(broker, 1)
        (old,) = take_messages(link, 1)
        broker.restart()  # a new connection: the broker sends the unacknowledged message again
        link.ack(old)  # of the old connection: must not acknowledge what now travels under the same id
        redelivered = take_messages(link, 1, timeout_s=30)
        assert [m.payload for m in redelivered] == [old.payload] and redelivered[0].session != old.session
        link.ack(redelivered[0])
    finally:
        link.stop()


def test_both_ends_turn_nagle_off(broker):
    link = started(MqttLink(mqtt(broker, "dev1")))
    try:
        assert link.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        link.stop()


def test_a_publish_paho_does_not_take_raises_and_qos1_waits_for_the_connection():
    link = MqttLink(MqttSettings(port=1, username="dev1"))  # never started: not connected
    with pytest.raises(PublishError, match="not currently connected") as error:
        link.publish(TOPIC, b"telemetry", qos=0)
    assert error.value.topic == TOPIC
    link.publish(TOPIC, b"an event", qos=1)  # kept by paho and sent once connected


def test_connection_events_go_to_the_queue_the_service_gave(broker):
    events: queue.Queue = queue.Queue()
    link = started(MqttLink(mqtt(broker, "dev1"), inbox=events))
    link.stop()
    assert isinstance(events.get(timeout=5), LinkEvent) and link.inbox is events


def test_the_links_queue_is_full_at_its_payload_bytes_but_takes_one_larger_message_alone() -> None:
    inbox = PayloadQueue(maxsize=100, max_bytes=1000)
    big = Incoming("t", b"x" * 5000, False)
    inbox.put(big, timeout=0.1)  # larger than the budget: into an empty queue
    with pytest.raises(queue.Full):
        inbox.put(Incoming("t", b"y", False), timeout=0.05)
    assert inbox.get_nowait() is big and inbox.held_bytes == 0
    for _ in range(4):
        inbox.put(Incoming("t", b"z" * 300, False), timeout=0.1)  # 1200 bytes: full after the fourth
    with pytest.raises(queue.Full):
        inbox.put(LinkEvent(True, "events wait too"), timeout=0.05)
    inbox.get_nowait()
    inbox.put(LinkEvent(True, "room again"), timeout=0.1)
    assert inbox.qsize() == 4 and inbox.held_bytes == 900


def test_take_stops_at_its_payload_bytes(broker) -> None:
    link = MqttLink(mqtt(broker, "aggregator"), [TOPIC])  # not started: the queue is filled by hand
    for index in range(10):
        link.inbox.put(Incoming("t", bytes(100), False, mid=index))
    assert [m.mid for m in link.take(0.1, max_bytes=250)] == [0, 1, 2]  # stops once 250 bytes were taken
    assert [m.mid for m in link.take(0.1, limit=2)] == [3, 4]
    assert len(link.take(0.1)) == 5
