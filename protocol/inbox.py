"""Pairs each transfer's manifest with its reassembled payload, whichever arrives first."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from protocol.chunking import Assembled, Reassembler
from protocol.errors import ProtocolError
from protocol.schemas import Chunk, TransferInfo

M = TypeVar("M")


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """A verified payload file and the manifest that describes it. The receiver owns the file."""

    manifest: M
    path: Path


class TransferInbox(Generic[M]):
    """Chunks go to a spool-backed Reassembler; manifests wait (bounded in time) for their payload."""

    def __init__(self, reassembler: Reassembler, transfer_of: Callable[[M], TransferInfo]) -> None:
        self.reassembler = reassembler
        self._transfer_of = transfer_of
        self._manifests: dict[str, tuple[M, float]] = {}
        self._payloads: dict[str, tuple[Assembled, float]] = {}

    def add_manifest(self, manifest: M, now: float | None = None) -> Delivery[M] | None:
        now = time.monotonic() if now is None else now
        info = self._transfer_of(manifest)
        ready = self._payloads.pop(info.id, None)
        if ready is None:
            self._manifests[info.id] = (manifest, now)
            return None
        return self._pair(manifest, ready[0])

    def add_chunk(self, chunk: Chunk, now: float | None = None) -> Delivery[M] | None:
        now = time.monotonic() if now is None else now
        assembled = self.reassembler.add(chunk, now)
        if assembled is None:
            return None
        waiting = self._manifests.pop(chunk.transfer, None)
        if waiting is None:
            self._payloads[chunk.transfer] = (assembled, now)
            return None
        return self._pair(waiting[0], assembled)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop manifests and payloads left unpaired for the reassembler's timeout, and stale transfers."""
        now = time.monotonic() if now is None else now
        timeout = self.reassembler.timeout_s
        dropped = self.reassembler.expire(now)
        pending = set(self.reassembler.pending_ids())  # still making progress: the manifest keeps waiting
        for tid in [t for t, (_, ts) in self._manifests.items() if now - ts > timeout and t not in pending]:
            del self._manifests[tid]
            dropped.append(tid)
        for tid in [t for t, (_, ts) in self._payloads.items() if now - ts > timeout]:
            self._payloads.pop(tid)[0].path.unlink(missing_ok=True)
            dropped.append(tid)
        return dropped

    def discard(self, transfer_id: str) -> M | None:
        """Forget everything held for a transfer and delete its files; return its manifest if it was waiting."""
        self.reassembler.discard(transfer_id)
        payload = self._payloads.pop(transfer_id, None)
        if payload is not None:
            payload[0].path.unlink(missing_ok=True)
        waiting = self._manifests.pop(transfer_id, None)
        return None if waiting is None else waiting[0]

    def held_bytes(self) -> dict[str, int]:
        """Each transfer held right now (manifest waiting, partial or complete payload) and its declared size."""
        held = {tid: self._transfer_of(manifest).size for tid, (manifest, _) in self._manifests.items()}
        held.update(self.reassembler.pending_sizes())
        held.update({tid: assembled.size for tid, (assembled, _) in self._payloads.items()})
        return held

    @property
    def waiting(self) -> int:
        """Manifests, payloads and partial transfers held right now."""
        return len(self._manifests) + len(self._payloads) + self.reassembler.pending_transfers

    def _pair(self, manifest: M, assembled: Assembled) -> Delivery[M]:
        info = self._transfer_of(manifest)
        if (assembled.size, assembled.sha256) != (info.size, info.sha256):
            assembled.path.unlink(missing_ok=True)
            raise ProtocolError(f"transfer {info.id}: payload does not match its manifest (size or sha256)")
        return Delivery(manifest, assembled.path)
