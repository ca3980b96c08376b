"""RoundLedger: idempotent rounds, update dedupe, atomic finalization, durability across reopen and crash."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aggregator.ledger import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    GlobalRecord,
    RoundLedger,
    TaskRoundRecord,
    UpdateRecord,
)
from protocol import ProtocolError

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def ledger(db):
    with RoundLedger(db) as ledger:
        ledger.record_global("cifar", 0, Path("/ckpt/cifar/v000000.safetensors"), SHA_A, 1.0)
        ledger.record_global("mnist", 0, Path("/ckpt/mnist/v000000.safetensors"), SHA_A, 1.0)
        yield ledger


def update(ledger: RoundLedger, device: str, update_id: str, *, task="cifar", round=1, samples=10, at=5.0):
    return ledger.record_update(
        task, round, device, update_id, samples, Path(f"/spool/{update_id}.bin"), SHA_B, at
    )


def test_schema_is_versioned_and_durable_settings_are_on(ledger, db):
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    assert ledger._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert ledger._db.execute("PRAGMA foreign_keys").fetchone() == (1,)


def test_newer_schema_is_refused(db):
    RoundLedger(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="schema"):
        RoundLedger(db)


def test_a_v1_ledger_gains_weights_and_scales_from_its_samples(db):
    conn = sqlite3.connect(db)
    conn.executescript(_MIGRATIONS[0] + "PRAGMA user_version = 1;")
    conn.executescript(
        "INSERT INTO globals VALUES ('cifar', 0, '/ckpt', 'a', 1.0);"
        "INSERT INTO rounds VALUES (1, 1.0, 2.0, 'open');"
        "INSERT INTO task_rounds (task, round, base_version) VALUES ('cifar', 1, 0);"
        "INSERT INTO updates VALUES ('cifar', 1, 'jetson1', 'u1', 42, '/spool/u1', 'b', 3.0);"
    )
    conn.close()
    with RoundLedger(db) as ledger:
        (old,) = ledger.updates_for("cifar", 1)
        assert (old.samples, old.weight, old.scale) == (42, 42, 1.0)
        outcome = ledger.record_update(
            "cifar", 1, "rtx1", "u2", 10**6, Path("/spool/u2"), SHA_B, 4.0, weight=500, scale=0.25
        )
        assert outcome == "accepted"
        assert ledger.update_by_id("u2").weight == 500 and ledger.update_by_id("u2").scale == 0.25
        with pytest.raises(sqlite3.IntegrityError):
            ledger.record_update("cifar", 1, "rtx2", "u3", 1, Path("/spool/u3"), SHA_B, 4.0, scale=2.0)


def test_open_round_and_reopen_is_idempotent(ledger):
    assert ledger.current_round() is None
    opened = ledger.open_round(1, {"cifar": 0, "mnist": 0}, opened_at=10.0, deadline=70.0)
    assert (opened.round, opened.opened_at, opened.deadline, opened.state) == (1, 10.0, 70.0, "open")
    assert opened.tasks == {
        "cifar": TaskRoundRecord("cifar", 1, 0, "open", None, None),
        "mnist": TaskRoundRecord("mnist", 1, 0, "open", None, None),
    }
    again = ledger.open_round(1, {"cifar": 0}, opened_at=99.0, deadline=999.0)
    assert again == opened
    assert ledger.current_round() == opened


def test_open_round_needs_known_base_versions_and_tasks(ledger):
    with pytest.raises(ValueError, match="no global version 3"):
        ledger.open_round(1, {"cifar": 0, "mnist": 3}, 10.0, 70.0)
    with pytest.raises(ValueError, match="tasks"):
        ledger.open_round(1, {}, 10.0, 70.0)
    with pytest.raises(ProtocolError):
        ledger.open_round(1, {"../x": 0}, 10.0, 70.0)
    assert ledger.current_round() is None  # nothing half-written


def test_current_round_is_the_highest(ledger):
    ledger.open_round(1, {"cifar": 0}, 10.0, 70.0)
    ledger.finalize_task("cifar", 1, 1, Path("/ckpt/v1"), SHA_B, 60.0)
    ledger.open_round(2, {"cifar": 1, "mnist": 0}, 80.0, 140.0)
    current = ledger.current_round()
    assert current.round == 2 and set(current.tasks) == {"cifar", "mnist"}
    assert current.tasks["cifar"].base_version == 1
    assert ledger.get_round(1).tasks["cifar"].state == "finalized"
    assert ledger.get_round(3) is None


def test_extend_deadline(ledger):
    ledger.open_round(1, {"cifar": 0}, 10.0, 70.0)
    assert ledger.extend_deadline(1, 100.0).deadline == 100.0
    assert ledger.current_round().deadline == 100.0
    assert ledger.extend_deadline(1, 100.0).deadline == 100.0  # idempotent
    with pytest.raises(ValueError, match="before"):
        ledger.extend_deadline(1, 50.0)
    with pytest.raises(ValueError, match="never opened"):
        ledger.extend_deadline(7, 200.0)
    assert ledger.current_round().deadline == 100.0


def test_record_update_accepted_duplicate_conflict(ledger):
    ledger.open_round(1, {"cifar": 0, "mnist": 0}, 10.0, 70.0)
    assert update(ledger, "jetson1", "u1") == "accepted"
    assert update(ledger, "jetson1", "u1") == "duplicate"
    assert update(ledger, "jetson1", "u2", samples=99) == "conflict"  # first update of a device wins
    assert update(ledger, "rtx1", "u1") == "conflict"  # id taken by another device
    assert update(ledger, "rtx1", "u3", samples=250, at=6.0) == "accepted"
    assert update(ledger, "jetson1", "u4", task="mnist") == "accepted"  # same device, other task
    assert ledger.updates_for("cifar", 1) == [
        UpdateRecord("cifar", 1, "jetson1", "u1", 10, Path("/spool/u1.bin"), SHA_B, 5.0, 10, 1.0),
        UpdateRecord("cifar", 1, "rtx1", "u3", 250, Path("/spool/u3.bin"), SHA_B, 6.0, 250, 1.0),
    ]
    assert [u.update_id for u in ledger.updates_for("mnist", 1)] == ["u4"]
    assert ledger.updates_for("cifar", 2) == []


def test_updates_keep_arrival_order_not_time_or_name_order(ledger):
    ledger.open_round(1, {"cifar": 0}, 10.0, 70.0)
    for device, at in (("zeta", 9.0), ("alpha", 3.0), ("mid", 5.0)):
        assert update(ledger, device, f"id-{device}", at=at) == "accepted"
    assert [u.device for u in ledger.updates_for("cifar", 1)] == ["zeta", "alpha", "mid"]


def test_update_outside_an_open_task_round_is_rejected(ledger):
    with pytest.raises(ProtocolError, match="not part of round 1"):
        update(ledger, "jetson1", "u0")
    ledger.open_round(1, {"cifar": 0}, 10.0, 70.0)
    with pytest.raises(ProtocolError, match="not part of"):
        update(ledger, "jetson1", "u1", task="mnist")
    assert update(ledger, "jetson1", "u2") == "accepted"
    ledger.finalize_task("cifar", 1, 1, Path("/ckpt/v1"), SHA_B, 60.0)
    with pytest.raises(ProtocolError, match="already finalized"):
        update(ledger, "rtx1", "u3")
    assert update(ledger, "jetson1", "u2") == "duplicate"  # a late retransmission still gets its receipt
    assert [u.update_id for u in ledger.updates_for("cifar", 1)] == ["u2"]


def test_finalize_task_records_the_new_global_atomically(ledger):
    ledger.open_round(1, {"cifar": 0, "mnist": 0}, 10.0, 70.0)
    record = ledger.finalize_task("cifar", 1, 1, Path("/ckpt/cifar/v000001.safetensors"), SHA_B, 60.0)
    assert record == TaskRoundRecord("cifar", 1, 0, "finalized", 1, 60.0)
    assert ledger.latest_global("cifar") == GlobalRecord(
        "cifar", 1, Path("/ckpt/cifar/v000001.safetensors"), SHA_B, 60.0
    )
    assert ledger.latest_global("mnist").version == 0
    assert ledger.latest_global("unknown") is None
    # idempotent: the same call again changes nothing; a different version is refused
    assert ledger.finalize_task("cifar", 1, 1, Path("/ckpt/cifar/v000001.safetensors"), SHA_B, 61.0) == record
    with pytest.raises(ValueError, match="finalized as v1"):
        ledger.finalize_task("cifar", 1, 2, Path("/ckpt/cifar/v000002.safetensors"), SHA_B, 62.0)


def test_failed_finalize_changes_nothing(ledger):
    ledger.record_global("mnist", 1, Path("/ckpt/mnist/other.safetensors"), SHA_A, 2.0)
    ledger.open_round(1, {"mnist": 0}, 10.0, 70.0)
    with pytest.raises(ValueError, match="another file"):
        ledger.finalize_task("mnist", 1, 1, Path("/ckpt/mnist/v000001.safetensors"), SHA_B, 60.0)
    assert ledger.current_round().tasks["mnist"].state == "open"
    assert ledger.latest_global("mnist").path == Path("/ckpt/mnist/other.safetensors")
    with pytest.raises(ValueError, match="<= base"):
        ledger.finalize_task("mnist", 1, 0, Path("/ckpt/mnist/v000000.safetensors"), SHA_A, 60.0)
    with pytest.raises(ValueError, match="not part of"):
        ledger.finalize_task("cifar", 1, 1, Path("/ckpt/cifar/v000001.safetensors"), SHA_B, 60.0)
    assert ledger.latest_global("cifar").version == 0


def test_record_global_is_idempotent(ledger):
    again = ledger.record_global("cifar", 0, Path("/ckpt/cifar/v000000.safetensors"), SHA_A, 50.0)
    assert again == GlobalRecord("cifar", 0, Path("/ckpt/cifar/v000000.safetensors"), SHA_A, 1.0)
    with pytest.raises(ValueError, match="another file"):
        ledger.record_global("cifar", 0, Path("/ckpt/cifar/v000000.safetensors"), SHA_B, 50.0)


def test_finalize_round_requires_all_tasks(ledger):
    ledger.open_round(1, {"cifar": 0, "mnist": 0}, 10.0, 70.0)
    ledger.finalize_task("cifar", 1, 1, Path("/ckpt/c1"), SHA_B, 60.0)
    with pytest.raises(ValueError, match=r"open tasks \['mnist'\]"):
        ledger.finalize_round(1)
    assert ledger.current_round().state == "open"
    ledger.finalize_task("mnist", 1, 1, Path("/ckpt/m1"), SHA_B, 61.0)
    assert ledger.finalize_round(1).state == "finalized"
    assert ledger.finalize_round(1).state == "finalized"  # idempotent
    with pytest.raises(ValueError, match="finalized"):
        ledger.extend_deadline(1, 500.0)


def test_state_survives_reopening_the_database(db):
    with RoundLedger(db) as ledger:
        ledger.record_global("cifar", 0, Path("/ckpt/c0"), SHA_A, 1.0)
        ledger.open_round(1, {"cifar": 0}, 10.0, 70.0)
        ledger.extend_deadline(1, 90.0)
        assert update(ledger, "jetson1", "u1") == "accepted"
        ledger.finalize_task("cifar", 1, 1, Path("/ckpt/c1"), SHA_B, 60.0)
        ledger.open_round(2, {"cifar": 1}, 100.0, 160.0)
        assert update(ledger, "rtx1", "u2", round=2, samples=250) == "accepted"
        before = (ledger.get_round(1), ledger.current_round(), ledger.updates_for("cifar", 1))

    with RoundLedger(db) as reopened:
        assert (reopened.get_round(1), reopened.current_round(), reopened.updates_for("cifar", 1)) == before
        assert reopened.get_round(1).deadline == 90.0
        assert reopened.latest_global("cifar").version == 1
        assert [u.samples for u in reopened.updates_for("cifar", 2)] == [250]
        assert update(reopened, "rtx1", "u2", round=2) == "duplicate"
        assert update(reopened, "rtx1", "u9", round=2) == "conflict"


def test_recorded_update_survives_a_crash_without_close(db):
    """A process that dies right after record_update returns (no close, no atexit) loses nothing."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from aggregator.ledger import RoundLedger
        ledger = RoundLedger(Path({str(db)!r}))
        ledger.record_global("cifar", 0, Path("/ckpt/c0"), {SHA_A!r}, 1.0)
        ledger.open_round(1, {{"cifar": 0}}, 10.0, 70.0)
        outcome = ledger.record_update("cifar", 1, "jetson1", "u1", 10, Path("/spool/u1"), {SHA_B!r}, 5.0)
        assert outcome == "accepted"
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with RoundLedger(db) as ledger:
        assert [u.update_id for u in ledger.updates_for("cifar", 1)] == ["u1"]
        assert ledger.current_round().round == 1


def test_device_status_changes_are_recorded_with_when_they_changed(ledger):
    ledger.record_devices([("dev1", True, 10.0)])
    ledger.record_devices([("dev1", True, 20.0)])  # the same state again: still online since 10
    ledger.record_devices([("dev2", True, 15.0), ("dev2", False, 30.0)])  # in order, in one transaction
    assert [(d.device, d.online, d.changed_at) for d in ledger.devices()] == [
        ("dev1", True, 10.0),
        ("dev2", False, 30.0),
    ]
    with pytest.raises(ProtocolError):
        ledger.record_devices([("dev3", True, 1.0), ("bad/id", True, 1.0)])
    assert [d.device for d in ledger.devices()] == ["dev1", "dev2"]  # none of a refused batch


def test_a_read_only_ledger_sees_the_writers_commits_and_cannot_write(ledger, db):
    with RoundLedger(db, read_only=True) as reader:
        ledger.open_round(1, {"cifar": 0}, 100.0, 200.0, {"cifar": {"dev1": 5}})
        ledger.record_devices([("dev1", True, 100.0)])
        assert reader.current_round().round == 1 and [d.device for d in reader.devices()] == ["dev1"]
        assert [r.round for r in reader.recent_rounds(5)] == [1]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.record_devices([("dev2", True, 1.0)])


def test_a_read_only_ledger_needs_this_schema(db):
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with pytest.raises(RuntimeError, match=f"has schema v1, this code reads v{SCHEMA_VERSION}"):
        RoundLedger(db, read_only=True)


def test_a_schema_v1_ledger_is_migrated_and_keeps_its_records(db):
    from aggregator.ledger import _MIGRATIONS

    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(f"BEGIN; {_MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    conn.execute("INSERT INTO globals VALUES ('cifar', 0, '/ckpt/v0', ?, 1.0)", (SHA_A,))
    conn.close()
    with RoundLedger(db) as ledger:
        assert ledger.latest_global("cifar").sha256 == SHA_A
        assert ledger.devices() == []
        ledger.record_devices([("dev1", True, 5.0)])
    with RoundLedger(db, read_only=True) as reader:
        assert [d.device for d in reader.devices()] == ["dev1"]


def test_a_batch_commits_its_writes_together_and_a_rollback_keeps_none(ledger, db):
    ledger.open_round(1, {"cifar": 0}, 100.0, 200.0)
    with RoundLedger(db, read_only=True) as reader:
        ledger.begin_batch()
        assert update(ledger, "dev1", "u1") == "accepted"
        assert update(ledger, "dev2", "u2") == "accepted"
        with pytest.raises(ProtocolError):  # fails alone, writing nothing: the batch goes on
            update(ledger, "dev3", "u3", round=7)
        assert ledger.update_by_id("u1") is not None and reader.update_by_id("u1") is None
        ledger.commit_batch()
        assert [u.update_id for u in reader.updates_for("cifar", 1)] == ["u1", "u2"]

        ledger.begin_batch()
        update(ledger, "dev3", "u3")
        ledger.rollback_batch()
        assert ledger.update_by_id("u3") is None and reader.update_by_id("u3") is None
    assert update(ledger, "dev3", "u3") == "accepted"  # outside a batch: committed at once


def test_a_payload_recorded_as_part_of_a_segment_reads_back_its_bytes_and_a_cut_segment_is_refused(
    ledger, tmp_path
):
    segment = tmp_path / "a.segment"
    segment.write_bytes(b"first" + b"second")
    ledger.open_round(1, {"cifar": 0}, 100.0, 200.0)
    ledger.record_update("cifar", 1, "dev1", "u1", 10, segment, SHA_B, 5.0, part=(5, 6))
    ledger.record_update("cifar", 1, "dev2", "u2", 10, tmp_path / "u2.state", SHA_B, 5.0)
    (whole,) = [u for u in ledger.updates_for("cifar", 1) if u.update_id == "u2"]
    assert (
        ledger.update_by_id("u1").read_payload() == b"second"
        and whole.read_payload() == tmp_path / "u2.state"
    )
    segment.write_bytes(b"first" + b"sec")  # the disk lost its tail
    with pytest.raises(ProtocolError, match="cut short"):
        ledger.update_by_id("u1").read_payload()
