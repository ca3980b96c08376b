"""A round's execution plan: which policy, each task's R_i and B_i, and the start order.

With the `fedmt` policy and a predictor fitted on this GPU (and at the tasks' input sizes), the predictor's search
chooses B_i and R_i (Eq. 5 and 6, data volumes = the round's images per task; by default minimising the makespan
over every batch combination, with Eq. 6's mismatch breaking ties; batch changes damped across rounds) and the
start order (Algorithm 1, downloads and uploads estimated from model size and link speed); the SM shares are then
the best of the search result and the static splits, scored with the device's own measurements
(agent/selection.py). Without a predictor, the documented heuristic applies (R_v = 200% split by workload, batch
sizes from the schedule) and the plan says so. A changed batch size changes the round's learning rate or steps as
the task says (agent/batching.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from agent.batching import batch_ceiling, round_images
from agent.handover import Reallocate, Training
from agent.history import DeviceHistory
from agent.mps import GpuSharing
from agent.policies import MPS_POLICIES, R_GRID, Policy, PolicyLaunches, policy_launches, split_by_workload
from agent.selection import Choice, candidates, choose, trust
from agent.workers import Launch
from predictor.encoding import MAX_TASKS
from protocol.schemas import TaskAssignment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPlan:
    policy: Policy
    assignments: list[TaskAssignment]  # in start order, with the planned batch sizes
    launches: list[Launch]
    resources: dict[str, float]
    note: str
    reference_batches: dict[str, int] = field(default_factory=dict)  # each task's configured batch size
    predicted: dict[str, float] = field(default_factory=dict)  # images/s per task (with a predictor)
    shares: str = ""  # where the SM shares come from: a candidate of agent/selection.py, or the policy


def batch_candidates(assignment: TaskAssignment, trusted: tuple[int, int]) -> list[int]:
    """Powers of two within the schedule's batch bounds, the `trusted` range (the predictor's profiled batch
    sizes; they must overlap) and the task's batch ceiling at its global version, and the scheduled batch size
    itself, moved into them."""
    low = max(assignment.min_batch_size, trusted[0])
    high = max(low, min(assignment.max_batch_size, trusted[1], batch_ceiling(assignment)))
    powers = [2**k for k in range(0, 11) if low <= 2**k <= high]
    return sorted({*powers, min(max(assignment.batch_size, low), high)})


class Planner:
    def __init__(
        self,
        sharing: GpuSharing,
        predictor=None,
        predictor_note: str = "",
        *,
        link_mbps: float = 100.0,
        damping: float = 0.5,
        objective: str = "makespan",
        history: DeviceHistory | None = None,
        max_error_percent: float = 20.0,
        error_rounds: int = 5,
    ) -> None:
        self.sharing = sharing
        self.predictor = predictor
        self.predictor_note = predictor_note
        self.link_mbps = link_mbps
        self.damping = damping
        self.objective = objective
        self.history = history
        self.max_error_percent = max_error_percent
        self.error_rounds = error_rounds
        self.previous_batches: dict[str, int] = {}

    def plan(
        self,
        policy: Policy,
        assignments: list[TaskAssignment],
        samples: dict[str, int],
        *,
        running: Mapping[str, float | None] | None = None,
        restart_cost_s: float = 10.0,
        commit: bool = True,
    ) -> RoundPlan:
        """The round's plan for the schedule's `assignments`. `running` gives the SM share each task's warm
        worker already runs under: a new share needs a restart (MPS fixes it at process start), so `fedmt` keeps
        the running shares unless the new ones are predicted to save more than `restart_cost_s` of training
        (without a predictor: unless some share moves by more than one grid step). With `commit` false nothing is
        remembered (a look ahead)."""
        from predictor.features import extract

        # only SM shares need the models' features (the first extraction costs seconds: torchvision, FLOPs)
        shares_planned = policy in MPS_POLICIES and self.sharing.mps_env is not None
        features = {a.task: extract(a.model) for a in assignments} if shares_planned else {}
        configured = {a.task: a.batch_size for a in assignments}
        resources, note, usable, shares = None, "", False, ""
        if policy == "fedmt" and self.sharing.mps_env is not None:
            usable, note = self.predictor_for(assignments)
            if usable:
                assignments, searched = self._predicted(assignments, features, samples, commit)
                choice = self._select(assignments, features, samples, configured, searched)
                resources = dict(zip([a.task for a in assignments], choice.candidate.resources))
                note, shares = f"{note}; {choice.note}", choice.candidate.name
        workloads = (
            {a.task: features[a.task].flops_per_sample * a.batch_size for a in assignments}
            if features
            else {}
        )
        launches = self._launches(policy, assignments, workloads, resources)
        work = {a.task: round_images(a, samples[a.task], configured[a.task]) for a in assignments}
        kept = running is not None and self._keep_running(
            launches, running, assignments, work, features, restart_cost_s if usable else None
        )
        if kept:
            launches = self._launches(
                policy, assignments, workloads, {t: running[t] for t in launches.resources}
            )
            note = "; ".join(filter(None, [note, "kept the running SM shares: a restart would not pay"]))
            shares = "kept"
        note = "; ".join(filter(None, [launches.note, note]))
        predicts = launches.resources and (usable or self.predictor_for(assignments)[0])
        predicted = self._throughputs(assignments, features, launches.resources) if predicts else {}
        return RoundPlan(
            launches.policy,
            assignments,
            launches.launches,
            launches.resources,
            note,
            reference_batches=configured,
            predicted=predicted,
            shares=shares or launches.policy,
        )

    def reallocation(self, plan: RoundPlan, restart_cost_s: float) -> Reallocate | None:
        """The rule that gives a finished task's SM share to the tasks still training (`[execution] reallocate =
        "handover"`): R_v stays as planned and the freed share goes to the others in proportion to their shares
        (each at most 100%); a task moves when its share grows by at least one grid step and its remaining
        training, at its pace so far, outlasts getting a standby worker ready (`restart_cost_s`). None when the
        plan has no SM shares."""
        if not plan.resources or self.sharing.mps_env is None:
            return None
        rv = sum(plan.resources.values())

        def reallocate(finished: str, training: list[Training]) -> dict[str, Launch]:
            shares = split_by_workload([t.launch.percent for t in training], rv)
            moves = {}
            for t, share in zip(training, shares):
                share = round(share, 1)
                remaining = t.remaining_s
                if (
                    share - t.launch.percent >= R_GRID
                    and remaining is not None
                    and remaining >= restart_cost_s
                ):
                    moves[t.task] = dataclasses.replace(
                        self.sharing.launch(t.task, share), wave=t.launch.wave
                    )
            if moves:
                log.info("task %s finished: moving %s", finished, {t: m.percent for t, m in moves.items()})
            return moves

        return reallocate

    def predictor_for(self, assignments: list[TaskAssignment]) -> tuple[bool, str]:
        """Whether the predictor can plan these tasks, and the note saying which one or why not."""
        if self.predictor is None:
            return False, self.predictor_note
        sizes = sorted(self.predictor.input_sizes)
        if any(a.model.input_size not in sizes for a in assignments):
            return False, f"the predictor was fitted at input sizes {sizes} px: heuristic instead"
        if not 1 <= len(assignments) <= MAX_TASKS:
            return False, f"the predictor takes 1..{MAX_TASKS} tasks: heuristic instead"
        low, high = self.predictor.batch_range
        for a in assignments:
            if a.max_batch_size < low or a.min_batch_size > high:
                return False, (
                    f"the predictor was profiled at batch sizes {low}..{high}, task {a.task} allows "
                    f"{a.min_batch_size}..{a.max_batch_size}: heuristic instead"
                )
        return True, f"predictor {self.predictor.path.name}"

    def profiled(self, assignments: list[TaskAssignment]) -> bool:
        """Whether the predictor plans these tasks and was profiled with every one of their models."""
        usable, _ = self.predictor_for(assignments)
        models = set(self.predictor.card.get("data", {}).get("models", ())) if usable else set()
        return usable and all(a.model.name in models for a in assignments)

    def _launches(self, policy, assignments, workloads, resources) -> PolicyLaunches:
        return policy_launches(
            policy,
            [a.task for a in assignments],
            workloads,
            mps_env=self.sharing.mps_env,
            no_mps_env=self.sharing.no_mps_env,
            expected_sms=self.sharing.expected_sms,
            resources=resources,
        )

    def _keep_running(self, launches, running, assignments, work, features, restart_cost_s) -> bool:
        """Whether the `fedmt` shares should stay as the warm workers run them (see `plan`)."""
        new = launches.resources
        if launches.policy != "fedmt" or not new or any(running.get(t) is None for t in new):
            return False
        if all(running[t] == new[t] for t in new):
            return False
        if restart_cost_s is None:
            return max(abs(running[t] - new[t]) for t in new) <= R_GRID
        import numpy as np

        images = np.array([work[a.task] for a in assignments], dtype=np.float64)

        def seconds(shares: Mapping[str, float]) -> float:
            predicted = self._throughputs(assignments, features, shares)
            return float((images / np.array([predicted[a.task] for a in assignments])).max())

        return seconds(running) - seconds(new) < restart_cost_s

    def _throughputs(self, assignments, features, shares: Mapping[str, float]) -> dict[str, float]:
        """The predicted images/s of each task at its planned batch size and `shares` (empty without shares)."""
        import numpy as np

        if not shares:
            return {}
        tasks = [features[a.task] for a in assignments]
        batches = np.array([[a.batch_size for a in assignments]], dtype=np.float64)
        percents = np.array([[shares[a.task] for a in assignments]], dtype=np.float64)
        predicted = np.asarray(self.predictor(tasks, batches, percents))[0]
        return {a.task: float(p) for a, p in zip(assignments, predicted)}

    def _predicted(
        self, assignments, features, samples, commit
    ) -> tuple[list[TaskAssignment], dict[str, float]]:
        import numpy as np

        from predictor.search import configure, default_grid

        tasks = [features[a.task] for a in assignments]
        seconds = [8 * f.param_bytes / (self.link_mbps * 1e6) for f in tasks]  # one model each way
        previous = [self.previous_batches.get(a.task) for a in assignments]
        result = configure(
            tasks,
            [round_images(a, samples[a.task]) for a in assignments],
            [batch_candidates(a, self.predictor.batch_range) for a in assignments],
            seconds,
            seconds,
            self.predictor,
            objective=self.objective,
            grid=default_grid(len(tasks), self.predictor.share_range),
            previous=np.array(previous) if all(previous) else None,
            damping=self.damping,
        )
        planned = [
            msgspec.structs.replace(assignments[i], batch_size=int(result.batches[i])) for i in result.order
        ]
        if commit:
            self.previous_batches = {a.task: a.batch_size for a in planned}
        return planned, {assignments[i].task: float(result.resources[i]) for i in result.order}

    def _select(self, assignments, features, samples, configured, searched) -> Choice:
        """The best of the search result and the static splits (agent/selection.py)."""
        error = self.history.recent_error(self.error_rounds) if self.history else None
        trusted, note = trust(error, self.max_error_percent)

        def measured(candidate) -> list[float] | None:
            if self.history is None:
                return None
            keys = [
                (a.model.name, a.model.input_size, a.batch_size, r)
                for a, r in zip(assignments, candidate.resources)
            ]
            return self.history.measured(keys)

        options = candidates(
            [searched[a.task] for a in assignments],
            [features[a.task].flops_per_sample * a.batch_size for a in assignments],
        )
        return choose(
            options,
            [features[a.task] for a in assignments],
            [a.batch_size for a in assignments],
            [round_images(a, samples[a.task], configured[a.task]) for a in assignments],
            self.predictor,
            measured,
            trust_model=trusted,
            error_note=note,
        )
