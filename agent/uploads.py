"""Updates on their way to the aggregator: each one in the outbox is sent, and sent again until a receipt settles it.

A payload is read once, memory-mapped, and streamed as chunks; its size and sha256 come with it from the worker
that wrote it (the manifest in the outbox), so the agent never reads its own update twice.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.outbox import Outbox, Pending
from protocol.schemas import Receipt, UpdateManifest
from protocol.transport import MqttLink, PublishError

log = logging.getLogger(__name__)
#: how soon an update the link did not take is sent again
REPUBLISH_S = 5.0


@dataclass(frozen=True)
class Settled:
    """What a receipt did to an update of the outbox: `done` (accepted, duplicate or rejected: it left the
    outbox) or not (retry: sent again later, as another transfer); `upload_s`: first send to this receipt."""

    manifest: UpdateManifest
    done: bool
    upload_s: float | None


class Uploads:
    def __init__(
        self, link: MqttLink, outbox: Outbox, device: str, *, receipt_timeout_s: float, retry_after_s: float
    ) -> None:
        self.link, self.outbox, self.device = link, outbox, device
        self.receipt_timeout_s, self.retry_after_s = receipt_timeout_s, retry_after_s
        self._send_at: dict[str, float] = {}  # update id -> when to send it (again) unless a receipt came
        self._first_sent_at: dict[str, float] = {}
        self._held: list[Pending] = []

    def send(self, pending: Pending) -> bool:
        """Publish an update's transfer; it goes again after the receipt timeout unless a receipt settles it.
        False: the link did not take it (logged; it goes again in REPUBLISH_S)."""
        manifest = pending.manifest
        now = time.monotonic()
        try:
            self.link.publish_update(self.device, manifest, _mapped(pending.payload_path))
        except PublishError as exc:
            log.warning(
                "update %s for %s not sent (%s); again in %.0f s",
                manifest.update_id,
                manifest.task,
                exc,
                REPUBLISH_S,
            )
            self._send_at[manifest.update_id] = now + REPUBLISH_S
            return False
        self._send_at[manifest.update_id] = now + self.receipt_timeout_s
        self._first_sent_at.setdefault(manifest.update_id, now)
        return True

    def hold(self, pending: Pending) -> None:
        """Keep an update of the outbox unsent until `release_held` hands it back (the naive upload order); a new
        connection or a restart sends it anyway."""
        self._send_at[pending.manifest.update_id] = math.inf
        self._held.append(pending)

    def release_held(self) -> list[Pending]:
        """The updates held since the last call, for the caller to `send`."""
        held, self._held = self._held, []
        return held

    def due(self, waiting: list[Pending], now: float) -> list[Pending]:
        """Those of the outbox's `waiting` updates whose time to be sent (again) has come (`now`: monotonic)."""
        return [p for p in waiting if now >= self._send_at.get(p.manifest.update_id, 0.0)]

    def send_all_again(self) -> None:
        """Send every update of the outbox at the next chance (a new connection: earlier sends may be lost)."""
        self._send_at.clear()

    def settle(self, receipt: Receipt) -> Settled | None:
        """Apply the aggregator's receipt to the update it answers (None: no such update waits)."""
        pending = self.outbox.get(receipt.update_id)
        if pending is None:
            return None
        if receipt.status == "retry":  # its transfer stays refused there; the update goes as a new one
            self.outbox.renew_transfer(pending)
            self._send_at[receipt.update_id] = time.monotonic() + self.retry_after_s
            return Settled(pending.manifest, done=False, upload_s=None)
        self.outbox.remove(receipt.update_id)
        self._send_at.pop(receipt.update_id, None)
        sent = self._first_sent_at.pop(receipt.update_id, None)
        return Settled(
            pending.manifest, done=True, upload_s=None if sent is None else time.monotonic() - sent
        )


def _mapped(path: Path) -> mmap.mmap | bytes:
    """A file's bytes as a read-only memory map (unmapped when dropped): chunks are copied from the page cache."""
    with open(path, "rb") as file:
        if not os.fstat(file.fileno()).st_size:
            return b""
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
