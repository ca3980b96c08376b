"""Robust aggregation against a real Mosquitto: a device declaring an absurd sample count and sending a huge
update cannot own the global model (weight cap, norm bound), and a robust rule over a window survives an
aggregator restart mid-round; each global equals an independent numpy reference."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from aggregator.limits import UpdateLimits
from aggregator.service import AggregatorService
from aggregator.strategies.fedprox import FedProxSpec
from aggregator.strategies.median import MedianSpec
from tests.federation import (
    SMALL_TASKS,
    RawDevice,
    Running,
    aggregator_config,
    random_delta,
    reference_fedavg,
)
from tests.test_limits import reference_norm as norm
from tests.test_round_integration import assert_states_equal

pytestmark = [pytest.mark.slow, pytest.mark.broker]
CAP, BOUND, ABSURD = 200, 1.0, 10_000_000


def clipped(delta: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """The delta scaled onto the norm bound (float tensors only), computed independently of aggregator.limits."""
    factor = bound / norm(delta)
    return {
        n: (a.astype(np.float64) * factor).astype(a.dtype) if a.dtype.kind == "f" else a
        for n, a in delta.items()
    }


@pytest.fixture
def devices(broker):
    """dev1 holds 100 samples of `shuffle`; dev2 claims ABSURD."""
    made = RawDevice(broker, "dev1", {"shuffle": 100}), RawDevice(broker, "dev2", {"shuffle": ABSURD})
    yield made
    for device in made:
        device.close()


@pytest.mark.parametrize("excess", ["clip", "reject"])
def test_an_absurd_sample_count_and_a_huge_update_cannot_own_the_global_model(
    tmp_path, broker, observer, devices, excess
):
    limits = UpdateLimits(max_samples=CAP, samples_excess=excess, max_norm=BOUND, norm_excess=excess)
    task = msgspec.structs.replace(SMALL_TASKS["shuffle"], limits=limits, strategy=FedProxSpec(mu=0.01))
    aggregator = Running(AggregatorService(aggregator_config(tmp_path, broker, {"shuffle": task})))
    honest, attacker = devices
    try:
        for device in devices:
            device.wait(lambda d=device: d.schedules, 60, "a schedule")
            assert device.schedules[-1].tasks[0].proximal_mu == 0.01  # FedProx's mu reaches the devices
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 30, "global v0", [aggregator])
        base = observer.globals[("shuffle", 0)]
        good, attack = random_delta(base, 1, scale=1e-4), random_delta(base, 2, scale=10.0)
        assert norm(good) < BOUND < norm(attack) / 1000

        sent = attacker.send_update("shuffle", attack, samples=ABSURD)
        receipt = attacker.receipt_for(sent)
        if excess == "clip":
            assert receipt.status == "accepted"
            assert f"weight capped at {CAP} samples (declared {ABSURD})" in receipt.reason
            assert f"clipped to {BOUND:.4g}" in receipt.reason
            counted = (CAP, clipped(attack, BOUND))
        else:
            assert (receipt.status, f"above the task's cap of {CAP}" in receipt.reason) == ("rejected", True)
            sent = attacker.send_update("shuffle", attack, samples=CAP)  # within the cap, still too large
            assert "exceeds the task's bound" in attacker.receipt_for(sent).reason
            modest = random_delta(base, 3, scale=1e-4)
            assert (
                attacker.receipt_for(attacker.send_update("shuffle", modest, samples=CAP)).status
                == "accepted"
            )
            counted = (CAP, modest)
        assert honest.receipt_for(honest.send_update("shuffle", good, samples=100)).reason == ""
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 30, "global v1", [aggregator])
    finally:
        aggregator.stop()
    new = observer.globals[("shuffle", 1)]
    assert_states_equal(new, reference_fedavg(base, [(100, good), counted]))
    moved = {n: new[n].astype(np.float64) - base[n] for n in base if base[n].dtype.kind == "f"}
    assert norm(moved) <= (100 * norm(good) + CAP * BOUND) / (100 + CAP) * (1 + 1e-4)  # the attacker's share


def test_a_coordinate_median_outvotes_an_attacker_and_survives_a_restart(tmp_path, broker, observer):
    task = msgspec.structs.replace(SMALL_TASKS["shuffle"], strategy=MedianSpec(window=3))
    config = aggregator_config(tmp_path, broker, {"shuffle": task}, min_devices=3)
    samples = {"dev1": 100, "dev2": 50, "dev3": ABSURD}
    devices = [RawDevice(broker, device, {"shuffle": n}) for device, n in samples.items()]
    aggregator = Running(AggregatorService(config))
    try:
        for device in devices:
            device.wait(lambda d=device: d.schedules, 60, "a schedule")
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 30, "global v0", [aggregator])
        base = observer.globals[("shuffle", 0)]
        deltas = [
            random_delta(base, 1),
            random_delta(base, 2),
            random_delta(base, 3, scale=1e3),
        ]  # dev3 attacks
        first, second, attacker = devices
        assert first.receipt_for(first.send_update("shuffle", deltas[0], samples=100)).status == "accepted"
        aggregator.stop()  # the window holds one update; the ledger has its payload
        late = attacker.send_update(
            "shuffle", deltas[2], samples=ABSURD
        )  # queued for the aggregator's session
        aggregator = Running(AggregatorService(config))
        assert attacker.receipt_for(late, timeout_s=60).status == "accepted"
        assert second.receipt_for(second.send_update("shuffle", deltas[1], samples=50)).status == "accepted"
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 30, "global v1", [aggregator])
    finally:
        aggregator.stop()
        for device in devices:
            device.close()
    stacked = {name: np.stack([d[name].astype(np.float64) for d in deltas]) for name in base}
    expected = {}
    for name, array in base.items():
        local = array.astype(np.float64) + np.sort(stacked[name], axis=0)[1]  # the middle of three
        expected[name] = (np.rint(local) if array.dtype.kind in "iu" else local).astype(array.dtype)
    new = observer.globals[("shuffle", 1)]
    assert_states_equal(new, expected)
    for name, array in base.items():  # every coordinate stays within what the honest devices sent
        if array.dtype.kind == "f":
            moved = new[name].astype(np.float64) - array
            honest = stacked[name][:2]
            assert (moved >= honest.min(axis=0) - 1e-6).all() and (moved <= honest.max(axis=0) + 1e-6).all()
