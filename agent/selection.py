"""Plans that never lose to a static split: the `fedmt` SM shares are the best of several candidates.

Candidates, all at the plan's batch sizes: the predictor's search result (`fedmt`), the static MPS policies
(`isolated`: an equal split to 100%, `sharing`: 100% each) and the workload heuristic (`heuristic`: R_v = 200%
split by training FLOPs). A candidate's score is its makespan max_i W_i / P_i (W_i: the images task i trains this
round), where P_i is the median of what this device measured for exactly that configuration when its history
holds it, else the (corrected) predictor's value; the shortest wins, ties to the earlier candidate.

When the predictor's recent error is above the threshold its values are not trusted: a candidate this device
never measured is tried (one round each, in the order above), then the one with the best measured makespan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.policies import equal_split, heuristic_shares
from predictor.features import TaskFeatures


@dataclass(frozen=True)
class Candidate:
    name: str
    resources: tuple[float, ...]  # R_i in percent, in task order


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    makespan_s: float  # as scored
    measured: bool  # the score rests on this device's measurements
    note: str


def candidates(search: Sequence[float] | None, workloads: Sequence[float]) -> list[Candidate]:
    """The search result (if any), isolated, sharing and the heuristic; shares as launched (one decimal), the
    same split listed once (under its first name)."""
    n = len(workloads)
    named = [("fedmt", search)] if search is not None else []
    named += [
        ("isolated", equal_split(n)),
        ("sharing", [100.0] * n),
        ("heuristic", heuristic_shares(workloads)),
    ]
    seen, result = set(), []
    for name, shares in named:
        shares = tuple(round(float(r), 1) for r in shares)
        if shares not in seen:
            seen.add(shares)
            result.append(Candidate(name, shares))
    return result


def trust(error: float | None, limit: float) -> tuple[bool, str]:
    """Whether plans may rest on the predictor, given its recent error in percent (None: no round measured yet)
    and the limit; when not, the note that says why (`choose`'s `error_note`)."""
    if error is None or error <= limit:
        return True, ""
    return False, f"recent prediction error {error:.0f}% > {limit:g}%"


def choose(
    options: Sequence[Candidate],
    tasks: Sequence[TaskFeatures],
    batches: Sequence[int],
    work: Sequence[float],
    predict,
    measured: Callable[[Candidate], list[float] | None],
    *,
    trust_model: bool,
    error_note: str = "",
) -> Choice:
    """The candidate to run (see the module docstring). `measured(candidate)` gives this device's per-task
    median throughputs for it, or None; `error_note` says why the model is not trusted."""
    rows = np.array([c.resources for c in options], dtype=np.float64)
    predicted = np.asarray(
        predict(tasks, np.tile(np.asarray(batches, dtype=np.float64), (len(options), 1)), rows)
    )
    work = np.asarray(work, dtype=np.float64)
    scored = []
    for candidate, guess in zip(options, predicted):
        values = measured(candidate)
        throughput = np.asarray(values if values is not None else guess, dtype=np.float64)
        span = float((work / np.maximum(throughput, 1e-9)).max())
        scored.append((span, values is not None, candidate))
    if trust_model:
        span, was_measured, best = min(scored, key=lambda s: s[0])
        how = "measured here" if was_measured else "predicted"
        return Choice(best, span, was_measured, f"{best.name} shares: makespan {span:.1f} s ({how})")
    untried = [s for s in scored if not s[1]]
    if untried:
        span, _, best = untried[0]
        return Choice(best, span, False, f"{error_note}: trying {best.name}, never measured here")
    span, _, best = min(scored, key=lambda s: s[0])
    return Choice(best, span, True, f"{error_note}: best measured {best.name} ({span:.1f} s)")
