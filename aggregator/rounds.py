"""Round logic: who trains what, validating and folding updates, finalising global versions.

No MQTT here: the service feeds device news and updates in and publishes what comes back. A round opens for
all tasks at once (one synchronisation cycle), each with the devices its sampling selects (aggregator.sampling;
every eligible device without it); each task finalises on its own as soon as its target of updates is in (every
expected device reported or failed; with sampling, K of them), or at the deadline with at least `min_updates`;
its schedules are then cleared, and the next round opens when all tasks of the current one are final. Updates
are taken in groups: each is validated and staged (`accept_update`), the group made durable at once (`commit`:
payloads and ledger rows, one commit) and then folded (`fold_accepted`); everything accepted is in the ledger
before a receipt is issued.
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.buffers import BufferPool
from aggregator.checkpoints import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.errors import Rejected
from aggregator.initial import initial_state
from aggregator.ledger import RoundLedger, RoundRecord
from aggregator.limits import LimitedUpdate, limit_update, scale_delta
from aggregator.removal import BackgroundRemover
from aggregator.sampling import Participation, select, target
from aggregator.segments import Segments
from aggregator.strategies import Strategy
from common.durable import fsync_paths
from protocol import ProtocolError
from protocol.chunking import transfer_info
from protocol.codecs import make_codec, warmed
from protocol.codecs.dense import DenseCodec
from protocol.deltas import encode_version
from protocol.schemas import (
    DeviceProfile,
    GlobalDelta,
    GlobalManifest,
    Receipt,
    Schedule,
    TaskAssignment,
    TensorInfo,
    UpdateManifest,
)
from protocol.tensors import decode_state, describe, encode_state
from protocol.topics import check_name

log = logging.getLogger(__name__)


@dataclass
class GlobalModel:
    """A task's current global version, ready to publish."""

    manifest: GlobalManifest
    state: dict[str, np.ndarray]
    payload: bytes
    delta_payload: bytes | None = None  # the version as a delta to the one before (manifest.delta says how)


@dataclass
class TaskRound:
    """The in-memory side of one task's open round: its aggregation and who still has to report."""

    base_version: int
    expected: dict[str, int]  # device -> samples it declared
    strategy: Strategy
    target: int  # updates that finalise it: every expected device's, or K with sampling
    reported: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    final: bool = False

    @property
    def waiting_for(self) -> set[str]:
        return set(self.expected) - self.reported - self.failed

    @property
    def complete(self) -> bool:
        """Its target of updates is in, or it has updates and nobody else can still report."""
        return len(self.reported) >= self.target or (not self.waiting_for and self.strategy.count > 0)


@dataclass(frozen=True)
class Staged:
    """An update validated, limited, stored in its durable place (a file of its own, linked, or part of a
    segment) and written to the ledger's open batch."""

    manifest: UpdateManifest
    limited: LimitedUpdate
    task_round: TaskRound
    path: Path | None  # its own file; None: it is part of a segment


@dataclass
class Outbound:
    """What the service must publish after a call."""

    globals: list[GlobalModel] = field(default_factory=list)
    schedules: list[Schedule] = field(default_factory=list)  # one per device and task
    cleared_schedules: list[tuple[str, str]] = field(default_factory=list)  # (device, task)


class Coordinator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        root = Path(config.state_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.updates_dir = root / "updates"
        self.ledger = RoundLedger(root / "ledger.sqlite")
        self.checkpoints = CheckpointStore(root / "checkpoints")
        self.remover = BackgroundRemover()  # a finalised round's payloads, off the critical path
        self.segments = Segments(self.updates_dir)  # payloads that came whole in memory
        self.globals: dict[str, GlobalModel] = {}
        self.buffers: dict[str, BufferPool] = {task: BufferPool() for task in config.tasks}
        self._staged: list[Staged] = []  # in the ledger's open batch
        self._accepted: list[Staged] = []  # committed, not folded yet
        self.round: RoundRecord | None = None
        self.task_rounds: dict[str, TaskRound] = {}
        self.online: set[str] = set()
        # device -> task -> the samples its profile declares: all of a profile that rounds are planned by (a fleet
        # of thousands would otherwise keep each device's whole profile)
        self.declared: dict[str, dict[str, int]] = {}
        self.participation: dict[str, dict[str, Participation]] = {}  # task -> device -> its last round
        # device -> online, as this process wrote it to the ledger; and the changes (device, online, at) that the
        # next commit writes
        self._recorded_status: dict[str, bool] = {}
        self._statuses: list[tuple[str, bool, float]] = []
        #: called with (task, reason) for every rejected update; the service counts them
        self.on_rejected: Callable[[str, str], None] = lambda task, reason: None

    def close(self) -> None:
        """Finish removing files and close the ledger."""
        self.segments.close_all()
        self.remover.close()
        self.ledger.close()

    # --- start-up ---------------------------------------------------------------------------------------

    def start(self) -> Outbound:
        """Load or create every task's latest global version and resume an open round from the ledger."""
        for task, task_config in self.config.tasks.items():
            record = self.ledger.latest_global(task)
            if record is None:
                state = initial_state(task, task_config)
                ref = self.checkpoints.save(task, 0, state)
                model = self._global_model(task, 0, state)
                self.ledger.record_global(task, 0, ref.path, model.manifest.transfer.sha256, time.time())
                log.info("task %s: initial global v0 created", task)
            else:
                state = self.checkpoints.load(task, record.version)
                model = self._global_model(task, record.version, state)
                if model.manifest.transfer.sha256 != record.sha256:
                    raise RuntimeError(f"checkpoint of {task} v{record.version} does not match the ledger")
            self.globals[task] = model
            self.participation[task] = {
                device: Participation(*last) for device, last in self.ledger.last_participation(task).items()
            }
        self.round = self.ledger.current_round()  # the next round is numbered after it
        if self.round is not None and self.round.state == "open":
            self._resume(self.round)
        self._remove_orphaned_updates()
        return self.retained()

    def retained(self) -> Outbound:
        """What the broker should hold retained: every global version, the open round's schedules, and no
        schedule of the latest round's final tasks (the process may have stopped before it cleared them)."""
        out = Outbound(globals=list(self.globals.values()), schedules=self.schedules())
        if self.round is not None:
            record = self.ledger.get_round(self.round.round)
            out.cleared_schedules = [
                (device, task)
                for task, devices in self.ledger.participants(record.round).items()
                if record.tasks[task].state == "finalized"
                for device in sorted(devices)
            ]
        return out

    def _resume(self, record: RoundRecord) -> None:
        self.round = record
        participants = self.ledger.participants(record.round)
        for task, task_record in record.tasks.items():
            task_round = self._new_task_round(task, task_record.base_version, participants.get(task, {}))
            task_round.final = task_record.state == "finalized"
            if not task_round.final:
                for update in self.ledger.updates_for(task, record.round):
                    layout = self.globals[task].manifest.tensors
                    delta = scale_delta(read_delta(update.read_payload(), update.codec, layout), update.scale)
                    task_round.strategy.fold(delta, update.weight)
                    task_round.reported.add(update.device)
            self.task_rounds[task] = task_round
        log.info("resumed round %d (%d tasks)", record.round, len(record.tasks))

    def _remove_orphaned_updates(self) -> None:
        """Delete update payloads that no open task round holds in the ledger: moved but never recorded (the
        process stopped in between), or left behind by a round already finalised."""
        keep = {
            update.payload_path.resolve()
            for task, task_round in self.task_rounds.items()
            if not task_round.final
            for update in self.ledger.updates_for(task, self.round.round)
        }
        orphans = [p for p in self.updates_dir.rglob("*") if p.is_file() and p.resolve() not in keep]
        for path in orphans:
            path.unlink()
        for folder in sorted((p for p in self.updates_dir.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        if orphans:
            log.warning("removed %d update payloads no open round holds: %s", len(orphans), orphans[:5])

    # --- device registry --------------------------------------------------------------------------------

    def device_status(self, device: str, online: bool) -> None:
        """A device's status; the ledger notes changes with the next `commit` (retained statuses repeat on every
        reconnect)."""
        if self._recorded_status.get(device) != online:
            self._statuses.append((check_name("device", device), online, time.time()))
        (self.online.add if online else self.online.discard)(device)

    def device_profile(self, profile: DeviceProfile) -> None:
        self.declared[profile.device] = {task: data.samples for task, data in profile.tasks.items()}

    def task_failed(self, device: str, task: str, round_: int) -> None:
        """A device reported it cannot deliver this task's update: stop waiting for it."""
        task_round = self.task_rounds.get(task)
        if (
            self.round is not None
            and round_ == self.round.round
            and task_round
            and device in task_round.expected
        ):
            task_round.failed.add(device)

    # --- updates ----------------------------------------------------------------------------------------

    def screen(self, manifest: UpdateManifest, device: str, task: str) -> Receipt | None:
        """The answer to an update manifest that arrived on `device`'s update topic for `task`, when it needs no
        transfer: rejected if it names another device or task (the one sender check), a duplicate receipt for
        an update already recorded (a resend); None: receive its payload."""
        if (manifest.device, manifest.task) != (device, task):
            reason = f"update names device {manifest.device}, task {manifest.task}; sent as {device}, {task}"
            return self._reject(manifest, Rejected("wrong_sender", reason))
        return self._recorded(manifest)

    def _recorded(self, manifest: UpdateManifest) -> Receipt | None:
        """The receipt of an update id the ledger holds already: a duplicate, or rejected if it was another's."""
        recorded = self.ledger.update_by_id(manifest.update_id)
        if recorded is None:
            return None
        same = (recorded.task, recorded.round, recorded.device) == (
            manifest.task,
            manifest.round,
            manifest.device,
        )
        if not same:
            return self._reject(manifest, Rejected("id_reused", "update id reused"))
        return self.receipt(manifest, "duplicate")

    def accept_update(self, manifest: UpdateManifest, payload: Path | bytes) -> Receipt | None:
        """Validate an update (that passed `screen`) fully, apply the task's limits and stage it: its payload, a
        file, is linked to its durable place (the caller keeps it), bytes are appended to the task round's
        segment, and its ledger row is written in the open batch. None: staged, `commit` gives its receipt.
        Otherwise the receipt now: rejected, duplicate, or retry (the disk cannot take it)."""
        try:
            task_round = self._check_update(manifest)
            delta = read_delta(payload, manifest.codec, self.globals[manifest.task].manifest.tensors)
            task_round.strategy.validate(delta, manifest.samples)
            limited = limit_update(
                delta,
                manifest.samples,
                self.config.tasks[manifest.task].limits,
                self.config.registered_samples.get(manifest.device, {}).get(manifest.task),
            )
        except ProtocolError as exc:
            log.warning("rejected update %s from %s: %s", manifest.update_id, manifest.device, exc)
            return self._reject(manifest, exc)
        if any(staged.manifest.update_id == manifest.update_id for staged in self._staged):
            return None  # a copy of an update staged in this batch: its receipt comes with the commit
        # The ledger holds an update of this device and task round only if it reported (folded, or resumed): this
        # very update recorded while this copy was in transit (keep the recorded file), or another one
        if manifest.device in task_round.reported:
            return self._not_recorded(manifest)
        try:
            outcome, durable = self._record(manifest, payload, limited)
        except (OSError, sqlite3.OperationalError) as exc:
            return self._cannot_store(manifest, exc)
        if outcome == "duplicate":  # the ledger holds this very update at `durable`: keep the file
            return self.receipt(manifest, "duplicate")
        if outcome != "accepted":
            if durable is not None:
                durable.unlink(missing_ok=True)
            return self._not_recorded(manifest)
        self._staged.append(Staged(manifest, limited, task_round, durable))
        return None

    def _not_recorded(self, manifest: UpdateManifest) -> Receipt:
        """The receipt of an update the ledger would not take: a duplicate, its id reused, or another update of
        the device's recorded already."""
        known = self._recorded(manifest)
        if known is None:
            known = self._reject(manifest, Rejected("already_reported", "device already reported"))
        return known

    def commit(self, sync: Callable[[set[Path]], None] = fsync_paths) -> list[tuple[str, Receipt]]:
        """Make the staged updates and the devices' status changes durable together (`sync` the updates' folders
        and segments, with whatever else the caller makes durable first, then one ledger commit) and return the
        updates' devices and receipts: accepted (saying what the limits changed), or retry when the ledger cannot
        take them (nothing kept). A failed fsync is raised, nothing committed: what the page cache holds can no
        longer be trusted (the caller stops)."""
        staged, self._staged = self._staged, []
        statuses, self._statuses = self._statuses, []
        try:
            sync(
                {update.path.parent for update in staged if update.path is not None} | self.segments.written()
            )
        except BaseException:
            self._drop(staged)
            raise
        try:
            self.ledger.record_devices(statuses)  # in the group's batch, if one is open: one commit
            self.ledger.commit_batch()
        except sqlite3.Error as exc:
            self._drop(staged)
            if statuses:  # not marked recorded: the device's next status writes it
                log.error("device statuses not recorded: %s", exc)
            return [(update.manifest.device, self._cannot_store(update.manifest, exc)) for update in staged]
        self._recorded_status.update((device, online) for device, online, _ in statuses)
        self._accepted.extend(staged)
        receipts = []
        for update in staged:
            changed = "; ".join(update.limited.notes)
            if changed:
                manifest = update.manifest
                log.warning(
                    "task %s round %d: update from %s: %s",
                    manifest.task,
                    manifest.round,
                    manifest.device,
                    changed,
                )
            receipts.append((update.manifest.device, self.receipt(update.manifest, "accepted", changed)))
        return receipts

    def _drop(self, staged: list[Staged]) -> None:
        self.ledger.rollback_batch()
        for update in staged:
            if update.path is not None:  # what it appended to a segment stays there, unreferenced
                update.path.unlink(missing_ok=True)

    def fold_accepted(self) -> None:
        """Fold the committed updates into their task rounds, in the order the ledger holds them."""
        accepted, self._accepted = self._accepted, []
        for update in accepted:
            manifest, limited, task_round = update.manifest, update.limited, update.task_round
            task_round.strategy.fold_valid(limited.delta, limited.weight)
            task_round.reported.add(manifest.device)
            self.participation[manifest.task][manifest.device] = Participation(
                manifest.round, time.time() - self.round.opened_at
            )
            log.debug(  # a line per update is a fleet's worth a round; INFO has one per task round (_finalize)
                "task %s round %d: update from %s (weight %d, delta norm %.4g), %d/%d",
                manifest.task,
                manifest.round,
                manifest.device,
                limited.weight,
                limited.norm,
                task_round.strategy.count,
                len(task_round.expected),
            )

    def _cannot_store(self, manifest: UpdateManifest, exc: Exception) -> Receipt:
        log.error("refused update %s from %s: cannot store it: %s", manifest.update_id, manifest.device, exc)
        self.on_rejected(manifest.task, "cannot_store")
        return self.receipt(manifest, "retry", f"the aggregator cannot store updates now: {exc}")

    def _record(
        self, manifest: UpdateManifest, payload: Path | bytes, limited: LimitedUpdate
    ) -> tuple[str, Path | None]:
        """Store the payload in its durable place (durable once `commit` syncs it) and record it in the ledger's
        open batch with the weight and scale the limits gave it; returns the outcome and the payload's own file
        (None where it was appended to a segment). On failure a linked file is removed."""
        if isinstance(payload, bytes):
            segment, offset = self.segments.append(manifest.task, manifest.round, payload)
            return self._record_row(manifest, segment, limited, (offset, len(payload))), None
        durable = (
            self.updates_dir
            / manifest.task
            / f"r{manifest.round:06d}"
            / f"{manifest.device}.{manifest.update_id}.state"
        )
        linking = durable.with_name(f".{durable.name}.link")
        try:
            durable.parent.mkdir(parents=True, exist_ok=True)
            linking.unlink(missing_ok=True)
            os.link(payload, linking)
            os.replace(linking, durable)  # over an earlier copy of this very update: the same bytes
            return self._record_row(manifest, durable, limited), durable
        except BaseException:
            linking.unlink(missing_ok=True)
            durable.unlink(missing_ok=True)
            raise

    def _record_row(
        self,
        manifest: UpdateManifest,
        path: Path,
        limited: LimitedUpdate,
        part: tuple[int, int] | None = None,
    ) -> str:
        self.ledger.begin_batch()
        return self.ledger.record_update(
            manifest.task,
            manifest.round,
            manifest.device,
            manifest.update_id,
            manifest.samples,
            path,
            manifest.transfer.sha256,
            time.time(),
            weight=limited.weight,
            scale=limited.scale,
            codec=manifest.codec,
            part=part,
        )

    def _check_update(self, manifest: UpdateManifest) -> TaskRound:
        if manifest.task not in self.config.tasks:
            raise Rejected("unknown_task", f"unknown task {manifest.task}")
        task_round = self.task_rounds.get(manifest.task)
        if self.round is None or manifest.round != self.round.round or task_round is None or task_round.final:
            raise Rejected("round_not_open", f"task {manifest.task} round {manifest.round} is not open")
        declared = task_round.expected.get(manifest.device)
        if declared is None:
            raise Rejected(
                "not_scheduled",
                f"device {manifest.device} is not scheduled for {manifest.task} round {manifest.round}",
            )
        if manifest.base_version != task_round.base_version:
            raise Rejected(
                "stale_base",
                f"update is based on v{manifest.base_version}, round uses v{task_round.base_version}",
            )
        if manifest.samples > declared:
            raise Rejected(
                "too_many_samples",
                f"update claims {manifest.samples} samples; the device declared {declared}",
            )
        accepted = self.config.tasks[manifest.task].codecs
        if manifest.codec not in accepted:
            raise Rejected(
                "codec", f"update codec {manifest.codec!r}; task {manifest.task} takes {sorted(accepted)}"
            )
        return task_round

    def _reject(self, manifest: UpdateManifest, error: ProtocolError) -> Receipt:
        """The rejected receipt for `error`, counted by its reason (`invalid_update` if it names none)."""
        self.on_rejected(manifest.task, getattr(error, "reason", "invalid_update"))
        return self.receipt(manifest, "rejected", str(error))

    # --- time -------------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> Outbound:
        """Finalise what is complete or due, open the next round when possible."""
        now = time.time() if now is None else now
        out = Outbound()
        if self.round is None or self.round.state == "finalized":
            self._maybe_open(now, out)
            return out
        deadline_passed = now >= self.round.deadline
        extend = False
        for task, task_round in self.task_rounds.items():
            if task_round.final:
                continue
            if task_round.complete:
                self._finalize(task, task_round, now, out)
            elif deadline_passed and task_round.strategy.count >= self.config.rounds.min_updates:
                log.warning(
                    "task %s round %d: deadline passed, finalising with %d updates",
                    task,
                    self.round.round,
                    task_round.strategy.count,
                )
                self._finalize(task, task_round, now, out)
            elif deadline_passed:
                extend = True
        if all(t.final for t in self.task_rounds.values()):
            self.round = self.ledger.finalize_round(self.round.round)
            log.info("round %d complete", self.round.round)
            self._maybe_open(now, out)
        elif extend:
            deadline = now + self.config.rounds.round_timeout_s
            self.round = self.ledger.extend_deadline(self.round.round, deadline)
            log.warning(
                "round %d: too few updates at the deadline; extended by %.0f s",
                self.round.round,
                self.config.rounds.round_timeout_s,
            )
        return out

    def _finalize(self, task: str, task_round: TaskRound, now: float, out: Outbound) -> None:
        """The task's new global version goes out and its schedules are cleared (a device still training it
        may stop)."""
        state = task_round.strategy.result()
        version = task_round.base_version + 1
        delta = None
        download_codec = self.config.tasks[task].download_codec
        if download_codec is not None:  # publish what the delta rebuilds, so both downloads give one model
            delta, state = encode_version(make_codec(download_codec), state, self.globals[task].state)
        ref = self.checkpoints.save(task, version, state)
        model = self._global_model(task, version, state, delta)
        self.ledger.finalize_task(
            task, self.round.round, version, ref.path, model.manifest.transfer.sha256, now
        )
        task_round.final = True
        task_round.strategy.release()
        self.globals[task] = model
        self.checkpoints.prune(task, keep=self.config.keep_checkpoints)
        self.segments.close(task, self.round.round)
        updates = self.ledger.updates_for(task, self.round.round)
        self.remover.remove(dict.fromkeys(update.payload_path for update in updates))
        log.info(
            "task %s: global v%d from %d updates (%d samples)",
            task,
            version,
            task_round.strategy.count,
            task_round.strategy.total_weight,
        )
        out.globals.append(model)
        out.cleared_schedules += [(device, task) for device in sorted(task_round.expected)]

    def _maybe_open(self, now: float, out: Outbound) -> None:
        rounds = self.config.rounds
        last = self.round.round if self.round else 0
        if rounds.rounds and last >= rounds.rounds:
            return
        ready = sorted(d for d in self.online if d in self.declared)
        if len(ready) < rounds.min_devices:
            return
        number = last + 1
        participants = {}
        for task, task_config in self.config.tasks.items():
            eligible = [d for d in ready if task in self.declared[d]]
            chosen = select(task_config.sampling, task, number, eligible, self.participation[task])
            if chosen:
                participants[task] = {d: self.declared[d][task] for d in chosen}
        if not participants:
            return
        bases = {task: self.globals[task].manifest.version for task in participants}
        self.round = self.ledger.open_round(number, bases, now, now + rounds.round_timeout_s, participants)
        self.task_rounds = {
            task: self._new_task_round(task, bases[task], devices) for task, devices in participants.items()
        }
        for task, devices in participants.items():
            self.participation[task].update({d: Participation(number) for d in devices})
        out.schedules = self.schedules()
        scheduled = {(schedule.device, schedule.tasks[0].task) for schedule in out.schedules}
        out.cleared_schedules = [c for c in out.cleared_schedules if c not in scheduled]
        log.info("round %d opened: %s", number, {t: _summary(d) for t, d in participants.items()})

    # --- helpers ----------------------------------------------------------------------------------------

    def _new_task_round(self, task: str, base_version: int, expected: dict[str, int]) -> TaskRound:
        current = self.globals[task]
        base = (
            current.state
            if current.manifest.version == base_version
            else self.checkpoints.load(task, base_version)
        )
        task_config = self.config.tasks[task]
        return TaskRound(
            base_version,
            dict(expected),
            task_config.strategy.build(base, self.buffers[task]),
            target(task_config.sampling, len(expected)),
        )

    def schedules(self) -> list[Schedule]:
        """This round's schedules of the tasks not final yet: one per expected device and task."""
        if self.round is None or self.round.state != "open":
            return []
        schedules = []
        for task, task_round in sorted(self.task_rounds.items()):
            if task_round.final:
                continue
            assignment = self._assignment(task, task_round)
            schedules += [
                Schedule(
                    device=device,
                    round=self.round.round,
                    issued_at=self.round.opened_at,
                    deadline=self.round.deadline,
                    tasks=[assignment],
                    policy=self.config.rounds.policy,
                )
                for device in sorted(task_round.expected)
            ]
        return schedules

    def _assignment(self, task: str, task_round: TaskRound) -> TaskAssignment:
        c = self.config.tasks[task]
        base = self.ledger.global_version(task, task_round.base_version)
        return TaskAssignment(
            task=task,
            model=c.model,
            optimizer=c.optimizer,
            base_version=task_round.base_version,
            base_sha256=base.sha256,
            local_epochs=c.local_epochs,
            local_steps=c.local_steps,
            batch_size=c.batch_size,
            min_batch_size=c.min_batch_size,
            max_batch_size=c.max_batch_size,
            precision=c.precision,
            proximal_mu=c.strategy.proximal_mu,
            lr_scaling=c.lr_scaling,
            batch_policy=c.batch_policy,
            initial_batch_growth=c.initial_batch_growth,
            codec=warmed(c.codec, task_round.base_version),
            train_seed=c.train_seed,
        )

    def _global_model(
        self, task: str, version: int, state: dict[str, np.ndarray], delta: bytes | None = None
    ) -> GlobalModel:
        """A version ready to publish; with `delta`, also as the difference to the current global version."""
        payload = encode_state(state)
        chunk_size = self.config.transfers.chunk_size
        delta_info = None
        if delta is not None:
            base = self.globals[task].manifest
            delta_info = GlobalDelta(
                base_version=base.version,
                base_sha256=base.transfer.sha256,
                codec=self.config.tasks[task].download_codec,
                transfer=transfer_info(f"{task}.v{version}.delta", delta, chunk_size),
            )
        manifest = GlobalManifest(
            task=task,
            version=version,
            model=self.config.tasks[task].model,
            tensors=describe(state),
            transfer=transfer_info(f"{task}.v{version}", payload, chunk_size),
            created_at=time.time(),
            delta=delta_info,
        )
        return GlobalModel(manifest, state, payload, delta)

    @staticmethod
    def receipt(manifest: UpdateManifest, status: str, reason: str = "") -> Receipt:
        return Receipt(
            update_id=manifest.update_id,
            task=manifest.task,
            round=manifest.round,
            status=status,
            reason=reason,
        )


def _summary(devices: dict[str, int], shown: int = 20) -> str:
    names = sorted(devices)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def read_delta(payload: Path | bytes, codec: str, layout: list[TensorInfo]) -> dict[str, np.ndarray]:
    """An update's tensors (from its file or its bytes), decoded by its codec and checked against the task's
    `layout`. A dense payload file is read as read-only views of it, memory-mapped: a strategy that holds updates
    (a window) holds file pages the OS may drop, not copies. Other codecs decode into memory, one update at a
    time."""
    if isinstance(payload, Path):
        with open(payload, "rb") as file:
            if codec == DenseCodec.name and file.seek(0, 2):
                payload = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                payload = file.read()
    if not len(payload):
        raise ProtocolError("update payload is empty")
    return decode_state(payload) if codec == DenseCodec.name else make_codec(codec).decode(payload, layout)
