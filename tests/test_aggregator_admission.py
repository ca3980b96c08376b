"""What the aggregator lets into its update spool and ledger: the sender check, spool quotas, a full disk, and
orphaned payloads at start. Handlers are called directly (network recorded, tests/fuzzing.py)."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time

import msgspec
import numpy as np
import pytest

import protocol.chunking
from aggregator.config import TransferConfig
from aggregator.service import AggregatorService
from protocol import topics
from protocol.chunking import transfer_info
from protocol.schemas import Receipt, UpdateManifest, decode, encode
from protocol.tensors import encode_state
from protocol.transport import Incoming
from tests.fuzzing import LAYOUT, RecordingLink, update_manifest
from tests.test_fuzz_handlers import LATER, QUOTAS, aggregator_with_round, feed, sent_transfer

KIB = 1 << 10


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(0, 0.1, a.shape).astype(a.dtype) if a.dtype.kind == "f" else np.zeros_like(a)
        for name, a in LAYOUT.items()
    }


def receipts(service: AggregatorService, device: str) -> dict[str, Receipt]:
    return {r.update_id: r for r in map(lambda p: decode(p, Receipt), service.link.on(f"/{device}/receipts"))}


def manifest_only(device: str, size: int, update_id: str) -> tuple[str, bytes]:
    """The manifest of an update of `size` bytes whose chunks have not come yet (it holds its size in the spool)."""
    return topics.manifest(topics.update("t", device)), encode(update_manifest("t", device, update_id, size))


def spool_files(service: AggregatorService) -> list[str]:
    return sorted(p.name for p in service.updates.reassembler.spool_dir.iterdir())


def updates_files(service: AggregatorService) -> list[str]:
    return sorted(p.name for p in service.coordinator.updates_dir.rglob("*") if p.is_file())


@pytest.fixture
def service(tmp_path):
    return aggregator_with_round(tmp_path)


# --- the sender check ----------------------------------------------------------------------------------


def test_update_naming_another_device_is_rejected_before_anything_is_spooled(service):
    manifest_topic, manifest = sent_transfer("t", "dev1", delta(1), 100, "spoof")[-1]
    feed(service, [(manifest_topic.replace("/dev1/", "/dev3/"), manifest)])  # dev1's manifest on dev3's topic
    assert receipts(service, "dev3")["spoof"].status == "rejected"
    assert "names device dev1" in receipts(service, "dev3")["spoof"].reason
    assert spool_files(service) == [] and service.coordinator.task_rounds["t"].reported == set()


def test_chunks_of_a_transfer_from_two_devices_are_kept_apart(service, caplog):
    messages = sent_transfer("t", "dev1", delta(1), 100, "mine")
    feed(service, messages[:1])  # dev1's first chunk claims the transfer
    foreign = [(topic.replace("/dev1/", "/dev3/"), payload) for topic, payload in messages]
    feed(service, foreign)  # dev3 cannot complete it, and its manifest is answered to dev3 only
    assert "belongs to dev1" in caplog.text
    assert receipts(service, "dev3")["mine"].status == "rejected" and receipts(service, "dev1") == {}
    feed(service, messages[1:])
    assert receipts(service, "dev1")["mine"].status == "accepted"


# --- quotas --------------------------------------------------------------------------------------------


def test_transfers_beyond_a_device_quota_are_refused_with_a_receipt_to_retry(service, caplog):
    feed(service, [manifest_only("dev3", 10 * KIB, f"u{i}") for i in range(3)])  # 30 of dev3's 32 KiB
    feed(service, [manifest_only("dev3", 3 * KIB, "u3")])
    refused = receipts(service, "dev3")["u3"]
    assert refused.status == "retry" and "max_device_spool_bytes" in refused.reason, refused
    assert caplog.text.count("refused update transfer u3") == 1

    feed(service, [manifest_only("dev3", 1 * KIB, "u4")])  # fits the bytes: a fourth transfer
    feed(service, [manifest_only("dev3", 1 * KIB, "u5")])
    assert "max_device_transfers" in receipts(service, "dev3")["u5"].reason
    assert set(receipts(service, "dev3")) == {"u3", "u5"}, "admitted transfers get no receipt yet"


def test_a_refused_transfer_stays_refused_and_its_chunks_are_dropped(service):
    feed(service, [manifest_only("dev3", 8 * KIB, f"u{i}") for i in range(4)])  # dev3's whole quota
    messages = sent_transfer("t", "dev3", delta(3), 50, "late")
    feed(service, messages)  # its first chunk is refused; the rest dropped quietly; the manifest answered
    assert receipts(service, "dev3")["late"].status == "retry"
    assert "late.part" not in spool_files(service)
    service.tick(time.monotonic() + LATER)  # the held transfers expire: dev3 may send again ...
    feed(service, messages)  # ... but not this transfer
    assert "late.part" not in spool_files(service) and service.coordinator.task_rounds["t"].reported == set()
    feed(service, sent_transfer("t", "dev3", delta(3), 50, "again"))
    assert receipts(service, "dev3")["again"].status == "accepted"


def test_the_total_quota_holds_across_devices(service):
    feed(service, [manifest_only("dev3", 15 * KIB, f"a{i}") for i in range(2)])  # 30 KiB
    feed(service, [manifest_only("dev4", 15 * KIB, "b0")])  # 45 KiB of 48
    feed(service, [manifest_only("dev4", 4 * KIB, "b1")])
    assert "max_spool_bytes" in receipts(service, "dev4")["b1"].reason
    assert sum(service.updates.held_bytes().values()) == 45 * KIB


def test_an_update_larger_than_max_update_bytes_is_refused_by_its_manifest_or_first_chunk(service):
    feed(service, [manifest_only("dev3", QUOTAS.max_update_bytes + 1, "big")])
    refused = receipts(service, "dev3")["big"]
    assert refused.status == "rejected" and "max_update_bytes" in refused.reason  # never, not later
    payload = encode_state({**delta(3), "w": np.zeros((64, 64), np.float32)})  # 16 KiB+ of tensors
    info = transfer_info("big2", payload, 64)
    chunk_first = [
        (topics.chunk(topics.update("t", "dev3"), 0), encode(next(protocol.chunking.split(payload, info))))
    ]
    feed(service, chunk_first)
    assert spool_files(service) == []


def test_a_transfer_whose_chunks_declare_another_size_is_dropped(service, caplog):
    topic, manifest = manifest_only("dev3", 100, "sized")
    feed(service, [(topic, manifest)])
    payload = b"\0" * 8000  # chunks of the same transfer id, claiming 8000 bytes
    chunk = next(protocol.chunking.split(payload, transfer_info("sized", payload, 1000)))
    feed(service, [(topics.chunk(topics.update("t", "dev3"), 0), encode(chunk))])
    assert "admitted with 100 bytes, not 8000" in caplog.text
    assert spool_files(service) == ["sized.manifest"]  # the manifest waits (durably); no chunk was spooled


def test_quota_settings_are_validated():
    with pytest.raises(ValueError, match="max_update_bytes <= max_device_spool_bytes <= max_spool_bytes"):
        TransferConfig(max_update_bytes=2 << 30, max_device_spool_bytes=1 << 30)
    with pytest.raises(msgspec.ValidationError, match="max_device_transfers"):
        msgspec.convert({"max_device_transfers": 0}, TransferConfig)


# --- a full disk -------------------------------------------------------------------------------------------


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("call", ["ftruncate", "pwrite"], ids=["creating-the-spool-file", "writing-a-chunk"])
def test_disk_full_while_spooling_refuses_the_update_and_the_service_goes_on(
    service, monkeypatch, caplog, call
):
    def full_disk(fd, *args):
        raise no_space(fd)

    monkeypatch.setattr(os, call, full_disk)
    with caplog.at_level(logging.ERROR):
        feed(service, sent_transfer("t", "dev1", delta(1), 100, "full"))
    refused = receipts(service, "dev1")["full"]
    assert refused.status == "retry" and "No space left on device" in refused.reason
    assert "refused update transfer full" in caplog.text and spool_files(service) == []

    monkeypatch.undo()  # space again: the device's next update goes through, the round completes exactly
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "after"))
    assert receipts(service, "dev1")["after"].status == "accepted"


def test_disk_full_while_recording_refuses_the_update_and_leaves_no_file(service, monkeypatch, caplog):
    def fails(*paths):
        raise no_space(paths[-1])

    monkeypatch.setattr(os, "link", fails)  # the payload cannot be linked to its durable place
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "link"))
    assert receipts(service, "dev1")["link"].status == "retry"
    assert "No space left on device" in receipts(service, "dev1")["link"].reason
    monkeypatch.undo()

    def commit_fails():
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(
        service.coordinator.ledger, "commit_batch", commit_fails
    )  # the group cannot be committed
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "commit"))
    assert "database or disk is full" in receipts(service, "dev1")["commit"].reason
    assert spool_files(service) == [] and updates_files(service) == []
    assert service.coordinator.ledger.update_by_id("commit") is None
    monkeypatch.undo()

    def ledger_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(service.coordinator.ledger, "record_update", ledger_full)
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "ledger"))
    assert "database or disk is full" in receipts(service, "dev1")["ledger"].reason
    assert spool_files(service) == [] and updates_files(service) == []
    assert "cannot store it" in caplog.text and service.coordinator.task_rounds["t"].strategy.count == 0
    monkeypatch.undo()

    feed(service, sent_transfer("t", "dev1", delta(1), 100, "room"))
    assert receipts(service, "dev1")["room"].status == "accepted"
    assert updates_files(service) == ["dev1.room.state"]


# --- resends and restarts ----------------------------------------------------------------------------------


def test_an_update_recorded_while_its_second_copy_travelled_keeps_its_file(service):
    """Two transfers of one update id (a device's resend under another transfer id) both complete."""
    first = sent_transfer("t", "dev1", delta(1), 100, "twice")
    payload = encode_state(delta(1))  # the same update again, under another transfer id
    info = transfer_info("twice-again", payload, 64)
    manifest = msgspec.structs.replace(decode(first[-1][1], UpdateManifest), transfer=info)
    second = [
        *[
            (topics.chunk(topics.update("t", "dev1"), c.index), encode(c))
            for c in protocol.chunking.split(payload, info)
        ],
        (topics.manifest(topics.update("t", "dev1")), encode(manifest)),
    ]
    feed(service, [first[-1], second[-1]])  # both manifests wait: neither is recorded yet
    feed(service, first[:-1] + second[:-1])
    statuses = [decode(p, Receipt).status for p in service.link.on("/dev1/receipts")]
    assert statuses == ["accepted", "duplicate"]
    recorded = service.coordinator.ledger.update_by_id("twice")
    assert recorded.payload_path.is_file(), "the duplicate deleted the recorded payload"


def test_orphaned_payloads_are_removed_at_start_and_recorded_ones_kept(tmp_path, service):
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "kept"))
    coordinator = service.coordinator
    kept = coordinator.ledger.update_by_id("kept").payload_path
    unrecorded = kept.with_name("dev2.lost.state")  # moved, then the process stopped before the ledger commit
    unrecorded.write_bytes(b"x")
    old = coordinator.updates_dir / "t" / "r000000" / "dev1.old.state"  # left by a finalised round
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    spool = service.updates.reassembler.spool_dir
    (spool / "never-paired.done").write_bytes(b"x")
    (spool / "half.part").write_bytes(b"x")
    coordinator.ledger.close()

    restarted = AggregatorService(service.config)
    restarted.link = RecordingLink()
    restarted.coordinator.start()
    assert updates_files(restarted) == ["dev1.kept.state"] and kept.is_file()
    assert not old.parent.exists() and spool_files(restarted) == []
    assert restarted.coordinator.task_rounds["t"].reported == {"dev1"}
    assert restarted.coordinator.task_rounds["t"].strategy.count == 1


# --- retained messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "fedmt/v1/devices/dev3/telemetry",
        "fedmt/v1/devices/dev3/events",
        "fedmt/v1/tasks/t/updates/dev3/manifest",
        "fedmt/v1/tasks/t/updates/dev3/chunks/7",
        "fedmt/v1/tasks/t/updates/dev3/status",  # not a device's status: under its update transfers
        "fedmt/v1/tasks/t/updates/dev3/chunks/" + "9" * 5000,
    ],
)
def test_a_retained_message_where_devices_may_not_retain_is_cleared(service, topic):
    service.handle(Incoming(topic, b"junk", retain=True))
    assert (topic, b"", True) in service.link.published


@pytest.mark.parametrize("leaf", ["status", "profile"])
def test_a_devices_retained_status_and_profile_stay(service, leaf):
    service.handle(Incoming(topics.device("dev3", leaf), b"junk", retain=True))
    assert not [p for p in service.link.published if p[0].endswith(f"dev3/{leaf}")]


def test_disk_full_while_spooling_a_payload_held_in_memory_refuses_it_and_the_service_goes_on(
    service, monkeypatch, caplog
):
    chunk, manifest = sent_transfer("t", "dev1", delta(1), 100, "held", chunk_size=1 << 20, apart=True)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (_ for _ in ()).throw(no_space(fd)))
    with caplog.at_level(logging.ERROR):
        feed(service, [chunk])  # its group settles before the manifest came: the payload must be written
    monkeypatch.undo()
    assert "refused update transfer held" in caplog.text and spool_files(service) == []
    feed(service, [manifest])
    refused = receipts(service, "dev1")["held"]
    assert refused.status == "retry" and "No space left on device" in refused.reason
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "after", chunk_size=1 << 20))
    assert receipts(service, "dev1")["after"].status == "accepted"


def test_disk_full_while_appending_to_a_segment_refuses_the_update(service, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (_ for _ in ()).throw(no_space(fd)))
    sent = sent_transfer("t", "dev1", delta(1), 100, "segment", chunk_size=1 << 20)
    service.receive([Incoming(topic, payload, retain=False) for topic, payload in sent])  # one group
    service.settle()
    monkeypatch.undo()
    refused = receipts(service, "dev1")["segment"]
    assert refused.status == "retry" and "No space left on device" in refused.reason
    assert service.coordinator.ledger.update_by_id("segment") is None
    feed(service, sent_transfer("t", "dev1", delta(1), 100, "after", chunk_size=1 << 20))
    assert receipts(service, "dev1")["after"].status == "accepted"
