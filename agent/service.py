"""The edge agent: MQTT session, global model cache, rounds of co-located task processes, update upload.

One thread (`run`) handles everything that changes state: MQTT messages (the link feeds them in), task
outcomes and timers arrive through the agent's own event queue; an error while handling one of them drops it
with a log line. Updates go out through `agent.uploads` until the aggregator's receipt. Task processes are warm
workers (`agent.workers.WorkerPool`, one per task, kept across rounds); `agent.runner` threads drive them and
only enqueue what happened.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import jobs
from agent.autocalibration import AutoCalibration
from agent.config import AgentConfig, predictor_dir
from agent.gpu.probe import GpuReport, own_gpu, probe, visible_gpu
from agent.learning import RoundLearning
from agent.metrics import AgentMetrics
from agent.model_cache import ModelCache
from agent.mps import GpuSharing, MpsDaemon
from agent.outbox import Outbox, Pending
from agent.planning import Planner, RoundPlan
from agent.policies import Policy, available_policies
from agent.profile import build_profile
from agent.receipts import ReceiptLog
from agent.runner import TaskOutcome, TaskWork, run_round
from agent.schedules import RoundCollector
from agent.telemetry import read_telemetry
from agent.uploads import Uploads
from agent.workers import Launch, Lease, WorkerPool
from common.daemon import drop_on_error
from common.metrics import serve
from protocol import ProtocolError, topics
from protocol.chunking import Reassembler, describe_transfer
from protocol.inbox import TransferInbox
from protocol.limits import MAX_TEXT
from protocol.schemas import (
    Event,
    GlobalManifest,
    MpsInfo,
    Receipt,
    Schedule,
    Status,
    TaskAssignment,
    TransferInfo,
    UpdateManifest,
    decode,
    encode,
)
from protocol.transport import Incoming, LinkEvent, MqttLink, PayloadQueue, PublishError

log = logging.getLogger(__name__)
#: what starting a CUDA worker costs (torch import, context, model, data) until this device has measured it
DEFAULT_RESTART_COST_S = 10.0
#: how long a starting agent waits for its spare workers' imports before it connects anyway
SPARES_LOAD_S = 60
#: events the agent's queue holds before the MQTT network thread (or a round thread) waits for the agent
EVENT_QUEUE_SIZE = 256


@dataclass
class ActiveRound:
    schedule: Schedule
    received_at: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    inputs_ready: dict[str, threading.Event] = field(default_factory=dict)
    ready_at: dict[str, float] = field(default_factory=dict)  # when each task's global model was cached
    thread: threading.Thread | None = None
    mps_fault: bool = False
    planned: dict[str, TaskAssignment] = field(default_factory=dict)  # with the batch sizes actually used
    plan: RoundPlan | None = None
    plan_s: float = 0.0  # taking the round: planning it, until its task thread runs
    outcomes: dict[str, TaskOutcome] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    outcome: TaskOutcome


@dataclass(frozen=True)
class RoundTaskStarted:
    """A task's worker is ready and its training command sent."""

    round: int
    task: str
    lease: Lease


@dataclass(frozen=True)
class RoundDone:
    """Every task process of the round has exited."""

    round: int


@dataclass(frozen=True)
class PredictorReady:
    """Calibration exported a predictor for this GPU."""

    path: Path


@dataclass(frozen=True)
class DeltaFetch:
    """A global version fetched as its delta to the version before, which the cache holds."""

    manifest: GlobalManifest

    @property
    def transfer(self) -> TransferInfo:
        return self.manifest.delta.transfer


def _chunks_of(fetch: GlobalManifest | DeltaFetch) -> str:
    """The subscription filter of a fetch's chunks."""
    task = fetch.manifest.task if isinstance(fetch, DeltaFetch) else fetch.task
    base = topics.global_delta(task) if isinstance(fetch, DeltaFetch) else topics.global_model(task)
    return f"{base}/chunks/+"


class Agent:
    def __init__(self, config: AgentConfig, policy: Policy | None = None) -> None:
        self.config = config
        self.device = config.device
        self.policy: Policy = policy or config.execution.policy
        root = Path(config.state_dir)
        self.work_dir = root / "work"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._setup_gpu()
        self.cache = ModelCache(root / "models")
        self.outbox = Outbox(root / "outbox")
        self.receipts = ReceiptLog(root / "receipts.json")
        self.globals: TransferInbox[GlobalManifest | DeltaFetch] = TransferInbox(
            Reassembler(root / "spool"), GlobalManifest
        )
        self.samples = {task: spec.sample_count() for task, spec in config.tasks.items()}
        self.metrics = AgentMetrics(config.tasks)
        status = topics.device(self.device, "status")
        # the link's messages (at most INBOX_BYTES of payloads: a global model's chunks wait in TCP) and the
        # rounds' events
        self.events: queue.Queue = PayloadQueue(EVENT_QUEUE_SIZE)
        self.link = MqttLink(
            config.mqtt,
            subscriptions=[
                topics.schedules(self.device),
                topics.device(self.device, "receipts"),
                *(topics.manifest(topics.global_model(task)) for task in config.tasks),
            ],
            will=(status, encode(Status(state="offline", ts=time.time()))),
            birth=(status, encode(Status(state="online", ts=time.time()))),
            inbox=self.events,
        )
        self.uploads = Uploads(
            self.link,
            self.outbox,
            self.device,
            receipt_timeout_s=config.receipt_timeout_s,
            retry_after_s=config.retry_after_s,
        )
        self.round: ActiveRound | None = None
        self.schedules = RoundCollector(config.tasks, config.schedule_grace_s)
        self.pool = WorkerPool(
            jobs.Init(
                device=self.compute,
                threads=config.execution.cpu_threads_per_task,
                cuda_graphs=config.execution.cuda_graphs,
            ),
            log_dir=self.work_dir,
            preload=sorted({module for data in config.tasks.values() for module in data.imports}),
        )
        self._next_telemetry = 0.0

    def _setup_gpu(self) -> None:
        """Compute device, GPU profile, MPS daemon and the round planner (predictor or heuristic)."""
        config = self.config
        if config.execution.gpu is not None:  # this process's CUDA, its workers and MPS daemon: that GPU only
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu(config.execution.gpu, probe())
        self.compute = self._compute_device()
        self.gpu = self._own_gpu(probe(allow_torch=self.compute == "cuda"))
        self.mps = MpsDaemon(config.mps)
        self.mps_info = (
            self.mps.ensure_running()
            if self.compute == "cuda"
            else MpsInfo(available=False, reason="no GPU: task processes run on the CPU, without MPS")
        )
        log.info("MPS: %s", self.mps_info.reason)
        total_sms = self.gpu.gpus[0].sm_count if self.gpu.gpus else None
        self.sharing = GpuSharing(self.mps, total_sms, self.work_dir)
        own = predictor_dir(config.state_dir)
        execution = config.execution
        predictor, note = load_predictor(
            execution.predictor, self.gpu, self.compute, own, cuda_graphs=execution.cuda_graphs
        )
        log.info("predictor: %s", note)
        self.planner = Planner(
            self.sharing,
            predictor,
            note,
            link_mbps=execution.link_mbps,
            damping=execution.batch_damping,
            objective=execution.plan_objective,
            max_error_percent=execution.max_prediction_error_pct,
            error_rounds=execution.error_rounds,
        )
        on_gpu = self.compute == "cuda" and self.gpu.gpus
        self.learning = (
            RoundLearning(own, self.gpu.gpus[0], self.gpu.driver_version, self.planner, execution.cuda_graphs)
            if on_gpu
            else None
        )
        self.calibration = AutoCalibration(
            config.calibration,
            own,
            self.sharing,
            lambda path: self.events.put(PredictorReady(path)),
            cuda_graphs=execution.cuda_graphs,  # measured as rounds train
        )

    # --- main loop --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, alive: Callable[[], None] = lambda: None) -> None:
        """Handle messages, task outcomes and timers until `stop`; `alive()` on every pass (systemd's watchdog)."""
        log.info("agent %s starting; tasks %s", self.device, self.samples)
        server = serve(self.config.metrics, self.metrics.registry)
        self.pool.keep_spares(self.config.execution.spares(len(self.config.tasks), self.compute))
        # The device announces itself (status, profile) once it can train at once: a round scheduled earlier
        # would wait for the spares' imports in its worker starts.
        if not self.pool.wait_for_spares(SPARES_LOAD_S, stop) and not stop.is_set():
            log.warning(
                "spare workers not loaded after %d s; connecting without waiting for them", SPARES_LOAD_S
            )
        self.link.start()
        try:
            while not stop.is_set():
                alive()
                try:
                    self.handle(self.events.get(timeout=0.5))
                except queue.Empty:
                    pass
                self.tick(time.monotonic())
        finally:
            self.calibration.pause()
            if self.round is not None:
                self.round.stop.set()
                if self.round.thread is not None:
                    self.round.thread.join(self.config.execution.stop_grace_s)
            self.pool.close(grace_s=self.config.execution.stop_grace_s)
            self.link.stop(
                farewell=(
                    topics.device(self.device, "status"),
                    encode(Status(state="offline", ts=time.time())),
                )
            )
            self.mps.stop()  # only a daemon this agent started
            if server is not None:
                server.close()

    def handle(self, item: object) -> None:
        """Handle one message, connection event or round event; an error drops it with one log line."""
        with drop_on_error(log, item, self.metrics.dropped.inc):
            if isinstance(item, Incoming):
                self.on_message(item)
            elif isinstance(item, LinkEvent):
                self.metrics.broker_connected.set(item.connected)
                if item.connected:
                    self.on_connected()
            elif isinstance(item, RoundOutcome):
                self.on_outcome(item)
            elif isinstance(item, RoundTaskStarted):
                self.on_task_started(item)
            elif isinstance(item, RoundDone):
                self.on_round_done(item)
            elif isinstance(item, PredictorReady):
                self.on_predictor_ready(item)

    def tick(self, now: float) -> None:
        self._take_schedules(now)
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.config.telemetry_interval_s
            telemetry = read_telemetry(self.device, self.gpu)
            self.metrics.telemetry.update(telemetry)
            try:
                self.link.publish(topics.device(self.device, "telemetry"), encode(telemetry), qos=0)
            except PublishError as exc:  # disconnected: this sample is skipped, the next one goes
                log.debug("telemetry not sent: %s", exc)
        waiting = self.outbox.pending()
        self.metrics.outbox.set(len(waiting))
        if not self.link.connected.is_set():
            return
        for dropped in self.globals.expire(now):
            log.warning("dropped incomplete global model transfer %s", dropped)
        for pending in self.uploads.due(waiting, now):
            self.publish_update(pending)

    # --- handlers ---------------------------------------------------------------------------------------

    def on_connected(self) -> None:
        self.publish_profile()
        self.uploads.send_all_again()  # whatever still waits for a receipt
        self._next_telemetry = 0.0  # and report the load now

    def publish_profile(self) -> None:
        policies = available_policies(self.mps_info.available)
        predictor = self.planner.predictor.path.name if self.planner.predictor else None
        profile = build_profile(self.device, self.samples, policies, self.gpu, self.mps_info, predictor)
        self.link.publish(topics.device(self.device, "profile"), encode(profile), retain=True)

    def on_message(self, message: Incoming) -> None:
        ref = topics.parse(message.topic)
        if ref.kind == "schedule":  # cleared (empty) when the aggregator no longer wants the task
            schedule = decode(message.payload, Schedule) if message.payload else None
            self.schedules.put(self.device, ref.task, schedule, time.monotonic())
            self._take_schedules(time.monotonic())
        elif not message.payload:
            return  # a cleared retained message
        elif ref.kind == "receipts":
            self.on_receipt(decode(message.payload, Receipt))
        elif ref.kind in ("global", "global_delta"):
            self.on_global_part(ref, message.payload)

    def on_global_part(self, ref: topics.TopicRef, payload: bytes) -> None:
        """A global manifest (fetch what this version needs: its delta when the version before is cached, else
        the whole model) or a chunk of such a fetch."""
        if ref.part == "manifest":
            manifest = decode(payload, GlobalManifest)
            if manifest.task != ref.task:
                raise ProtocolError(f"global manifest for {manifest.task} published under task {ref.task}")
            if self.cache.has(manifest.task, manifest.version, manifest.transfer.sha256):
                self._mark_ready(manifest.task, manifest.version)
                return
            delivery = self._fetch(DeltaFetch(manifest) if self.cache.holds_base_of(manifest) else manifest)
        else:
            delivery = self.globals.receive(ref.part, payload)
        if delivery is None:
            return
        fetched = delivery.manifest
        manifest = fetched.manifest if isinstance(fetched, DeltaFetch) else fetched
        self.link.unsubscribe(_chunks_of(fetched))
        try:
            path = self.cache.rebuild(manifest, delivery.path) if fetched is not manifest else delivery.path
            self.cache.store(manifest, path)
        except ProtocolError as exc:
            if fetched is manifest:
                raise
            log.warning("%s; fetching the whole model", exc)
            self._fetch(manifest)
            return
        finally:
            self.globals.release(delivery)  # moved into the cache, or rejected
            delivery.path.with_suffix(".rebuilt").unlink(missing_ok=True)
        log.info(
            "global model %s v%d cached (%s, %d bytes)",
            manifest.task,
            manifest.version,
            "delta" if fetched is not manifest else "whole",
            fetched.transfer.size,
        )
        self.metrics.downloaded(manifest.task, fetched.transfer.size)
        self._mark_ready(manifest.task, manifest.version)

    def _fetch(self, fetch: GlobalManifest | DeltaFetch):
        """Expect `fetch`'s transfer and subscribe to its (retained) chunks."""
        self.link.subscribe(_chunks_of(fetch))
        return self.globals.add_manifest(fetch)

    def _take_schedules(self, now: float) -> None:
        """Start the next round the collected schedules make, unless a round still trains: then it waits, or,
        once every task still training there has been withdrawn, that round is stopped."""
        current = self.round
        if current is not None and current.thread is not None and current.thread.is_alive():
            number = current.schedule.round
            training = [task for task in current.planned if task not in current.outcomes]
            if not all(self.schedules.withdrawn(task, number) for task in training):
                return
            if not current.stop.is_set():
                log.warning("round %d: the aggregator no longer waits for %s; stopping", number, training)
                current.stop.set()
        schedule = self.schedules.next_round(now, time.time())
        if schedule is not None:
            self.on_schedule(schedule)

    def on_schedule(self, schedule: Schedule) -> None:
        """Start a round: `schedule` holds the tasks of one round number (RoundCollector)."""
        current = self.round
        if current is not None and current.thread is not None and current.thread.is_alive():
            log.warning(
                "round %d superseded by round %d; stopping its tasks", current.schedule.round, schedule.round
            )
            current.stop.set()
        self.outbox.drop_older_than(schedule.round, [a.task for a in schedule.tasks])
        self.metrics.round.set(schedule.round)
        active = ActiveRound(schedule)
        self.round = active
        to_train = []
        for assignment in schedule.tasks:
            if assignment.task not in self.config.tasks:
                self.emit_event("skipped", schedule.round, assignment.task, "no local data for this task")
            elif self.receipts.done(assignment.task, schedule.round):
                continue
            elif (pending := self.outbox.find(assignment.task, schedule.round)) is not None:
                self.publish_update(pending)
            else:
                to_train.append(assignment)
        if to_train:
            self.calibration.pause()  # the GPU is the round's now
            try:
                self._start(active, to_train)
            except Exception as exc:  # noqa: BLE001 - e.g. a model this agent cannot build: the tasks fail
                log.error(
                    "round %d: cannot start its tasks: %s: %.500s", schedule.round, type(exc).__name__, exc
                )
                for assignment in to_train:  # so the aggregator stops waiting for them
                    self.emit_event("failed", schedule.round, assignment.task, f"cannot start: {exc}")

    def on_outcome(self, item: RoundOutcome) -> None:
        current = self.round
        if current is None or item.round != current.schedule.round:
            return  # a stopped, superseded round
        outcome = item.outcome
        assignment = current.planned[outcome.task]
        current.outcomes[outcome.task] = outcome
        predicted = current.plan.predicted.get(outcome.task)
        if outcome.failure is not None:
            log.error("task %s failed in round %d: %s", outcome.task, item.round, outcome.failure.error)
            current.mps_fault |= outcome.failure.code == "mps"
            self.emit_event(
                "failed", item.round, outcome.task, f"{outcome.failure.code}: {outcome.failure.error}"
            )
            return
        trained = outcome.trained
        payload_path = Path(trained.output_path)
        update_id = uuid.uuid4().hex
        manifest = UpdateManifest(
            task=outcome.task,
            round=item.round,
            device=self.device,
            update_id=update_id,
            base_version=assignment.base_version,
            samples=trained.samples,
            codec=assignment.codec.name,
            transfer=describe_transfer(update_id, trained.size, trained.sha256),
            metrics={
                **trained.metrics,
                "seconds": trained.seconds,
                "images_per_s": trained.metrics["images"] / max(trained.metrics["train_s"], 1e-9),
                "batch_size": assignment.batch_size,
                "handovers": float(outcome.handovers),
                **({"predicted_images_per_s": predicted} if predicted else {}),
            },
        )
        pending = self.outbox.put(manifest, payload_path)
        self.emit_event("finished", item.round, outcome.task, metrics=manifest.metrics)
        if self.config.execution.upload == "after_round":
            self.uploads.hold(pending)
        else:
            self.publish_update(pending)

    def on_task_started(self, item: RoundTaskStarted) -> None:
        current = self.round
        if current is None or item.round != current.schedule.round:
            return
        lease = item.lease
        metrics = {
            "plan_s": current.plan_s,
            "wait_global_s": current.ready_at.get(item.task, current.received_at) - current.received_at,
            "worker_start_s": lease.start_s,
            "worker_restarted": float(lease.started_process),
        }
        if lease.started_process:  # what the start took: the CUDA context, then the model and data
            metrics["worker_init_s"] = lease.ready.seconds
            if lease.prepared is not None:
                metrics["worker_prepare_s"] = lease.prepared.seconds
        self.emit_event("started", item.round, item.task, metrics=metrics)

    def on_round_done(self, item: RoundDone) -> None:
        """Upload what the naive order held back (`execution.upload = "after_round"`). After an MPS fault, recover
        the daemon now that every task process of the round has exited. Then start
        the workers whose SM share the next round (planned as this one) changes, while updates upload and the
        aggregator folds them."""
        self.metrics.rounds_trained.inc()
        for pending in self.uploads.release_held():  # a superseded round's too: its training is over
            self.publish_update(pending)
        current = self.round
        if current is None or item.round != current.schedule.round:
            return
        if current.mps_fault:
            self.mps_info = self.mps.recover()
            log.warning("MPS fault in round %d; after recovery: %s", item.round, self.mps_info.reason)
            self.publish_profile()
        assignments = [a for a in current.schedule.tasks if a.task in current.planned]
        if self.learning is not None and current.plan is not None:
            try:
                self.learning.observe(item.round, current.plan, current.outcomes)
                self.calibration.maybe_start(assignments, self.planner)
            except Exception:  # noqa: BLE001 - learning from a round must never stop the agent
                log.exception("learning from round %d failed", item.round)
        plan = self._plan(current.schedule, assignments, commit=False)
        for launch in plan.launches:
            if self._needs_restart(launch):
                self.pool.prestart(launch.task, launch, self._prepare(current.planned[launch.task]))

    def on_predictor_ready(self, item: PredictorReady) -> None:
        """Plan with a predictor calibration just exported, from the next round on."""
        predictor, self.planner.predictor_note = load_predictor(
            str(item.path), self.gpu, self.compute, cuda_graphs=self.config.execution.cuda_graphs
        )
        if self.learning is not None:
            self.learning.use(predictor)
        log.info("predictor: %s", self.planner.predictor_note)
        self.publish_profile()

    def on_receipt(self, receipt: Receipt) -> None:
        """The aggregator's answer to an update in the outbox (receipts for other ids change nothing)."""
        settled = self.uploads.settle(receipt)
        if settled is None:
            return
        manifest = settled.manifest
        self.metrics.receipts.labels(self.metrics.events.task_label(receipt.task), receipt.status).inc()
        if not settled.done:
            log.warning(
                "update %s for %s round %d not taken yet (%s); sending it again in %.0f s",
                receipt.update_id,
                manifest.task,
                manifest.round,
                receipt.reason,
                self.config.retry_after_s,
            )
        elif receipt.status == "rejected":
            log.error(
                "update %s for %s round %d rejected: %s",
                receipt.update_id,
                manifest.task,
                manifest.round,
                receipt.reason,
            )
        else:
            self.receipts.mark_done(manifest.task, manifest.round)
            if settled.upload_s is not None:
                self.emit_event(
                    "acknowledged", manifest.round, manifest.task, metrics={"upload_s": settled.upload_s}
                )

    # --- actions ----------------------------------------------------------------------------------------

    def publish_update(self, pending: Pending) -> None:
        """Send an update of the outbox (again); its `uploaded` event once the link took it."""
        manifest = pending.manifest
        if self.uploads.send(pending):
            self.emit_event(
                "uploaded",
                manifest.round,
                manifest.task,
                f"{manifest.transfer.size} bytes",
                metrics={"bytes": manifest.transfer.size},
            )

    def emit_event(self, kind: str, round_: int, task: str | None, message: str = "", metrics=None) -> None:
        event = Event(
            device=self.device,
            ts=time.time(),
            kind=kind,
            round=round_,
            task=task,
            message=message[:MAX_TEXT],  # a long error would make the whole event invalid
            metrics=metrics or {},
        )
        self.metrics.events.observe(event)
        try:
            self.link.publish(topics.device(self.device, "events"), encode(event))
        except PublishError as exc:
            log.warning("%s event of %s round %d not sent: %s", kind, task, round_, exc)

    def _start(self, active: ActiveRound, assignments: list[TaskAssignment]) -> None:
        number = active.schedule.round
        plan = self._plan(active.schedule, assignments)
        active.planned, active.plan = {a.task: a for a in plan.assignments}, plan
        restarts = sum(self._needs_restart(launch) for launch in plan.launches)
        error = self.planner.history.recent_error(self.planner.error_rounds) if self.planner.history else None
        metrics = (
            {f"R.{t}": r for t, r in plan.resources.items()}
            | {f"B.{a.task}": a.batch_size for a in plan.assignments}
            | {f"P_pred.{t}": p for t, p in plan.predicted.items()}
            | {"restarted": restarts}
            | ({"prediction_error_pct": error} if error is not None else {})
        )
        handover = self.config.execution.reallocate == "handover"
        self.emit_event("plan", number, None, f"{plan.policy}: {plan.note}", metrics)
        work = {}
        for a in plan.assignments:
            ready = threading.Event()
            if self.cache.has(a.task, a.base_version, a.base_sha256):
                ready.set()
                active.ready_at[a.task] = active.received_at
            active.inputs_ready[a.task] = ready
            work[a.task] = TaskWork(
                prepare=self._prepare(a),
                train=jobs.Train(
                    assignment=a,
                    base_path=str(self.cache.payload_path(a.task, a.base_version)),
                    output_path=str(self.work_dir / f"{a.task}-r{number}.update"),
                    seed=a.round_seed(number),
                    release_memory=self.config.execution.release_memory,
                    reference_batch_size=plan.reference_batches.get(a.task),
                    handover_path=str(self.work_dir / f"{a.task}-r{number}.handover") if handover else None,
                    residual_path=str(Path(self.config.state_dir) / "residuals" / f"{a.task}.state"),
                ),
            )
        inbox = self.events
        reallocate = self.planner.reallocation(plan, self._restart_cost_s()) if handover else None

        def run() -> None:
            run_round(
                plan.launches,
                work,
                self.pool,
                lambda o: inbox.put(RoundOutcome(number, o)),
                inputs_ready=active.inputs_ready,
                on_started=lambda task, lease: inbox.put(RoundTaskStarted(number, task, lease)),
                stop=active.stop,
                stall_timeout_s=self.config.execution.worker_stall_s,
                reallocate=reallocate,
            )
            inbox.put(RoundDone(number))

        active.thread = threading.Thread(target=run, name=f"round-{number}", daemon=True)
        active.plan_s = time.monotonic() - active.received_at
        active.thread.start()
        log.info("round %d (%s): training %s", number, plan.policy, [a.task for a in plan.assignments])

    def _plan(self, schedule: Schedule, assignments: list[TaskAssignment], commit: bool = True) -> RoundPlan:
        """The round's plan, knowing the SM share each warm worker runs under and what a restart costs."""
        running = {a.task: launch.percent for a in assignments if (launch := self.pool.launch_of(a.task))}
        return self.planner.plan(
            schedule.policy or self.policy,
            assignments,
            self.samples,
            running=running,
            restart_cost_s=self._restart_cost_s(),
            commit=commit,
        )

    def _needs_restart(self, launch: Launch) -> bool:
        running = self.pool.launch_of(launch.task)
        return running is not None and running.process_key != launch.process_key

    def _prepare(self, assignment: TaskAssignment) -> jobs.Prepare:
        execution = self.config.execution
        return jobs.Prepare(
            model=assignment.model,
            data=self.config.tasks[assignment.task],
            precision=assignment.precision,
            budget_bytes=execution.data_budget_mb << 20,
            loader_workers=execution.loader_workers,
        )

    def _restart_cost_s(self) -> float:
        """What starting a worker costs here: the measured starts of the kind the next one would be (a spare's, or
        one from scratch), else a typical CUDA start."""
        return self.pool.expected_start_s(DEFAULT_RESTART_COST_S)

    def _mark_ready(self, task: str, version: int) -> None:
        current = self.round
        if current is None or task not in current.inputs_ready:
            return
        assignment = next(a for a in current.schedule.tasks if a.task == task)
        if assignment.base_version == version and self.cache.has(task, version, assignment.base_sha256):
            current.ready_at.setdefault(task, time.monotonic())
            current.inputs_ready[task].set()

    def _own_gpu(self, report: GpuReport) -> GpuReport:
        """The GPU this agent trains on: the first of CUDA_VISIBLE_DEVICES (set from `[execution] gpu`), else
        the first GPU; an entry NVML cannot match (a MIG instance, say) is logged and the first GPU taken."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or None
        try:
            return own_gpu(report, visible)
        except ValueError as exc:
            log.warning("CUDA_VISIBLE_DEVICES: %s; profiling the first GPU", exc)
            return own_gpu(report, None)

    def _compute_device(self) -> str:
        wanted = self.config.execution.device
        if wanted != "auto":
            return wanted
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def load_predictor(
    path: str | None, gpu: GpuReport, compute: str, own: Path | None = None, cuda_graphs: bool = False
):
    """The throughput predictor for this GPU, or None and why (the planner then uses the heuristic): the
    configured file, else the one calibrated on this device (in `own`), else the one shipped for this GPU; one
    profiled with the other kind of training step than this agent's (`cuda_graphs`) is refused."""
    from predictor.features import remember
    from predictor.records import STEP_KINDS, dataset_path
    from predictor.runtime import PREDICTOR_DIR, OnnxPredictor, PredictorUnavailable, find_predictor

    if compute != "cuda" or not gpu.gpus:
        return None, "no GPU: no throughput predictor needed"
    name = gpu.gpus[0].name
    calibrated = dataset_path(own, name, cuda_graphs).with_suffix(".onnx") if own is not None else None
    chosen = Path(path) if path else calibrated if calibrated and calibrated.exists() else None
    try:
        predictor = OnnxPredictor(chosen, gpu=name) if chosen else find_predictor(PREDICTOR_DIR, name)
    except PredictorUnavailable as exc:
        return None, f"no predictor for this device ({exc}): heuristic R_v=200% split by workload"
    if predictor.cuda_graphs is not None and predictor.cuda_graphs != cuda_graphs:
        return None, (
            f"predictor {predictor.path.name} was profiled with {STEP_KINDS[predictor.cuda_graphs]}, this agent "
            f"runs {STEP_KINDS[cuda_graphs]}: heuristic until it calibrates ([calibration] auto, fedmt-agent "
            "calibrate)"
        )
    remember(predictor.features)  # the plans then need no feature extraction for these workloads
    return predictor, f"predictor {predictor.path.name} (MAPE {predictor.card['mape_percent']})"
