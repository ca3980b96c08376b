"""Chunked transfers: split() + Reassembler under reordering, duplication, loss, corruption and abuse."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from msgspec.structs import replace

from protocol import ProtocolError
from protocol.chunking import Reassembler, sha256_file, sha256_hex, split, transfer_info

CS = 64  # small chunk size keeps multi-chunk payloads tiny


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def chunks_of(data: bytes, chunk_size: int = CS, tid: str = "t1"):
    return list(split(data, transfer_info(tid, data, chunk_size)))


def feed(reassembler: Reassembler, chunks, now: float = 0.0) -> list[tuple[int, object]]:
    """Add chunks in order; return (position, result) for every non-None result."""
    results = [(i, reassembler.add(c, now=now)) for i, c in enumerate(chunks)]
    return [(i, r) for i, r in results if r is not None]


def spool_files(reassembler: Reassembler) -> list[str]:
    return sorted(p.name for p in reassembler.spool_dir.iterdir())


@pytest.fixture
def reasm(tmp_path):
    return Reassembler(tmp_path / "spool", timeout_s=60.0)


# --- split ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, chunks", [(0, 1), (1, 1), (CS - 1, 1), (CS, 1), (CS + 1, 2), (5 * CS, 5), (5 * CS + 3, 6)]
)
def test_transfer_info_and_split_cut_payload_into_ceil_size_over_chunk_size(size, chunks):
    data = payload(size)
    info = transfer_info("t1", data, CS)
    assert (info.id, info.size, info.chunk_size, info.chunks) == ("t1", size, CS, chunks)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    parts = list(split(data, info))
    assert [c.index for c in parts] == list(range(chunks))
    assert b"".join(c.data for c in parts) == data
    assert all(len(c.data) == CS for c in parts[:-1])
    assert all(
        (c.transfer, c.total, c.chunk_size, c.size, c.sha256) == ("t1", chunks, CS, size, info.sha256)
        for c in parts
    )


def test_transfer_info_rejects_non_positive_chunk_size():
    with pytest.raises(ValueError):
        transfer_info("t1", b"abc", 0)


def test_sha256_helpers_agree_with_hashlib(tmp_path):
    data = payload(3 << 20, seed=1)  # more than one read block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_hex(data) == sha256_file(path) == hashlib.sha256(data).hexdigest()


# --- reassembly ----------------------------------------------------------------------------------------

ORDERS = {
    "in-order": lambda cs: cs,
    "reversed": lambda cs: cs[::-1],
    "shuffled-1": lambda cs: random.Random(1).sample(cs, len(cs)),
    "shuffled-2": lambda cs: random.Random(2).sample(cs, len(cs)),
    "last-first": lambda cs: cs[-1:] + cs[:-1],
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("size", [0, 1, CS, CS + 1, 7 * CS + 5])
def test_reassembly_in_any_order_yields_identical_verified_file_once(reasm, size, order):
    data = payload(size, seed=size)
    chunks = ORDERS[order](chunks_of(data))
    results = feed(reasm, chunks)
    assert [i for i, _ in results] == [len(chunks) - 1]  # reported by the completing chunk, exactly once
    done = results[0][1]
    assert done.transfer == "t1"
    assert done.size == size
    assert done.sha256 == hashlib.sha256(data).hexdigest()
    assert done.path.read_bytes() == data
    assert done.path.parent == reasm.spool_dir
    assert reasm.pending_transfers == 0 and reasm.pending_ids() == []
    assert not list(reasm.spool_dir.glob("*.part"))


def test_several_mib_with_small_chunks_shuffled(reasm):
    data = payload((3 << 20) + 123, seed=7)
    chunks = chunks_of(data, chunk_size=8192)
    assert len(chunks) == 385
    random.Random(3).shuffle(chunks)
    results = feed(reasm, chunks)
    assert len(results) == 1
    assert sha256_file(results[0][1].path) == hashlib.sha256(data).hexdigest()
    assert results[0][1].path.read_bytes() == data


@pytest.mark.parametrize(
    "arrange",
    [lambda cs: [c for c in cs for _ in range(2)], lambda cs: cs + cs, lambda cs: cs[::-1] + cs],
    ids=["each-twice-adjacent", "whole-sequence-twice", "reversed-then-forward"],
)
def test_duplicated_chunks_complete_once_and_later_duplicates_return_none(reasm, arrange):
    data = payload(5 * CS + 9, seed=5)
    chunks = chunks_of(data)
    sequence = arrange(chunks)
    results = feed(reasm, sequence)
    assert len(results) == 1
    assert results[0][1].path.read_bytes() == data
    # the chunk that completed it is the first position by which every index had been seen
    seen, first_complete = set(), None
    for i, c in enumerate(sequence):
        seen.add(c.index)
        if len(seen) == len(chunks) and first_complete is None:
            first_complete = i
    assert results[0][0] == first_complete
    # a completed transfer stays completed: re-sending everything changes nothing
    assert feed(reasm, chunks) == []
    assert reasm.pending_transfers == 0
    assert spool_files(reasm) == [results[0][1].path.name]


def test_duplicate_of_pending_chunk_does_not_count_towards_completion(reasm):
    chunks = chunks_of(payload(3 * CS, seed=2))
    assert reasm.add(chunks[0], now=0) is None
    assert reasm.add(chunks[0], now=0) is None
    assert reasm.add(chunks[1], now=0) is None
    assert reasm.pending_transfers == 1
    assert reasm.add(chunks[2], now=0) is not None


def test_many_interleaved_transfers_complete_independently(reasm):
    datas = {f"upd-{i}": payload(i * 37 + (i % 3) * CS, seed=i) for i in range(25)}
    all_chunks = [c for tid, data in datas.items() for c in chunks_of(data, tid=tid)]
    random.Random(11).shuffle(all_chunks)
    done = {}
    for c in all_chunks:
        result = reasm.add(c, now=0)
        if result is not None:
            assert result.transfer not in done
            done[result.transfer] = result
    assert set(done) == set(datas)
    for tid, result in done.items():
        assert result.path.read_bytes() == datas[tid]
        assert result.sha256 == hashlib.sha256(datas[tid]).hexdigest()
    assert len({r.path for r in done.values()}) == len(datas)
    assert reasm.pending_transfers == 0


def test_pending_transfers_counts_incomplete_transfers(reasm):
    a, b = chunks_of(payload(2 * CS), tid="a"), chunks_of(payload(2 * CS, seed=1), tid="b")
    reasm.add(a[0], now=0)
    reasm.add(b[0], now=0)
    assert reasm.pending_transfers == 2 and sorted(reasm.pending_ids()) == ["a", "b"]
    reasm.add(a[1], now=0)
    assert reasm.pending_ids() == ["b"]


# --- loss and expiry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [0, 3, 5])
def test_lost_chunk_never_completes_and_expire_reclaims_spool(reasm, missing):
    chunks = chunks_of(payload(5 * CS + 1))
    assert len(chunks) == 6
    assert feed(reasm, [c for c in chunks if c.index != missing], now=10.0) == []
    assert reasm.pending_ids() == ["t1"]
    assert len(list(reasm.spool_dir.glob("*.part"))) == 1
    assert reasm.expire(now=10.0 + 59.0) == []  # before the timeout: kept
    assert reasm.pending_ids() == ["t1"]
    assert reasm.expire(now=10.0 + 61.0) == ["t1"]
    assert reasm.pending_transfers == 0
    assert spool_files(reasm) == []
    assert reasm.expire(now=1000.0) == []


def test_expiry_is_measured_from_last_progress_not_first_chunk(reasm):
    chunks = chunks_of(payload(4 * CS))
    reasm.add(chunks[0], now=0.0)
    reasm.add(chunks[1], now=50.0)
    reasm.add(chunks[2], now=100.0)
    assert reasm.expire(now=150.0) == []
    assert reasm.add(chunks[3], now=150.0) is not None


def test_duplicates_do_not_count_as_progress(reasm):
    chunks = chunks_of(payload(3 * CS))
    reasm.add(chunks[0], now=0.0)
    reasm.add(chunks[0], now=50.0)
    assert reasm.expire(now=61.0) == ["t1"]


def test_late_chunk_after_expiry_does_not_complete_old_transfer(reasm):
    chunks = chunks_of(payload(3 * CS))
    feed(reasm, chunks[:2], now=0.0)
    assert reasm.expire(now=100.0) == ["t1"]
    assert reasm.add(chunks[2], now=101.0) is None
    assert reasm.pending_ids() == ["t1"]


def test_discard_deletes_spool_file_and_ignores_unknown_ids(reasm):
    chunks = chunks_of(payload(2 * CS))
    reasm.add(chunks[0], now=0)
    reasm.discard("t1")
    reasm.discard("never-seen")
    assert reasm.pending_transfers == 0
    assert spool_files(reasm) == []


def test_new_reassembler_deletes_stale_part_files_and_unclaimed_payloads(tmp_path):
    """A payload still in the spool was never claimed (a claimed one is moved out): an orphan after a restart."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in ("old1.part", "old2.part"):
        (spool / name).write_bytes(b"partial")
    (spool / "orphan.done").write_bytes(b"complete, never paired with its manifest")
    (spool / "notes.txt").write_text("unrelated")
    Reassembler(spool)
    assert sorted(p.name for p in spool.iterdir()) == ["notes.txt"]


def test_reassembler_creates_missing_spool_dir(tmp_path):
    reasm = Reassembler(tmp_path / "a" / "b")
    assert reasm.spool_dir.is_dir()
    assert len(feed(reasm, chunks_of(b"x"))) == 1


# --- corruption and inconsistent headers ---------------------------------------------------------------


def flip(chunk, position: int = 0):
    data = bytearray(chunk.data)
    data[position] ^= 0x01
    return replace(chunk, data=bytes(data))


@pytest.mark.parametrize("bad_index", [0, 2, 4])
def test_corrupted_chunk_fails_sha256_on_completion_and_leaves_no_file(reasm, bad_index):
    data = payload(4 * CS + 10, seed=9)
    chunks = chunks_of(data)
    chunks[bad_index] = flip(chunks[bad_index], position=len(chunks[bad_index].data) - 1)
    for c in chunks[:-1]:
        assert reasm.add(c, now=0) is None
    with pytest.raises(ProtocolError, match="sha256"):
        reasm.add(chunks[-1], now=0)
    assert reasm.pending_transfers == 0
    assert spool_files(reasm) == []
    # the transfer is not blacklisted: a clean retransmission succeeds
    results = feed(reasm, chunks_of(data))
    assert len(results) == 1 and results[0][1].path.read_bytes() == data


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda data: chunks_of(payload(len(data), seed=99)), id="other-sha256"),
        pytest.param(lambda data: chunks_of(data + b"x"), id="other-size"),
        pytest.param(lambda data: chunks_of(data, chunk_size=CS // 2), id="other-chunk-size-and-total"),
    ],
)
def test_chunk_disagreeing_with_earlier_chunks_is_rejected_and_not_written(reasm, other):
    data = payload(4 * CS, seed=4)
    good = chunks_of(data)
    intruder = other(data)[1]
    reasm.add(good[0], now=0)
    with pytest.raises(ProtocolError, match="disagrees"):
        reasm.add(intruder, now=0)
    assert reasm.pending_ids() == ["t1"]
    results = feed(reasm, good[1:])
    assert len(results) == 1
    assert results[0][1].path.read_bytes() == data


def test_header_only_disagreement_in_sha256_is_rejected(reasm):
    good = chunks_of(payload(3 * CS))
    reasm.add(good[0], now=0)
    with pytest.raises(ProtocolError):
        reasm.add(replace(good[1], sha256="0" * 64), now=0)


def _multi() -> list:
    return chunks_of(payload(3 * CS + 5, seed=3))  # 4 chunks, last one 5 bytes


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: replace(_multi()[0], index=4), id="index-equals-total"),
        pytest.param(lambda: replace(_multi()[0], index=1000), id="index-far-beyond"),
        pytest.param(  # a plausible byte count (0) must not let an out-of-range index count towards completion
            lambda: replace(chunks_of(payload(2 * CS))[0], index=2, data=b""),
            id="index-equals-total-empty-data",
        ),
        pytest.param(lambda: replace(_multi()[0], data=_multi()[0].data[:-1]), id="short-data"),
        pytest.param(lambda: replace(_multi()[0], data=_multi()[0].data + b"\0"), id="long-data"),
        pytest.param(lambda: replace(_multi()[3], data=_multi()[3].data + b"\0"), id="long-last-chunk"),
        pytest.param(lambda: replace(_multi()[3], data=b""), id="empty-last-chunk"),
        pytest.param(lambda: replace(_multi()[0], total=5), id="total-too-large"),
        pytest.param(lambda: replace(_multi()[0], total=1), id="total-too-small"),
        pytest.param(lambda: replace(_multi()[0], size=10 * CS), id="size-vs-total"),
        pytest.param(lambda: replace(_multi()[0], chunk_size=CS * 2), id="chunk-size-vs-total"),
        pytest.param(lambda: replace(chunks_of(b"")[0], data=b"x"), id="empty-payload-with-data"),
    ],
)
def test_inconsistent_chunk_is_rejected_and_nothing_stored(reasm, bad):
    with pytest.raises(ProtocolError):
        reasm.add(bad(), now=0)
    assert reasm.pending_transfers == 0
    assert spool_files(reasm) == []


def test_payload_above_max_payload_bytes_is_rejected_before_storing(tmp_path):
    reasm = Reassembler(tmp_path, max_payload_bytes=10 * CS)
    with pytest.raises(ProtocolError):
        reasm.add(chunks_of(payload(10 * CS + 1))[0], now=0)
    assert reasm.pending_transfers == 0 and list(tmp_path.iterdir()) == []
    # an absurd claimed size must not create a huge (sparse) spool file either
    with pytest.raises(ProtocolError):
        reasm.add(replace(chunks_of(payload(CS))[0], size=1 << 40, total=(1 << 40) // CS), now=0)
    assert list(tmp_path.iterdir()) == []
    assert len(feed(reasm, chunks_of(payload(10 * CS), tid="at-limit"))) == 1


def test_chunk_size_above_max_chunk_bytes_is_rejected_before_storing(tmp_path):
    reasm = Reassembler(tmp_path, max_chunk_bytes=CS)
    with pytest.raises(ProtocolError):
        reasm.add(chunks_of(payload(3 * CS), chunk_size=CS + 1)[0], now=0)
    assert reasm.pending_transfers == 0 and list(tmp_path.iterdir()) == []
    assert len(feed(reasm, chunks_of(payload(3 * CS), chunk_size=CS, tid="at-limit"))) == 1


# --- the durable spool (the aggregator's) ------------------------------------------------------------------


def durable(spool) -> Reassembler:
    return Reassembler(spool, timeout_s=60.0, durable=True)


def test_synced_chunks_survive_a_restart_and_the_transfer_completes_after_it(tmp_path):
    data = payload(7 * CS + 5, seed=11)
    chunks = chunks_of(data)
    first = durable(tmp_path)
    assert feed(first, chunks[:3], now=0.0) == []
    first.sync()
    first.add(chunks[3], now=0.0)  # written but never synced: the sender still holds it (not acknowledged)

    resumed = durable(tmp_path)  # the process restarted
    assert resumed.pending_ids() == ["t1"] and resumed.pending_owners() == {"t1": ""}
    results = feed(resumed, chunks[:3] + chunks[3:])  # the broker sends what was not acknowledged again
    assert [i for i, _ in results] == [len(chunks) - 1]
    assert (
        results[0][1].path.read_bytes() == data and results[0][1].sha256 == hashlib.sha256(data).hexdigest()
    )


def test_unsynced_chunks_are_not_taken_up_after_a_restart(tmp_path):
    chunks = chunks_of(payload(4 * CS))
    first = durable(tmp_path)
    feed(first, chunks[:2])
    first.close()
    resumed = durable(tmp_path)
    assert resumed.pending_ids() == [] and spool_files(resumed) == []


def test_a_payload_complete_before_a_restart_is_recovered_with_its_owner(tmp_path):
    data = payload(3 * CS, seed=2)
    first = durable(tmp_path)
    for chunk in chunks_of(data):
        done = first.add(chunk, now=0.0, owner="dev1")
    first.sync()  # complete, its manifest not come: it stays in the spool, journaled
    resumed = durable(tmp_path)
    (recovered,) = resumed.recovered
    assert (recovered.transfer, recovered.owner, recovered.path) == ("t1", "dev1", done.path)
    assert recovered.path.read_bytes() == data
    assert feed(resumed, chunks_of(data)) == [], "a late duplicate of a recovered transfer starts nothing"


def test_a_transfer_handed_over_before_the_sync_leaves_no_journal(tmp_path):
    spool = durable(tmp_path)
    ((_, done),) = feed(spool, chunks_of(payload(CS + 1)))
    spool.hand_over("t1")
    spool.sync()
    assert spool_files(spool) == ["t1.done"]
    spool.release("t1")
    assert spool_files(spool) == []


def test_a_torn_journal_tail_is_ignored_and_a_broken_journal_drops_its_transfer(tmp_path):
    chunks = chunks_of(payload(5 * CS, seed=4))
    first = durable(tmp_path)
    feed(first, chunks[:2])
    first.sync()
    journal = tmp_path / "t1.journal"
    journal.write_bytes(journal.read_bytes() + b"\x02\x00")  # half a record: the crash cut it short
    assert durable(tmp_path).pending_ids() == ["t1"]

    journal.write_bytes(b"\xff\xff\xff\x7f garbage")
    resumed = durable(tmp_path)
    assert resumed.pending_ids() == [] and spool_files(resumed) == []


def test_a_transfer_whose_last_chunk_was_written_before_a_restart_is_completed_at_start(tmp_path):
    data = payload(3 * CS, seed=6)
    chunks = chunks_of(data)
    first = durable(tmp_path)
    feed(first, chunks[:2])
    first.sync()
    pending = (
        tmp_path / "t1.part"
    )  # the last chunk written and journaled, the process stopped before it moved
    with open(pending, "r+b") as f:
        f.seek(2 * CS)
        f.write(chunks[2].data)
    with open(tmp_path / "t1.journal", "ab") as f:
        f.write((2).to_bytes(4, "little"))
    (recovered,) = durable(tmp_path).recovered
    assert recovered.path.read_bytes() == data


# --- payloads held in memory (`memory_bytes`) -------------------------------------------------------------


def holding(spool) -> Reassembler:
    return Reassembler(spool, timeout_s=60.0, durable=True, memory_bytes=CS)


def test_a_one_chunk_payload_is_held_in_memory_and_a_handed_over_one_never_touches_the_disk(tmp_path):
    spool = holding(tmp_path)
    data = payload(CS, seed=12)
    ((_, done),) = feed(spool, chunks_of(data))
    assert spool.held("t1") == data and done.sha256 == sha256_hex(data)
    assert feed(spool, chunks_of(data)) == [], "a duplicate of a completed transfer is ignored"
    spool.hand_over("t1")
    spool.sync()
    assert spool_files(spool) == [] and spool.unsynced_bytes == 0
    spool.release("t1")
    assert spool.held("t1") is None


def test_a_held_payload_still_unclaimed_at_a_sync_is_spooled_and_recovered_after_a_restart(tmp_path):
    spool = holding(tmp_path)
    data = payload(CS - 1, seed=13)
    ((_, done),) = feed(spool, chunks_of(data), now=0.0)
    spool.sync()  # its manifest has not come: the payload must survive a crash from here on
    assert spool.held("t1") is None and done.path.read_bytes() == data
    assert spool_files(spool) == ["t1.done", "t1.journal"]
    (recovered,) = holding(tmp_path).recovered
    assert (recovered.transfer, recovered.path.read_bytes()) == ("t1", data)


@pytest.mark.parametrize("size", [CS + 1, 2 * CS], ids=["two chunks", "larger than memory_bytes"])
def test_a_payload_of_several_chunks_or_beyond_memory_bytes_is_spooled(tmp_path, size):
    spool = Reassembler(tmp_path, timeout_s=60.0, durable=True, memory_bytes=CS)
    data = payload(size, seed=14)
    ((_, done),) = feed(spool, chunks_of(data, chunk_size=CS if size == CS + 1 else 2 * CS))
    assert spool.held("t1") is None and done.path.read_bytes() == data


def test_a_held_payload_with_a_wrong_sha256_is_rejected(tmp_path):
    (chunk,) = chunks_of(payload(CS, seed=15))
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        holding(tmp_path).add(replace(chunk, data=payload(CS, seed=16)))


def test_chunks_hashed_on_arrival_need_no_second_read_in_order(reasm, monkeypatch):
    """In order, every chunk is hashed from memory: the spool file is never read back."""
    import os

    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda *args: reads.append(args) or real_pread(*args))
    data = payload(6 * CS + 3, seed=8)
    assert len(feed(reasm, chunks_of(data))) == 1 and reads == []
    feed(reasm, chunks_of(data, tid="t2")[::-1])  # reversed: read back once the gaps close
    assert len(reads) == 6


@pytest.mark.parametrize("size", [CS, 3 * CS + 5], ids=["held, then spooled", "spooled chunk by chunk"])
def test_payloads_reach_the_spool_whole_when_the_disk_takes_them_in_pieces(tmp_path, monkeypatch, size):
    import os

    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, bytes(data)[:10], offset))
    spool = holding(tmp_path)
    data = payload(size, seed=17)
    ((_, done),) = feed(spool, chunks_of(data))
    spool.sync()
    assert done.path.read_bytes() == data


def test_chunks_are_hashed_beside_the_spooling_and_no_more_than_a_few_wait_for_the_hasher(reasm, monkeypatch):
    """While the hasher is busy, chunks are still spooled; once _HASH_AHEAD chunks wait for it, the next one
    waits too (the chunks it holds stay bounded); the payload is verified once every chunk is hashed."""
    import threading

    from protocol import chunking

    gate, hashing_threads, sha256 = threading.Event(), set(), hashlib.sha256

    class GatedSha256:
        def __init__(self) -> None:
            self._digest = sha256()

        def update(self, data) -> None:
            hashing_threads.add(threading.current_thread().name)
            gate.wait(10)
            self._digest.update(data)

        def hexdigest(self) -> str:
            return self._digest.hexdigest()

    data = payload(10 * CS, seed=9)
    chunks, results = chunks_of(data), []
    monkeypatch.setattr(chunking.hashlib, "sha256", GatedSha256)
    adding = threading.Thread(target=lambda: results.extend(feed(reasm, chunks)))
    adding.start()
    adding.join(0.5)
    assert adding.is_alive(), "the adder waits for the gated hasher"
    spooled, ahead = (reasm.spool_dir / "t1.part").read_bytes(), (chunking._HASH_AHEAD + 1) * CS
    assert spooled[:ahead] == data[:ahead], "the hasher's chunk and the ones waiting for it were spooled"
    assert spooled[ahead:] == bytes(len(data) - ahead), "the next chunk waits for the hasher"
    gate.set()
    adding.join(10)
    (position, assembled), *_ = results
    assert position == len(chunks) - 1 and assembled.path.read_bytes() == data
    assert hashing_threads and all(name.startswith("spool-hash") for name in hashing_threads)


def test_a_durable_spool_file_is_written_behind_and_a_failed_flush_fails_the_sync_or_the_next_chunk(
    tmp_path, monkeypatch
):
    """Chunks are flushed to the disk on the flush thread as they come, so a sync finds little to write. A write
    error that only such a flush saw (the kernel reports it once) still fails what comes next: the sync (nothing
    is acknowledged), or the transfer's next chunk (the transfer is dropped)."""
    import errno
    import os
    import threading

    from protocol import chunking

    flushed_on, failures = [], []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushed_on.append(threading.current_thread().name)
        if failures and threading.current_thread().name.startswith("spool-flush"):
            raise failures.pop()
        real_fdatasync(fd)

    def flushed(transfer: str) -> None:
        spool._flushes[transfer].exception(10)  # wait until its flush has run

    monkeypatch.setattr(chunking.os, "fdatasync", fdatasync)
    spool = durable(tmp_path)
    failures.append(OSError(errno.EIO, "injected"))
    assert feed(spool, chunks_of(payload(3 * CS, seed=12))[:1]) == []
    flushed("t1")
    assert flushed_on == ["spool-flush_0"]
    with pytest.raises(OSError, match="injected"):
        spool.sync()
    spool.sync()  # nothing failed since

    failures.append(OSError(errno.EIO, "injected"))
    first, second, *_ = chunks_of(payload(3 * CS, seed=13), tid="t2")
    assert spool.add(first) is None
    flushed("t2")
    with pytest.raises(chunking.SpoolError, match="injected"):
        spool.add(second)
    assert "t2" not in spool.pending_ids()


def test_a_sync_closes_no_spool_file_while_its_flush_still_runs_even_when_another_flush_failed(
    tmp_path, monkeypatch
):
    """A failed flush fails the sync, but only once every other flush has finished: a file closed under a
    running fdatasync could have its descriptor reused by another file."""
    import errno
    import os
    import threading

    from protocol import chunking

    gate, calls, real_fdatasync = threading.Event(), [], os.fdatasync

    def fdatasync(fd: int) -> None:
        if threading.current_thread().name.startswith("spool-flush"):
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(errno.EIO, "injected")
            gate.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr(chunking.os, "fdatasync", fdatasync)
    spool = durable(tmp_path)
    spool.add(chunks_of(payload(3 * CS, seed=14), tid="t1")[0])
    spool._flushes["t1"].exception(10)  # failed
    spool.add(chunks_of(payload(3 * CS, seed=15), tid="t2")[0])  # its flush waits at the gate
    errors = []
    syncing = threading.Thread(target=lambda: errors.append(pytest.raises(OSError, spool.sync)))
    syncing.start()
    syncing.join(0.5)
    assert syncing.is_alive(), "the sync waits for the running flush before it closes its file"
    gate.set()
    syncing.join(10)
    assert not syncing.is_alive() and "injected" in str(errors[0].value)
