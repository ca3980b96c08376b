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


def test_later_rounds_train_on_the_warm_workers_of_the_first(tmp_path, broker, observer):
    tasks = [{"shuffle": digits(i), "mobile": digits(i)} for i in range(2)]
    with running(
        AggregatorService(aggregator_config(tmp_path, broker, rounds=2)),
        Agent(agent_config(tmp_path, broker, "dev1", tasks[0])),
        Agent(agent_config(tmp_path, broker, "dev2", tasks[1])),
    ) as services:
        observer.wait_for(
            lambda: all((t, 2) in observer.globals for t in ("shuffle", "mobile")), 300, "v2", services
        )
        acknowledged = lambda: sum(e.kind == "acknowledged" for e in observer.events)  # noqa: E731
        observer.wait_for(lambda: acknowledged() >= 8, 30, "every acknowledgement", services)
    started = {(e.device, e.task, e.round): e.metrics for e in observer.events if e.kind == "started"}
    assert len(started) == 8  # 2 devices x 2 tasks x 2 rounds
    assert all(0 <= metrics["plan_s"] < 60 for metrics in started.values())  # taking the round is timed
    for (device, task, round_), metrics in started.items():
        if round_ == 1:  # started while the global models downloaded: the task may not have waited for it
            assert metrics["worker_restarted"] == 1.0 and metrics["worker_start_s"] >= 0, (device, task)
            assert 0 < metrics["worker_init_s"] and 0 < metrics["worker_prepare_s"], (device, task)
        else:
            assert metrics["worker_restarted"] == 0.0 and metrics["worker_start_s"] < 0.5, (device, task)
            assert "worker_init_s" not in metrics and "worker_prepare_s" not in metrics, (device, task)
    finished = [e for e in observer.events if e.kind == "finished"]
    assert len(finished) == 8 and all(e.metrics["precision_fp32"] == 1.0 for e in finished)
    assert all(0 < e.metrics["train_s"] <= e.metrics["seconds"] for e in finished)
    acknowledged = [e for e in observer.events if e.kind == "acknowledged"]
    assert len(acknowledged) == 8 and all(e.metrics["upload_s"] >= 0 for e in acknowledged)
