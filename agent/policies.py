"""Execution policies: how a round's task processes share the GPU.

| policy     | processes                     | MPS | R_i (SM percentage per task)                         |
|------------|-------------------------------|-----|------------------------------------------------------|
| temporal   | one after another, full GPU   | no  | -                                                    |
| concurrent | all at once, time-sliced      | no  | -                                                    |
| isolated   | all at once                   | yes | equal split, summing to 100%                         |
| sharing    | all at once                   | yes | 100% each                                            |
| fedmt      | all at once, in the plan order| yes | the predictor's configuration; without one, R_v=200% |
|            |                               |     | split by workload (`split_by_workload`)              |

Without MPS (no daemon, Jetson without support, CPU) the MPS policies fall back to `concurrent`, and the
plan says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

from agent.workers import Launch
from protocol.schemas import ExecutionPolicy

Policy = ExecutionPolicy
POLICIES: tuple[Policy, ...] = get_args(ExecutionPolicy)
MPS_POLICIES = frozenset({"isolated", "sharing", "fedmt"})
HEURISTIC_RV = 200.0
MIN_PERCENT = 10.0
R_GRID = 10.0  # heuristic shares are multiples of this: small workload changes restart no worker


@dataclass(frozen=True)
class PolicyLaunches:
    policy: Policy  # the policy actually applied (after any fallback)
    launches: list[Launch]
    resources: dict[str, float]  # task -> R_i in percent; empty without MPS
    note: str


def available_policies(mps_available: bool) -> list[Policy]:
    """What this device can run: the MPS policies only with a usable MPS daemon."""
    return [p for p in POLICIES if mps_available or p not in MPS_POLICIES]


def split_by_workload(
    workloads: Sequence[float], rv: float, floor: float = MIN_PERCENT, cap: float = 100.0
) -> list[float]:
    """R_i proportional to workload with sum R_i = rv, each within [floor, cap] (water-filling).

    rv is clipped to what the bounds allow (n*floor .. n*cap).
    """
    n = len(workloads)
    if n == 0:
        return []
    if any(w <= 0 for w in workloads):
        raise ValueError("workloads must be positive")
    rv = min(max(rv, n * floor), n * cap)
    shares = [0.0] * n
    free = set(range(n))
    budget = rv
    while free:
        total = sum(workloads[i] for i in free)
        proposal = {i: budget * workloads[i] / total for i in free}
        pinned = {i: cap for i, p in proposal.items() if p > cap} or {
            i: floor for i, p in proposal.items() if p < floor
        }
        if not pinned:
            for i, p in proposal.items():
                shares[i] = p
            break
        for i, value in pinned.items():
            shares[i] = value
            budget -= value
            free.discard(i)
    return shares


def heuristic_shares(workloads: Sequence[float]) -> list[float]:
    """The `fedmt` heuristic: R_v = HEURISTIC_RV split by workload, on the R_GRID."""
    return [max(MIN_PERCENT, round(p / R_GRID) * R_GRID) for p in split_by_workload(workloads, HEURISTIC_RV)]


def equal_split(n: int, total: float = 100.0) -> list[float]:
    return [total / n] * n


def policy_launches(
    policy: Policy,
    tasks: Sequence[str],
    workloads: Mapping[str, float],
    *,
    mps_env: Callable[[float], dict[str, str]] | None,
    no_mps_env: Mapping[str, str],
    expected_sms: Callable[[float], int] | None = None,
    resources: Mapping[str, float] | None = None,
) -> PolicyLaunches:
    """Launches for `tasks` (in start order) under `policy`.

    `mps_env(percent)` gives an MPS client's environment, or is None when MPS is unavailable; `no_mps_env` keeps a
    process away from a running MPS daemon; `expected_sms(percent)` gives the SM count a client must see;
    `resources` (task -> percent) is the predictor's configuration for `fedmt`.
    """
    if policy in MPS_POLICIES and mps_env is None:
        fallback = policy_launches("concurrent", tasks, workloads, mps_env=None, no_mps_env=no_mps_env)
        note = f"{policy} needs MPS, which is unavailable: ran concurrent"
        return PolicyLaunches(fallback.policy, fallback.launches, {}, note)
    if policy == "temporal":
        launches = [Launch(task, wave=i, env=dict(no_mps_env)) for i, task in enumerate(tasks)]
        return PolicyLaunches(policy, launches, {}, "one task at a time on the whole GPU")
    if policy == "concurrent":
        launches = [Launch(task, env=dict(no_mps_env)) for task in tasks]
        return PolicyLaunches(policy, launches, {}, "all tasks at once, time-sliced, no MPS")
    if policy == "isolated":
        percents, note = equal_split(len(tasks)), "MPS, equal SM split summing to 100%"
    elif policy == "sharing":
        percents, note = [100.0] * len(tasks), "MPS, every task may use 100% of the SMs"
    elif resources is not None:
        percents, note = [resources[t] for t in tasks], "MPS, R_i from the predictor's configuration"
    else:
        percents = heuristic_shares([workloads[t] for t in tasks])
        note = f"MPS, no predictor for this device: heuristic R_v={HEURISTIC_RV:.0f}% split by workload"
    # One decimal: the environment string and the expected SM count then come from the same short number (an
    # exact third, 33.333...%, sits on an SM rounding boundary where CUDA's arithmetic may differ from ours).
    percents = [round(p, 1) for p in percents]
    launches = [
        Launch(task, env=mps_env(p), percent=p, expected_sms=expected_sms(p) if expected_sms else None)
        for task, p in zip(tasks, percents)
    ]
    return PolicyLaunches(policy, launches, dict(zip(tasks, percents)), note)
