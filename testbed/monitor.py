"""A read-only MQTT client for dashboards, the demo and the tests: it follows everything under fedmt/v1.

With the `monitor` user of broker_config/acl it sees everything but the devices' raw updates (the demo needs no
more: it evaluates the global models); with the `auditor` user it reassembles the updates too.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol import ProtocolError, topics
from protocol.chunking import Reassembler
from protocol.codecs import make_codec
from protocol.inbox import TransferInbox
from protocol.schemas import Event, GlobalManifest, Receipt, Schedule, Status, UpdateManifest, decode
from protocol.tensors import decode_state, describe
from protocol.transport import Incoming, MqttLink, MqttSettings


@dataclass
class Monitor:
    """A read-only client that records statuses, schedules, events and receipts and reassembles every transfer."""

    settings: MqttSettings
    spool: Path
    globals: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)
    global_manifests: dict[tuple[str, int], GlobalManifest] = field(default_factory=dict)
    updates: dict[str, tuple[UpdateManifest, dict[str, np.ndarray]]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    schedules: dict[str, Schedule] = field(default_factory=dict)  # the latest per device
    schedule_issued_at: dict[tuple[str, int], float] = field(default_factory=dict)  # (device, round) -> first
    seen_at: dict[tuple[str, int], float] = field(default_factory=dict)
    malformed: int = 0

    def __post_init__(self) -> None:
        self._globals = TransferInbox(Reassembler(self.spool / "globals"), GlobalManifest)
        self._updates = TransferInbox(Reassembler(self.spool / "updates"), UpdateManifest)
        # unbounded: an observer that pumps only now and then must not make the broker drop what it queues for it
        self.link = MqttLink(self.settings, [f"{topics.PREFIX}/#"], inbox=queue.Queue())
        self.link.start()
        if not self.link.wait_connected(15):
            raise TimeoutError(f"monitor could not connect to {self.settings.host}:{self.settings.port}")

    def pump(self, timeout_s: float = 0.2) -> None:
        for message in self.link.received(timeout_s):
            if message.payload:
                try:
                    self._record(message)
                except (ProtocolError, OSError):  # bad input, or a payload the spool cannot hold
                    self.malformed += 1

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str, watch=()) -> None:
        """Pump messages until `condition()`; raise on timeout, or let a `watch` callable raise (a process died)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            for check in watch:
                check()
            self.pump()

    def close(self) -> None:
        self.link.stop()

    def _decode(self, manifest: GlobalManifest | UpdateManifest, payload: bytes) -> dict:
        """A global model's tensors, or an update's as its codec decodes them against the global it started from
        (seen before it, as agents see it)."""
        if isinstance(manifest, GlobalManifest) or manifest.codec == "dense":
            return decode_state(payload)
        base = self.globals.get((manifest.task, manifest.base_version))
        if base is None:
            raise ProtocolError(f"update {manifest.update_id}: its base global model was not seen")
        return make_codec(manifest.codec).decode(payload, describe(base))

    def _record(self, message: Incoming) -> None:
        ref = topics.parse(message.topic)
        if ref.kind == "schedule":
            schedule = decode(message.payload, Schedule)
            self.schedules[ref.device] = schedule
            self.schedule_issued_at.setdefault((ref.device, schedule.round), schedule.issued_at)
        elif ref.kind == "status":
            self.statuses[ref.device] = decode(message.payload, Status).state
        elif ref.kind == "events":
            self.events.append(decode(message.payload, Event))
        elif ref.kind == "receipts":
            self.receipts.append(decode(message.payload, Receipt))
        elif ref.kind in ("global", "update"):
            inbox = self._globals if ref.kind == "global" else self._updates
            delivery = inbox.receive(ref.part, message.payload)
            if delivery is None:
                return
            manifest = delivery.manifest
            try:
                state = {k: v.copy() for k, v in self._decode(manifest, delivery.path.read_bytes()).items()}
            finally:
                inbox.release(delivery)
            if ref.kind == "global":
                self.globals[(manifest.task, manifest.version)] = state
                self.global_manifests[(manifest.task, manifest.version)] = manifest
                self.seen_at[(manifest.task, manifest.version)] = time.time()
            else:
                self.updates[manifest.update_id] = (manifest, state)
