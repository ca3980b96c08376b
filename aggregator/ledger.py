"""The aggregator's durable record of rounds, accepted updates and global versions (SQLite, WAL, fsync'd).

Every method commits before it returns, so a caller may acknowledge what it recorded as soon as the call ends,
unless a batch is open (`begin_batch`): then writes wait for `commit_batch`, one commit (one fsync) for many
writes, and only then may the caller acknowledge them. Writes are idempotent: repeating a call with the same arguments changes nothing. Update payload files and
checkpoints are written by the caller; the ledger stores their paths and sha256.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from protocol.errors import ProtocolError
from protocol.topics import check_name

State = Literal["open", "finalized"]
UpdateOutcome = Literal["accepted", "duplicate", "conflict"]

# Migration i brings the schema from user_version i to i + 1; append new ones, never edit old ones.
_MIGRATIONS = (
    """
    CREATE TABLE rounds (
        round      INTEGER PRIMARY KEY CHECK (round >= 1),
        opened_at  REAL NOT NULL,
        deadline   REAL NOT NULL,
        state      TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'finalized'))
    );
    CREATE TABLE globals (
        task       TEXT NOT NULL,
        version    INTEGER NOT NULL CHECK (version >= 0),
        path       TEXT NOT NULL,
        sha256     TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (task, version)
    );
    CREATE TABLE task_rounds (
        task         TEXT NOT NULL,
        round        INTEGER NOT NULL REFERENCES rounds (round),
        base_version INTEGER NOT NULL,
        state        TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'finalized')),
        new_version  INTEGER,
        finalized_at REAL,
        PRIMARY KEY (task, round),
        FOREIGN KEY (task, base_version) REFERENCES globals (task, version),
        FOREIGN KEY (task, new_version) REFERENCES globals (task, version),
        CHECK ((state = 'open') = (new_version IS NULL AND finalized_at IS NULL))
    );
    CREATE TABLE updates (
        task         TEXT NOT NULL,
        round        INTEGER NOT NULL,
        device       TEXT NOT NULL,
        update_id    TEXT NOT NULL UNIQUE,
        samples      INTEGER NOT NULL CHECK (samples >= 1),
        payload_path TEXT NOT NULL,
        sha256       TEXT NOT NULL,
        received_at  REAL NOT NULL,
        PRIMARY KEY (task, round, device),
        FOREIGN KEY (task, round) REFERENCES task_rounds (task, round)
    );
    CREATE TABLE participants (
        task     TEXT NOT NULL,
        round    INTEGER NOT NULL,
        device   TEXT NOT NULL,
        samples  INTEGER NOT NULL CHECK (samples >= 0),
        PRIMARY KEY (task, round, device),
        FOREIGN KEY (task, round) REFERENCES task_rounds (task, round)
    );
    """,
    # 2: what an update counts for after the operator's limits: its weight, and the factor its delta was scaled by
    """
    ALTER TABLE updates ADD COLUMN weight INTEGER CHECK (weight >= 1);
    UPDATE updates SET weight = samples;
    ALTER TABLE updates ADD COLUMN scale REAL NOT NULL DEFAULT 1.0 CHECK (scale > 0 AND scale <= 1);
    """,
    # 3: devices as the aggregator last saw them (for `fedmt-aggregator status`)
    """
    CREATE TABLE devices (
        device     TEXT PRIMARY KEY,
        online     INTEGER NOT NULL CHECK (online IN (0, 1)),
        changed_at REAL NOT NULL
    );
    """,
    # 4: the codec an update's payload is in (protocol.codecs); updates before it were dense
    """
    ALTER TABLE updates ADD COLUMN codec TEXT NOT NULL DEFAULT 'dense';
    """,
    # 5: a payload that is part of a file (a segment of small updates): its offset and size; NULL: the whole file
    """
    ALTER TABLE updates ADD COLUMN payload_offset INTEGER CHECK (payload_offset >= 0);
    ALTER TABLE updates ADD COLUMN payload_size INTEGER CHECK (payload_size >= 0);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass(frozen=True)
class TaskRoundRecord:
    task: str
    round: int
    base_version: int
    state: State
    new_version: int | None
    finalized_at: float | None


@dataclass(frozen=True)
class RoundRecord:
    round: int
    opened_at: float
    deadline: float
    state: State
    tasks: dict[str, TaskRoundRecord]


@dataclass(frozen=True)
class UpdateRecord:
    task: str
    round: int
    device: str
    update_id: str
    samples: int  # as the device declared
    payload_path: Path
    sha256: str
    received_at: float
    weight: int  # what the update weighs in the aggregation (samples unless the operator's limits changed it)
    scale: float  # the factor its delta is multiplied by (1.0 unless clipped to the task's norm bound)
    codec: str = "dense"  # what its payload is in (protocol.codecs)
    #: where the payload starts in its file (a segment), and its size; None: the whole file
    payload_offset: int | None = None
    payload_size: int | None = None

    def read_payload(self) -> Path | bytes:
        """The payload: its file, or its bytes where it is part of a segment file."""
        if self.payload_offset is None:
            return self.payload_path
        with open(self.payload_path, "rb") as file:
            data = os.pread(file.fileno(), self.payload_size or 0, self.payload_offset)
        if len(data) != self.payload_size:
            raise ProtocolError(f"update {self.update_id}: its segment {self.payload_path} is cut short")
        return data


@dataclass(frozen=True)
class DeviceRecord:
    device: str
    online: bool
    changed_at: float  # when it last went online or offline


@dataclass(frozen=True)
class GlobalRecord:
    task: str
    version: int
    path: Path
    sha256: str
    created_at: float


class RoundLedger:
    """One SQLite connection, used from one thread. Caller mistakes raise ValueError; a device's update that
    does not belong to an open task round raises ProtocolError."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """Open (creating or migrating) the ledger at `path`; `read_only` reads one that a running aggregator
        may be writing, and needs its schema to be this code's."""
        self.path = Path(path)
        self._batch = False  # a batch is open: writes wait for commit_batch
        # Transactions are explicit. The ledger may be created on one thread and then used by another (the
        # service thread), but never by two at once.
        if read_only:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version != SCHEMA_VERSION:
                self._db.close()
                raise RuntimeError(
                    f"ledger {self.path} has schema v{version}, this code reads v{SCHEMA_VERSION}: "
                    "run the aggregator of this version on it first"
                )
            return
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RoundLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- rounds ------------------------------------------------------------------------------------------

    def open_round(
        self,
        round: int,
        tasks: Mapping[str, int],
        opened_at: float,
        deadline: float,
        participants: Mapping[str, Mapping[str, int]] | None = None,
    ) -> RoundRecord:
        """Open `round` with each task's base version and, per task, the expected devices and the samples
        they declared; reopening an existing round returns it unchanged."""
        with self._transaction():
            existing = self.get_round(round)
            if existing is not None:
                return existing
            if round < 1 or not tasks:
                raise ValueError(f"round must be >= 1 and have tasks, got round {round} with {dict(tasks)}")
            for task, base in tasks.items():
                if self.global_version(check_name("task", task), base) is None:
                    raise ValueError(f"task {task!r} has no global version {base} recorded")
            self._db.execute(
                "INSERT INTO rounds (round, opened_at, deadline) VALUES (?, ?, ?)",
                (round, opened_at, deadline),
            )
            self._db.executemany(
                "INSERT INTO task_rounds (task, round, base_version) VALUES (?, ?, ?)",
                [(task, round, base) for task, base in tasks.items()],
            )
            self._db.executemany(
                "INSERT INTO participants (task, round, device, samples) VALUES (?, ?, ?, ?)",
                [
                    (task, round, check_name("device", device), samples)
                    for task, devices in (participants or {}).items()
                    for device, samples in devices.items()
                ],
            )
            return self._require_round(round)

    def participants(self, round: int) -> dict[str, dict[str, int]]:
        """Per task of `round`: the devices expected to report and the samples each declared."""
        result: dict[str, dict[str, int]] = {}
        rows = self._db.execute(
            "SELECT task, device, samples FROM participants WHERE round = ? ORDER BY task, device", (round,)
        )
        for task, device, samples in rows:
            result.setdefault(task, {})[device] = samples
        return result

    def last_participation(self, task: str) -> dict[str, tuple[int, float | None]]:
        """Per device: the last round it was expected to report for `task`, and how many seconds after that round
        opened its update was recorded (None: none was)."""
        rows = self._db.execute(
            "SELECT p.device, p.round, u.received_at - r.opened_at FROM participants p "
            "JOIN rounds r ON r.round = p.round "
            "LEFT JOIN updates u ON (u.task, u.round, u.device) = (p.task, p.round, p.device) "
            "WHERE p.task = ? AND p.round = "
            "(SELECT MAX(q.round) FROM participants q WHERE q.task = p.task AND q.device = p.device)",
            (task,),
        )
        return {device: (round, seconds) for device, round, seconds in rows}

    def extend_deadline(self, round: int, deadline: float) -> RoundRecord:
        """Move an open round's deadline later (or keep it); ValueError if earlier or the round is closed."""
        with self._transaction():
            record = self._require_round(round)
            if record.state != "open":
                raise ValueError(f"round {round} is {record.state}; its deadline cannot change")
            if deadline < record.deadline:
                raise ValueError(
                    f"round {round}: deadline {deadline} is before the current {record.deadline}"
                )
            self._db.execute("UPDATE rounds SET deadline = ? WHERE round = ?", (deadline, round))
            return self._require_round(round)

    def get_round(self, round: int) -> RoundRecord | None:
        row = self._db.execute(
            "SELECT round, opened_at, deadline, state FROM rounds WHERE round = ?", (round,)
        ).fetchone()
        if row is None:
            return None
        tasks = self._db.execute(
            "SELECT task, round, base_version, state, new_version, finalized_at FROM task_rounds "
            "WHERE round = ? ORDER BY task",
            (round,),
        )
        return RoundRecord(*row, tasks={t[0]: TaskRoundRecord(*t) for t in tasks})

    def current_round(self) -> RoundRecord | None:
        """The highest round opened so far, with its tasks' states."""
        (highest,) = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return None if highest is None else self.get_round(highest)

    def recent_rounds(self, limit: int) -> list[RoundRecord]:
        """The last `limit` rounds opened, latest first."""
        rows = self._db.execute("SELECT round FROM rounds ORDER BY round DESC LIMIT ?", (limit,))
        return [self._require_round(number) for (number,) in rows.fetchall()]

    def finalize_round(self, round: int) -> RoundRecord:
        """Mark a round finalized once all its tasks are; idempotent."""
        with self._transaction():
            record = self._require_round(round)
            still_open = sorted(t for t, tr in record.tasks.items() if tr.state != "finalized")
            if still_open:
                raise ValueError(f"round {round} still has open tasks {still_open}")
            self._db.execute("UPDATE rounds SET state = 'finalized' WHERE round = ?", (round,))
            return self._require_round(round)

    # --- updates -----------------------------------------------------------------------------------------

    def record_update(
        self,
        task: str,
        round: int,
        device: str,
        update_id: str,
        samples: int,
        payload_path: Path,
        sha256: str,
        received_at: float,
        *,
        weight: int | None = None,
        scale: float = 1.0,
        codec: str = "dense",
        part: tuple[int, int] | None = None,
    ) -> UpdateOutcome:
        """Record a device's update for a task round; the first update of a device wins. `weight` (default:
        `samples`) and `scale` say what it counts for after the operator's limits; `part` (offset, size) says
        where in `payload_path` the payload is, when it does not fill the file.

        "duplicate": this update id is already recorded for the same task, round and device;
        "conflict": the device already has another update here, or another task/round/device owns the id;
        "accepted": recorded and committed. ProtocolError if the task round is unknown or finalized.
        """
        key = (task, round, device)
        values = (
            *key,
            update_id,
            samples,
            str(payload_path),
            sha256,
            received_at,
            samples if weight is None else weight,
            scale,
            codec,
            *(part or (None, None)),
        )
        # One statement, atomic alone (in a batch, or committed on its own): it inserts only where the task round
        # is open and neither the id nor the device's place is taken; the reads below say why it did not.
        if self._db.execute(_INSERT_UPDATE, (*values, task, round)).rowcount:
            return "accepted"
        row = self._db.execute(
            "SELECT task, round, device FROM updates WHERE update_id = ?", (update_id,)
        ).fetchone()
        if row is not None:
            return "duplicate" if row == key else "conflict"
        taken = self._db.execute(
            "SELECT 1 FROM updates WHERE task = ? AND round = ? AND device = ?", key
        ).fetchone()
        if taken is not None:
            return "conflict"
        state = self._db.execute(
            "SELECT state FROM task_rounds WHERE task = ? AND round = ?", (task, round)
        ).fetchone()
        why = "is not part of" if state is None else "is already finalized in"
        raise ProtocolError(f"update {update_id}: task {task!r} {why} round {round}")

    def update_by_id(self, update_id: str) -> UpdateRecord | None:
        row = self._db.execute(
            f"SELECT {_UPDATE_COLUMNS} FROM updates WHERE update_id = ?",
            (update_id,),
        ).fetchone()
        return None if row is None else _update_record(row)

    def updates_for(self, task: str, round: int) -> list[UpdateRecord]:
        """A task round's recorded updates, in arrival (insertion) order."""
        rows = self._db.execute(
            f"SELECT {_UPDATE_COLUMNS} FROM updates WHERE task = ? AND round = ? ORDER BY rowid",
            (task, round),
        )
        return [_update_record(row) for row in rows]

    # --- devices -----------------------------------------------------------------------------------------

    def record_devices(self, statuses: Iterable[tuple[str, bool, float]]) -> None:
        """Note devices' statuses, (device, online, at) in the order they came, in one transaction; a device's
        `changed_at` moves only when its status changes."""
        rows = [(check_name("device", device), int(online), at) for device, online, at in statuses]
        if not rows:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT INTO devices (device, online, changed_at) VALUES (?, ?, ?) ON CONFLICT (device) DO "
                "UPDATE SET online = excluded.online, changed_at = excluded.changed_at "
                "WHERE online != excluded.online",
                rows,
            )

    def devices(self) -> list[DeviceRecord]:
        rows = self._db.execute("SELECT device, online, changed_at FROM devices ORDER BY device")
        return [DeviceRecord(device, bool(online), changed_at) for device, online, changed_at in rows]

    # --- global versions ---------------------------------------------------------------------------------

    def record_global(
        self, task: str, version: int, path: Path, sha256: str, created_at: float
    ) -> GlobalRecord:
        """Record a global version outside any round (the initial version 0); idempotent."""
        with self._transaction():
            return self._insert_global(
                GlobalRecord(check_name("task", task), version, Path(path), sha256, created_at)
            )

    def finalize_task(
        self, task: str, round: int, new_version: int, checkpoint_path: Path, sha256: str, finalized_at: float
    ) -> TaskRoundRecord:
        """In one transaction: record the new global version and mark the task round finalized; idempotent."""
        with self._transaction():
            record = self._require_round(round).tasks.get(task)
            if record is None:
                raise ValueError(f"task {task!r} is not part of round {round}")
            if record.state == "finalized":
                if record.new_version != new_version:
                    raise ValueError(
                        f"task {task!r} round {round} was finalized as "
                        f"v{record.new_version}, not v{new_version}"
                    )
                return record
            if new_version <= record.base_version:
                raise ValueError(f"task {task!r}: new version {new_version} <= base {record.base_version}")
            self._insert_global(GlobalRecord(task, new_version, Path(checkpoint_path), sha256, finalized_at))
            self._db.execute(
                "UPDATE task_rounds SET state = 'finalized', new_version = ?, finalized_at = ? "
                "WHERE task = ? AND round = ?",
                (new_version, finalized_at, task, round),
            )
            return self._require_round(round).tasks[task]

    def latest_global(self, task: str) -> GlobalRecord | None:
        row = self._db.execute(
            "SELECT task, version, path, sha256, created_at FROM globals WHERE task = ? "
            "ORDER BY version DESC LIMIT 1",
            (task,),
        ).fetchone()
        return None if row is None else _global_record(row)

    # --- internals ---------------------------------------------------------------------------------------

    def begin_batch(self) -> None:
        """Hold the commits of the writes that follow until `commit_batch` (or `rollback_batch`)."""
        if not self._batch:
            self._db.execute("BEGIN IMMEDIATE")
            self._batch = True

    def commit_batch(self) -> None:
        """Commit the writes of the open batch, if any; on failure nothing of it is kept and the error raised."""
        if not self._batch:
            return
        self._batch = False
        try:
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def rollback_batch(self) -> None:
        """Drop the writes of the open batch, if any."""
        if self._batch:
            self._batch = False
            self._db.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction committed (fsync'd) on success and rolled back on any error; in a batch, a
        savepoint that rolls back alone and commits with the batch."""
        begin, commit, rollback = (
            ("SAVEPOINT step", "RELEASE step", "ROLLBACK TO step; RELEASE step")
            if self._batch
            else ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")
        )
        self._db.execute(begin)
        try:
            yield
        except BaseException:
            for statement in rollback.split("; "):
                self._db.execute(statement)
            raise
        self._db.execute(commit)

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"ledger {self.path} has schema v{version}; this code knows up to v{SCHEMA_VERSION}"
            )
        for target, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            try:
                self._db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {target}; COMMIT;")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _require_round(self, round: int) -> RoundRecord:
        record = self.get_round(round)
        if record is None:
            raise ValueError(f"round {round} was never opened")
        return record

    def global_version(self, task: str, version: int) -> GlobalRecord | None:
        row = self._db.execute(
            "SELECT task, version, path, sha256, created_at FROM globals WHERE task = ? AND version = ?",
            (task, version),
        ).fetchone()
        return None if row is None else _global_record(row)

    def _insert_global(self, record: GlobalRecord) -> GlobalRecord:
        """Insert a global version, or return the identical one already recorded; ValueError if it differs."""
        existing = self.global_version(record.task, record.version)
        if existing is None:
            self._db.execute(
                "INSERT INTO globals (task, version, path, sha256, created_at) VALUES (?, ?, ?, ?, ?)",
                (record.task, record.version, str(record.path), record.sha256, record.created_at),
            )
            return record
        if (existing.path, existing.sha256) != (record.path, record.sha256):
            raise ValueError(f"task {record.task!r} v{record.version} is already recorded with another file")
        return existing


_UPDATE_COLUMNS = (
    "task, round, device, update_id, samples, payload_path, sha256, received_at, weight, scale, codec, "
    "payload_offset, payload_size"
)
_INSERT_UPDATE = (
    f"INSERT INTO updates ({_UPDATE_COLUMNS}) SELECT {', '.join('?' * 13)} FROM task_rounds "
    "WHERE task = ? AND round = ? AND state = 'open' ON CONFLICT DO NOTHING"
)


def _update_record(row: tuple) -> UpdateRecord:
    task, round, device, update_id, samples, path, sha256, *rest = row
    return UpdateRecord(task, round, device, update_id, samples, Path(path), sha256, *rest)


def _global_record(row: tuple) -> GlobalRecord:
    task, version, path, sha256, created_at = row
    return GlobalRecord(task, version, Path(path), sha256, created_at)
