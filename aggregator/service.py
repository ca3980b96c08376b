"""The aggregator daemon: MQTT in, the round coordinator in the middle, retained globals and schedules out.

One thread (`run`) handles every message and timer, so the coordinator needs no locks. Each message is
handled as it is taken (an error drops that message with a log line; update transfers are admitted against
the spool quotas and their chunks spooled as they come). What the messages changed is made durable in groups
(`settle`: spool files, update payloads and their folders fsynced together, then one ledger commit), and only
then are the group's accepted receipts sent and its messages acknowledged to the broker, which meanwhile sends
no more than RECEIVE_MAXIMUM unacknowledged messages (the link's queue also holds no more than its payload
bytes: not every broker honours the window): memory stays flat whatever the number of devices, and a crash
loses nothing acknowledged. A group settles as soon as a pass over the messages taken completed an update (its
receipt waits) and left no one-chunk payload held in memory waiting for its manifest (usually right behind it;
the sync would have to spool it), when SYNC_BYTES of chunks or HELD_BYTES of complete updates wait, when half
the broker's window waits and no such payload does (the whole window whatever waits), or when no message came
for SETTLE_WAIT_S. Accepted updates are folded after their receipts; a task whose last expected update was
folded is finalised at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from aggregator.admission import Refused, UpdateAdmission
from aggregator.config import AggregatorConfig
from aggregator.metrics import AggregatorMetrics
from aggregator.rounds import Coordinator, GlobalModel, Outbound
from common.daemon import drop_on_error
from common.metrics import serve
from protocol import ProtocolError, topics
from protocol.chunking import Reassembler, SpoolError
from protocol.inbox import Delivery, TransferInbox
from protocol.schemas import (
    DeviceProfile,
    Event,
    Receipt,
    Status,
    Telemetry,
    UpdateManifest,
    decode,
    encode,
)
from protocol.transport import Incoming, LinkEvent, MqttLink, PayloadQueue, PublishError

log = logging.getLogger(__name__)
#: QoS 1 messages the broker sends before their acknowledgements
RECEIVE_MAXIMUM = 128
#: chunk bytes spooled before a group settles anyway (the sync at the end of a large update stays short)
SYNC_BYTES = 8 << 20
#: payload bytes one pass takes from the link, and complete updates a group holds (mapped until folded) before it
#: settles: with the link's queue, what bounds the aggregator's memory
HELD_BYTES = 4 << 20
#: one-chunk update payloads held in memory at once rather than spooled (no file to create; see Reassembler): as
#: many as a group holds, so that a group of small updates creates no file
HELD_IN_MEMORY_BYTES = HELD_BYTES
#: payload bytes the link's queue holds before its network thread waits and TCP pushes back on the broker
LINK_QUEUE_BYTES = 2 << 20
#: how long unacknowledged messages wait for more to come before their group settles
SETTLE_WAIT_S = 0.005
DEVICE_SUBSCRIPTIONS = [topics.every_device(leaf) for leaf in ("status", "profile", "telemetry", "events")]


def subscriptions(config: AggregatorConfig) -> list[str]:
    """Every device's news, and the updates of every task, or, `sharded`, of this aggregator's tasks only (other
    aggregators own the rest, on the same broker)."""
    tasks = list(config.tasks) if config.sharded else [None]
    return DEVICE_SUBSCRIPTIONS + [topics.every_update(task) for task in tasks]


class AggregatorService:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        self.metrics = AggregatorMetrics(config.tasks, config.metrics.device_series)
        self.coordinator.on_rejected = self.metrics.rejection
        transfers = config.transfers
        self.updates: TransferInbox[UpdateManifest] = TransferInbox(
            Reassembler(
                Path(config.state_dir) / "spool",
                timeout_s=transfers.reassembly_timeout_s,
                max_payload_bytes=transfers.max_update_bytes,
                max_chunk_bytes=max(transfers.chunk_size, 16 << 20),
                durable=True,
                memory_bytes=HELD_IN_MEMORY_BYTES,
            ),
            UpdateManifest,
        )
        self.admission = UpdateAdmission(transfers)
        owners = self.updates.owners()
        self.admission.restore({tid: (owners[tid], size) for tid, size in self.updates.held_bytes().items()})
        self.telemetry: dict[str, Telemetry] = {}
        self.link = MqttLink(
            config.mqtt,
            subscriptions(config),
            persistent_session=True,
            manual_ack=True,
            receive_maximum=RECEIVE_MAXIMUM,
            inbox=PayloadQueue(max_bytes=LINK_QUEUE_BYTES),
        )
        self._published_chunks: dict[str, int] = {}
        # handled (their payloads dropped), acknowledged once their group is durable
        self._unsettled: list[Incoming] = []
        self._delivered: list[Delivery[UpdateManifest]] = []  # payloads of this group, released then

    def run(
        self, stop: threading.Event, tick_s: float = 0.5, alive: Callable[[], None] = lambda: None
    ) -> None:
        """Handle messages and timers until `stop`; `alive()` is called on every pass (systemd's watchdog)."""
        server = serve(self.config.metrics, self.metrics.registry)
        try:
            self.coordinator.start()  # its globals and schedules go out when the link connects
            self.settle()  # deliveries the spool completed before a restart
            self.link.start()
            next_tick = 0.0
            while not stop.is_set():
                alive()
                wait = SETTLE_WAIT_S if self._unsettled else tick_s
                self.process(self.link.take(wait, RECEIVE_MAXIMUM, max_bytes=HELD_BYTES))
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_s
                    self.tick(now)
        finally:
            self.link.stop()
            self.updates.reassembler.close()
            if server is not None:
                server.close()
            self.coordinator.close()

    def tick(self, now: float) -> None:
        """Timers: finalise or open rounds, drop stalled transfers (`now`: time.monotonic()), bring the metrics
        up to date. An open group settles first: a deadline finalises what is durable and folded, never from
        under updates staged in an uncommitted ledger batch."""
        if self._unsettled or self._delivered:
            self.settle()
        self.advance()
        for dropped in self.updates.expire(now):
            self.metrics.transfers_expired.inc()
            log.warning("dropped incomplete update transfer %s", dropped)
        self.admission.forget_gone(self.updates.held_bytes())
        self.metrics.rounds(self.coordinator)

    def advance(self) -> None:
        """Finalise what is complete or due, open the next round when possible, and publish the outcome."""
        out = self.coordinator.tick()
        self.publish(out)
        for model in out.globals:
            self.metrics.finalized(model.manifest.task)
        if out.globals or out.schedules:
            self.metrics.rounds(self.coordinator)

    def handle(self, item: Incoming | LinkEvent) -> None:
        """Handle one message or connection event and settle at once."""
        self.receive([item])
        self.settle()

    def process(self, items: list[Incoming | LinkEvent]) -> None:
        """Handle what one pass took, each item out of the list once handed over (its payload goes as it is
        handled); the group settles whenever it is full, and after the pass if the pass completed an update or
        nothing came."""
        idle = not items
        for item in _taking(items):
            self.receive([item])
            if self._group_full():
                self.settle()
        if self._settle_due(idle):
            self.settle()

    def receive(self, items: Iterable[Incoming | LinkEvent]) -> None:
        """Handle messages and connection events; they settle later. A handled message keeps only what its
        acknowledgement needs: its payload was spooled or applied."""
        for item in items:
            self._handle_one(item)
            if isinstance(item, Incoming):
                self._unsettled.append(item.without_payload())

    def _settle_due(self, idle: bool) -> bool:
        if not self._unsettled and not self.updates.recovered:
            return False
        return (
            idle or self._group_full() or (bool(self._delivered) and not self.updates.reassembler.unclaimed)
        )

    def _group_full(self) -> bool:
        """SYNC_BYTES of spooled or held chunks or HELD_BYTES of complete updates (whose payloads the group holds
        until it is folded) wait in the group: what bounds memory; or half the broker's window waits, and no
        one-chunk payload held in memory waits for its manifest (usually right behind it; the sync would spool
        it); or the whole window waits."""
        unsettled = len(self._unsettled)
        return (
            self.updates.reassembler.unsynced_bytes >= SYNC_BYTES
            or sum(delivery.manifest.transfer.size for delivery in self._delivered) >= HELD_BYTES
            or unsettled >= RECEIVE_MAXIMUM
            or (unsettled >= RECEIVE_MAXIMUM // 2 and not self.updates.reassembler.unclaimed)
        )

    def settle(self) -> None:
        """Make what the handled messages changed durable (spool, then the accepted updates: one commit), then
        send the accepted receipts, acknowledge the messages, fold the updates and finalise what they completed.
        An fsync that fails stops the service (nothing of the group acknowledged): its restart resumes from the
        spool's journals and the broker sends the group again."""
        for delivery in self.updates.recovered:  # complete before a restart
            self._deliver(delivery)
        self.updates.recovered = []
        receipts = self.coordinator.commit(sync=self.updates.sync)
        for failure in self.updates.reassembler.take_unspooled():  # its manifest will get a retry
            self._refuse(failure.transfer, f"the aggregator cannot spool updates now: {failure}")
        for device, receipt in receipts:
            self.send_receipt(device, receipt)
        if receipts:  # they leave now, not after the fold and finalisation below
            self.link.let_send()
        unsettled, self._unsettled = self._unsettled, []
        for message in unsettled:
            self.link.ack(message)
        delivered, self._delivered = self._delivered, []
        for delivery in delivered:
            self.updates.release(delivery)
        self.coordinator.fold_accepted()
        if receipts:
            self.advance()

    def _handle_one(self, item: Incoming | LinkEvent) -> None:
        """Handle one message or connection event; an error drops it with one log line, counted by topic kind."""
        if isinstance(item, LinkEvent):
            self.metrics.broker_connected.set(item.connected)
        with drop_on_error(log, item, lambda: self.metrics.dropped.labels(_kind_of(item)).inc()):
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
            # A fleet sends several events per update: counted in the metrics, logged only when a task failed.
            log.log(
                logging.WARNING if event.kind == "failed" else logging.DEBUG,
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
        try:
            delivery = self.updates.receive(
                ref.part,
                payload,
                ref.device,
                admit_manifest=lambda manifest: self._admit_manifest(manifest, ref),
                admit_chunk=lambda chunk: self._admit(chunk.transfer, ref.device, chunk.size) is None,
            )
        except SpoolError as exc:  # the spool file cannot be written: refuse the transfer, keep running
            self._refuse(exc.transfer, f"the aggregator cannot spool updates now: {exc}")
            return
        if delivery is not None:
            self._deliver(delivery)

    def _admit_manifest(self, manifest: UpdateManifest, ref: topics.TopicRef) -> bool:
        """Whether to keep a manifest: one that needs no transfer (refused, rejected, a duplicate) is answered."""
        receipt = self.coordinator.screen(manifest, ref.device, ref.task)
        if receipt is None and (
            refused := self._admit(manifest.transfer.id, ref.device, manifest.transfer.size)
        ):
            receipt = self._refusal(manifest, refused)
        if receipt is not None:
            self.send_receipt(ref.device, receipt)
        return receipt is None

    def _deliver(self, delivery: Delivery[UpdateManifest]) -> None:
        """A complete update: accepted into the coordinator's group, or answered now; its spool files are
        released once the group is durable."""
        self.admission.release(delivery.manifest.transfer.id)
        self._delivered.append(delivery)
        receipt = self.coordinator.accept_update(delivery.manifest, delivery.payload)
        if receipt is not None:
            self.send_receipt(delivery.manifest.device, receipt)

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
        """Send a receipt; one that cannot be sent is logged (the device sends its update again and gets a
        duplicate receipt)."""
        self.metrics.receipt(receipt)
        try:
            self.link.publish(topics.device(device, "receipts"), encode(receipt))
        except PublishError as exc:
            log.error("receipt of update %s for %s not sent: %s", receipt.update_id, device, exc)

    def publish(self, out: Outbound) -> None:
        """Publish retained state; what the link refuses is logged and goes out again on the next connect."""
        try:
            for model in out.globals:
                self.publish_global(model)
            for device, task in out.cleared_schedules:
                self.link.publish(topics.schedule(device, task), b"", retain=True)
            for schedule in out.schedules:
                self.link.publish(
                    topics.schedule(schedule.device, schedule.tasks[0].task), encode(schedule), retain=True
                )
        except PublishError as exc:
            log.error("retained state not published (again on the next connection): %s", exc)

    def publish_global(self, model: GlobalModel) -> None:
        """A version's retained chunks (whole, and as a delta when it has one), then its manifest; retained chunks
        that an earlier, longer transfer left (or a delta the version does not have) are cleared."""
        manifest = model.manifest
        whole, delta = topics.global_model(manifest.task), topics.global_delta(manifest.task)
        transfers = [(whole, manifest.transfer, model.payload)]
        if model.delta_payload is not None:
            transfers.append((delta, manifest.delta.transfer, model.delta_payload))
        for base, info, payload in transfers:
            self.link.publish_chunks(base, info, payload, retain=True)
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


def _kind_of(item: Incoming | LinkEvent) -> str:
    """A dropped item's kind for its metric label: its topic's kind, "link" or "unknown" (a bounded set: never a
    device or task name)."""
    if isinstance(item, LinkEvent):
        return "link"
    try:
        return topics.parse(item.topic).kind
    except ProtocolError:
        return "unknown"


def _check_sender(claimed: str, topic_device: str) -> None:
    if claimed != topic_device:
        raise ProtocolError(f"message names device {claimed} but arrived on {topic_device}'s topic")


def _taking(items: list[Incoming | LinkEvent]) -> Iterator[Incoming | LinkEvent]:
    """The items in order, each out of the list once handed out: a batch's payloads go as they are handled."""
    items.reverse()
    while items:
        yield items.pop()
