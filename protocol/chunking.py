"""Chunked streaming of large payloads and their reassembly.

A payload is cut into `Chunk`s of `chunk_size` bytes (default 1 MiB), each carrying the transfer id, its index,
the chunk count and the whole payload's size and sha256. The `Reassembler` writes each chunk at its offset into
a spool file as it arrives and hashes the payload in order on the way, on a thread of its own while the next
chunks arrive (a chunk that comes early is hashed from the spool once the gap before it is filled), so completing
a transfer costs no second read. It holds O(chunk) memory (plus one byte per chunk of each pending transfer)
whatever the number of concurrent transfers, tolerates duplicated and reordered chunks, rejects a payload whose
sha256 does not match, drops transfers that made no progress for `timeout_s` (deleting their spool files), and
drops a transfer whose spool file cannot be written (disk full) before raising `SpoolError`.

A `durable` reassembler (the aggregator's) keeps a journal per transfer (who sends it, its header, the chunks
written) next to its spool file; `sync()` makes everything written since the last call durable at once (the
files' fsyncs issued together), so a receiver may acknowledge the messages it spooled, and a new reassembler on
the same folder resumes every transfer from its journal. Meanwhile a thread writes each spool file's new chunks
to the disk behind the receiver (write-behind), so a sync finds little left to write. Journals are written at
`sync()`, and not at all for a transfer that completed and was handed over (`hand_over`) before it: a small
update costs one fsync of its payload. With `memory_bytes`, payloads that come in one chunk are held in memory
instead (`held`), up to that many bytes at once: no spool file unless a `sync()` finds one still unclaimed, when
it is written as a completed transfer with its journal (creating files is what a burst of small updates costs
most); one that cannot be written (disk full) is dropped and reported by `take_unspooled`. Without `durable`,
files left by an earlier process are deleted.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from protocol.errors import ProtocolError
from protocol.schemas import Chunk, TransferInfo

DEFAULT_CHUNK_SIZE = 1 << 20
_INDEX = struct.Struct("<I")  # a journal record: the index of one chunk written
_SYNC_THREADS = 8  # fsyncs issued at once: the file system commits them together
_HASH_AHEAD = 4  # chunks that may wait for the hashing thread (held in memory until hashed), of all transfers
_SUFFIXES = (".part", ".done", ".journal", ".manifest")  # a transfer's spool files


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (a short write, as a filling disk may give, is carried on until an error)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def describe_transfer(
    transfer_id: str, size: int, sha256: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> TransferInfo:
    """How a payload of `size` bytes with this sha256 will be chunked."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    return TransferInfo(
        id=transfer_id,
        size=size,
        sha256=sha256,
        chunk_size=chunk_size,
        chunks=max(1, math.ceil(size / chunk_size)),
    )


def transfer_info(
    transfer_id: str, payload: bytes | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> TransferInfo:
    """Describe how `payload` will be chunked."""
    return describe_transfer(transfer_id, len(payload), sha256_hex(payload), chunk_size)


def split(payload: bytes | memoryview, info: TransferInfo) -> Iterator[Chunk]:
    """The chunks of `payload` (bytes, or any buffer such as a memory map) as described by `info` (an empty
    payload is one empty chunk)."""
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


class SpoolError(OSError):
    """A chunk of `transfer` could not be spooled (disk full, I/O error); the transfer was dropped."""

    def __init__(self, transfer: str, cause: OSError) -> None:
        super().__init__(cause.errno, f"transfer {transfer}: {cause.strerror or cause}")
        self.transfer = transfer


@dataclass(frozen=True)
class Assembled:
    """A complete payload whose sha256 was verified; give it back with `Reassembler.release` once handled. `path`
    is its spool file, written only once a sync finds a payload held in memory (`Reassembler.held`) unclaimed."""

    transfer: str
    path: Path
    size: int
    sha256: str
    owner: str = ""


class _Header(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """What a journal says about its transfer, before the indices of the chunks written."""

    owner: str
    total: int
    chunk_size: int
    size: int
    sha256: str


@dataclass
class _Pending:
    header: _Header
    path: Path
    received: bytearray  # one flag per chunk
    hasher: hashlib._Hash
    hashed: int = 0  # the leading chunks handed to the hasher
    hashing: Future | None = None  # the hasher's last update, on the hashing thread
    count: int = 0
    last_progress: float = 0.0
    journaled: bool = False  # its journal exists (the header is written)
    unjournaled: list[int] = field(default_factory=list)  # chunks written since the last sync

    def chunk_bytes(self, index: int) -> int:
        return min(self.header.chunk_size, self.header.size - index * self.header.chunk_size)


class Reassembler:
    """Collects chunks of many concurrent transfers into spool files under `spool_dir`.

    `add` returns the verified, complete payload once the last missing chunk arrives; the caller gives it back
    with `release` (after moving or linking its file elsewhere). Each completed transfer is reported once; its
    later duplicates are ignored.
    """

    def __init__(
        self,
        spool_dir: Path,
        *,
        timeout_s: float = 120.0,
        max_payload_bytes: int = 1 << 30,
        max_chunk_bytes: int = 16 << 20,
        remember_completed: int = 4096,
        durable: bool = False,
        memory_bytes: int = 0,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.max_payload_bytes = max_payload_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.durable = durable
        self.memory_bytes = memory_bytes
        self._pending: dict[str, _Pending] = {}
        self._held: dict[str, tuple[_Header, bytes]] = {}  # complete one-chunk payloads in memory
        self.held_bytes = 0
        self._unspooled: list[SpoolError] = []  # held payloads a sync could not write, dropped
        self._completed: dict[str, None] = {}  # insertion-ordered set, bounded
        self._remember = remember_completed
        self._open: dict[str, dict[str, int]] = {}  # transfer -> its files written since the last sync
        self._completed_unjournaled: dict[
            str, _Pending
        ] = {}  # complete since the last sync, journal unwritten
        self._handed_over: set[str] = set()  # complete and taken by the receiver: no journal needed
        self._kept: dict[str, set[str]] = {}  # transfer -> suffixes of the files `keep` wrote
        self._pool: ThreadPoolExecutor | None = None
        self._hash_pool: ThreadPoolExecutor | None = None  # one thread: chunks are hashed in the order given
        self._hashing: deque[Future] = deque()  # its updates, oldest first
        self._flush_pool: ThreadPoolExecutor | None = None  # durable: one thread for the write-behind
        self._flushes: dict[str, Future] = {}  # transfer -> its spool file's flush, maybe running
        self.unsynced_bytes = 0  # chunk bytes written since the last sync
        self.recovered: list[Assembled] = []  # complete payloads found at start (durable), not yet claimed
        if durable:
            self._recover(time.monotonic())
        else:
            for stale in [*self.spool_dir.glob("*.part"), *self.spool_dir.glob("*.done")]:
                stale.unlink()

    @property
    def pending_transfers(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def pending_sizes(self) -> dict[str, int]:
        """Declared payload size of each pending transfer (what its spool file will hold)."""
        return {tid: pending.header.size for tid, pending in self._pending.items()}

    def pending_owners(self) -> dict[str, str]:
        """Who sends each pending transfer (the `owner` its first chunk came with)."""
        return {tid: pending.header.owner for tid, pending in self._pending.items()}

    def add(self, chunk: Chunk, now: float | None = None, owner: str = "") -> Assembled | None:
        """Store one chunk; return the complete payload when this chunk completes a transfer. `owner` (who sent
        the first chunk) is kept with the transfer."""
        now = time.monotonic() if now is None else now
        if chunk.transfer in self._completed:
            return None
        self._check_chunk(chunk)
        pending = self._pending.get(chunk.transfer)
        if (
            pending is None
            and chunk.total == 1
            and self.memory_bytes
            and self.held_bytes + chunk.size <= self.memory_bytes
        ):
            return self._hold(chunk, owner)
        if pending is None:
            pending = self._start(chunk, now, owner)
        elif (chunk.total, chunk.chunk_size, chunk.size, chunk.sha256) != (
            pending.header.total,
            pending.header.chunk_size,
            pending.header.size,
            pending.header.sha256,
        ):
            raise ProtocolError(
                f"chunk {chunk.index} of transfer {chunk.transfer} disagrees with earlier chunks"
            )
        if pending.received[chunk.index]:
            return None
        try:
            fd = self._file(chunk.transfer, ".part")
            write_all(fd, chunk.data, chunk.index * chunk.chunk_size)
            if self.durable:
                pending.unjournaled.append(chunk.index)
                self.unsynced_bytes += len(chunk.data)
                self._flush_behind(chunk.transfer, fd)
            pending.received[chunk.index] = 1
            pending.count += 1
            pending.last_progress = now
            self._hash_ready(pending, fd, chunk)
        except OSError as exc:
            self.discard(chunk.transfer)
            raise SpoolError(chunk.transfer, exc) from exc
        if pending.count < pending.header.total:
            self._written(chunk.transfer)
            return None
        return self._finish(chunk.transfer, pending)

    def sync(self, paths: Iterable[Path] = ()) -> None:
        """Make every chunk written since the last call durable, with its journal (durable mode: the journals
        written, then every file written and the folder, and the other `paths` given (folders, or files written
        elsewhere), fsynced at once); close the files."""
        if self.durable:
            for transfer_id in [t for t in self._held if t not in self._handed_over]:
                try:
                    self._spill(transfer_id)
                except OSError as exc:
                    self.release(transfer_id)
                    self._unspooled.append(SpoolError(transfer_id, exc))
            for transfer_id, pending in self._pending.items():
                if pending.unjournaled:
                    self._journal_chunks(transfer_id, pending)
            for transfer_id, pending in self._completed_unjournaled.items():
                if transfer_id not in self._handed_over:
                    self._journal_chunks(transfer_id, pending)
        self._completed_unjournaled.clear()
        self.unsynced_bytes = 0
        fds = [fd for opened in self._open.values() for fd in opened.values()]
        self._open.clear()
        flushes, self._flushes = list(self._flushes.values()), {}
        wait(flushes)  # every one, before its file is closed, even when one of them failed
        try:
            for flush in flushes:  # its error is the sync's: an fsync reports a write error only once
                flush.result()
            if self.durable:
                self._fsync_all(fds, [*paths, self.spool_dir] if fds else list(paths))
        finally:
            for fd in fds:
                os.close(fd)

    def hand_over(self, transfer_id: str) -> None:
        """A completed transfer is taken by the receiver, which makes it durable elsewhere (a link to its file,
        synced with `sync()`) before it acknowledges anything: its journal is not needed."""
        self._handed_over.add(transfer_id)

    @property
    def unclaimed(self) -> int:
        """Payloads held in memory that no receiver took yet: the next durable `sync()` writes them."""
        return len(self._held) - len(self._handed_over.intersection(self._held))

    def take_unspooled(self) -> list[SpoolError]:
        """The held payloads that a sync could not write since the last call (dropped: their senders must send
        them again)."""
        unspooled, self._unspooled = self._unspooled, []
        return unspooled

    def held(self, transfer_id: str) -> bytes | None:
        """The payload of a completed transfer while it is held in memory (its spool file is not written)."""
        held = self._held.get(transfer_id)
        return None if held is None else held[1]

    def keep(self, transfer_id: str, suffix: str, data: bytes) -> Path:
        """Write a small file that belongs to a transfer (a manifest waiting for its payload) into the spool; it
        is durable after the next `sync()` and deleted with the transfer."""
        os.write(self._file(transfer_id, suffix, truncate=True), data)
        self._written(transfer_id)
        self._kept.setdefault(transfer_id, set()).add(suffix)
        return self.spool_dir / f"{transfer_id}{suffix}"

    def kept_before(self, suffix: str) -> list[Path]:
        """The spool's files with `suffix`, which `keep` wrote before this process started; they go with their
        transfer, as the files `keep` writes now do."""
        paths = sorted(self.spool_dir.glob(f"*{suffix}"))
        for path in paths:
            self._kept.setdefault(path.stem, set()).add(suffix)
        return paths

    def release(self, transfer_id: str) -> None:
        """Forget a completed transfer whose payload was handled: delete its files (a link made elsewhere stays)."""
        self._close(transfer_id)
        self._handed_over.discard(transfer_id)
        self._completed_unjournaled.pop(transfer_id, None)
        kept = self._kept.pop(transfer_id, set())
        # held in memory all along, a payload has no spool files of its own, only those `keep` wrote
        held = self._drop_held(transfer_id) is not None
        for path in self._files(transfer_id, tuple(kept) if held else _SUFFIXES):
            path.unlink(missing_ok=True)

    def discard(self, transfer_id: str) -> None:
        """Forget a pending transfer and delete its spool files."""
        if self._pending.pop(transfer_id, None) is not None:
            self.release(transfer_id)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop transfers with no new chunk for `timeout_s`; return their ids."""
        now = time.monotonic() if now is None else now
        stale = [tid for tid, p in self._pending.items() if now - p.last_progress > self.timeout_s]
        for tid in stale:
            self.discard(tid)
        return stale

    def close(self) -> None:
        """Close the files still open and stop the sync threads (nothing is synced)."""
        for tid in list(self._open):
            self._close(tid)
        for pool in (self._pool, self._hash_pool, self._flush_pool):
            if pool is not None:
                pool.shutdown()
        self._pool = self._hash_pool = self._flush_pool = None

    # --- internals ---------------------------------------------------------------------------------------

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

    def _start(self, chunk: Chunk, now: float, owner: str) -> _Pending:
        header = _Header(owner, chunk.total, chunk.chunk_size, chunk.size, chunk.sha256)
        path = self.spool_dir / f"{chunk.transfer}.part"
        try:
            os.ftruncate(self._file(chunk.transfer, ".part", truncate=True), chunk.size)
        except OSError as exc:
            self.release(chunk.transfer)
            raise SpoolError(chunk.transfer, exc) from exc
        pending = _Pending(header, path, bytearray(chunk.total), hashlib.sha256(), last_progress=now)
        self._pending[chunk.transfer] = pending
        return pending

    def _hold(self, chunk: Chunk, owner: str) -> Assembled:
        """A payload that came whole in one small chunk: verified and held in memory."""
        if sha256_hex(chunk.data) != chunk.sha256:
            raise ProtocolError(f"transfer {chunk.transfer}: sha256 mismatch, payload rejected")
        header = _Header(owner, chunk.total, chunk.chunk_size, chunk.size, chunk.sha256)
        self._remember_completed(chunk.transfer)
        self._held[chunk.transfer] = (header, chunk.data)
        self.held_bytes += chunk.size
        if self.durable:
            self.unsynced_bytes += chunk.size
        return Assembled(chunk.transfer, self._done_path(chunk.transfer), chunk.size, chunk.sha256, owner)

    def _spill(self, transfer_id: str) -> None:
        """Write a held payload to the spool as a completed transfer with its journal (durable at the sync)."""
        header, data = self._drop_held(transfer_id)
        write_all(self._file(transfer_id, ".done", truncate=True), data, 0)
        self._journal(transfer_id, header, [0], first=True)

    def _drop_held(self, transfer_id: str) -> tuple[_Header, bytes] | None:
        held = self._held.pop(transfer_id, None)
        if held is not None:
            self.held_bytes -= held[0].size
        return held

    def _done_path(self, transfer_id: str) -> Path:
        return self.spool_dir / f"{transfer_id}.done"

    def _hash_ready(self, pending: _Pending, fd: int, chunk: Chunk) -> None:
        """Hash the payload up to the first chunk still missing: this chunk from memory when it is next in
        order, chunks that came early from the spool file."""
        if chunk.index == pending.hashed:
            self._hash(pending, chunk.data)
        while pending.hashed < pending.header.total and pending.received[pending.hashed]:
            index = pending.hashed
            size = pending.chunk_bytes(index)
            data = os.pread(fd, size, index * pending.header.chunk_size)
            if len(data) != size:
                raise OSError(f"spool file {pending.path.name} is shorter than its chunks")
            self._hash(pending, data)

    def _hash(self, pending: _Pending, data: bytes) -> None:
        """Add the next chunk to the transfer's sha256 on the hashing thread (hashlib lets go of the GIL: the next
        chunks are received and spooled meanwhile); no more than _HASH_AHEAD chunks wait for it."""
        while self._hashing and (self._hashing[0].done() or len(self._hashing) >= _HASH_AHEAD):
            self._hashing.popleft().result()
        self._hash_pool = self._hash_pool or ThreadPoolExecutor(1, thread_name_prefix="spool-hash")
        pending.hashing = self._hash_pool.submit(pending.hasher.update, data)
        self._hashing.append(pending.hashing)
        pending.hashed += 1

    def _flush_behind(self, transfer_id: str, fd: int) -> None:
        """Have the flush thread write the spool file's chunks to the disk (fdatasync) unless it still is: the
        next sync then waits for little. A flush that failed fails this chunk (its error is not seen again)."""
        flush = self._flushes.get(transfer_id)
        if flush is not None and not flush.done():
            return
        if flush is not None:
            flush.result()
        self._flush_pool = self._flush_pool or ThreadPoolExecutor(1, thread_name_prefix="spool-flush")
        self._flushes[transfer_id] = self._flush_pool.submit(os.fdatasync, fd)

    def _finish(self, transfer_id: str, pending: _Pending) -> Assembled:
        del self._pending[transfer_id]
        if pending.hashing is not None:
            pending.hashing.result()  # and every update before it: one thread takes them in order
        if pending.hasher.hexdigest() != pending.header.sha256:
            self.release(transfer_id)
            raise ProtocolError(f"transfer {transfer_id}: sha256 mismatch, payload rejected")
        self._remember_completed(transfer_id)
        done = self._done_path(transfer_id)
        os.replace(pending.path, done)
        if self.durable:
            self._completed_unjournaled[transfer_id] = pending
        self._written(transfer_id)
        return Assembled(transfer_id, done, pending.header.size, pending.header.sha256, pending.header.owner)

    def _journal_chunks(self, transfer_id: str, pending: _Pending) -> None:
        """Append the chunks a pending transfer wrote since the last sync to its journal."""
        self._journal(transfer_id, pending.header, pending.unjournaled, first=not pending.journaled)
        pending.journaled, pending.unjournaled = True, []

    def _journal(self, transfer_id: str, header: _Header, chunks: list[int], *, first: bool) -> None:
        """Append the indices of chunks written to a transfer's journal; the `first` record starts a new journal
        with the transfer's header."""
        records = b"".join(_INDEX.pack(index) for index in chunks)
        if first:
            encoded = _encoder.encode(header)
            records = _INDEX.pack(len(encoded)) + encoded + records
        os.write(self._file(transfer_id, ".journal", truncate=first), records)

    def _fsync_all(self, fds: list[int], paths: list[Path]) -> None:
        """fsync the open files (their data) and `paths` (folders: their entries; files) at once: the file system
        commits them together."""
        path_fds = [os.open(path, os.O_RDONLY) for path in dict.fromkeys(paths)]
        try:
            jobs = [(os.fdatasync, fd) for fd in fds] + [(os.fsync, fd) for fd in path_fds]
            if len(jobs) <= 2:
                for sync, fd in jobs:
                    sync(fd)
            else:
                self._pool = self._pool or ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="spool-sync")
                for future in [self._pool.submit(sync, fd) for sync, fd in jobs]:
                    future.result()
        finally:
            for fd in path_fds:
                os.close(fd)

    def _remember_completed(self, transfer_id: str) -> None:
        self._completed[transfer_id] = None
        if len(self._completed) > self._remember:
            self._completed.pop(next(iter(self._completed)))

    def _files(self, transfer_id: str, suffixes: tuple[str, ...]) -> list[Path]:
        return [self.spool_dir / f"{transfer_id}{suffix}" for suffix in suffixes]

    def _file(self, transfer_id: str, suffix: str, truncate: bool = False) -> int:
        """An open file descriptor of one of a transfer's spool files, kept (in `_open`) until the next sync;
        journals are appended to."""
        opened = self._open.setdefault(transfer_id, {})
        fd = opened.get(suffix)
        if fd is None:
            flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if suffix == ".journal" else 0)
            fd = opened[suffix] = os.open(self.spool_dir / f"{transfer_id}{suffix}", flags, 0o600)
        if truncate:
            os.ftruncate(fd, 0)
        return fd

    def _written(self, transfer_id: str) -> None:
        """Files of a non-durable reassembler need no sync: close them now."""
        if not self.durable:
            self._close(transfer_id)

    def _close(self, transfer_id: str) -> None:
        flush = self._flushes.pop(transfer_id, None)
        if flush is not None:
            wait([flush])  # the transfer is dropped or handled: its flush's outcome no longer matters
        for fd in self._open.pop(transfer_id, {}).values():
            os.close(fd)

    def _recover(self, now: float) -> None:
        """Resume the transfers whose journals a previous process left; delete spool files without one."""
        journaled = set()
        for journal in sorted(self.spool_dir.glob("*.journal")):
            transfer_id = journal.stem
            journaled.add(transfer_id)
            try:
                self._resume(transfer_id, journal.read_bytes(), now)
            except (OSError, ValueError, struct.error, msgspec.DecodeError, ProtocolError):
                self._pending.pop(transfer_id, None)
                self.release(transfer_id)
                journaled.discard(transfer_id)
        for path in [*self.spool_dir.glob("*.part"), *self.spool_dir.glob("*.done")]:
            if path.stem not in journaled:
                path.unlink()
        self.close()

    def _resume(self, transfer_id: str, journal: bytes, now: float) -> None:
        (length,) = _INDEX.unpack_from(journal)
        header = msgspec.msgpack.decode(journal[_INDEX.size : _INDEX.size + length], type=_Header)
        done = self._done_path(transfer_id)
        if done.exists():  # complete and verified before the restart; verified again, as the disk kept it
            if sha256_file(done) != header.sha256 or done.stat().st_size != header.size:
                raise ProtocolError(f"recovered transfer {transfer_id} does not match its journal")
            self._remember_completed(transfer_id)
            self.recovered.append(Assembled(transfer_id, done, header.size, header.sha256, header.owner))
            return
        path = self.spool_dir / f"{transfer_id}.part"
        if path.stat().st_size != header.size:
            raise ProtocolError(f"spool file of {transfer_id} has the wrong size")
        pending = _Pending(
            header, path, bytearray(header.total), hashlib.sha256(), last_progress=now, journaled=True
        )
        records = journal[_INDEX.size + length :]
        for (index,) in _INDEX.iter_unpack(records[: len(records) - len(records) % _INDEX.size]):
            if index < header.total and not pending.received[index]:
                pending.received[index] = 1
                pending.count += 1
        with open(path, "rb") as f:
            while pending.hashed < header.total and pending.received[pending.hashed]:
                pending.hasher.update(f.read(pending.chunk_bytes(pending.hashed)))
                pending.hashed += 1
        self._pending[transfer_id] = pending
        if (
            pending.count == header.total
        ):  # its last chunk was written, and the process stopped before it moved
            self.recovered.append(self._finish(transfer_id, pending))


_encoder = msgspec.msgpack.Encoder()
