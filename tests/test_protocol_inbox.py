"""TransferInbox: pairing manifests with reassembled payloads, in either order, and bounded waiting."""

from __future__ import annotations

import random

import numpy as np
import pytest
from msgspec.structs import replace

from protocol import ProtocolError
from protocol.chunking import Reassembler, split, transfer_info
from protocol.inbox import TransferInbox
from protocol.schemas import Chunk, UpdateManifest, WholeTransfer, encode

CS = 64
TIMEOUT = 60.0


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def transfer(tid: str, size: int = 5 * CS + 3, seed: int = 0):
    """(manifest, chunks, data) of one update transfer."""
    data = payload(size, seed)
    info = transfer_info(tid, data, CS)
    manifest = UpdateManifest(
        task="cifar10",
        round=3,
        device="dev-1",
        update_id=tid,
        base_version=2,
        samples=100,
        codec="dense",
        transfer=info,
    )
    return manifest, list(split(data, info)), data


@pytest.fixture
def inbox(tmp_path) -> TransferInbox[UpdateManifest]:
    return TransferInbox(Reassembler(tmp_path / "spool", timeout_s=TIMEOUT), UpdateManifest)


def spool(inbox: TransferInbox) -> list[str]:
    return sorted(p.name for p in inbox.reassembler.spool_dir.iterdir())


def test_manifest_first_then_chunks_delivers_on_last_chunk(inbox):
    manifest, chunks, data = transfer("u1")
    assert inbox.add_manifest(manifest, now=0) is None
    assert inbox.waiting == 1
    random.Random(0).shuffle(chunks)
    results = [inbox.add_chunk(c, now=1) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    delivery = results[-1]
    assert delivery.manifest is manifest
    assert delivery.path.read_bytes() == data
    assert inbox.waiting == 0


def test_payload_first_then_manifest_delivers_on_manifest(inbox):
    manifest, chunks, data = transfer("u1")
    assert [inbox.add_chunk(c, now=0) for c in chunks] == [None] * len(chunks)
    assert inbox.waiting == 1  # the assembled payload waits for its manifest
    delivery = inbox.add_manifest(manifest, now=1)
    assert delivery is not None and delivery.manifest is manifest
    assert delivery.path.read_bytes() == data
    assert inbox.waiting == 0


def test_manifest_between_chunks_delivers_once(inbox):
    manifest, chunks, data = transfer("u1")
    inbox.add_chunk(chunks[0], now=0)
    assert inbox.add_manifest(manifest, now=0) is None
    deliveries = [d for c in chunks[1:] + chunks for d in [inbox.add_chunk(c, now=0)] if d is not None]
    assert len(deliveries) == 1 and deliveries[0].path.read_bytes() == data


def test_interleaved_transfers_pair_with_their_own_manifests(inbox):
    transfers = {f"u{i}": transfer(f"u{i}", size=CS * (i + 1) + i, seed=i) for i in range(6)}
    events = [("m", tid, m) for tid, (m, _, _) in transfers.items()]
    events += [("c", tid, c) for tid, (_, cs, _) in transfers.items() for c in cs]
    random.Random(5).shuffle(events)
    delivered = {}
    for kind, _tid, item in events:
        d = inbox.add_manifest(item, now=0) if kind == "m" else inbox.add_chunk(item, now=0)
        if d is not None:
            assert d.manifest.update_id not in delivered
            delivered[d.manifest.update_id] = d
    assert set(delivered) == set(transfers)
    for tid, d in delivered.items():
        assert d.manifest is transfers[tid][0]
        assert d.path.read_bytes() == transfers[tid][2]
    assert inbox.waiting == 0


@pytest.mark.parametrize("manifest_first", [True, False], ids=["manifest-first", "payload-first"])
@pytest.mark.parametrize("field", ["sha256", "size"])
def test_manifest_disagreeing_with_payload_is_rejected_and_file_removed(inbox, manifest_first, field):
    manifest, chunks, _ = transfer("u1")
    wrong = {"sha256": "ab" * 32, "size": manifest.transfer.size + 1}[field]
    manifest = replace(manifest, transfer=replace(manifest.transfer, **{field: wrong}))
    with pytest.raises(ProtocolError, match="u1"):
        if manifest_first:
            inbox.add_manifest(manifest, now=0)
            for c in chunks:
                inbox.add_chunk(c, now=0)
        else:
            for c in chunks:
                inbox.add_chunk(c, now=0)
            inbox.add_manifest(manifest, now=0)
    assert spool(inbox) == []
    assert inbox.waiting == 0


def test_unpaired_manifest_expires_after_timeout(inbox):
    manifest, _, _ = transfer("u1")
    inbox.add_manifest(manifest, now=100.0)
    assert inbox.expire(now=100.0 + TIMEOUT - 1) == []
    assert inbox.waiting == 1
    assert inbox.expire(now=100.0 + TIMEOUT + 1) == ["u1"]
    assert inbox.waiting == 0
    assert inbox.expire(now=1e6) == []


def test_unpaired_payload_expires_after_timeout_and_its_file_is_deleted(inbox):
    manifest, chunks, _ = transfer("u1")
    for c in chunks:
        inbox.add_chunk(c, now=100.0)
    assert len(spool(inbox)) == 1
    assert inbox.expire(now=100.0 + TIMEOUT - 1) == []
    assert inbox.waiting == 1 and len(spool(inbox)) == 1
    assert inbox.expire(now=100.0 + TIMEOUT + 1) == ["u1"]
    assert inbox.waiting == 0
    assert spool(inbox) == []
    # a manifest arriving after the payload was dropped finds nothing to pair with
    assert inbox.add_manifest(manifest, now=200.0) is None


def test_manifest_with_stalled_partial_transfer_expires_with_its_spool_file(inbox):
    manifest, chunks, _ = transfer("u1")
    inbox.add_manifest(manifest, now=0.0)
    for c in chunks[:-1]:
        inbox.add_chunk(c, now=0.0)
    assert inbox.waiting == 2
    assert set(inbox.expire(now=TIMEOUT + 1)) == {"u1"}
    assert inbox.waiting == 0
    assert spool(inbox) == []


def test_expire_keeps_fresh_items_while_dropping_stale_ones(inbox):
    old_m, _, _ = transfer("old")
    new_m, new_chunks, new_data = transfer("new", seed=1)
    inbox.add_manifest(old_m, now=0.0)
    inbox.add_manifest(new_m, now=50.0)
    assert inbox.expire(now=TIMEOUT + 10) == ["old"]
    deliveries = [d for c in new_chunks for d in [inbox.add_chunk(c, now=TIMEOUT + 10)] if d]
    assert len(deliveries) == 1 and deliveries[0].path.read_bytes() == new_data


def test_slow_but_progressing_transfer_with_early_manifest_is_delivered(inbox):
    manifest, chunks, data = transfer("u1")
    inbox.add_manifest(manifest, now=0.0)
    delivery = None
    for i, c in enumerate(chunks):  # one chunk every half timeout: never stalled
        now = i * TIMEOUT / 2
        inbox.expire(now=now)
        delivery = inbox.add_chunk(c, now=now)
    assert delivery is not None and delivery.path.read_bytes() == data


# --- dispatch and the durable spool ---------------------------------------------------------------------------


def test_receive_decodes_by_part_and_admit_callables_turn_messages_away(tmp_path):
    inbox = TransferInbox(Reassembler(tmp_path / "spool"), UpdateManifest)
    manifest, chunks, data = transfer("u1")
    assert inbox.receive("manifest", encode(manifest), admit_manifest=lambda m: False) is None
    assert inbox.waiting == 0
    assert inbox.receive("chunk", encode(chunks[0]), admit_chunk=lambda c: c.index > 0) is None
    assert inbox.waiting == 0
    deliveries = [inbox.receive("chunk", encode(c), "dev1") for c in chunks]
    delivery = inbox.receive("manifest", encode(manifest), "dev1")
    assert deliveries == [None] * len(chunks) and delivery.path.read_bytes() == data
    assert delivery.owner == "dev1"
    inbox.release(delivery)
    assert spool(inbox) == []


def whole(manifest: UpdateManifest, chunk: Chunk) -> bytes:
    return encode(WholeTransfer(manifest=manifest, chunk=chunk))


def test_a_whole_transfer_is_delivered_at_once_and_held_in_memory_writes_no_file(tmp_path):
    inbox = TransferInbox(Reassembler(tmp_path / "spool", durable=True, memory_bytes=CS), UpdateManifest)
    manifest, (chunk,), data = transfer("u1", size=CS - 1)
    assert inbox.receive("whole", whole(manifest, chunk), admit_manifest=lambda m: False) is None
    assert inbox.waiting == 0 and inbox.reassembler.held("u1") is None, "turned away: nothing kept"
    delivery = inbox.receive("whole", whole(manifest, chunk), "dev1")
    assert delivery.manifest == manifest and delivery.data == data and delivery.owner == "dev1"
    inbox.sync()
    assert spool(inbox) == [] and inbox.waiting == 0
    inbox.release(delivery)
    assert inbox.receive("whole", whole(manifest, chunk), "dev1") is None, "a duplicate is ignored"
    assert inbox.waiting == 0 and spool(inbox) == [], "and leaves no manifest waiting"


@pytest.mark.parametrize("problem", ["two chunks", "another transfer", "another payload"])
def test_a_whole_transfer_must_carry_the_one_chunk_its_manifest_describes(inbox, problem):
    manifest, chunks, _ = transfer("u1", size=CS + 1 if problem == "two chunks" else CS - 1)
    chunk = {
        "two chunks": chunks[0],
        "another transfer": transfer("u2", size=CS - 1)[1][0],
        "another payload": transfer("u1", size=CS - 1, seed=1)[1][0],
    }[problem]
    with pytest.raises(ProtocolError):
        inbox.receive("whole", whole(manifest, chunk))
    assert inbox.waiting == 0 and spool(inbox) == []


def test_a_manifest_waiting_at_a_sync_is_kept_and_paired_after_a_restart(tmp_path):
    manifest, chunks, data = transfer("u1")
    first = TransferInbox(Reassembler(tmp_path, durable=True), UpdateManifest)
    first.add_manifest(manifest, owner="dev1")
    first.add_chunk(chunks[0], owner="dev1")
    first.sync()
    second = TransferInbox(Reassembler(tmp_path, durable=True), UpdateManifest)
    assert second.owners() == {"u1": "dev1"} and second.recovered == []
    for chunk in chunks[1:-1]:
        second.add_chunk(chunk)
    second.sync()
    third = TransferInbox(Reassembler(tmp_path, durable=True), UpdateManifest)  # again, one chunk short
    delivery = third.add_chunk(chunks[-1])
    assert delivery.manifest == manifest and delivery.path.read_bytes() == data

    third.sync()  # handed over: the receiver will make it durable elsewhere; the manifest file stays until then
    fourth = TransferInbox(Reassembler(tmp_path, durable=True), UpdateManifest)
    (recovered,) = fourth.recovered  # it was not released: taken up again at start
    assert recovered.manifest == manifest and recovered.path.read_bytes() == data
    fourth.release(recovered)
    assert spool(fourth) == []


@pytest.mark.parametrize("synced_between", [False, True], ids=["paired at once", "spooled while unpaired"])
def test_a_one_chunk_payload_held_in_memory_is_delivered_as_its_bytes_until_a_sync_spools_it(
    tmp_path, synced_between
):
    reassembler = Reassembler(tmp_path / "spool", timeout_s=TIMEOUT, durable=True, memory_bytes=CS)
    inbox = TransferInbox(reassembler, UpdateManifest)
    manifest, (chunk,), data = transfer("u1", size=CS)
    assert inbox.add_chunk(chunk, now=0) is None  # its manifest comes after it, as agents send them
    if synced_between:
        inbox.sync()
    delivery = inbox.add_manifest(manifest, now=1)
    if synced_between:
        assert (
            delivery.data is None and delivery.payload == delivery.path and delivery.path.read_bytes() == data
        )
    else:
        assert delivery.payload == delivery.data == data and spool(inbox) == []
    inbox.sync()
    inbox.release(delivery)
    assert spool(inbox) == []


def test_a_manifest_kept_in_the_spool_goes_with_the_one_chunk_payload_it_waited_for(tmp_path):
    reassembler = Reassembler(tmp_path / "spool", timeout_s=TIMEOUT, durable=True, memory_bytes=CS)
    inbox = TransferInbox(reassembler, UpdateManifest)
    manifest, (chunk,), data = transfer("u1", size=CS)
    assert inbox.add_manifest(manifest, now=0) is None
    inbox.sync()
    assert spool(inbox) == ["u1.manifest"]
    delivery = inbox.add_chunk(chunk, now=1)
    assert delivery.data == data
    inbox.release(delivery)
    assert spool(inbox) == []


def test_a_manifest_kept_before_a_restart_goes_with_the_one_chunk_payload_that_comes_after_it(tmp_path):
    reassembler = Reassembler(tmp_path / "spool", timeout_s=TIMEOUT, durable=True, memory_bytes=CS)
    inbox = TransferInbox(reassembler, UpdateManifest)
    manifest, (chunk,), data = transfer("u1", size=CS)
    inbox.add_manifest(manifest, now=0)
    inbox.sync()
    reassembler.close()
    restarted = TransferInbox(
        Reassembler(tmp_path / "spool", timeout_s=TIMEOUT, durable=True, memory_bytes=CS), UpdateManifest
    )
    delivery = restarted.add_chunk(chunk, now=1)
    assert delivery.manifest == manifest and delivery.data == data  # held in memory, paired with the kept one
    restarted.release(delivery)
    assert spool(restarted) == []
