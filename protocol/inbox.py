"""Pairs each transfer's manifest with its reassembled payload, whichever arrives first: the one place where a
transfer's messages (manifest or chunk, by topic) are decoded and dispatched."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import msgspec

from protocol.chunking import Assembled, Reassembler
from protocol.errors import ProtocolError
from protocol.schemas import Chunk, GlobalManifest, UpdateManifest, WholeTransfer, decode, encode

M = TypeVar("M", GlobalManifest, UpdateManifest)  # what a manifest carries: `.transfer`


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """A verified payload and the manifest that describes it; give it back with `TransferInbox.release` once
    handled (moved, linked, stored or rejected)."""

    manifest: M
    path: Path  # the payload's spool file, unless it is held in memory (`data`)
    owner: str = ""
    data: bytes | None = None  # the payload, when the reassembler holds it in memory (no spool file)

    @property
    def payload(self) -> Path | bytes:
        """The payload: its bytes where they are held in memory, else its spool file."""
        return self.path if self.data is None else self.data


def _accept(_: object) -> bool:
    return True


class TransferInbox(Generic[M]):
    """Chunks go to a spool-backed Reassembler; manifests wait (bounded in time) for their payload.

    With a durable reassembler, manifests still waiting at a `sync()` are kept in the spool as well, and a new
    inbox on the same folder resumes them: `recovered` holds the pairs complete at start.
    """

    def __init__(self, reassembler: Reassembler, manifest_type: type[M]) -> None:
        self.reassembler = reassembler
        self.manifest_type = manifest_type
        self._manifests: dict[str, tuple[M, float, str]] = {}  # transfer -> (manifest, since, owner)
        self._payloads: dict[str, tuple[Assembled, float]] = {}
        self._unkept: set[str] = set()  # waiting manifests not in the spool yet
        now = time.monotonic()
        for assembled in reassembler.recovered:
            self._payloads[assembled.transfer] = (assembled, now)
        reassembler.recovered = []
        self.recovered: list[Delivery[M]] = []
        if reassembler.durable:
            self._recover_manifests(now)

    def receive(
        self,
        part: str,
        payload: bytes,
        owner: str = "",
        *,
        admit_manifest: Callable[[M], bool] = _accept,
        admit_chunk: Callable[[Chunk], bool] = _accept,
    ) -> Delivery[M] | None:
        """One message of a transfer (`part`: "manifest", "chunk" or "whole", from its topic) sent by `owner`;
        the admit callables may turn a decoded manifest or chunk away (False) before it is kept."""
        if part == "manifest":
            manifest = decode(payload, self.manifest_type)
            return self.add_manifest(manifest, owner=owner) if admit_manifest(manifest) else None
        if part == "whole":
            return self._add_whole(decode(payload, WholeTransfer[self.manifest_type]), owner, admit_manifest)
        chunk = decode(payload, Chunk)
        return self.add_chunk(chunk, owner=owner) if admit_chunk(chunk) else None

    def _add_whole(
        self, whole: WholeTransfer[M], owner: str, admit_manifest: Callable[[M], bool]
    ) -> Delivery[M] | None:
        """A transfer of one chunk with its manifest: paired at once (the manifest's admission admits both)."""
        manifest, chunk = whole.manifest, whole.chunk
        if chunk.total != 1 or chunk.transfer != manifest.transfer.id:
            raise ProtocolError(
                f"a whole transfer carries one chunk of its own transfer, not {chunk.index + 1} of "
                f"{chunk.total} of {chunk.transfer} for {manifest.transfer.id}"
            )
        if not admit_manifest(manifest):
            return None
        assembled = self.reassembler.add(chunk, owner=owner)
        if assembled is None:
            return None  # a copy of a transfer assembled before: nothing to pair, nothing to keep
        self._manifests.pop(chunk.transfer, None)  # the same manifest, if it also came apart
        return self._pair(manifest, assembled, owner)

    def add_manifest(self, manifest: M, now: float | None = None, owner: str = "") -> Delivery[M] | None:
        now = time.monotonic() if now is None else now
        info = manifest.transfer
        ready = self._payloads.pop(info.id, None)
        if ready is not None:
            return self._pair(manifest, ready[0], owner)
        self._manifests[info.id] = (manifest, now, owner)
        if self.reassembler.durable:
            self._unkept.add(info.id)
        return None

    def add_chunk(self, chunk: Chunk, now: float | None = None, owner: str = "") -> Delivery[M] | None:
        now = time.monotonic() if now is None else now
        assembled = self.reassembler.add(chunk, now, owner)
        if assembled is None:
            return None
        waiting = self._manifests.pop(chunk.transfer, None)
        if waiting is None:
            self._payloads[chunk.transfer] = (assembled, now)
            return None
        return self._pair(waiting[0], assembled, waiting[2])

    def sync(self, paths: Iterable[Path] = ()) -> None:
        """Make what was received since the last call durable (a durable reassembler's spool), and the folders
        or files `paths` with it."""
        for transfer_id in self._unkept:
            if (waiting := self._manifests.get(transfer_id)) is not None:
                manifest, _, owner = waiting
                self.reassembler.keep(transfer_id, ".manifest", _kept.encode(_Kept(owner, encode(manifest))))
        self._unkept.clear()
        self.reassembler.sync(paths)

    def release(self, delivery: Delivery[M]) -> None:
        """A delivery was handled: delete its files from the spool."""
        self.reassembler.release(delivery.manifest.transfer.id)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop manifests and payloads left unpaired for the reassembler's timeout, and stale transfers."""
        now = time.monotonic() if now is None else now
        timeout = self.reassembler.timeout_s
        dropped = self.reassembler.expire(now)
        pending = set(self.reassembler.pending_ids())  # still making progress: the manifest keeps waiting
        for tid in [
            t for t, (_, ts, _) in self._manifests.items() if now - ts > timeout and t not in pending
        ]:
            del self._manifests[tid]
            self.reassembler.release(tid)
            dropped.append(tid)
        for tid in [t for t, (_, ts) in self._payloads.items() if now - ts > timeout]:
            del self._payloads[tid]
            self.reassembler.release(tid)
            dropped.append(tid)
        return dropped

    def discard(self, transfer_id: str) -> M | None:
        """Forget everything held for a transfer and delete its files; return its manifest if it was waiting."""
        self.reassembler.discard(transfer_id)
        self._payloads.pop(transfer_id, None)
        waiting = self._manifests.pop(transfer_id, None)
        self.reassembler.release(transfer_id)
        return None if waiting is None else waiting[0]

    def held_bytes(self) -> dict[str, int]:
        """Each transfer held right now (manifest waiting, partial or complete payload) and its declared size."""
        held = {tid: manifest.transfer.size for tid, (manifest, _, _) in self._manifests.items()}
        held.update(self.reassembler.pending_sizes())
        held.update({tid: assembled.size for tid, (assembled, _) in self._payloads.items()})
        return held

    def owners(self) -> dict[str, str]:
        """Who sent each transfer held right now (the owner its first message came with)."""
        owners = {tid: owner for tid, (_, _, owner) in self._manifests.items()}
        owners.update(self.reassembler.pending_owners())
        owners.update({tid: assembled.owner for tid, (assembled, _) in self._payloads.items()})
        return owners

    @property
    def waiting(self) -> int:
        """Manifests, payloads and partial transfers held right now."""
        return len(self._manifests) + len(self._payloads) + self.reassembler.pending_transfers

    def _pair(self, manifest: M, assembled: Assembled, owner: str) -> Delivery[M]:
        info = manifest.transfer
        if (assembled.size, assembled.sha256) != (info.size, info.sha256):
            self.reassembler.release(info.id)
            raise ProtocolError(f"transfer {info.id}: payload does not match its manifest (size or sha256)")
        self.reassembler.hand_over(info.id)
        return Delivery(
            manifest, assembled.path, owner or assembled.owner, data=self.reassembler.held(info.id)
        )

    def _recover_manifests(self, now: float) -> None:
        """Take up the manifests a previous process kept; pair those whose payload is complete."""
        for path in self.reassembler.kept_before(".manifest"):
            transfer_id = path.stem
            try:
                kept = _kept_decoder.decode(path.read_bytes())
                manifest = decode(kept.manifest, self.manifest_type)
                if manifest.transfer.id != transfer_id:
                    raise ProtocolError(f"{path.name} holds the manifest of transfer {manifest.transfer.id}")
                ready = self._payloads.pop(transfer_id, None)
                if ready is None:
                    self._manifests[transfer_id] = (manifest, now, kept.owner)
                else:
                    self.recovered.append(self._pair(manifest, ready[0], kept.owner))
            except (OSError, msgspec.DecodeError, ProtocolError):
                self.reassembler.discard(transfer_id)
                self._payloads.pop(transfer_id, None)
                self.reassembler.release(transfer_id)


class _Kept(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """A waiting manifest as the spool keeps it: who sent it and its bytes."""

    owner: str
    manifest: bytes


_kept = msgspec.msgpack.Encoder()
_kept_decoder = msgspec.msgpack.Decoder(_Kept)
