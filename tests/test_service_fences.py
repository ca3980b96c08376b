"""The fence around each input of both services: an error while handling one message drops that message with one
log line and the service goes on; and what an agent does with receipts and schedules it cannot use."""

from __future__ import annotations

import logging
import time

import pytest

from protocol import topics
from protocol.schemas import Event, ModelSpec, Receipt, Schedule, Status, decode, encode
from protocol.transport import Incoming, LinkEvent
from tests.fuzzing import assignment
from tests.test_fuzz_handlers import agent, aggregator_with_round, feed  # noqa: F401 - `agent` is a fixture


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("error", [OverflowError("int too big"), KeyError("x"), OSError(5, "I/O error")])
def test_aggregator_drops_a_message_whose_handling_fails_and_goes_on(tmp_path, monkeypatch, caplog, error):
    service = aggregator_with_round(tmp_path)

    def fails(*args):
        raise error

    monkeypatch.setattr(service.coordinator, "device_status", fails)
    offline = encode(Status(state="offline", ts=time.time()))
    service.handle(Incoming(topics.device("dev1", "status"), offline, retain=True))
    assert error_lines(caplog) == [
        f"dropped message on 'fedmt/v1/devices/dev1/status': {type(error).__name__}: {error}"
    ]
    monkeypatch.undo()
    service.handle(Incoming(topics.device("dev1", "status"), offline, retain=False))
    assert "dev1" not in service.coordinator.online


def test_agent_drops_an_input_whose_handling_fails_and_goes_on(agent, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setattr(agent, "on_connected", lambda: 1 / 0)
    agent.handle(LinkEvent(True, "Success"))
    assert error_lines(caplog) == ["dropped LinkEvent: ZeroDivisionError: division by zero"]
    monkeypatch.undo()
    agent.handle(LinkEvent(True, "Success"))
    assert agent.link.on("/dev1/profile"), "the agent stopped handling input"


def test_agent_ignores_receipts_for_updates_it_does_not_hold(agent):  # noqa: F811
    forged = Receipt(update_id="not-mine", task="t", round=7, status="accepted")
    feed(agent, [(topics.device("dev1", "receipts"), encode(forged))])
    assert not agent.receipts.done("t", 1), "a receipt for an unknown update marked rounds as done"


def test_a_round_the_agent_cannot_start_fails_its_tasks_in_one_line(agent, monkeypatch, caplog):  # noqa: F811
    unknown = ModelSpec(name="no_such_model", num_classes=2, input_size=32)
    schedule = Schedule(
        device="dev1",
        round=3,
        issued_at=time.time(),
        deadline=time.time() + 600,
        tasks=[assignment("t", model=unknown)],
    )

    def cannot_plan(*args, **kwargs):  # e.g. a model the planner cannot build to measure its features
        raise ValueError("unknown model 'no_such_model'")

    monkeypatch.setattr(agent.planner, "plan", cannot_plan)
    feed(agent, [(topics.schedule("dev1", "t"), encode(schedule))])
    failed = [e for e in map(lambda p: decode(p, Event), agent.link.on("/dev1/events")) if e.kind == "failed"]
    assert [(e.task, e.round) for e in failed] == [("t", 3)] and "no_such_model" in failed[0].message
    assert len(error_lines(caplog)) == 1 and "round 3: cannot start its tasks" in error_lines(caplog)[0]


def test_an_update_the_aggregator_cannot_take_yet_is_kept_and_sent_again_as_a_new_transfer(agent, tmp_path):  # noqa: F811
    import uuid

    from protocol.chunking import transfer_info
    from protocol.schemas import UpdateManifest

    payload = tmp_path / "u.payload"
    payload.write_bytes(b"update bytes")
    update_id = uuid.uuid4().hex
    manifest = UpdateManifest(
        task="t",
        round=1,
        device="dev1",
        update_id=update_id,
        base_version=0,
        samples=5,
        codec="dense",
        transfer=transfer_info(update_id, payload.read_bytes()),
    )
    pending = agent.outbox.put(manifest, payload)
    agent.link.connected.set()
    agent.publish_update(pending)
    retry = Receipt(update_id=update_id, task="t", round=1, status="retry", reason="quota: spool full")
    feed(agent, [(topics.device("dev1", "receipts"), encode(retry))])
    (kept,) = agent.outbox.pending()
    assert kept.manifest.update_id == update_id and kept.manifest.transfer.id != manifest.transfer.id
    assert kept.manifest.transfer.sha256 == manifest.transfer.sha256 and not agent.receipts.done("t", 1)
    sent = len(agent.link.updates_sent())
    agent.tick(time.monotonic())
    assert len(agent.link.updates_sent()) == sent, "sent again before retry_after_s"
    agent.tick(time.monotonic() + agent.config.retry_after_s + 1)
    again = agent.link.updates_sent()[-1]
    assert again.transfer.id == kept.manifest.transfer.id
