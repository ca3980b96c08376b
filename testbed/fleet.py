"""A fleet of simulated devices in one process, for tests and bench/fleet.py.

Every device is a real MQTT client with its own username and password (so the broker's ACL applies to it), and
speaks the protocol as the agent does: retained `online` status (LWT `offline`) and profile, its per-task
schedules, the retained global manifest of each task (its version and tensor shapes; the chunks are not
fetched), a `started` event, then after a simulated training time a `finished` and `uploaded` event and the
update as the agent sends it (`protocol.transport.update_messages`: one message when it fits one chunk), sent
again until a receipt comes (a `retry` receipt: again as a new transfer after `retry_after_s`), and an
`acknowledged` event. A cleared schedule, or one of a later round, stops the training of that task. Training
time comes from `TrainTime` (a per-device speed, so the slow devices stay slow, per-round jitter and a share of
stragglers); tasks can fail (a `failed` event) and devices can drop out (the connection dies without a
DISCONNECT, so the broker publishes the will; the device comes back after a while and trains again).

The update of device i is every floating-point tensor of the global model filled with `fleet.values[device]`
(integer tensors zero), so the aggregate tells how often each update was counted.

All clients share one thread and one selector (paho's external-loop API): a thousand devices are a thousand
sockets, not a thousand threads. Read what the fleet recorded through `query`, which runs in that thread's lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import resource
import secrets
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol import ProtocolError, topics
from protocol.chunking import DEFAULT_CHUNK_SIZE, transfer_info
from protocol.schemas import (
    DeviceProfile,
    Event,
    GlobalManifest,
    HostInfo,
    Receipt,
    Schedule,
    Status,
    TaskData,
    TransferInfo,
    UpdateManifest,
    decode,
    encode,
)
from protocol.tensors import encode_state
from protocol.transport import update_messages

log = logging.getLogger(__name__)
T = TypeVar("T")
HOST = HostInfo(
    hostname="fleet-sim", os="linux", machine="sim", python="3", cpu_count=1, memory_bytes=1 << 30
)


@dataclass(frozen=True)
class TrainTime:
    """Seconds a device trains a task per round: `median_s` times the device's speed factor (lognormal with
    `spread`; `stragglers` of the devices, chosen by the seed, are `straggler_factor` times slower) times a
    per-round jitter (lognormal with `jitter`)."""

    median_s: float = 0.0
    spread: float = 0.0
    jitter: float = 0.0
    stragglers: float = 0.0
    straggler_factor: float = 10.0

    def factors(self, devices: list[str], rng: random.Random) -> dict[str, float]:
        """Each device's fixed speed factor."""
        slow = set(rng.sample(devices, round(self.stragglers * len(devices))))
        return {
            d: math.exp(rng.gauss(0, self.spread)) * (self.straggler_factor if d in slow else 1.0)
            for d in devices
        }

    def sample(self, factor: float, rng: random.Random) -> float:
        return self.median_s * factor * math.exp(rng.gauss(0, self.jitter))


@dataclass(frozen=True)
class FleetConfig:
    tasks: dict[str, int]  # task -> samples every device holds
    train_time: TrainTime = TrainTime()
    failure_rate: float = 0.0  # chance that a task fails in a round (a `failed` event, no update)
    dropout_rate: float = 0.0  # chance that a device drops out while training a round
    dropout_s: tuple[float, float] = (1.0, 3.0)  # how long a dropped device stays away (uniform)
    receipt_timeout_s: float = 30.0  # send an update again when no receipt came within this
    retry_after_s: float = 5.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    events: bool = True  # started / finished / uploaded / acknowledged events, as the agent sends them
    keepalive_s: int = 60
    seed: int = 0


@dataclass
class Transfer:
    """An update waiting for its receipt."""

    manifest: UpdateManifest
    payload: bytes
    resend_at: float
    sent_at: float


@dataclass
class TaskRecord:
    """What the fleet saw of one task round (times are time.monotonic() in the fleet's thread)."""

    scheduled: set[str] = field(default_factory=set)
    uploaded: dict[str, float] = field(default_factory=dict)  # device -> first upload of its update
    receipts: dict[str, tuple[str, float]] = field(default_factory=dict)  # device -> (status, arrival)
    failed: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)  # stopped: schedule cleared or replaced
    resends: int = 0

    def unanswered(self) -> set[str]:
        """Devices whose uploaded update has no receipt yet."""
        return set(self.uploaded) - set(self.receipts)

    def accepted(self) -> dict[str, float]:
        """Devices whose update was recorded (accepted, or a duplicate of a recorded one) and when they heard."""
        return {d: t for d, (status, t) in self.receipts.items() if status in ("accepted", "duplicate")}


@dataclass
class FleetStats:
    tasks: dict[tuple[str, int], TaskRecord] = field(default_factory=dict)  # (task, round)
    global_seen: dict[tuple[str, int], float] = field(default_factory=dict)  # (task, version) -> first seen
    connects: int = 0
    dropouts: int = 0
    malformed: int = 0

    def task(self, task: str, round_: int) -> TaskRecord:
        return self.tasks.setdefault((task, round_), TaskRecord())

    def settled(self) -> bool:
        """Whether every uploaded update has its receipt."""
        return not any(record.unanswered() for record in self.tasks.values())


class _Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list]] = []
        self._serial = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> list:
        """Run `action` at monotonic time `when`; the returned handle cancels it with `cancel`."""
        handle = [action]
        heapq.heappush(self._heap, (when, next(self._serial), handle))
        return handle

    @staticmethod
    def cancel(handle: list | None) -> None:
        if handle is not None:
            handle[0] = None

    def next_at(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def run_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            action = heapq.heappop(self._heap)[2][0]
            if action is not None:
                action()


class SimDevice:
    """One simulated device. Everything runs on the fleet's thread."""

    def __init__(self, fleet: Fleet, name: str, password: str, speed: float, value: float) -> None:
        self.fleet, self.name, self.speed, self.value = fleet, name, speed, value
        self.rng = random.Random(f"{fleet.config.seed}:{name}")
        self.globals: dict[str, GlobalManifest] = {}
        self.waiting: dict[str, Schedule] = {}  # task -> schedule whose global manifest has not come yet
        self.training: dict[str, tuple[int, list]] = {}  # task -> (round, timer handle)
        self.done: set[tuple[str, int]] = set()  # (task, round) trained (or failed)
        self.outbox: dict[str, Transfer] = {}  # update id -> transfer
        self.down = False
        status = topics.device(name, "status")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        client.username_pw_set(name, password)
        client.will_set(status, encode(Status(state="offline", ts=time.time())), qos=1, retain=True)
        client.max_inflight_messages_set(64)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = fleet._socket_open
        client.on_socket_close = fleet._socket_close
        client.on_socket_register_write = fleet._want_write
        client.on_socket_unregister_write = fleet._written
        client.user_data_set(self)
        self.client = client

    # --- connection ---------------------------------------------------------------------------------------

    def connect(self) -> None:
        host, port = self.fleet.broker
        try:
            self.client.connect(host, port, self.fleet.config.keepalive_s, clean_start=True)
        except OSError as exc:
            log.debug("%s cannot connect: %s", self.name, exc)
            self.fleet.timers.at(time.monotonic() + 1.0, self.reconnect)

    def reconnect(self) -> None:
        self.down = False
        if self.client.is_connected():
            return
        try:
            self.client.reconnect()
        except OSError as exc:
            log.debug("%s cannot reconnect: %s", self.name, exc)
            self.fleet.timers.at(time.monotonic() + 1.0, self.reconnect)

    def drop_out(self) -> None:
        """Lose the connection without a DISCONNECT (the broker sends the will) and the training in progress;
        come back later."""
        self.fleet.stats.dropouts += 1
        self.down = True
        for task in list(self.training):
            self._stop_training(task)
        self.waiting.clear()
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        low, high = self.fleet.config.dropout_s
        self.fleet.timers.at(time.monotonic() + self.rng.uniform(low, high), self.reconnect)

    def farewell(self) -> None:
        if self.client.is_connected():
            self.client.publish(
                topics.device(self.name, "status"),
                encode(Status(state="offline", ts=time.time())),
                qos=1,
                retain=True,
            )
            self.client.disconnect()

    def _on_connect(self, client, device, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.name, reason_code)
            return
        self.fleet.stats.connects += 1
        options = SubscribeOptions(qos=1)
        filters = [topics.schedules(self.name), topics.device(self.name, "receipts")]
        filters += [topics.manifest(topics.global_model(task)) for task in self.fleet.config.tasks]
        client.subscribe([(f, options) for f in filters])
        client.publish(
            topics.device(self.name, "status"),
            encode(Status(state="online", ts=time.time())),
            qos=1,
            retain=True,
        )
        profile = DeviceProfile(
            device=self.name,
            ts=time.time(),
            agent_version="fleet-sim",
            host=HOST,
            tasks={task: TaskData(samples=n) for task, n in self.fleet.config.tasks.items()},
        )
        client.publish(topics.device(self.name, "profile"), encode(profile), qos=1, retain=True)
        now = time.monotonic()
        for transfer in self.outbox.values():  # as the agent does: resend whatever waits for a receipt
            transfer.resend_at = now

    def _on_disconnect(self, client, device, flags, reason_code, properties) -> None:
        if not self.down and not self.fleet.stopping:
            self.fleet.timers.at(time.monotonic() + 1.0, self.reconnect)

    # --- messages -----------------------------------------------------------------------------------------

    def _on_message(self, client, device, message) -> None:
        try:
            ref = topics.parse(message.topic)
            payload = bytes(message.payload)
            if ref.kind == "schedule":
                self._on_schedule(ref.task, decode(payload, Schedule) if payload else None)
            elif ref.kind == "receipts" and payload:
                self._on_receipt(decode(payload, Receipt))
            elif ref.kind == "global" and payload:
                self._on_global(decode(payload, GlobalManifest))
        except ProtocolError as exc:
            self.fleet.stats.malformed += 1
            log.warning("%s: dropped a message on %s: %s", self.name, message.topic, exc)

    def _on_schedule(self, task: str, schedule: Schedule | None) -> None:
        """A task's schedule: cleared or for a later round, it stops what trains; a new one starts training once
        its global manifest is here. Retained copies of one already taken change nothing."""
        if schedule is not None and (schedule.device, [a.task for a in schedule.tasks]) != (
            self.name,
            [task],
        ):
            raise ProtocolError(f"schedule on {task}'s topic is not this device's schedule for it")
        training = self.training.get(task)
        if training is not None and (schedule is None or schedule.round > training[0]):
            self.fleet.stats.task(task, training[0]).cancelled.add(self.name)
            self._stop_training(task)
        if schedule is None:
            self.waiting.pop(task, None)
            return
        waiting = self.waiting.get(task)
        taken = (task, schedule.round) in self.done or task in self.training
        if (
            taken
            or (waiting is not None and waiting.round >= schedule.round)
            or schedule.deadline < time.time()
        ):
            return
        self.fleet.stats.task(task, schedule.round).scheduled.add(self.name)
        self.waiting[task] = schedule
        self._start_waiting(task)

    def _on_global(self, manifest: GlobalManifest) -> None:
        self.globals[manifest.task] = manifest
        key = (manifest.task, manifest.version)
        self.fleet.stats.global_seen.setdefault(key, time.monotonic())
        self._start_waiting(manifest.task)

    def _start_waiting(self, task: str) -> None:
        schedule = self.waiting.get(task)
        manifest = self.globals.get(task)
        if schedule is None or manifest is None or manifest.version != schedule.tasks[0].base_version:
            return
        del self.waiting[task]
        config = self.fleet.config
        seconds = config.train_time.sample(self.speed, self.rng)
        now = time.monotonic()
        if self.rng.random() < config.dropout_rate:
            dropout = self.fleet.timers.at(now + seconds * self.rng.random(), self.drop_out)
            self.training[task] = (schedule.round, dropout)
            return
        finish = self.fleet.timers.at(now + seconds, lambda: self._finish(schedule, manifest, seconds))
        self.training[task] = (schedule.round, finish)
        self._event("started", schedule.round, task)

    def _stop_training(self, task: str) -> None:
        _, handle = self.training.pop(task)
        self.fleet.timers.cancel(handle)

    def _finish(self, schedule: Schedule, manifest: GlobalManifest, seconds: float) -> None:
        task, round_ = manifest.task, schedule.round
        self.training.pop(task, None)
        self.done.add((task, round_))
        if self.rng.random() < self.fleet.config.failure_rate:
            self.fleet.stats.task(task, round_).failed.add(self.name)
            self._event("failed", round_, task, "simulated failure")
            return
        payload, info = self.fleet.update_payload(manifest, self.value)
        update_id = uuid.uuid4().hex
        update = UpdateManifest(
            task=task,
            round=round_,
            device=self.name,
            update_id=update_id,
            base_version=manifest.version,
            samples=self.fleet.config.tasks[task],
            codec="dense",  # the simulator sends dense updates (a task config with another codec refuses them)
            transfer=msgspec.structs.replace(info, id=update_id),
            metrics={"train_s": seconds},
        )
        now = time.monotonic()
        self.outbox[update_id] = Transfer(update, payload, now, now)
        self._event("finished", round_, task, metrics={"train_s": seconds})
        self.fleet.stats.task(task, round_).uploaded[self.name] = now
        self._send(self.outbox[update_id])

    def _send(self, transfer: Transfer) -> None:
        manifest = transfer.manifest
        for topic, message in update_messages(self.name, manifest, transfer.payload):
            self.client.publish(topic, message, qos=1)
        transfer.resend_at = time.monotonic() + self.fleet.config.receipt_timeout_s
        self._event("uploaded", manifest.round, manifest.task, metrics={"bytes": manifest.transfer.size})

    def resend_due(self, now: float) -> None:
        if not self.client.is_connected():
            return
        for transfer in list(self.outbox.values()):
            if now >= transfer.resend_at:
                self.fleet.stats.task(transfer.manifest.task, transfer.manifest.round).resends += 1
                self._send(transfer)

    def _on_receipt(self, receipt: Receipt) -> None:
        transfer = self.outbox.get(receipt.update_id)
        if transfer is None:
            return
        manifest = transfer.manifest
        if receipt.status == "retry":  # the old transfer stays refused: the same update as a new transfer
            info = msgspec.structs.replace(manifest.transfer, id=uuid.uuid4().hex)
            transfer.manifest = msgspec.structs.replace(manifest, transfer=info)
            transfer.resend_at = time.monotonic() + self.fleet.config.retry_after_s
            return
        del self.outbox[receipt.update_id]
        record = self.fleet.stats.task(manifest.task, manifest.round)
        record.receipts.setdefault(self.name, (receipt.status, time.monotonic()))
        if receipt.status != "rejected":
            upload_s = time.monotonic() - transfer.sent_at
            self._event("acknowledged", manifest.round, manifest.task, metrics={"upload_s": upload_s})

    def _event(self, kind: str, round_: int, task: str, message: str = "", metrics=None) -> None:
        if not self.fleet.config.events:
            return
        event = Event(
            device=self.name,
            ts=time.time(),
            kind=kind,
            round=round_,
            task=task,
            message=message,
            metrics=metrics or {},
        )
        self.client.publish(topics.device(self.name, "events"), encode(event), qos=1)


class Fleet:
    """`devices` (name -> password) simulated against the broker at `host`:`port`; start() or use as a
    context manager."""

    def __init__(self, host: str, port: int, devices: dict[str, str], config: FleetConfig) -> None:
        self.broker = (host, port)
        self.config = config
        self.stats = FleetStats()
        self.timers = _Timers()
        self.stopping = False
        self.lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._payloads: dict[tuple[str, int], dict[float, tuple[bytes, TransferInfo]]] = {}
        names = sorted(devices)
        speeds = config.train_time.factors(names, random.Random(config.seed))
        #: the value every floating-point tensor of a device's update holds (251 distinct values)
        self.values = {name: 1e-3 * (1 + index % 251) for index, name in enumerate(names)}
        self.devices = {
            name: SimDevice(self, name, devices[name], speeds[name], self.values[name]) for name in names
        }

    def start(self, connect_batch: int = 50) -> Fleet:
        raise_open_files(len(self.devices) + 256)
        self._thread = threading.Thread(target=self._run, args=(connect_batch,), name="fleet", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._selector.close()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def update_payload(self, manifest: GlobalManifest, value: float) -> tuple[bytes, TransferInfo]:
        """The payload of an update of `manifest`'s model filled with `value`, and how it is chunked (its id to be
        set); made once per model version and value, so that the fleet can send faster than an aggregator takes."""
        key = (manifest.task, manifest.version)
        if key not in self._payloads:
            self._payloads = {k: v for k, v in self._payloads.items() if k[0] != manifest.task}
            self._payloads[key] = {}
        made = self._payloads[key]
        if value not in made:
            state = {
                t.name: np.full(t.shape, value if t.dtype.startswith("float") else 0, dtype=t.dtype)
                for t in manifest.tensors
            }
            payload = encode_state(state)
            made[value] = (payload, transfer_info("payload", payload, self.config.chunk_size))
        return made[value]

    def query(self, read: Callable[[FleetStats], T]) -> T:
        """`read(stats)` under the fleet's lock (the fleet's thread changes the stats)."""
        with self.lock:
            return read(self.stats)

    def wait(self, condition: Callable[[FleetStats], bool], timeout_s: float, what: str, watch=()) -> None:
        """Until `condition(stats)` holds; TimeoutError after `timeout_s`; each of `watch` may raise first."""
        deadline = time.monotonic() + timeout_s
        while not self.query(condition):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet: timed out after {timeout_s:.0f} s waiting for {what}")
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the fleet's thread died")
            for check in watch:
                check()
            time.sleep(0.05)

    # --- the thread -----------------------------------------------------------------------------------------

    def _run(self, connect_batch: int) -> None:
        unconnected = list(self.devices.values())
        next_misc = 0.0
        while not self._stop.is_set():
            timeout = max(0.0, min(self.timers.next_at() - time.monotonic(), 0.05))
            events = self._selector.select(0 if unconnected else timeout)
            with self.lock:
                for key, mask in events:
                    client = key.data.client
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE:
                        client.loop_write()
                now = time.monotonic()
                self.timers.run_due(now)
                for device in unconnected[:connect_batch]:
                    device.connect()
                del unconnected[:connect_batch]
                if now >= next_misc:  # keepalive pings and resends, once a second
                    next_misc = now + 1.0
                    for device in self.devices.values():
                        device.client.loop_misc()
                        device.resend_due(now)
        self._close()

    def _close(self) -> None:
        """Say goodbye (retained `offline`) and disconnect every device, writing what is queued."""
        with self.lock:
            self.stopping = True
            for device in self.devices.values():
                device.farewell()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self._selector.get_map():
            for key, mask in self._selector.select(0.05):
                client = key.data.client
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
                if mask & selectors.EVENT_READ:
                    client.loop_read()
        for device in self.devices.values():
            if device.client.socket() is not None:
                device.client.socket().close()

    # paho's socket callbacks (the fleet's thread)
    def _socket_open(self, client, device, sock) -> None:
        self._selector.register(sock, selectors.EVENT_READ, device)

    def _socket_close(self, client, device, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client, device, sock) -> None:
        self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _written(self, client, device, sock) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ, device)
        except (KeyError, ValueError):
            pass


def fleet_users(count: int, prefix: str = "sim") -> dict[str, str]:
    """`count` device names (`prefix`-0001...) with fresh passwords, for the broker's password file."""
    width = max(4, len(str(count)))
    return {f"{prefix}-{i:0{width}d}": secrets.token_urlsafe(12) for i in range(1, count + 1)}


def raise_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files to `needed` (up to the hard limit); a broker started from
    this process inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < needed:
        log.warning("open files limited to %d (hard limit); %d wanted", hard, needed)
