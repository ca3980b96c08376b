"""predictor.search: Eq. 5 resource search, Eq. 6 batch adaptation, damping, Algorithm 1, configure()."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from predictor.features import TaskFeatures
from predictor.search import (
    COARSE_GRID,
    DEFAULT_GRID,
    adapt_batches,
    best_resources,
    configure,
    damp,
    default_grid,
    mismatch,
    order_tasks,
    simulate_makespan,
)


def tasks(n: int) -> list[TaskFeatures]:
    return [TaskFeatures(f"m{i}", 32, 10, 1e8 * (i + 1), 1_000_000, 500_000) for i in range(n)]


def analytic(tasks, batches: np.ndarray, resources: np.ndarray) -> np.ndarray:
    """Sublinear in batch and SM share, with contention growing with R_v (interior optimum near R_v ~ 155)."""
    scale = np.array([1e11 / t.flops_per_sample for t in tasks])
    contention = 1 + 1.5 * resources.sum(axis=1, keepdims=True) / 100
    return scale * batches / (batches + 16) * resources**0.7 / contention


def batch_coupled(tasks, batches: np.ndarray, resources: np.ndarray) -> np.ndarray:
    """Bigger batches help their own task and slow every co-located one."""
    scale = np.array([1e11 / t.flops_per_sample for t in tasks])
    return scale * batches / (batches + 32) * resources**0.5 / (1 + batches.sum(axis=1, keepdims=True) / 200)


class Counting:
    def __init__(self, predict) -> None:
        self.predict, self.calls = predict, 0

    def __call__(self, tasks, batches, resources):
        self.calls += 1
        return self.predict(tasks, batches, resources)


def one(predict, tasks, batches, resources) -> np.ndarray:
    return predict(tasks, np.asarray([batches], float), np.asarray([resources], float))[0]


# --- Eq. 5 -----------------------------------------------------------------------------------------------


def brute_resources(work, batches, score, grid=DEFAULT_GRID, rv_max=None):
    feasible = [r for r in itertools.product(grid, repeat=len(work)) if rv_max is None or sum(r) <= rv_max]
    return max(feasible, key=lambda r: score(one(analytic, work, batches, r)))


def test_best_resources_equals_brute_force() -> None:
    work, batches = tasks(3), [32, 64, 16]
    result = best_resources(work, batches, analytic)
    expected = brute_resources(work, batches, np.sum)
    np.testing.assert_array_equal(result.resources, expected)
    assert result.rv == sum(expected)
    np.testing.assert_allclose(result.predicted, one(analytic, work, batches, expected))
    assert result.score == pytest.approx(result.predicted.sum())
    assert 100 < result.rv < 300  # an interior optimum, neither isolated nor fully shared


def test_best_resources_respects_rv_max() -> None:
    work, batches = tasks(3), [32, 64, 16]
    result = best_resources(work, batches, analytic, rv_max=90)
    assert result.rv <= 90
    np.testing.assert_array_equal(result.resources, brute_resources(work, batches, np.sum, rv_max=90))
    with pytest.raises(ValueError):
        best_resources(work, batches, analytic, rv_max=20)


def test_fair_objective_normalises_by_alone_throughput() -> None:
    work, batches = tasks(3), np.array([32, 64, 16])
    alone = np.array([one(analytic, [t], [b], [100])[0] for t, b in zip(work, batches)])
    result = best_resources(work, batches, analytic, objective="fair", alone=alone)
    expected = brute_resources(work, batches, lambda p: np.sum(p / alone))
    np.testing.assert_array_equal(result.resources, expected)
    assert result.score == pytest.approx(np.sum(result.predicted / alone))
    as_callable = best_resources(
        work, batches, analytic, objective="fair", alone=lambda _t, b: np.broadcast_to(alone, b.shape)
    )
    np.testing.assert_array_equal(as_callable.resources, result.resources)
    assert not np.array_equal(result.resources, best_resources(work, batches, analytic).resources)
    with pytest.raises(ValueError):
        best_resources(work, batches, analytic, objective="fair")


def test_resource_ties_go_to_the_smaller_rv() -> None:
    def flat(_t, b, r):
        return np.ones_like(b)  # every R scores the same

    result = best_resources(tasks(2), [8, 8], flat)
    np.testing.assert_array_equal(result.resources, [10, 10])


def improving_moves(work, batches, resources, grid, rv_max=None) -> list[tuple[int, float]]:
    """(task, R) single-coordinate moves on the grid (within rv_max) that raise sum P_i above `resources`."""
    current = one(analytic, work, batches, resources).sum()
    moves = []
    for i, value in itertools.product(range(len(work)), grid):
        moved = np.array(resources, dtype=float)
        moved[i] = value
        feasible = rv_max is None or moved.sum() <= rv_max
        if feasible and one(analytic, work, batches, moved).sum() > current * (1 + 1e-9):
            moves.append((i, value))
    return moves


@pytest.mark.parametrize("rv_max", [None, 240])
def test_coordinate_ascent_beyond_the_exhaustive_limit_ends_at_a_coordinatewise_optimum(rv_max) -> None:
    work, batches, grid = tasks(6), [16, 32, 64, 16, 32, 64], (20, 40, 60, 80, 100)
    counting = Counting(analytic)
    result = best_resources(work, batches, counting, grid, rv_max=rv_max, max_rounds=8)
    assert counting.calls < 8  # one predict call per round; it stopped because no move improved
    assert improving_moves(work, batches, result.resources, grid, rv_max) == []
    assert rv_max is None or result.rv <= rv_max
    np.testing.assert_allclose(result.predicted, one(analytic, work, batches, result.resources))
    assert result.score == pytest.approx(result.predicted.sum())
    # This objective is smooth enough that the local optimum is the global one.
    exact = best_resources(work, batches, analytic, grid, rv_max=rv_max, exhaustive_limit=6)
    np.testing.assert_array_equal(result.resources, exact.resources)
    assert result.score == pytest.approx(exact.score)
    # One round stops short of it, so the checks above can tell a converged search from a truncated one.
    truncated = best_resources(work, batches, analytic, grid, rv_max=rv_max, max_rounds=1)
    assert improving_moves(work, batches, truncated.resources, grid, rv_max) != []


# --- Eq. 6 -----------------------------------------------------------------------------------------------


def test_mismatch_hand_computed() -> None:
    assert mismatch([1, 2], [1, 2]) == 0
    # pairs (0,1): |1/2 - 2/2| = 0.5, (1,0): |2 - 1| = 1
    assert mismatch([1, 2], [2, 2]) == pytest.approx(1.5)
    # (0,1) |1-0.5|=0.5, (1,0) |1-2|=1, (0,2) |0.5-0.5|=0, (2,0) 0, (1,2) |0.5-1|=0.5, (2,1) |2-1|=1
    assert mismatch([1, 1, 2], [1, 2, 2]) == pytest.approx(3.0)
    np.testing.assert_allclose(mismatch([1, 2], [[1, 2], [2, 2]]), [0, 1.5])


def test_adapt_batches_picks_proportional_batches() -> None:
    work, allowed = tasks(3), [16, 32, 48, 64, 96, 128]
    counting = Counting(analytic)
    result = adapt_batches(work, [1000, 2000, 3000], [allowed] * 3, counting)
    # (16, 32, 48) and (32, 64, 96) have mismatch 0; bigger batches are faster
    np.testing.assert_array_equal(result.batches, [32, 64, 96])
    assert result.mismatch == 0 and counting.calls == 1
    expected = best_resources(work, [32, 64, 96], analytic)
    np.testing.assert_array_equal(result.resources, expected.resources)
    np.testing.assert_allclose(result.predicted, expected.predicted)


def test_adapt_batches_obeys_the_mismatch_filter() -> None:
    work, data, allowed = tasks(2), [1000, 3000], [[10, 20], [32, 64, 200]]
    # mismatch: (10,32) and (20,64) 0.221; (20,32) 1.69; (10,64) 3.58; (20,200) 7.23; (10,200) 17.3
    assert adapt_batches(work, data, allowed, analytic).batches.tolist() == [20, 64]
    assert adapt_batches(work, data, allowed, analytic, tolerance=100).batches.tolist() == [20, 200]
    for tolerance in (0.0, 0.25, 10, 100):
        combos = np.array(list(itertools.product(*allowed)))
        cost = mismatch(data, combos)
        kept = combos[cost <= cost.min() * (1 + tolerance) + 1e-9]
        best = max(kept, key=lambda b: best_resources(work, b, analytic).score)
        result = adapt_batches(work, data, allowed, analytic, tolerance)
        np.testing.assert_array_equal(result.batches, best)


def test_adapt_batches_under_the_makespan_objective_scores_every_combination() -> None:
    work, data, allowed = tasks(2), [1000, 3000], [[10, 20], [32, 64, 200]]
    combos = np.array(list(itertools.product(*allowed)))
    makespans = [-best_resources(work, b, analytic, objective="makespan", volumes=data).score for b in combos]
    best = combos[int(np.argmin(makespans))]
    result = adapt_batches(work, data, allowed, analytic, objective="makespan")
    np.testing.assert_array_equal(result.batches, best)
    assert best.tolist() == [20, 200]  # outside Eq. 6's filter at the default tolerance (above)


def test_adapt_batches_ties_go_to_lower_mismatch_then_lexicographic() -> None:
    def blind(_t, b, r):
        return r**0.5  # batch sizes do not matter

    result = adapt_batches(tasks(2), [1, 2], [[10, 11], [20, 21]], blind, tolerance=100)
    np.testing.assert_array_equal(result.batches, [10, 20])
    result = adapt_batches(tasks(2), [1, 1], [[8, 16], [8, 16]], blind)
    np.testing.assert_array_equal(result.batches, [8, 8])


# --- damping ---------------------------------------------------------------------------------------------


def test_damping() -> None:
    np.testing.assert_array_equal(damp(None, [32, 64]), [32, 64])
    np.testing.assert_array_equal(damp([32, 64], [64, 32]), [48, 48])
    np.testing.assert_array_equal(damp([32], [64], factor=1.0), [64])
    allowed = [[16, 32, 64, 128]]
    assert damp([32], [128], 0.5, allowed).tolist() == [64]  # 80 snaps to 64
    assert damp([32], [64], 0.5, [[32, 64]]).tolist() == [64]  # 48: a tie goes toward the target
    assert damp([64], [32], 0.5, [[32, 64]]).tolist() == [32]
    assert damp([32], [64], 0.25, [[32, 64]]).tolist() == [64]  # 40 would snap back to 32: step instead
    assert damp([100], [10], 0.5, [[10, 40, 200]]).tolist() == [40]  # never past the target, never 200
    current, steps = np.array([8]), 0
    while current[0] != 512:
        current, steps = damp(current, [512], 0.1, [[8, 16, 32, 64, 128, 256, 512]]), steps + 1
    assert steps <= 6


# --- Algorithm 1 -----------------------------------------------------------------------------------------


def test_simulate_makespan_two_tasks_where_order_matters() -> None:
    compute, down, up = [10, 1], [1, 5], [1, 5]
    # (0, 1): downloads 0 -> 1 (task 0), 1 -> 6 (task 1); task 0 computes 1 -> 11, task 1 6 -> 7.
    # Uploads by finish: task 1 7 -> 12, task 0 (done at 11) waits for the link: 12 -> 13.
    assert simulate_makespan([0, 1], compute, down, up) == pytest.approx(13)
    # (1, 0): downloads 0 -> 5 (task 1), 5 -> 6 (task 0); task 1 computes 5 -> 6, task 0 6 -> 16.
    # Uploads: task 1 6 -> 11, task 0 16 -> 17.
    assert simulate_makespan([1, 0], compute, down, up) == pytest.approx(17)


def test_simulate_makespan_uploads_wait_for_all_downloads() -> None:
    # Downloads 0 -> 1 (task 0), 1 -> 5 (task 1); task 0 computes 1 -> 2 but the link is busy until 5:
    # upload 5 -> 7; task 1 computes 5 -> 5.5, uploads 7 -> 8.
    assert simulate_makespan([0, 1], [1, 0.5], [1, 4], [2, 1]) == pytest.approx(8)


def test_simulate_makespan_three_tasks_and_a_finish_tie() -> None:
    # Downloads: task 0 0 -> 2, task 1 2 -> 3, task 2 3 -> 4; finishes: 0 at 8, 1 at 4, 2 at 8.
    # Uploads: task 1 4 -> 7; tasks 0 and 2 tie at 8, task 0 (earlier in the order) 8 -> 9, task 2 9 -> 11.
    assert simulate_makespan([0, 1, 2], [6, 1, 4], [2, 1, 1], [1, 3, 2]) == pytest.approx(11)
    # Same tasks in order (2, 0, 1): task 2 0 -> 1, computes to 5; task 0 1 -> 3, to 9; task 1 3 -> 4, to 5.
    # Uploads: task 2 and task 1 tie at 5, task 2 first: 5 -> 7, task 1 7 -> 10, task 0 10 -> 11.
    assert simulate_makespan([2, 0, 1], [6, 1, 4], [2, 1, 1], [1, 3, 2]) == pytest.approx(11)
    assert simulate_makespan([0], [3], [2], [4]) == pytest.approx(9)
    with pytest.raises(ValueError):
        simulate_makespan([0, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])


def brute_start_order(work, data, star, down, up, resources, predict, delta=0.2):
    options = [sorted({max(1, int(np.floor(b * f + 0.5))) for f in (1 - delta, 1, 1 + delta)}) for b in star]
    best = None
    for order in itertools.permutations(range(len(work))):
        for combo in itertools.product(*options):
            compute = np.asarray(data) / one(predict, work, combo, resources)
            key = (simulate_makespan(order, compute, down, up), sum(c != s for c, s in zip(combo, star)))
            if (
                best is None
                or key[0] < best[0][0] * (1 - 1e-9)
                or (key[0] <= best[0][0] * (1 + 1e-9) and key[1] < best[0][1])
            ):
                best = (key, order, combo)
    return best


def test_order_tasks_three_tasks_is_exhaustive_over_162_points() -> None:
    work, data, star = tasks(3), [20000, 3000, 4000], [40, 30, 50]
    down, up, resources = [3.0, 0.5, 2.0], [1.0, 4.0, 2.0], [60, 30, 40]
    counting = Counting(batch_coupled)
    result = order_tasks(work, data, star, down, up, counting, resources)
    assert result.evaluated_points == 162 and counting.calls == 1
    assert result.order == (1, 0, 2) and result.batches.tolist() == [
        32,
        24,
        60,
    ]  # both order and batches matter
    (makespan, _), order, combo = brute_start_order(work, data, star, down, up, resources, batch_coupled)
    assert result.makespan == pytest.approx(makespan)
    assert result.order == order
    np.testing.assert_array_equal(result.batches, combo)
    np.testing.assert_allclose(result.predicted, one(batch_coupled, work, combo, resources))
    compute = np.asarray(data) / result.predicted
    assert simulate_makespan(result.order, compute, down, up) == pytest.approx(result.makespan)


def test_order_tasks_keeps_b_star_when_changes_do_not_help() -> None:
    def blind(_t, b, r):
        return np.full(b.shape, 100.0)  # batch sizes do not matter

    result = order_tasks(tasks(2), [100, 100], [20, 30], [1, 1], [1, 1], blind, [50, 50])
    np.testing.assert_array_equal(result.batches, [20, 30])
    assert result.order == (0, 1)  # a makespan tie between both orders: lexicographic


def test_order_tasks_limits_clip_the_batch_options() -> None:
    result = order_tasks(
        tasks(2), [100, 900], [32, 64], [1, 1], [1, 1], analytic, [50, 50], limits=[(8, 32), (8, 70)]
    )
    assert result.batches[0] <= 32 and result.batches[1] <= 70
    assert result.evaluated_points == 2 * (2 * 3)  # task 0: {26, 32}, task 1: {51, 64, 70}
    # B* itself above the limit is clipped first: 100 -> 64, options {51, 64}
    result = order_tasks(
        tasks(2), [100, 900], [32, 100], [1, 1], [1, 1], analytic, [50, 50], limits=[(8, 32), (8, 64)]
    )
    assert result.batches.tolist() == [32, 64] and result.evaluated_points == 2 * (2 * 2)
    with pytest.raises(ValueError):
        order_tasks(tasks(2), [1, 1], [8, 8], [1, 1], [1, 1], analytic, [50, 50], limits=[(8, 4), (8, 8)])


def test_five_tasks_take_one_predict_call_per_phase() -> None:
    work, data = tasks(5), [1000, 2000, 3000, 4000, 5000]
    counting = Counting(batch_coupled)
    result = order_tasks(
        work, data, [16, 32, 48, 64, 80], [1, 2, 1, 2, 1], [2, 1, 2, 1, 2], counting, [40] * 5
    )
    assert counting.calls == 1 and result.evaluated_points == 120 * 3**5
    counting = Counting(analytic)
    configure(work, data, [[8, 16, 32, 48, 64, 80]] * 5, [1, 2, 1, 2, 1], [2, 1, 2, 1, 2], counting)
    assert counting.calls == 2  # adapt_batches (Eq. 5 inside), order_tasks


def test_six_tasks_use_the_bounded_local_search() -> None:
    work, data, star = tasks(6), [1000, 2000, 3000, 4000, 5000, 6000], [16, 32, 48, 64, 80, 96]
    down, up, resources = [1, 2, 1, 2, 1, 3], [2, 1, 2, 1, 2, 1], [40] * 6
    capped = order_tasks(work, data, star, down, up, batch_coupled, resources, max_evaluations=100)
    assert sorted(capped.order) == list(range(6)) and capped.evaluated_points <= 100
    result = order_tasks(work, data, star, down, up, batch_coupled, resources)
    assert sorted(result.order) == list(range(6)) and result.evaluated_points <= 5000
    compute = np.asarray(data) / result.predicted
    assert simulate_makespan(result.order, compute, down, up) == pytest.approx(result.makespan)
    start = np.asarray(data) / one(batch_coupled, work, star, resources)
    assert result.makespan <= simulate_makespan(np.argsort(-start, kind="stable"), start, down, up)
    for i, j in itertools.combinations(range(6), 2):  # a local optimum: no swap of two tasks helps
        swapped = list(result.order)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        assert simulate_makespan(swapped, compute, down, up) >= result.makespan * (1 - 1e-9)


# --- configure -------------------------------------------------------------------------------------------


def test_configure_chains_eq6_and_algorithm_1() -> None:
    work, data, allowed = tasks(3), [1000, 2000, 3000], [[16, 32, 48, 64, 96, 128]] * 3
    down, up = [1.0, 2.0, 0.5], [1.0, 0.5, 2.0]
    result = configure(work, data, allowed, down, up, analytic)
    adapted = adapt_batches(work, data, allowed, analytic)
    np.testing.assert_array_equal(result.resources, adapted.resources)
    expected = order_tasks(
        work, data, adapted.batches, down, up, analytic, adapted.resources, limits=[(16, 128)] * 3
    )
    assert result.order == expected.order and result.batches == tuple(expected.batches)
    assert result.makespan == pytest.approx(expected.makespan)
    assert result.mismatch == pytest.approx(mismatch(data, result.batches))
    assert all(16 <= b <= 128 for b in result.batches)
    np.testing.assert_allclose(
        result.predicted_throughput, one(analytic, work, result.batches, result.resources)
    )
    assert hash(result) == hash(configure(work, data, allowed, down, up, analytic))  # frozen, deterministic


def test_configure_damps_toward_the_eq6_choice() -> None:
    work, data, allowed = tasks(3), [1000, 2000, 3000], [[16, 32, 48, 64, 96, 128]] * 3
    counting = Counting(analytic)
    result = configure(work, data, allowed, [1, 1, 1], [1, 1, 1], counting, previous=[128, 16, 16], delta=0.0)
    # Eq. 6 picks (32, 64, 96); half way from (128, 16, 16) is (80, 40, 56): every task sits between two
    # allowed sizes 16 apart, so the ties go toward the target: (64, 48, 64). delta=0 keeps them.
    assert result.batches == (64, 48, 64)
    assert counting.calls == 3  # adapt_batches, Eq. 5 again for the damped batches, order_tasks
    np.testing.assert_array_equal(result.resources, best_resources(work, result.batches, analytic).resources)


def test_makespan_objective_balances_completion_times_and_matches_brute_force():
    from predictor.search import best_resources

    tasks = ("heavy", "light")  # the predict function below ignores the features

    def predict(_tasks, batches, resources):
        speed = np.array([100.0, 400.0])  # images/s at 100% SMs, alone
        return speed * (resources / 100.0) ** 0.8 / (1 + 0.002 * resources.sum(axis=1, keepdims=True))

    grid = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    volumes = [1000, 1000]
    choice = best_resources(tasks, [64, 64], predict, grid=grid, objective="makespan", volumes=volumes)
    rows = np.array([(a, b) for a in grid for b in grid], dtype=float)
    makespans = (np.array(volumes) / predict(tasks, None, rows)).max(axis=1)
    assert makespans[rows.tolist().index(list(choice.resources))] == pytest.approx(makespans.min())
    assert choice.resources[0] > choice.resources[1]  # the slower task gets more SMs
    with pytest.raises(ValueError, match="volumes"):
        best_resources(tasks, [64, 64], predict, grid=grid, objective="makespan")


def test_the_default_grid_keeps_to_the_given_share_range():
    assert default_grid(3) == DEFAULT_GRID and default_grid(5) == COARSE_GRID
    assert default_grid(3, (20.0, 100.0)) == tuple(range(20, 101, 10))
    assert default_grid(2, (25.0, 60.0)) == (30, 40, 50, 60)
    assert default_grid(5, (20.0, 100.0)) == COARSE_GRID  # 9**5 rows would be too many: 20% steps
    assert default_grid(2, (23.0, 27.0)) == (30,)  # none within: the nearest step
