"""A round's execution plan: which policy, each task's R_i and B_i, and the start order.

With the `fedmt` policy and a predictor fitted on this GPU (and at the tasks' input size), the predictor's search
chooses B_i (Eq. 6, data volumes = local samples, batch changes damped across rounds), R_i (Eq. 5) and the start
order (Algorithm 1, downloads and uploads estimated from model size and link speed). Without one, the documented
heuristic applies (R_v = 200% split by workload, batch sizes from the schedule) and the plan says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from agent.mps import GpuSharing
from agent.policies import R_GRID, Policy, PolicyLaunches, policy_launches
from agent.workers import Launch
from protocol.schemas import TaskAssignment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPlan:
    policy: Policy
    assignments: list[TaskAssignment]  # in start order, with the planned batch sizes
    launches: list[Launch]
    resources: dict[str, float]
    note: str


def batch_candidates(assignment: TaskAssignment, trusted: tuple[int, int]) -> list[int]:
    """Powers of two within the schedule's batch bounds and the `trusted` range (the predictor's profiled batch
    sizes; they must overlap), and the scheduled batch size itself, moved into both."""
    low = max(assignment.min_batch_size, trusted[0])
    high = min(assignment.max_batch_size, trusted[1])
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
    ) -> None:
        self.sharing = sharing
        self.predictor = predictor
        self.predictor_note = predictor_note
        self.link_mbps = link_mbps
        self.damping = damping
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
        """The round's plan. `running` gives the SM share each task's warm worker already runs under: a new share
        needs a restart (MPS fixes it at process start), so `fedmt` keeps the running shares unless the new ones
        are predicted to save more than `restart_cost_s` of training (without a predictor: unless some share
        moves by more than one grid step). With `commit` false nothing is remembered (a look ahead)."""
        from predictor.features import extract

        features = {a.task: extract(a.model) for a in assignments}
        resources, note, usable = None, "", False
        if policy == "fedmt" and self.sharing.mps_env is not None:
            usable, note = self._predictor_for(assignments)
            if usable:
                assignments, resources = self._predicted(assignments, features, samples, commit)
        workloads = {a.task: features[a.task].flops_per_sample * a.batch_size for a in assignments}
        launches = self._launches(policy, assignments, workloads, resources)
        kept = running is not None and self._keep_running(
            launches, running, assignments, samples, features, restart_cost_s if usable else None
        )
        if kept:
            launches = self._launches(
                policy, assignments, workloads, {t: running[t] for t in launches.resources}
            )
            note = "; ".join(filter(None, [note, "kept the running SM shares: a restart would not pay"]))
        note = "; ".join(filter(None, [launches.note, note]))
        return RoundPlan(launches.policy, assignments, launches.launches, launches.resources, note)

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

    def _keep_running(self, launches, running, assignments, samples, features, restart_cost_s) -> bool:
        """Whether the `fedmt` shares should stay as the warm workers run them (see `plan`)."""
        new = launches.resources
        if launches.policy != "fedmt" or not new or any(running.get(t) is None for t in new):
            return False
        if all(running[t] == new[t] for t in new):
            return False
        if restart_cost_s is None:
            return max(abs(running[t] - new[t]) for t in new) <= R_GRID
        import numpy as np

        tasks = [features[a.task] for a in assignments]
        batches = np.array([[a.batch_size for a in assignments]], dtype=np.float64)
        work = np.array(
            [
                a.local_steps * a.batch_size if a.local_steps else a.local_epochs * samples[a.task]
                for a in assignments
            ]
        )

        def seconds(shares: Mapping[str, float]) -> float:
            percents = np.array([[shares[a.task] for a in assignments]], dtype=np.float64)
            return float((work / np.asarray(self.predictor(tasks, batches, percents))[0]).max())

        return seconds(running) - seconds(new) < restart_cost_s

    def _predictor_for(self, assignments: list[TaskAssignment]) -> tuple[bool, str]:
        if self.predictor is None:
            return False, self.predictor_note
        resolution = self.predictor.card.get("resolution")
        if any(a.model.input_size != resolution for a in assignments):
            return False, f"the predictor was fitted at {resolution}x{resolution} inputs: heuristic instead"
        if not 1 <= len(assignments) <= 5:
            return False, "the predictor takes 1..5 tasks: heuristic instead"
        low, high = self.predictor.batch_range
        for a in assignments:
            if a.max_batch_size < low or a.min_batch_size > high:
                return False, (
                    f"the predictor was profiled at batch sizes {low}..{high}, task {a.task} allows "
                    f"{a.min_batch_size}..{a.max_batch_size}: heuristic instead"
                )
        return True, f"predictor {self.predictor.path.name}"

    def _predicted(
        self, assignments, features, samples, commit
    ) -> tuple[list[TaskAssignment], dict[str, float]]:
        import numpy as np

        from predictor.search import configure

        tasks = [features[a.task] for a in assignments]
        seconds = [8 * f.param_bytes / (self.link_mbps * 1e6) for f in tasks]  # one model each way
        previous = [self.previous_batches.get(a.task) for a in assignments]
        result = configure(
            tasks,
            [samples[a.task] for a in assignments],
            [batch_candidates(a, self.predictor.batch_range) for a in assignments],
            seconds,
            seconds,
            self.predictor,
            previous=np.array(previous) if all(previous) else None,
            damping=self.damping,
        )
        planned = [
            msgspec.structs.replace(assignments[i], batch_size=int(result.batches[i])) for i in result.order
        ]
        if commit:
            self.previous_batches = {a.task: a.batch_size for a in planned}
        return planned, {assignments[i].task: float(result.resources[i]) for i in result.order}
