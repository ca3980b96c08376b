"""Chunked streaming of large payloads and their reassembly.

A payload is cut into `Chunk`s of `chunk_size` bytes (default 1 MiB), each carrying the transfer id, its index,
the chunk count and the whole payload's size and sha256. The `Reassembler` writes chunks at their offsets into a
spool file, so it holds O(chunk) memory (plus one byte per chunk of each pending transfer) whatever the number of
concurrent transfers. It tolerates duplicated and reordered chunks, rejects a payload whose sha256 does not
match, drops transfers that made no progress for `timeout_s` (deleting their spool files), and drops a transfer
whose spool file cannot be written (disk full) before re-raising the OSError.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.schemas import Chunk, TransferInfo

DEFAULT_CHUNK_SIZE = 1 << 20


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def transfer_info(transfer_id: str, payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> TransferInfo:
    """Describe how `payload` will be chunked."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    return TransferInfo(
        id=transfer_id,
        size=len(payload),
        sha256=sha256_hex(payload),
        chunk_size=chunk_size,
        chunks=max(1, math.ceil(len(payload) / chunk_size)),
    )


def split(payload: bytes, info: TransferInfo) -> Iterator[Chunk]:
    """The chunks of `payload` as described by `info` (an empty payload is one empty chunk)."""
    view = memoryview(payload)
    for index in range(info.chunks):
        start = index * info.chunk_size
        yield Chunk(
            transfer=info.id,
            index=index,
            total=info.chunks,
            chunk_size=info.chunk_size,
            size=info.size,
            sha256=info.sha256,
            data=bytes(view[start : start + info.chunk_size]),
        )


@dataclass(frozen=True)
class Assembled:
    """A complete payload whose sha256 was verified; the receiver owns the file at `path`."""

    transfer: str
    path: Path
    size: int
    sha256: str


@dataclass
class _Pending:
    total: int
    chunk_size: int
    size: int
    sha256: str
    path: Path
    received: bytearray  # one flag per chunk
    count: int = 0
    last_progress: float = 0.0


class Reassembler:
    """Collects chunks of many concurrent transfers into spool files under `spool_dir`.

    `add` returns the verified, complete payload once the last missing chunk arrives; the caller owns its file
    (move or delete it). Each completed transfer is reported once; its later duplicates are ignored. Spool files
    left by an earlier process (partial or complete but never claimed) are deleted at start.
    """

    def __init__(
        self,
        spool_dir: Path,
        *,
        timeout_s: float = 120.0,
        max_payload_bytes: int = 1 << 30,
        max_chunk_bytes: int = 16 << 20,
        remember_completed: int = 4096,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.spool_dir.glob("*.part"), *self.spool_dir.glob("*.done")]:
            stale.unlink()
        self.timeout_s = timeout_s
        self.max_payload_bytes = max_payload_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self._pending: dict[str, _Pending] = {}
        self._completed: dict[str, None] = {}  # insertion-ordered set, bounded
        self._remember = remember_completed

    @property
    def pending_transfers(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def pending_sizes(self) -> dict[str, int]:
        """Declared payload size of each pending transfer (what its spool file will hold)."""
        return {tid: pending.size for tid, pending in self._pending.items()}

    def add(self, chunk: Chunk, now: float | None = None) -> Assembled | None:
        """Store one chunk; return the complete payload when this chunk completes a transfer."""
        now = time.monotonic() if now is None else now
        if chunk.transfer in self._completed:
            return None
        self._check_chunk(chunk)
        pending = self._pending.get(chunk.transfer)
        if pending is None:
            pending = self._start(chunk, now)
        elif (chunk.total, chunk.chunk_size, chunk.size, chunk.sha256) != (
            pending.total,
            pending.chunk_size,
            pending.size,
            pending.sha256,
        ):
            raise ProtocolError(
                f"chunk {chunk.index} of transfer {chunk.transfer} disagrees with earlier chunks"
            )
        if pending.received[chunk.index]:
            return None
        try:
            with open(pending.path, "r+b") as f:
                f.seek(chunk.index * chunk.chunk_size)
                f.write(chunk.data)
        except OSError:
            self.discard(chunk.transfer)
            raise
        pending.received[chunk.index] = 1
        pending.count += 1
        pending.last_progress = now
        if pending.count < pending.total:
            return None
        return self._finish(chunk.transfer, pending)

    def discard(self, transfer_id: str) -> None:
        """Forget a pending transfer and delete its spool file."""
        pending = self._pending.pop(transfer_id, None)
        if pending is not None:
            pending.path.unlink(missing_ok=True)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop transfers with no new chunk for `timeout_s`; return their ids."""
        now = time.monotonic() if now is None else now
        stale = [tid for tid, p in self._pending.items() if now - p.last_progress > self.timeout_s]
        for tid in stale:
            self.discard(tid)
        return stale

    def _check_chunk(self, chunk: Chunk) -> None:
        if chunk.size > self.max_payload_bytes:
            raise ProtocolError(
                f"transfer {chunk.transfer}: {chunk.size} bytes exceeds {self.max_payload_bytes}"
            )
        if chunk.chunk_size > self.max_chunk_bytes:
            raise ProtocolError(
                f"transfer {chunk.transfer}: chunk size {chunk.chunk_size} exceeds {self.max_chunk_bytes}"
            )
        if chunk.total != max(1, math.ceil(chunk.size / chunk.chunk_size)):
            raise ProtocolError(
                f"transfer {chunk.transfer}: {chunk.total} chunks cannot hold {chunk.size} bytes"
            )
        if chunk.index >= chunk.total:
            raise ProtocolError(
                f"transfer {chunk.transfer}: chunk index {chunk.index} >= total {chunk.total}"
            )
        expected = min(chunk.chunk_size, chunk.size - chunk.index * chunk.chunk_size)
        if len(chunk.data) != expected:
            raise ProtocolError(
                f"transfer {chunk.transfer}: chunk {chunk.index} has {len(chunk.data)} bytes, expected {expected}"
            )

    def _start(self, chunk: Chunk, now: float) -> _Pending:
        path = self.spool_dir / f"{chunk.transfer}.part"
        try:
            with open(path, "wb") as f:
                f.truncate(chunk.size)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        pending = _Pending(
            chunk.total,
            chunk.chunk_size,
            chunk.size,
            chunk.sha256,
            path,
            bytearray(chunk.total),
            last_progress=now,
        )
        self._pending[chunk.transfer] = pending
        return pending

    def _finish(self, transfer_id: str, pending: _Pending) -> Assembled:
        del self._pending[transfer_id]
        if sha256_file(pending.path) != pending.sha256:
            pending.path.unlink(missing_ok=True)
            raise ProtocolError(f"transfer {transfer_id}: sha256 mismatch, payload rejected")
        self._completed[transfer_id] = None
        if len(self._completed) > self._remember:
            self._completed.pop(next(iter(self._completed)))
        done = pending.path.with_suffix(".done")
        os.replace(pending.path, done)
        return Assembled(transfer_id, done, pending.size, pending.sha256)
