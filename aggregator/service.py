"""The aggregator daemon: MQTT in, the round coordinator in the middle, retained globals and schedules out.

One thread (`run`) handles every message and timer, so the coordinator needs no locks. An error while handling
one message drops that message with a log line; update transfers are admitted against the spool quotas.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.admission import Refused, UpdateAdmission
from aggregator.config import AggregatorConfig
from aggregator.metrics import AggregatorMetrics
from aggregator.rounds import Coordinator, GlobalModel, Outbound
from common.daemon import drop_on_error
from common.metrics import serve
from protocol import ProtocolError, topics
from protocol.chunking import Reassembler, split
from protocol.inbox import TransferInbox
from protocol.schemas import (
    Chunk,
    DeviceProfile,
    Event,
    Receipt,
    Status,
    Telemetry,
    UpdateManifest,
    decode,
    encode,
)
from protocol.transport import Incoming, LinkEvent, MqttLink

log = logging.getLogger(__name__)
DEVICE_SUBSCRIPTIONS = [
    f"{topics.PREFIX}/devices/+/status",
    f"{topics.PREFIX}/devices/+/profile",
    f"{topics.PREFIX}/devices/+/telemetry",
    f"{topics.PREFIX}/devices/+/events",
]


def subscriptions(config: AggregatorConfig) -> list[str]:
    """Every device's news, and the updates of every task, or, `sharded`, of this aggregator's tasks only (other
    aggregators own the rest, on the same broker)."""
    tasks = config.tasks if config.sharded else ["+"]
    return DEVICE_SUBSCRIPTIONS + [f"{topics.PREFIX}/tasks/{task}/updates/#" for task in tasks]


class AggregatorService:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        self.metrics = AggregatorMetrics(config.tasks)
        self.coordinator.on_rejected = self.metrics.rejection
        transfers = config.transfers
        self.updates: TransferInbox[UpdateManifest] = TransferInbox(
            Reassembler(
                Path(config.state_dir) / "spool",
                timeout_s=transfers.reassembly_timeout_s,
                max_payload_bytes=transfers.max_update_bytes,
                max_chunk_bytes=max(transfers.chunk_size, 16 << 20),
            ),
            lambda m: m.transfer,
        )
        self.admission = UpdateAdmission(transfers)
        self.telemetry: dict[str, Telemetry] = {}
        self.link = MqttLink(config.mqtt, subscriptions(config), persistent_session=True)
        self._published_chunks: dict[str, int] = {}

    def run(
        self, stop: threading.Event, tick_s: float = 0.5, alive: Callable[[], None] = lambda: None
    ) -> None:
        """Handle messages and timers until `stop`; `alive()` is called on every pass (systemd's watchdog)."""
        server = serve(self.config.metrics, self.metrics.registry)
        try:
            self.coordinator.start()
            self.link.start()
            next_tick = 0.0
            while not stop.is_set():
                alive()
                try:
                    self.handle(self.link.inbox.get(timeout=tick_s))
                except queue.Empty:
                    pass
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_s
                    self.tick(now)
        finally:
            self.link.stop()
            if server is not None:
                server.close()
            self.coordinator.ledger.close()

    def tick(self, now: float) -> None:
        """Timers: finalise or open rounds, drop stalled transfers (`now`: time.monotonic()), bring the metrics
        up to date."""
        out = self.coordinator.tick()
        self.publish(out)
        for model in out.globals:
            self.metrics.finalized(model.manifest.task)
        for dropped in self.updates.expire(now):
            self.metrics.transfers_expired.inc()
            log.warning("dropped incomplete update transfer %s", dropped)
        self.admission.forget_gone(self.updates.held_bytes())
        self.metrics.rounds(self.coordinator)

    def handle(self, item: Incoming | LinkEvent) -> None:
        """Handle one message or connection event; an error drops it with one log line, counted by topic kind."""
        if isinstance(item, LinkEvent):
            self.metrics.broker_connected.set(item.connected)
        kind = _topic_kind(item.topic) if isinstance(item, Incoming) else "link"
        with drop_on_error(log, item, self.metrics.dropped.labels(kind).inc):
            if isinstance(item, Incoming):
                self.on_message(item)
            elif item.connected:  # republish retained state: idempotent, and repairs a broker that lost it
                self.publish(self.coordinator.retained())

    def on_message(self, message: Incoming) -> None:
        if message.retain and message.payload and not topics.retained_by_devices(message.topic):
            self.link.publish(message.topic, b"", retain=True)  # the broker keeps no device junk
            log.warning(
                "cleared a retained message on %.200r: devices retain only status and profile", message.topic
            )
        ref = topics.parse(message.topic)
        if ref.kind == "status":
            online = bool(message.payload) and decode(message.payload, Status).state == "online"
            self.coordinator.device_status(ref.device, online)
            self.metrics.device_status(ref.device, online)
        elif not message.payload:
            return
        elif ref.kind == "update":
            self.metrics.update_bytes(ref.task, len(message.payload))
            self.on_update_part(ref, message.payload)
        elif ref.kind == "profile":
            profile = decode(message.payload, DeviceProfile)
            _check_sender(profile.device, ref.device)
            self.coordinator.device_profile(profile)
        elif ref.kind == "events":
            event = decode(message.payload, Event)
            _check_sender(event.device, ref.device)
            log.info(
                "%s: %s %s round %d %s",
                event.device,
                event.kind,
                event.task or "",
                event.round,
                event.message,
            )
            self.metrics.event(event)
            if event.kind == "failed" and event.task:
                self.coordinator.task_failed(event.device, event.task, event.round)
        elif ref.kind == "telemetry":
            telemetry = decode(message.payload, Telemetry)
            _check_sender(telemetry.device, ref.device)
            self.telemetry[ref.device] = telemetry
            self.metrics.device_telemetry(telemetry)

    def on_update_part(self, ref: topics.TopicRef, payload: bytes) -> None:
        """A chunk or the manifest of an update transfer. The manifest must name the device and task of its
        topic (the one sender check); the transfer must be admitted (quotas) and fit on the disk."""
        if ref.part == "manifest":
            manifest = decode(payload, UpdateManifest)
            receipt = self.coordinator.screen(manifest, ref.device, ref.task)
            if receipt is None and (
                refused := self._admit(manifest.transfer.id, ref.device, manifest.transfer.size)
            ):
                receipt = self._refusal(manifest, refused)
            if receipt is not None:
                self.send_receipt(ref.device, receipt)
                return
            delivery = self.updates.add_manifest(manifest)
        else:
            chunk = decode(payload, Chunk)
            if self._admit(chunk.transfer, ref.device, chunk.size):
                return
            try:
                delivery = self.updates.add_chunk(chunk)
            except OSError as exc:  # the spool file cannot be written: refuse the transfer, keep running
                self._refuse(chunk.transfer, f"the aggregator cannot spool updates now: {exc}")
                return
        if delivery is not None:
            self.admission.release(delivery.manifest.transfer.id)
            try:
                receipt = self.coordinator.accept_update(delivery.manifest, delivery.path)
            finally:
                delivery.path.unlink(missing_ok=True)  # moved to the updates folder, or rejected
            self.send_receipt(ref.device, receipt)

    def _admit(self, transfer_id: str, device: str, size: int) -> Refused | None:
        """Why the transfer may not go on (a quota; logged once per transfer), or None."""
        try:
            self.admission.claim(transfer_id, device, size, self.updates.held_bytes)
        except Refused as refused:
            if refused.new:
                log.warning("refused update transfer %s of %s: %s", transfer_id, device, refused)
            return refused
        return None

    def _refusal(self, manifest: UpdateManifest, refused: Refused) -> Receipt:
        """The receipt of a refused transfer: retry (as another transfer, later) unless it can never be taken."""
        self.metrics.rejection(manifest.task, "quota" if refused.transient else "too_large")
        return Coordinator.receipt(manifest, "retry" if refused.transient else "rejected", str(refused))

    def _refuse(self, transfer_id: str, reason: str) -> None:
        """Refuse a transfer already under way (its spool file cannot be written): drop what is held of it,
        answer its manifest, if it came, with a retry."""
        log.error("refused update transfer %s: %s", transfer_id, reason)
        manifest = self.updates.discard(transfer_id)
        self.admission.refuse(transfer_id, reason)
        if manifest is not None:
            self.metrics.rejection(manifest.task, "cannot_spool")
            self.send_receipt(manifest.device, Coordinator.receipt(manifest, "retry", reason))

    def send_receipt(self, device: str, receipt: Receipt) -> None:
        self.metrics.receipt(receipt)
        self.link.publish(topics.device(device, "receipts"), encode(receipt))

    def publish(self, out: Outbound) -> None:
        for model in out.globals:
            self.publish_global(model)
        for device, task in out.cleared_schedules:
            self.link.publish(topics.schedule(device, task), b"", retain=True)
        for schedule in out.schedules:
            self.link.publish(
                topics.schedule(schedule.device, schedule.tasks[0].task), encode(schedule), retain=True
            )

    def publish_global(self, model: GlobalModel) -> None:
        """A version's retained chunks (whole, and as a delta when it has one), then its manifest; retained chunks
        that an earlier, longer transfer left (or a delta the version does not have) are cleared."""
        manifest = model.manifest
        whole, delta = topics.global_model(manifest.task), topics.global_delta(manifest.task)
        transfers = [(whole, manifest.transfer, model.payload)]
        if model.delta_payload is not None:
            transfers.append((delta, manifest.delta.transfer, model.delta_payload))
        for base, info, payload in transfers:
            for chunk in split(payload, info):
                self.link.publish(topics.chunk(base, chunk.index), encode(chunk), retain=True)
        for base in (whole, delta):
            count = next((info.chunks for b, info, _ in transfers if b == base), 0)
            for index in range(count, self._published_chunks.get(base, 0)):
                self.link.publish(topics.chunk(base, index), b"", retain=True)
            self._published_chunks[base] = count
        self.link.publish(topics.manifest(whole), encode(manifest), retain=True)
        self.metrics.global_published(manifest.task, manifest.transfer.size)
        log.info(
            "published global %s v%d (%d bytes%s)",
            manifest.task,
            manifest.version,
            manifest.transfer.size,
            f"; as a delta {manifest.delta.transfer.size}" if manifest.delta else "",
        )


def _topic_kind(topic: str) -> str:
    """A dropped message's topic kind for its metric label (a bounded set: never a device or task name)."""
    try:
        return topics.parse(topic).kind
    except ProtocolError:
        return "unknown"


def _check_sender(claimed: str, topic_device: str) -> None:
    if claimed != topic_device:
        raise ProtocolError(f"message names device {claimed} but arrived on {topic_device}'s topic")
