"""The aggregator takes messages in groups: nothing of a group is acknowledged to the broker or answered
`accepted` before the group is durable; many updates share one commit; a restart in the middle of a transfer
loses nothing acknowledged; a task is final the moment its last expected update is folded. Handlers are called
directly (network recorded, tests/fuzzing.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import aggregator.service
from aggregator.ledger import RoundLedger
from aggregator.service import AggregatorService
from protocol.transport import Incoming
from tests.fuzzing import RecordingLink
from tests.test_aggregator_admission import delta, receipts, spool_files
from tests.test_fuzz_handlers import aggregator_with_round, sent_transfer


def incoming(messages: list[tuple[str, bytes]], first_mid: int = 1) -> list[Incoming]:
    """Messages as a manual-ack link hands them over (QoS 1, each with its packet id)."""
    return [
        Incoming(topic, payload, False, mid, 1) for mid, (topic, payload) in enumerate(messages, first_mid)
    ]


def committed(service: AggregatorService, update_id: str):
    """The ledger's row of an update as another process sees it (committed only)."""
    with RoundLedger(Path(service.config.state_dir) / "ledger.sqlite", read_only=True) as reader:
        return reader.update_by_id(update_id)


def restarted(service: AggregatorService) -> AggregatorService:
    """The same aggregator after kill -9: nothing closed or flushed but what the kernel keeps."""
    service.coordinator.ledger.close()  # the dead process's lock goes with it
    again = AggregatorService(service.config)
    again.link = RecordingLink()
    again.coordinator.start()
    return again


@pytest.mark.parametrize("chunk_size", [64, 1 << 20], ids=["chunks, then the manifest", "one whole message"])
def test_nothing_is_acknowledged_or_accepted_before_its_group_is_durable(tmp_path, chunk_size):
    service = aggregator_with_round(tmp_path)
    service.link.acked.clear()  # the set-up's messages
    messages = incoming(sent_transfer("t", "dev1", delta(1), 100, "u1", chunk_size))
    assert (len(messages) == 1) == (chunk_size > 64)
    service.receive(messages)
    assert service.link.acked == [] and receipts(service, "dev1") == {}
    assert committed(service, "u1") is None and service.coordinator.task_rounds["t"].strategy.count == 0
    service.settle()
    assert [m.mid for m in service.link.acked] == [m.mid for m in messages]
    assert receipts(service, "dev1")["u1"].status == "accepted" and committed(service, "u1") is not None
    assert service.coordinator.task_rounds["t"].strategy.count == 1
    assert spool_files(service) == []


def test_updates_of_one_group_become_durable_together(tmp_path):
    service = aggregator_with_round(tmp_path)
    sent = [
        sent_transfer("t", device, delta(i), 50, f"u-{device}") for i, device in enumerate(["dev1", "dev2"])
    ]
    service.receive(incoming(sent[0] + sent[1]))
    assert [committed(service, f"u-{d}") for d in ("dev1", "dev2")] == [None, None]
    service.settle()
    assert all(committed(service, f"u-{d}") is not None for d in ("dev1", "dev2"))
    answers = [*receipts(service, "dev1").values(), *receipts(service, "dev2").values()]
    assert [r.status for r in answers] == ["accepted", "accepted"]


def test_a_task_is_final_the_moment_its_last_expected_update_is_folded(tmp_path):
    service = aggregator_with_round(tmp_path)
    for i, device in enumerate(["dev1", "dev2"]):
        service.receive(incoming(sent_transfer("t", device, delta(i), 50, f"u{i}")))
        service.settle()
    assert service.coordinator.globals["t"].manifest.version == 0
    service.receive(incoming(sent_transfer("t", "dev3", delta(3), 50, "u3")))
    service.settle()  # no timer tick in between
    assert service.coordinator.globals["t"].manifest.version == 1
    assert service.coordinator.task_rounds["t"].final and service.link.on("/global/manifest")


def test_a_timer_tick_settles_the_open_group_before_it_finalises(tmp_path, monkeypatch):
    """A deadline met while an update waits in an open group: the update is made durable and folded first, so the
    global model holds it and nothing is published from an uncommitted ledger batch."""
    service = aggregator_with_round(tmp_path)
    for i, device in enumerate(["dev1", "dev2"]):
        service.receive(incoming(sent_transfer("t", device, delta(i), 50, f"u{i}")))
        service.settle()
    service.receive(incoming(sent_transfer("t", "dev3", delta(3), 50, "u3")))  # not settled yet
    coordinator = service.coordinator
    late = coordinator.round.deadline + 1
    monkeypatch.setattr(coordinator, "tick", lambda now=None, tick=coordinator.tick: tick(late))
    service.tick(time.monotonic())
    assert coordinator.globals["t"].manifest.version == 1 and coordinator.task_rounds["t"].strategy.count == 3
    assert receipts(service, "dev3")["u3"].status == "accepted" and committed(service, "u3") is not None


def test_a_restart_in_the_middle_of_a_transfer_loses_nothing_acknowledged(tmp_path):
    service = aggregator_with_round(tmp_path)
    messages = incoming(sent_transfer("t", "dev1", delta(1), 100, "u1"))
    assert len(messages) == 3  # two chunks and the manifest
    service.receive(messages[:1])
    service.settle()  # acknowledged: the broker forgets it
    service.receive(messages[1:2])  # handled, never settled: the process dies

    again = restarted(service)
    assert again.admission.owners["u1"][0] == "dev1"  # the spool's transfers are claimed again
    again.receive(messages[1:])  # the broker sends again what was not acknowledged
    again.settle()
    assert receipts(again, "dev1")["u1"].status == "accepted"
    assert [u.update_id for u in again.coordinator.ledger.updates_for("t", 1)] == ["u1"]
    assert again.coordinator.task_rounds["t"].strategy.count == 1 and spool_files(again) == []


def test_a_payload_complete_before_a_restart_is_paired_with_its_later_manifest(tmp_path):
    service = aggregator_with_round(tmp_path)
    messages = incoming(sent_transfer("t", "dev2", delta(2), 50, "u2"))
    service.receive(messages[:-1])  # every chunk; the manifest has not come
    service.settle()
    again = restarted(service)
    again.receive(messages[-1:])
    again.settle()
    assert receipts(again, "dev2")["u2"].status == "accepted" and spool_files(again) == []
    assert again.coordinator.task_rounds["t"].reported == {"dev2"}


def test_a_pass_settles_whenever_its_complete_updates_reach_the_byte_budget(tmp_path, monkeypatch):
    service = aggregator_with_round(tmp_path)
    sent = [
        sent_transfer("t", device, delta(i), 50, f"u{i}") for i, device in enumerate(["dev1", "dev2", "dev3"])
    ]
    manifests = [m for update in sent for m in update if m[0].endswith("/manifest")]
    chunks = [m for update in sent for m in update if not m[0].endswith("/manifest")]
    service.process(incoming(chunks))  # every payload complete, no manifest yet: no update
    service.process([])  # nothing more came: the chunks settle
    assert service.coordinator.task_rounds["t"].strategy.count == 0
    payload = service.updates.held_bytes()["u0"]
    monkeypatch.setattr(aggregator.service, "HELD_BYTES", 2 * payload)  # two complete updates fill a group
    groups = []
    settle = service.settle

    def counting_settle():
        before = len(service.link.acked)
        settle()
        groups.append(len(service.link.acked) - before)

    service.settle = counting_settle
    service.process(incoming(manifests, first_mid=1000))  # one pass: three manifests complete three updates
    assert groups == [2, 1]
    assert [r.status for r in receipts(service, "dev3").values()] == ["accepted"]
    assert service.coordinator.globals["t"].manifest.version == 1  # all three folded, the task final


def test_a_group_waits_for_the_manifest_of_a_payload_held_in_memory_and_writes_no_file_for_it(tmp_path):
    service = aggregator_with_round(tmp_path)
    service.link.acked.clear()
    first, second = (
        sent_transfer("t", device, delta(i), 50, f"u{i}", chunk_size=1 << 20, apart=True)
        for i, device in enumerate(["dev1", "dev2"])
    )
    assert len(first) == len(second) == 2  # one chunk each (held in memory), then the manifest
    service.process(incoming(first + second[:1]))  # u0 complete; u1's payload waits for its manifest
    assert service.link.acked == [] and receipts(service, "dev1") == {}
    service.process(incoming(second[1:], first_mid=100))
    assert len(service.link.acked) == 4 and receipts(service, "dev2")["u1"].status == "accepted"
    assert spool_files(service) == []
    updates = Path(service.config.state_dir) / "updates"
    assert [p.suffix for p in updates.rglob("*") if p.is_file()] == [".segment"]


def test_a_payload_held_in_memory_is_spooled_when_its_group_settles_without_its_manifest(tmp_path):
    service = aggregator_with_round(tmp_path)
    chunk, manifest = sent_transfer("t", "dev1", delta(1), 50, "u1", chunk_size=1 << 20, apart=True)
    service.process(incoming([chunk]))
    service.process([])  # nothing more came: the group settles, its chunk acknowledged
    assert spool_files(service) == ["u1.done", "u1.journal"]
    again = restarted(service)
    again.receive(incoming([manifest], first_mid=10))
    again.settle()
    assert receipts(again, "dev1")["u1"].status == "accepted" and spool_files(again) == []
