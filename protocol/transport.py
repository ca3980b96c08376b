"""The MQTT link both services use: paho-mqtt 2.x, MQTT v5, reconnect with backoff, messages into a queue.

Callbacks run on paho's network thread and only enqueue; each service handles messages on its own thread,
so application state needs no locks. The queue (the service's own, or the link's) is bounded, the link's by
count and by payload bytes: when it is full the network thread waits, the socket stops being read and TCP
pushes back on the broker, so a slow reader holds a bounded number of bytes whatever the number of senders.
With `manual_ack` a QoS 1 message is acknowledged to the broker only when the service says so (`ack`, once what
it did with the message is durable), so the broker keeps and redelivers whatever a crash interrupted;
`receive_maximum` bounds how many such messages the broker sends before their acknowledgements (where the
broker honours it). Both ends turn Nagle's algorithm off (TCP_NODELAY).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import paho.mqtt.client as mqtt
from msgspec import Meta
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol import topics
from protocol.chunking import split
from protocol.schemas import TransferInfo, UpdateManifest, WholeTransfer, encode

log = logging.getLogger(__name__)
#: MQTT v5 CONNACK reason codes of a refused login
BAD_CREDENTIALS, NOT_AUTHORIZED = 0x86, 0x87


class TlsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


class MqttSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Broker connection. The username is the device id for agents (the broker ACL relies on it)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, Meta(gt=0)] = 1.0
    reconnect_max_s: Annotated[float, Meta(gt=0)] = 30.0
    session_expiry_s: Annotated[int, Meta(ge=0)] = 3600
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 64
    tls: TlsSettings | None = None

    def resolved_password(self) -> str | None:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password


#: messages and events a link's own queue holds before its network thread waits for the service
INBOX_SIZE = 256
#: payload bytes a link's own queue holds before its network thread waits (one larger message still goes in)
INBOX_BYTES = 4 << 20


class PublishError(ConnectionError):
    """paho did not take a message for sending (`rc`: its error code); nothing was queued."""

    def __init__(self, topic: str, rc: mqtt.MQTTErrorCode) -> None:
        super().__init__(f"publish to {topic[:200]!r} failed: {mqtt.error_string(rc)}")
        self.topic, self.rc = topic, rc


@dataclass(frozen=True)
class Incoming:
    """A message; `mid`, `qos` and `session` (the connection it came on) let a manual-ack link acknowledge it."""

    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0
    session: int = 0

    def without_payload(self) -> Incoming:
        """What acknowledging it needs, the payload let go (cheaper than dataclasses.replace per message)."""
        return Incoming(self.topic, b"", self.retain, self.mid, self.qos, self.session)


def update_messages(
    device: str, manifest: UpdateManifest, payload: bytes | memoryview
) -> Iterator[tuple[str, bytes]]:
    """The messages of an update's transfer that `device` sends (on its own topics, whatever the manifest
    says), in order: one (`whole`) when the payload fits one chunk, else its chunks, then its manifest."""
    base, info = topics.update(manifest.task, device), manifest.transfer
    if info.chunks == 1:
        (chunk,) = split(payload, info)
        yield topics.whole(base), encode(WholeTransfer(manifest=manifest, chunk=chunk))
        return
    for chunk in split(payload, info):
        yield topics.chunk(base, chunk.index), encode(chunk)
    yield topics.manifest(base), encode(manifest)


def _let_the_network_thread_send() -> None:
    """Give up the GIL for a moment after queueing a chunk: paho's network thread, woken by the publish, sends it
    while the caller copies the next one. Without this, a loop of publishes holds the GIL for whole switch
    intervals (5 ms) and a 45 MB update reaches the socket only after it was all queued."""
    time.sleep(0)


class PayloadQueue(queue.Queue):
    """A queue of messages and link events, full at `maxsize` items or once its messages' payloads reach
    `max_bytes` (a message larger than that goes into an empty queue alone). Needed beside `receive_maximum`:
    Mosquitto 2.0.11 (Debian 12's) sends past a client's receive maximum once acknowledgements flow, and 256
    chunks of 1 MiB would wait here."""

    def __init__(self, maxsize: int = INBOX_SIZE, max_bytes: int = INBOX_BYTES) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.held_bytes = 0

    def _qsize(self) -> int:
        held = len(self.queue)
        return self.maxsize if held and self.held_bytes >= self.max_bytes else held

    def _put(self, item: Incoming | LinkEvent) -> None:
        super()._put(item)
        self.held_bytes += _payload_bytes(item)

    def _get(self) -> Incoming | LinkEvent:
        item = super()._get()
        self.held_bytes -= _payload_bytes(item)
        return item


def _payload_bytes(item: Incoming | LinkEvent) -> int:
    return len(item.payload) if isinstance(item, Incoming) else 0


@dataclass(frozen=True)
class LinkEvent:
    """Connection state change, delivered through the same queue as messages."""

    connected: bool
    reason: str


class MqttLink:
    """One paho client: connects in the background, resubscribes and republishes the birth on every connect.

    The client id is the username: the shipped broker config (use_username_as_clientid) binds them, so a
    persistent session belongs to its identity and one client cannot take over another's session.
    """

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: Iterable[str] = (),
        *,
        will: tuple[str, bytes] | None = None,
        birth: tuple[str, bytes] | None = None,
        persistent_session: bool = False,
        inbox: queue.Queue | None = None,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
    ) -> None:
        """`inbox`: the queue messages and connection events go to (bounded; default: a PayloadQueue)."""
        if isinstance(subscriptions, str):  # MqttLink(settings, "client-id") from before ids were usernames
            raise TypeError("subscriptions must be a list of topic filters, not one string")
        if persistent_session and not settings.username:
            raise ValueError("a persistent MQTT session needs a username: it names the session")
        self.settings = settings
        self.inbox: queue.Queue = PayloadQueue() if inbox is None else inbox
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # connected, and the broker acknowledged the subscriptions
        self._unacknowledged: set[int] = set()  # mids of this connection's SUBSCRIBEs not yet acknowledged
        self._manual_ack = manual_ack
        self._session = 0  # changes on every connect and disconnect: acks of an older one are not sent
        self._session_lock = threading.Lock()
        self._subscriptions = list(subscriptions)
        self._birth = birth
        self._persistent = persistent_session
        self._stopping = False
        self._last_problem = ""  # the connection problem logged last; repeats go to DEBUG
        client = mqtt.Client(  # anonymous: the broker assigns an id
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.username or "",
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        if settings.username:
            client.username_pw_set(settings.username, settings.resolved_password())
        if settings.tls:
            client.tls_set(
                ca_certs=settings.tls.ca_file, certfile=settings.tls.cert_file, keyfile=settings.tls.key_file
            )
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=settings.reconnect_min_s, max_delay=settings.reconnect_max_s)
        client.max_inflight_messages_set(settings.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._connect_properties = Properties(PacketTypes.CONNECT)
        self._connect_properties.SessionExpiryInterval = (
            settings.session_expiry_s if persistent_session else 0
        )
        if receive_maximum is not None:
            self._connect_properties.ReceiveMaximum = receive_maximum
        self.client = client

    def start(self) -> None:
        s = self.settings
        self.client.connect_async(
            s.host,
            s.port,
            s.keepalive_s,
            clean_start=not self._persistent,
            properties=self._connect_properties,
        )
        self.client.loop_start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the link connected, and the broker acknowledged its subscriptions, within `timeout_s`: what
        others publish from then on reaches it."""
        return self.subscribed.wait(timeout_s)

    def received(self, timeout_s: float) -> Iterator[Incoming]:
        """The messages that arrive within `timeout_s` (connection events are skipped)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                return
            if isinstance(item, Incoming):
                yield item

    def take(self, timeout_s: float, limit: int = INBOX_SIZE, max_bytes: int | None = None) -> list:
        """What is in the queue: wait up to `timeout_s` for the first item, then take up to `limit` items, or
        until their payloads reach `max_bytes`, without waiting (an empty list if nothing came)."""
        try:
            items = [self.inbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        taken = _payload_bytes(items[0])
        while len(items) < limit and (max_bytes is None or taken < max_bytes):
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
            taken += _payload_bytes(items[-1])
        return items

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS 1 message to the broker (manual-ack links; others acknowledge on arrival). A message
        of an earlier connection is not acknowledged: the broker sends it again."""
        if not self._manual_ack or not message.qos:
            return
        with self._session_lock:
            if message.session == self._session:
                self.client.ack(message.mid, message.qos)

    def subscribe(self, topic_filter: str) -> None:
        """Add a subscription now (retained messages under it arrive) and on every reconnect; idempotent."""
        if topic_filter not in self._subscriptions:
            self._subscriptions.append(topic_filter)
            self.client.subscribe(topic_filter, options=SubscribeOptions(qos=1, retainAsPublished=True))

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription made with `subscribe`; idempotent."""
        if topic_filter in self._subscriptions:
            self._subscriptions.remove(topic_filter)
            self.client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Hand a message to paho. QoS 1 while disconnected is kept and sent on reconnect (in memory); a message
        paho did not take raises PublishError."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not (info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0):
            raise PublishError(topic, info.rc)
        return info

    def let_send(self) -> None:
        """Let paho's network thread send what was just published before the caller goes on: a thread that keeps
        the GIL would hold it back for a switch interval (5 ms)."""
        _let_the_network_thread_send()

    def publish_update(self, device: str, manifest: UpdateManifest, payload: bytes | memoryview) -> None:
        """Publish the messages of `device`'s update (`update_messages`); PublishError if paho refused one of them
        (the receiver then lacks the transfer and the sender may send it again)."""
        for topic, message in update_messages(device, manifest, payload):
            self.publish(topic, message)
            _let_the_network_thread_send()

    def publish_chunks(
        self, base: str, info: TransferInfo, payload: bytes | memoryview, *, retain: bool = False
    ) -> None:
        """Publish `payload`'s chunks under `base`/chunks/i (a transfer whose manifest travels elsewhere)."""
        for chunk in split(payload, info):
            self.publish(topics.chunk(base, chunk.index), encode(chunk), retain=retain)
            _let_the_network_thread_send()

    def stop(self, farewell: tuple[str, bytes] | None = None, timeout_s: float = 5.0) -> None:
        """Publish an optional last retained message, then disconnect cleanly (the broker sends no LWT)."""
        self._stopping = True
        if farewell and self.connected.is_set():
            try:
                self.publish(farewell[0], farewell[1], retain=True).wait_for_publish(timeout_s)
            except (PublishError, RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def broker(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _problem(self, level: int, message: str, *args: object) -> None:
        """Log a connection problem; the same one again (every reconnect attempt) only at DEBUG."""
        text = message % args
        log.log(level if text != self._last_problem else logging.DEBUG, "%s", text)
        self._last_problem = text

    def _deliver(self, item: Incoming | LinkEvent) -> None:
        """Put into the bounded queue, waiting while it is full (the broker's messages wait in TCP meanwhile);
        once the link stops, give up (a manual-ack message not taken is sent again by the broker)."""
        while not self._stopping:
            try:
                self.inbox.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _new_session(self) -> int:
        with self._session_lock:
            self._session += 1
            return self._session

    # paho callbacks (network thread): log and enqueue only
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            user = self.settings.username
            if reason_code.value in (BAD_CREDENTIALS, NOT_AUTHORIZED):
                self._problem(
                    logging.ERROR,
                    "broker %s refused user %r (%s): wrong credentials? check [mqtt] username and password "
                    "or password_file; retrying",
                    self.broker,
                    user,
                    reason_code,
                )
            else:
                self._problem(logging.ERROR, "broker %s refused the connection: %s", self.broker, reason_code)
            return
        _no_delay(client.socket())
        self._new_session()
        self._unacknowledged = set()
        # retain flags as published: a receiver sees what was retained
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        for topic_filter in self._subscriptions:
            self._unacknowledged.add(client.subscribe(topic_filter, options=options)[1])
        if self._birth:
            client.publish(self._birth[0], self._birth[1], qos=1, retain=True)
        self._last_problem = ""
        session = "resumed session" if flags.session_present else "new session"
        log.info("connected to broker %s as %r (%s)", self.broker, self.settings.username, session)
        self.connected.set()
        if not self._unacknowledged:
            self.subscribed.set()
        self._deliver(LinkEvent(True, str(reason_code)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.warning(
                "broker %s refused a subscription of %r: %s", self.broker, self.settings.username, refused
            )
        self._unacknowledged.discard(mid)
        if not self._unacknowledged and self.connected.is_set():
            self.subscribed.set()

    def _on_connect_fail(self, client, userdata) -> None:
        self._problem(logging.WARNING, "cannot reach broker %s; retrying", self.broker)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        self._new_session()
        if was_connected and not self._stopping:
            log.warning(
                "lost the connection to broker %s: %s (reason code %d); reconnecting",
                self.broker,
                reason_code,
                reason_code.value,
            )
            self._deliver(LinkEvent(False, str(reason_code)))

    def _on_message(self, client, userdata, message) -> None:
        self._deliver(
            Incoming(
                message.topic,
                bytes(message.payload),
                bool(message.retain),
                message.mid,
                message.qos,
                self._session,
            )
        )


def _no_delay(sock: object) -> None:
    """Send small packets (acknowledgements, receipts, a transfer's last piece) at once, not after Nagle's wait
    for the previous packet's ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # not a TCP socket (a test double, a websocket wrapper)
        log.debug("cannot set TCP_NODELAY: %s", exc)
