"""Configuration search on one device: R_i (Eq. 5), B_i (Eq. 6 and damping), start order (Algorithm 1).

Pure numpy. The throughput predictor is injected: `predict(tasks, B, R) -> P` gets float64 arrays B (batch
sizes) and R (SM percentages) of shape (N, n), N configurations of the same n co-located tasks, and returns
their per-task throughputs P in images/s, shape (N, n). Each search phase stacks all its configurations into
one call (one ONNX inference); only the bounded heuristics used beyond `exhaustive_limit` tasks make one call
per improvement round. Ties are broken deterministically, as each function documents.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from predictor.features import TaskFeatures

Predict = Callable[[Sequence[TaskFeatures], np.ndarray, np.ndarray], np.ndarray]
# Alone throughputs for batch rows: (tasks, B of shape (K, n)) -> P_alone of shape (K, n).
Alone = Callable[[Sequence[TaskFeatures], np.ndarray], np.ndarray]
Objective = Literal["sum", "fair", "makespan"]

DEFAULT_GRID = tuple(range(10, 101, 10))
COARSE_GRID = tuple(range(20, 101, 20))
MAX_GRID_ROWS = 20_000  # per batch vector; above it (5 tasks) the default grid is the coarse one
_REL_TOL = 1e-9  # scores and makespans this close (relative) are ties
_EPS = 1e-9
_MAX_COMBINATIONS = 1_000_000
EQ6_TOLERANCE = 0.25  # Eq. 6's filter: batch vectors whose mismatch is within this share of the least


@dataclass(frozen=True, eq=False)
class ResourceChoice:
    resources: np.ndarray  # R_i, percent of the GPU's SMs
    rv: float  # R_v = sum of R_i
    predicted: np.ndarray  # P_i, images/s
    score: float  # the objective's value


@dataclass(frozen=True, eq=False)
class BatchChoice:
    batches: np.ndarray
    resources: np.ndarray
    predicted: np.ndarray
    mismatch: float


@dataclass(frozen=True, eq=False)
class StartOrder:
    order: tuple[int, ...]  # start (download) order of the tasks
    batches: np.ndarray
    predicted: np.ndarray  # P_i at these batches and the given resources
    makespan: float
    evaluated_points: int  # (order, batches) points simulated


@dataclass(frozen=True)
class Configuration:
    """A device's configuration for one round, as plain tuples so it can be logged or sent as is."""

    order: tuple[int, ...]
    batches: tuple[int, ...]
    resources: tuple[float, ...]  # percent
    predicted_throughput: tuple[float, ...]  # images/s
    makespan: float  # seconds, Algorithm 1's simulation
    mismatch: float  # Eq. 6 objective 1 of `batches`


# --- Eq. 5: SM shares for fixed batch sizes ------------------------------------------------------------


def best_resources(
    tasks: Sequence[TaskFeatures],
    batches: Sequence[int] | np.ndarray,
    predict: Predict,
    grid: Sequence[float] | None = None,
    objective: Objective = "sum",
    alone: np.ndarray | Sequence[float] | Alone | None = None,
    rv_max: float | None = None,
    *,
    volumes: Sequence[float] | np.ndarray | None = None,
    exhaustive_limit: int = 5,
    max_rounds: int = 20,
) -> ResourceChoice:
    """R maximising sum P_i ("sum"), sum P_i / P_alone_i ("fair"), or minimising the compute makespan
    max_i D_i / P_i for data volumes D ("makespan") at these batch sizes.

    R_v is not fixed: every R vector on `grid` (with sum <= rv_max if given) is a candidate. Up to
    `exhaustive_limit` tasks all len(grid)**n vectors are predicted in one call; ties go to the smaller R_v,
    then the lexicographically smaller R. Beyond that, coordinate ascent: from the largest equal grid share
    with R_v <= rv_max (or 100), each round predicts every single-task change of R in one call and moves to the
    best one, stopping when nothing improves or after `max_rounds` rounds. `alone` (fair only) is P_alone_i,
    shape (n,), or a callable giving it for batch rows of shape (K, n).
    """
    rows = _positive(batches, len(tasks), "batches")[None]
    resources, predicted, scores = _resource_search(
        tasks, rows, predict, grid, objective, alone, rv_max, exhaustive_limit, max_rounds, volumes
    )
    return ResourceChoice(
        _frozen(resources[0]), float(resources[0].sum()), _frozen(predicted[0]), float(scores[0])
    )


def _resource_search(
    tasks, batches, predict, grid, objective, alone, rv_max, exhaustive_limit, max_rounds, volumes=None
):
    """Eq. 5 for K batch rows (K, n) at once: best R, P and score per row."""
    grid = _grid(grid, len(tasks))
    score = _scorer(tasks, batches, objective, alone, volumes)
    k = np.arange(len(batches))
    if len(tasks) <= exhaustive_limit:
        rows = _grid_rows(grid, len(tasks), rv_max)
        scores, predicted = _scores(
            tasks,
            np.repeat(batches, len(rows), axis=0),
            np.tile(rows, (len(batches), 1)),
            predict,
            score,
            len(rows),
        )
        best = _first_best(scores)
        return rows[best], predicted[k, best], scores[k, best]
    return _coordinate_ascent(tasks, batches, predict, grid, score, rv_max, max_rounds)


def _coordinate_ascent(tasks, batches, predict, grid, score, rv_max, max_rounds):
    n = batches.shape[1]
    budget = 100.0 if rv_max is None else rv_max
    shares = grid[grid * n <= budget + _EPS]
    if rv_max is not None and not len(shares):
        raise ValueError(f"no grid point has R_v <= {rv_max}")
    current = np.full(batches.shape, shares[-1] if len(shares) else grid[0])
    task = np.repeat(np.arange(n), len(grid))
    moves = 1 + len(task)  # row 0 is the current point, so ties keep it
    k = np.arange(len(batches))
    for _ in range(max(max_rounds, 1)):
        candidates = np.repeat(current[:, None, :], moves, axis=1)
        candidates[:, np.arange(1, moves), task] = np.tile(grid, n)
        scores, predicted = _scores(
            tasks, np.repeat(batches, moves, axis=0), candidates.reshape(-1, n), predict, score, moves
        )
        if rv_max is not None:
            scores[candidates.sum(axis=-1) > rv_max + _EPS] = -np.inf
        best = _first_best(scores)
        current = candidates[k, best]
        if not best.any():
            break
    return current, predicted[k, best], scores[k, best]


def _scores(tasks, batch_rows, resource_rows, predict, score, per_row):
    """Predict stacked rows; scores (K, per_row) and throughputs (K, per_row, n)."""
    predicted = _predict(predict, tasks, batch_rows, resource_rows).reshape(-1, per_row, len(tasks))
    return score(predicted), predicted


def _scorer(tasks, batches, objective, alone, volumes) -> Callable[[np.ndarray], np.ndarray]:
    """Score of predicted throughputs (K, rows, n), higher is better:
    sum: sum P_i; fair: sum P_i / P_alone_i (Eq. 2); makespan: -max_i D_i / P_i (equal start, Sec. V)."""
    if objective == "sum":
        return lambda predicted: predicted.sum(axis=-1)
    if objective == "makespan":
        if volumes is None:
            raise ValueError("the makespan objective needs the tasks' data volumes")
        d = _positive(volumes, len(tasks), "volumes")
        return lambda predicted: -(d / np.maximum(predicted, _EPS)).max(axis=-1)
    if objective != "fair":
        raise ValueError(f"objective must be 'sum', 'fair' or 'makespan', got {objective!r}")
    if alone is None:
        raise ValueError("the fair objective needs the tasks' alone throughputs")
    values = alone(tasks, batches) if callable(alone) else alone
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), batches.shape)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError("alone throughputs must be positive")
    weights = 1.0 / values
    return lambda predicted: (predicted * weights[:, None, :]).sum(axis=-1)


def default_grid(n: int, within: tuple[float, float] = (0.0, 100.0)) -> tuple[int, ...]:
    """10% steps while len(grid)**n stays within MAX_GRID_ROWS, else 20% steps (keeps a 5-task search fast);
    only the steps `within` (low, high), e.g. the SM shares a predictor was profiled at (outside them it
    extrapolates), or the step nearest to them when none lies within."""
    low, high = within
    for grid in (DEFAULT_GRID, COARSE_GRID):
        inside = tuple(g for g in grid if low <= g <= high) or (min(grid, key=lambda g: abs(g - high)),)
        if len(inside) ** n <= MAX_GRID_ROWS:
            break
    return inside


def _grid(grid: Sequence[float] | None, n: int) -> np.ndarray:
    grid = default_grid(n) if grid is None else grid
    values = np.unique(np.asarray(grid, dtype=np.float64))
    if not len(values) or values[0] <= 0 or values[-1] > 100:
        raise ValueError(f"resource grid must be non-empty percentages in (0, 100], got {list(grid)}")
    return values


def _grid_rows(grid: np.ndarray, n: int, rv_max: float | None) -> np.ndarray:
    """Every R vector on the grid, smaller R_v first, then lexicographic."""
    rows = np.stack(np.meshgrid(*[grid] * n, indexing="ij"), axis=-1).reshape(-1, n)
    if rv_max is not None:
        rows = rows[rows.sum(axis=1) <= rv_max + _EPS]
        if not len(rows):
            raise ValueError(f"no grid point has R_v <= {rv_max}")
    return rows[np.argsort(rows.sum(axis=1), kind="stable")]


# --- Eq. 6: batch sizes proportional to data volumes -----------------------------------------------------


def mismatch(data_volumes: Sequence[float] | np.ndarray, batches: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 6 objective 1: sum over ordered pairs a != b of |D_a/D_b - B_a/B_b|, for batches (n,) or (M, n)."""
    d = np.asarray(data_volumes, dtype=np.float64)
    b = np.asarray(batches, dtype=np.float64)
    return np.abs(b[..., :, None] / b[..., None, :] - d[:, None] / d[None, :]).sum(axis=(-2, -1))


def adapt_batches(
    tasks: Sequence[TaskFeatures],
    data_volumes: Sequence[float] | np.ndarray,
    candidates: Sequence[Sequence[int]],
    predict: Predict,
    tolerance: float = EQ6_TOLERANCE,
    *,
    grid: Sequence[float] | None = None,
    objective: Objective = "sum",
    alone: np.ndarray | Sequence[float] | Alone | None = None,
    rv_max: float | None = None,
    exhaustive_limit: int = 5,
    max_rounds: int = 20,
    max_rows: int = 1_000_000,
) -> BatchChoice:
    """Eq. 6: among batch vectors of low mismatch, the one whose Eq. 5 optimum has the best objective.

    Every combination of the per-task `candidates` is scored; those with mismatch <= min * (1 + tolerance) +
    1e-9 pass the filter (under the makespan objective all of them: Eq. 6's batches in proportion to the data
    volumes stand in for finishing together, which that objective predicts) and Eq. 5 is solved for all of them
    in one predict call (their R grids stacked). If that would exceed `max_rows` predictor rows, only the
    lowest-mismatch survivors are kept. Ties in the objective go to the lower mismatch, then the
    lexicographically smaller batch vector.
    """
    n = len(tasks)
    d = _positive(data_volumes, n, "data_volumes")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    combos = _product(_options(candidates, n))
    cost = mismatch(d, combos)
    passes = (
        np.full(len(cost), True) if objective == "makespan" else cost <= cost.min() * (1 + tolerance) + _EPS
    )
    kept = np.flatnonzero(passes)
    kept = kept[np.argsort(cost[kept], kind="stable")]  # preference order: mismatch, then lexicographic
    grid = _grid(grid, n)
    per_candidate = len(grid) ** n if n <= exhaustive_limit else 1 + n * len(grid)
    kept = kept[: max(1, max_rows // per_candidate)]
    resources, predicted, scores = _resource_search(
        tasks,
        combos[kept].astype(np.float64),
        predict,
        grid,
        objective,
        alone,
        rv_max,
        exhaustive_limit,
        max_rounds,
        volumes=d,  # the makespan objective weighs each task by its data volume
    )
    best = _first_best(scores)
    return BatchChoice(
        batches=_frozen(combos[kept[best]]),
        resources=_frozen(resources[best]),
        predicted=_frozen(predicted[best]),
        mismatch=float(cost[kept[best]]),
    )


def damp(
    previous: Sequence[int] | np.ndarray | None,
    target: Sequence[int] | np.ndarray,
    factor: float = 0.5,
    candidates: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Batch sizes moved `factor` of the way from `previous` toward `target`, snapped to allowed values.

    Allowed values lie between previous and target (inclusive of target): the task's `candidates`, or every
    integer without them. Snapping takes the nearest (ties toward target); a task that would stay put although
    its target differs moves one allowed value toward it, so repeated damping reaches the target.
    """
    goal = _positive(target, len(target), "target").astype(np.int64)
    if previous is None:
        return goal
    if not 0 < factor <= 1:
        raise ValueError(f"damping factor must be in (0, 1], got {factor}")
    start = _positive(previous, len(goal), "previous").astype(np.int64)
    options = _options(candidates, len(goal)) if candidates is not None else None
    result = goal.copy()
    for i, (p, t) in enumerate(zip(start, goal)):
        if p == t:
            continue
        lo, hi = min(p, t), max(p, t)
        pool = (
            np.arange(lo, hi + 1) if options is None else options[i][(options[i] >= lo) & (options[i] <= hi)]
        )
        allowed = np.union1d(pool, [t])
        moved = p + factor * (t - p)
        nearest = allowed[np.lexsort((np.abs(allowed - t), np.abs(allowed - moved)))[0]]
        if nearest == p:
            others = allowed[allowed != p]
            nearest = others[np.argmin(np.abs(others - p))]
        result[i] = nearest
    return result


# --- Algorithm 1: start order and batch fine-tuning against the makespan -------------------------------


def simulate_makespan(
    order: Sequence[int],
    compute_s: Sequence[float] | np.ndarray,
    down_s: Sequence[float] | np.ndarray,
    up_s: Sequence[float] | np.ndarray,
) -> float:
    """Seconds until the last upload ends, for tasks started in `order`.

    Model: one shared link carries every transfer, one at a time. Downloads go first, back to back from t=0 in
    `order`; task i computes for compute_s[i] from the end of its download (co-located tasks compute
    concurrently, their throughputs already account for the co-location). Uploads follow in the order the tasks
    finish computing (ties: earlier in `order` first), each starting when its task has finished and the link is
    free (so never before all downloads are done). The makespan is the end of the last upload.
    """
    n = len(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}, got {list(order)}")
    compute = _nonnegative(compute_s, n, "compute_s")
    down, up = _nonnegative(down_s, n, "down_s"), _nonnegative(up_s, n, "up_s")
    return float(_makespans(np.array([order]), compute[None], down, up)[0, 0])


def _makespans(orders: np.ndarray, compute: np.ndarray, down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Makespans (P, C) of P orders (P, n) times C compute-time rows (C, n); see simulate_makespan."""
    start = np.cumsum(down[orders], axis=1)  # (P, n), by position in the order
    finish = start[:, None, :] + np.take(compute, orders, axis=1).transpose(1, 0, 2)  # (P, C, n)
    sequence = np.argsort(finish, axis=-1, kind="stable")  # upload order; ties keep start order
    finish = np.take_along_axis(finish, sequence, axis=-1)
    upload = np.take_along_axis(np.broadcast_to(up[orders][:, None, :], finish.shape), sequence, axis=-1)
    link = np.full(finish.shape[:2], down.sum())
    for k in range(orders.shape[1]):
        link = np.maximum(link, finish[..., k]) + upload[..., k]
    return link


def order_tasks(
    tasks: Sequence[TaskFeatures],
    data_volumes: Sequence[float] | np.ndarray,
    batches_star: Sequence[int] | np.ndarray,
    down_s: Sequence[float] | np.ndarray,
    up_s: Sequence[float] | np.ndarray,
    predict: Predict,
    resources: Sequence[float] | np.ndarray,
    delta: float = 0.2,
    exhaustive_limit: int = 5,
    *,
    limits: Sequence[tuple[int, int]] | None = None,
    max_evaluations: int = 5000,
) -> StartOrder:
    """Algorithm 1: start order and batches in {(1-delta)B*, B*, (1+delta)B*} minimising the makespan.

    B* and the options are clipped to the per-task (low, high) `limits` (default: at least 1), rounded and
    deduplicated; compute time is D_i / P_i at the given resources (infinite if P_i <= 0). Up to
    `exhaustive_limit` tasks, every permutation times every batch combination is simulated after one predict
    call (3 tasks: 6 x 27 = 162 points); ties go to fewer changes from B*, then the lexicographically smaller
    order, then batches. Beyond that, local search: start from B* with the longest compute first, then each
    round simulates every pairwise swap of the order and (after one predict call) every single-task batch
    change, moving to the best strict improvement (same tie rules); it stops at a local optimum or before a
    round would exceed `max_evaluations` simulated points.
    """
    n = len(tasks)
    d = _positive(data_volumes, n, "data_volumes")
    star = _positive(batches_star, n, "batches_star").astype(np.int64)
    down, up = _nonnegative(down_s, n, "down_s"), _nonnegative(up_s, n, "up_s")
    share = np.asarray(resources, dtype=np.float64)
    if share.shape != (n,):
        raise ValueError(f"resources must have shape ({n},), got {share.shape}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    bounds = _bounds(limits, n)
    star = np.clip(star, bounds[:, 0], bounds[:, 1]).astype(np.int64)
    scaled = np.floor(star[:, None] * np.array([1 - delta, 1.0, 1 + delta]) + 0.5)
    options = [np.unique(row).astype(np.int64) for row in np.clip(scaled, bounds[:, :1], bounds[:, 1:])]

    def compute_times(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        predicted = _predict(
            predict, tasks, rows.astype(np.float64), np.broadcast_to(share, rows.shape).copy()
        )
        return np.divide(d, predicted, out=np.full(predicted.shape, np.inf), where=predicted > 0), predicted

    if n <= exhaustive_limit:
        combos = _product(options)
        compute, predicted = compute_times(combos)
        orders = np.array(list(itertools.permutations(range(n))))
        spans = _makespans(orders, compute, down, up)
        near = np.argwhere(spans <= spans.min() * (1 + _REL_TOL))  # (order, combo) pairs, lexicographic
        p, c = near[np.argmin((combos[near[:, 1]] != star).sum(axis=1))]
        return StartOrder(
            tuple(int(i) for i in orders[p]),
            _frozen(combos[c]),
            _frozen(predicted[c]),
            float(spans[p, c]),
            spans.size,
        )
    return _local_search(star, options, compute_times, down, up, max_evaluations)


def _local_search(star, options, compute_times, down, up, max_evaluations) -> StartOrder:
    compute, predicted = (a[0] for a in compute_times(star[None]))
    order = np.argsort(-compute, kind="stable")  # longest compute first
    span = _makespans(order[None], compute[None], down, up)[0, 0]
    batches, evaluated = star, 1
    pairs = list(itertools.combinations(range(len(star)), 2))
    while True:
        swaps = np.repeat(order[None], len(pairs), axis=0)
        for row, (i, j) in enumerate(pairs):
            swaps[row, [i, j]] = swaps[row, [j, i]]
        changes = [(i, b) for i, values in enumerate(options) for b in values if b != batches[i]]
        if evaluated + len(pairs) + len(changes) > max_evaluations:
            break
        rows = np.repeat(batches[None], len(changes), axis=0)
        for row, (i, b) in enumerate(changes):
            rows[row, i] = b
        row_compute, row_predicted = compute_times(rows) if changes else (np.empty((0, len(star))),) * 2
        points = [
            (s, swap, batches, compute, predicted)
            for s, swap in zip(_makespans(swaps, compute[None], down, up)[:, 0], swaps)
        ]
        points += [
            (s, order, r, rc, rp)
            for s, r, rc, rp in zip(
                _makespans(order[None], row_compute, down, up)[0], rows, row_compute, row_predicted
            )
        ]
        evaluated += len(points)
        best = min((s for s, *_ in points), default=np.inf)
        if not best < span * (1 - _REL_TOL):
            break
        span, order, batches, compute, predicted = min(
            (p for p in points if p[0] <= best * (1 + _REL_TOL)),
            key=lambda p: (int((p[2] != star).sum()), tuple(p[1]), tuple(p[2])),
        )
    return StartOrder(
        tuple(int(i) for i in order), _frozen(batches), _frozen(predicted), float(span), evaluated
    )


def _bounds(limits: Sequence[tuple[int, int]] | None, n: int) -> np.ndarray:
    """Per-task (low, high) batch limits as an (n, 2) array; no limits is [1, inf)."""
    if limits is None:
        return np.tile([1.0, np.inf], (n, 1))
    bounds = np.asarray(limits, dtype=np.float64)
    if bounds.shape != (n, 2) or np.any(bounds[:, 0] < 1) or np.any(bounds[:, 0] > bounds[:, 1]):
        raise ValueError(f"limits must be {n} (low, high) pairs with 1 <= low <= high, got {limits!r}")
    return bounds


# --- the whole configuration -----------------------------------------------------------------------------


def configure(
    tasks: Sequence[TaskFeatures],
    data_volumes: Sequence[float] | np.ndarray,
    candidates: Sequence[Sequence[int]],
    down_s: Sequence[float] | np.ndarray,
    up_s: Sequence[float] | np.ndarray,
    predict: Predict,
    *,
    tolerance: float = EQ6_TOLERANCE,
    delta: float = 0.2,
    grid: Sequence[float] | None = None,
    objective: Objective = "sum",
    alone: np.ndarray | Sequence[float] | Alone | None = None,
    rv_max: float | None = None,
    previous: Sequence[int] | np.ndarray | None = None,
    damping: float = 0.5,
    exhaustive_limit: int = 5,
    max_evaluations: int = 5000,
) -> Configuration:
    """Eq. 6 (with Eq. 5 inside) for B* and R, then Algorithm 1 for the start order and final batches.

    With `previous` batch sizes, B* is first damped toward the Eq. 6 choice (and R re-solved for it if it
    moved: one more predict call). R stays fixed through Algorithm 1, whose batches are kept within each
    task's candidate range.
    """
    adapted = adapt_batches(
        tasks,
        data_volumes,
        candidates,
        predict,
        tolerance,
        grid=grid,
        objective=objective,
        alone=alone,
        rv_max=rv_max,
        exhaustive_limit=exhaustive_limit,
    )
    star, resources = adapted.batches, adapted.resources
    if previous is not None:
        star = damp(previous, star, damping, candidates)
        if not np.array_equal(star, adapted.batches):
            resources = best_resources(
                tasks,
                star,
                predict,
                grid,
                objective,
                alone,
                rv_max,
                volumes=data_volumes,
                exhaustive_limit=exhaustive_limit,
            ).resources
    limits = [(min(c), max(c)) for c in candidates]
    result = order_tasks(
        tasks,
        data_volumes,
        star,
        down_s,
        up_s,
        predict,
        resources,
        delta,
        exhaustive_limit,
        limits=limits,
        max_evaluations=max_evaluations,
    )
    return Configuration(
        order=result.order,
        batches=tuple(int(b) for b in result.batches),
        resources=tuple(float(r) for r in resources),
        predicted_throughput=tuple(float(p) for p in result.predicted),
        makespan=result.makespan,
        mismatch=float(mismatch(data_volumes, result.batches)),
    )


# --- helpers ---------------------------------------------------------------------------------------------


def _predict(predict: Predict, tasks, batches: np.ndarray, resources: np.ndarray) -> np.ndarray:
    out = np.asarray(predict(tasks, batches, resources), dtype=np.float64)
    if out.shape != batches.shape:
        raise ValueError(f"predictor returned shape {out.shape}, expected {batches.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError("predictor returned non-finite throughputs")
    return out


def _first_best(scores: np.ndarray) -> np.ndarray:
    """Index of the first maximum (within _REL_TOL) along the last axis."""
    top = scores.max(axis=-1, keepdims=True)
    return np.argmax(scores >= top - _REL_TOL * np.maximum(np.abs(top), 1.0), axis=-1)


def _options(candidates: Sequence[Sequence[int]], n: int) -> list[np.ndarray]:
    if len(candidates) != n:
        raise ValueError(f"need candidate batch sizes for {n} tasks, got {len(candidates)}")
    options = [np.unique(np.asarray(c, dtype=np.int64)) for c in candidates]
    if any(not len(o) or o[0] < 1 for o in options):
        raise ValueError("every task needs at least one candidate batch size, all >= 1")
    return options


def _product(options: list[np.ndarray]) -> np.ndarray:
    """Every combination of per-task values, lexicographic, shape (M, n)."""
    count = int(np.prod([len(o) for o in options]))
    if count > _MAX_COMBINATIONS:
        raise ValueError(f"{count} batch combinations exceed {_MAX_COMBINATIONS}: offer fewer candidates")
    return np.stack(np.meshgrid(*options, indexing="ij"), axis=-1).reshape(-1, len(options))


def _positive(values, n: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,) or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be {n} positive numbers, got {values!r}")
    return array


def _nonnegative(values, n: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,) or not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be {n} non-negative numbers, got {values!r}")
    return array


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array)
    array.setflags(write=False)
    return array
