"""Whole rounds against a real Mosquitto: an aggregator and agents on threads, task processes for real."""

from __future__ import annotations

import numpy as np
import pytest

from agent.service import Agent
from aggregator.service import AggregatorService
from tests.federation import BOTH_V1, agent_config, aggregator_config, digits, reference_fedavg, running

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        if array.dtype.kind == "f":
            np.testing.assert_allclose(actual[name], array, rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(actual[name], array, err_msg=name)


def test_full_round_two_agents_two_tasks_equals_reference_fedavg(tmp_path, broker, observer):
    tasks = [{"shuffle": digits(i), "mobile": digits(i)} for i in range(2)]
    with running(
        AggregatorService(aggregator_config(tmp_path, broker)),
        Agent(agent_config(tmp_path, broker, "dev1", tasks[0])),
        Agent(agent_config(tmp_path, broker, "dev2", tasks[1], policy="isolated")),  # no MPS here: falls back
    ) as services:
        observer.wait_for(
            lambda: all(k in observer.globals for k in BOTH_V1), 240, "v1 of both tasks", services
        )

    for task in ("shuffle", "mobile"):
        sent = [(m.samples, delta) for m, delta in observer.updates.values() if m.task == task]
        assert len(sent) == 2, f"{task}: expected one update per device"
        assert_states_equal(observer.globals[(task, 1)], reference_fedavg(observer.globals[(task, 0)], sent))
    accepted = [r for r in observer.receipts if r.status == "accepted"]
    assert len(accepted) == 4
    kinds = {(e.device, e.task, e.kind) for e in observer.events}
    assert {("dev1", "shuffle", "finished"), ("dev2", "mobile", "uploaded")} <= kinds
    plans = {e.device: e.message for e in observer.events if e.kind == "plan"}
    assert plans["dev1"].startswith("concurrent: all tasks at once")
    assert plans["dev2"].startswith("concurrent: isolated needs MPS, which is unavailable")
