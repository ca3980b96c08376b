"""Round logic: who trains what, validating and folding updates, finalising global versions.

No MQTT here: the service feeds device news and updates in and publishes what comes back. A round opens for
all tasks at once (one synchronisation cycle); each task finalises on its own as soon as every expected device
reported (or failed), or at the deadline with at least `min_updates`; the next round opens when all tasks of
the current one are final. Everything accepted is in the ledger before a receipt is issued.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.checkpoints import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.fedavg import StreamingFedAvg
from aggregator.initial import initial_state
from aggregator.ledger import RoundLedger, RoundRecord
from common.durable import move_durably
from protocol import ProtocolError
from protocol.chunking import transfer_info
from protocol.schemas import (
    DeviceProfile,
    GlobalManifest,
    Receipt,
    Schedule,
    TaskAssignment,
    UpdateManifest,
)
from protocol.tensors import decode_state, describe, encode_state

log = logging.getLogger(__name__)


@dataclass
class GlobalModel:
    """A task's current global version, ready to publish."""

    manifest: GlobalManifest
    state: dict[str, np.ndarray]
    payload: bytes


@dataclass
class TaskRound:
    """The in-memory side of one task's open round: the running average and who still has to report."""

    base_version: int
    expected: dict[str, int]  # device -> samples it declared
    fedavg: StreamingFedAvg
    reported: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    final: bool = False

    @property
    def waiting_for(self) -> set[str]:
        return set(self.expected) - self.reported - self.failed


@dataclass
class Outbound:
    """What the service must publish after a call."""

    globals: list[GlobalModel] = field(default_factory=list)
    schedules: list[Schedule] = field(default_factory=list)
    cleared_schedules: list[str] = field(default_factory=list)


class Coordinator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        root = Path(config.state_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.updates_dir = root / "updates"
        self.ledger = RoundLedger(root / "ledger.sqlite")
        self.checkpoints = CheckpointStore(root / "checkpoints")
        self.globals: dict[str, GlobalModel] = {}
        self.round: RoundRecord | None = None
        self.task_rounds: dict[str, TaskRound] = {}
        self.online: set[str] = set()
        self.profiles: dict[str, DeviceProfile] = {}
        self.known_devices: set[str] = set()

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
        out = Outbound(globals=list(self.globals.values()))
        current = self.ledger.current_round()
        if current is not None and current.state == "open":
            self._resume(current)
            out.schedules = self.schedules()
        return out

    def _resume(self, record: RoundRecord) -> None:
        self.round = record
        participants = self.ledger.participants(record.round)
        for task, task_record in record.tasks.items():
            task_round = self._new_task_round(task, task_record.base_version, participants.get(task, {}))
            task_round.final = task_record.state == "finalized"
            if not task_round.final:
                for update in self.ledger.updates_for(task, record.round):
                    task_round.fedavg.fold(decode_state(update.payload_path.read_bytes()), update.samples)
                    task_round.reported.add(update.device)
            self.task_rounds[task] = task_round
        log.info("resumed round %d (%d tasks)", record.round, len(record.tasks))

    # --- device registry --------------------------------------------------------------------------------

    def device_status(self, device: str, online: bool) -> None:
        self.known_devices.add(device)
        (self.online.add if online else self.online.discard)(device)

    def device_profile(self, profile: DeviceProfile) -> None:
        self.known_devices.add(profile.device)
        self.profiles[profile.device] = profile

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

    def known_update(self, manifest: UpdateManifest) -> Receipt | None:
        """A receipt for an update already recorded (a resend), so it need not be transferred again."""
        recorded = self.ledger.update_by_id(manifest.update_id)
        if recorded is None:
            return None
        same = (recorded.task, recorded.round, recorded.device) == (
            manifest.task,
            manifest.round,
            manifest.device,
        )
        return self.receipt(manifest, "duplicate" if same else "rejected", "" if same else "update id reused")

    def accept_update(self, manifest: UpdateManifest, payload_path: Path, sender: str) -> Receipt:
        """Validate an update fully, record it durably, fold it; the receipt says what happened."""
        try:
            task_round = self._check_update(manifest, sender)
            delta = decode_state(payload_path.read_bytes())
            task_round.fedavg.validate(delta, manifest.samples)
        except ProtocolError as exc:
            payload_path.unlink(missing_ok=True)
            log.warning("rejected update %s from %s: %s", manifest.update_id, sender, exc)
            return self.receipt(manifest, "rejected", str(exc))
        durable = (
            self.updates_dir
            / manifest.task
            / f"r{manifest.round:06d}"
            / f"{manifest.device}.{manifest.update_id}.state"
        )
        durable.parent.mkdir(parents=True, exist_ok=True)
        move_durably(payload_path, durable)
        outcome = self.ledger.record_update(
            manifest.task,
            manifest.round,
            manifest.device,
            manifest.update_id,
            manifest.samples,
            durable,
            manifest.transfer.sha256,
            time.time(),
        )
        if outcome != "accepted":
            durable.unlink(missing_ok=True)
            status = "duplicate" if outcome == "duplicate" else "rejected"
            return self.receipt(manifest, status, "" if status == "duplicate" else "device already reported")
        task_round.fedavg.fold(delta, manifest.samples)
        task_round.reported.add(manifest.device)
        log.info(
            "task %s round %d: update from %s (%d samples), %d/%d",
            manifest.task,
            manifest.round,
            manifest.device,
            manifest.samples,
            task_round.fedavg.count,
            len(task_round.expected),
        )
        return self.receipt(manifest, "accepted")

    def _check_update(self, manifest: UpdateManifest, sender: str) -> TaskRound:
        if manifest.device != sender:
            raise ProtocolError(f"update names device {manifest.device} but was sent by {sender}")
        if manifest.task not in self.config.tasks:
            raise ProtocolError(f"unknown task {manifest.task}")
        task_round = self.task_rounds.get(manifest.task)
        if self.round is None or manifest.round != self.round.round or task_round is None or task_round.final:
            raise ProtocolError(f"task {manifest.task} round {manifest.round} is not open")
        declared = task_round.expected.get(manifest.device)
        if declared is None:
            raise ProtocolError(
                f"device {manifest.device} is not scheduled for {manifest.task} round {manifest.round}"
            )
        if manifest.base_version != task_round.base_version:
            raise ProtocolError(
                f"update is based on v{manifest.base_version}, round uses v{task_round.base_version}"
            )
        if manifest.samples > declared:
            raise ProtocolError(f"update claims {manifest.samples} samples; the device declared {declared}")
        return task_round

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
            if not task_round.waiting_for and task_round.fedavg.count > 0:
                out.globals.append(self._finalize(task, task_round, now))
            elif deadline_passed and task_round.fedavg.count >= self.config.rounds.min_updates:
                log.warning(
                    "task %s round %d: deadline passed, finalising with %d updates",
                    task,
                    self.round.round,
                    task_round.fedavg.count,
                )
                out.globals.append(self._finalize(task, task_round, now))
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

    def _finalize(self, task: str, task_round: TaskRound, now: float) -> GlobalModel:
        state = task_round.fedavg.result()
        version = task_round.base_version + 1
        ref = self.checkpoints.save(task, version, state)
        model = self._global_model(task, version, state)
        self.ledger.finalize_task(
            task, self.round.round, version, ref.path, model.manifest.transfer.sha256, now
        )
        task_round.final = True
        self.globals[task] = model
        self.checkpoints.prune(task, keep=self.config.keep_checkpoints)
        for update in self.ledger.updates_for(task, self.round.round):
            update.payload_path.unlink(missing_ok=True)
        log.info(
            "task %s: global v%d from %d updates (%d samples)",
            task,
            version,
            task_round.fedavg.count,
            task_round.fedavg.total_weight,
        )
        return model

    def _maybe_open(self, now: float, out: Outbound) -> None:
        rounds = self.config.rounds
        last = self.round.round if self.round else 0
        if rounds.rounds and last >= rounds.rounds:
            return
        ready = sorted(d for d in self.online if d in self.profiles)
        if len(ready) < rounds.min_devices:
            return
        participants = {
            task: {
                d: self.profiles[d].tasks[task].samples
                for d in ready
                if self.profiles[d].tasks.get(task, None)
            }
            for task in self.config.tasks
        }
        participants = {task: devices for task, devices in participants.items() if devices}
        if not participants:
            return
        number = last + 1
        bases = {task: self.globals[task].manifest.version for task in participants}
        self.round = self.ledger.open_round(number, bases, now, now + rounds.round_timeout_s, participants)
        self.task_rounds = {
            task: self._new_task_round(task, bases[task], devices) for task, devices in participants.items()
        }
        out.schedules = self.schedules()
        scheduled = {s.device for s in out.schedules}
        out.cleared_schedules = sorted(self.known_devices - scheduled)
        log.info("round %d opened: %s", number, {t: sorted(d) for t, d in participants.items()})

    # --- helpers ----------------------------------------------------------------------------------------

    def _new_task_round(self, task: str, base_version: int, expected: dict[str, int]) -> TaskRound:
        current = self.globals[task]
        base = (
            current.state
            if current.manifest.version == base_version
            else self.checkpoints.load(task, base_version)
        )
        return TaskRound(base_version, dict(expected), StreamingFedAvg(base))

    def schedules(self) -> list[Schedule]:
        """This round's schedule of every expected device that still has tasks to report."""
        if self.round is None or self.round.state != "open":
            return []
        devices = sorted({d for t in self.task_rounds.values() for d in t.expected})
        schedules = []
        for device in devices:
            assignments = [
                self._assignment(task, task_round)
                for task, task_round in sorted(self.task_rounds.items())
                if device in task_round.expected and not task_round.final
            ]
            if assignments:
                schedules.append(
                    Schedule(
                        device=device,
                        round=self.round.round,
                        issued_at=self.round.opened_at,
                        deadline=self.round.deadline,
                        tasks=assignments,
                        policy=self.config.rounds.policy,
                    )
                )
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
            lr_scaling=c.lr_scaling,
            batch_policy=c.batch_policy,
        )

    def _global_model(self, task: str, version: int, state: dict[str, np.ndarray]) -> GlobalModel:
        payload = encode_state(state)
        manifest = GlobalManifest(
            task=task,
            version=version,
            model=self.config.tasks[task].model,
            tensors=describe(state),
            transfer=transfer_info(f"{task}.v{version}", payload, self.config.transfers.chunk_size),
            created_at=time.time(),
        )
        return GlobalModel(manifest, state, payload)

    @staticmethod
    def receipt(manifest: UpdateManifest, status: str, reason: str = "") -> Receipt:
        return Receipt(
            update_id=manifest.update_id,
            task=manifest.task,
            round=manifest.round,
            status=status,
            reason=reason,
        )
