"""A round's execution plan: which policy, each task's R_i and B_i, and the start order.

With the `fedmt` policy and a predictor fitted on this GPU (and at the tasks' input size), the predictor's search
chooses B_i (Eq. 6, data volumes = local samples, batch changes damped across rounds), R_i (Eq. 5) and the start
order (Algorithm 1, downloads and uploads estimated from model size and link speed). Without one, the documented
heuristic applies (R_v = 200% split by workload, batch sizes from the schedule) and the plan says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from agent.mps import GpuSharing
from agent.policies import Policy, plan_launches
from agent.runner import Launch
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

    def plan(self, policy: Policy, assignments: list[TaskAssignment], samples: dict[str, int]) -> RoundPlan:
        from predictor.features import extract

        features = {a.task: extract(a.model) for a in assignments}
        resources, note = None, ""
        if policy == "fedmt" and self.sharing.mps_env is not None:
            usable, note = self._predictor_for(assignments)
            if usable:
                assignments, resources = self._predicted(assignments, features, samples)
        workloads = {a.task: features[a.task].flops_per_sample * a.batch_size for a in assignments}
        launch_plan = plan_launches(
            policy,
            [a.task for a in assignments],
            workloads,
            mps_env=self.sharing.mps_env,
            no_mps_env=self.sharing.no_mps_env,
            expected_sms=self.sharing.expected_sms,
            resources=resources,
        )
        note = "; ".join(filter(None, [launch_plan.note, note]))
        return RoundPlan(launch_plan.policy, assignments, launch_plan.launches, launch_plan.resources, note)

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

    def _predicted(self, assignments, features, samples) -> tuple[list[TaskAssignment], dict[str, float]]:
        import numpy as np

        from predictor.search import plan

        tasks = [features[a.task] for a in assignments]
        seconds = [8 * f.param_bytes / (self.link_mbps * 1e6) for f in tasks]  # one model each way
        previous = [self.previous_batches.get(a.task) for a in assignments]
        result = plan(
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
        self.previous_batches = {a.task: a.batch_size for a in planned}
        return planned, {assignments[i].task: float(result.resources[i]) for i in result.order}
