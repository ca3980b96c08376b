"""Faults against a real Mosquitto: bad and spoofed input, a killed agent, a restarted aggregator, a failing task."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from agent.service import Agent
from aggregator.ledger import RoundLedger
from aggregator.service import AggregatorService
from common.config import to_toml
from protocol import topics
from tests.federation import (
    BOTH_V1,
    SMALL_TASKS,
    RawDevice,
    Running,
    agent_config,
    aggregator_config,
    digits,
    random_delta,
    reference_fedavg,
    running,
)
from tests.test_round_integration import assert_states_equal

pytestmark = [pytest.mark.slow, pytest.mark.broker]
ONE_TASK = {"shuffle": SMALL_TASKS["shuffle"]}


@pytest.fixture
def raw_devices(broker):
    """dev1 (100 samples) and dev2 (50 samples) of the task `shuffle`, driven by hand."""
    devices = RawDevice(broker, "dev1", {"shuffle": 100}), RawDevice(broker, "dev2", {"shuffle": 50})
    yield devices
    for device in devices:
        device.close()


def test_bad_and_spoofed_updates_are_rejected_and_change_nothing(tmp_path, broker, observer, raw_devices):
    aggregator = Running(AggregatorService(aggregator_config(tmp_path, broker, ONE_TASK)))
    dev1, dev2 = raw_devices
    try:
        for dev in (dev1, dev2):
            dev.wait(lambda d=dev: d.schedules, 30, "a schedule")
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 30, "global v0")
        base = observer.globals[("shuffle", 0)]
        good1, good2 = random_delta(base, 1), random_delta(base, 2)
        wrong_shape = dict(good1, **{"fc.bias": np.zeros(3, np.float32)})
        non_finite = {k: v.copy() for k, v in good1.items()}
        non_finite["fc.weight"][0, 0] = np.nan
        rejected = {
            "names device dev2": dev1.send_update("shuffle", good1, samples=100, device="dev2"),
            "fc.bias": dev1.send_update("shuffle", wrong_shape, samples=100),
            "non-finite": dev1.send_update("shuffle", non_finite, samples=100),
            "declared 100": dev1.send_update("shuffle", good1, samples=101),
            "based on v3": dev1.send_update("shuffle", good1, samples=100, base_version=3),
            "round 2 is not open": dev1.send_update("shuffle", good1, samples=100, round_=2),
            "unknown task": dev1.send_update("nosuchtask", good1, samples=100),
        }
        for reason, update_id in rejected.items():
            receipt = dev1.receipt_for(update_id)
            assert (receipt.status, reason in receipt.reason) == ("rejected", True), receipt
        dev1.link.publish(topics.manifest(topics.update("shuffle", "dev1")), b"\x93garbage")  # undecodable
        spoof = dev1.link.publish(topics.manifest(topics.update("shuffle", "dev2")), b"x")  # the ACL refuses
        spoof.wait_for_publish(5)

        accepted = dev1.send_update("shuffle", good1, samples=100)
        assert dev1.receipt_for(accepted).status == "accepted"
        dev1.send_update("shuffle", good1, samples=100, update_id=accepted)  # a resend of the same update
        dev1.wait(
            lambda: [r.status for r in dev1.receipts if r.update_id == accepted] == ["accepted", "duplicate"],
            20,
            "the duplicate receipt",
        )
        second = dev1.send_update("shuffle", good2, samples=100)
        assert dev1.receipt_for(second).reason == "device already reported"

        assert dev2.receipt_for(dev2.send_update("shuffle", good2, samples=50)).status == "accepted"
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 30, "global v1", [aggregator])
    finally:
        aggregator.stop()
    assert_states_equal(observer.globals[("shuffle", 1)], reference_fedavg(base, [(100, good1), (50, good2)]))


def test_restarted_aggregator_resumes_the_round_and_loses_no_update(tmp_path, broker, observer, raw_devices):
    config = aggregator_config(tmp_path, broker, ONE_TASK)
    aggregator = Running(AggregatorService(config))
    dev1, dev2 = raw_devices
    try:
        dev1.wait(lambda: dev1.schedules, 30, "a schedule")
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 30, "global v0")
        base = observer.globals[("shuffle", 0)]
        good1, good2 = random_delta(base, 1), random_delta(base, 2)
        assert dev1.receipt_for(dev1.send_update("shuffle", good1, samples=100)).status == "accepted"
        aggregator.stop()
        late = dev2.send_update(
            "shuffle", good2, samples=50
        )  # the broker queues it for the aggregator's session
        aggregator = Running(AggregatorService(config))
        assert dev2.receipt_for(late, timeout_s=60).status == "accepted"
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 30, "global v1", [aggregator])
    finally:
        aggregator.stop()
    assert_states_equal(observer.globals[("shuffle", 1)], reference_fedavg(base, [(100, good1), (50, good2)]))
    with RoundLedger(tmp_path / "aggregator" / "ledger.sqlite") as ledger:
        assert ledger.current_round().round == 1
        assert [u.device for u in ledger.updates_for("shuffle", 1)] == ["dev1", "dev2"]


def test_agent_killed_mid_round_does_not_block_the_round_past_its_deadline(tmp_path, broker, observer):
    timeout_s = 20.0
    aggregator = Running(
        AggregatorService(aggregator_config(tmp_path, broker, ONE_TASK, round_timeout_s=timeout_s))
    )
    dev1 = RawDevice(broker, "dev1", {"shuffle": 100})
    slow = agent_config(tmp_path, broker, "dev2", {"shuffle": {"kind": "synthetic", "samples": 200_000}})
    config_path = tmp_path / "dev2.toml"
    config_path.write_text(to_toml(slow))
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config_path)], start_new_session=True
    )
    try:
        dev1.wait(lambda: dev1.schedules, 60, "a schedule")
        opened = dev1.schedules[0].issued_at
        observer.wait_for(
            lambda: any(e.device == "dev2" and e.kind == "started" for e in observer.events),
            60,
            "dev2 to start training",
            [aggregator],
        )
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 30, "global v0")
        base = observer.globals[("shuffle", 0)]
        update = random_delta(base, 1)
        assert dev1.receipt_for(dev1.send_update("shuffle", update, samples=100)).status == "accepted"
        os.killpg(process.pid, signal.SIGKILL)  # the agent and its task process die mid-round
        observer.wait_for(
            lambda: ("shuffle", 1) in observer.globals, timeout_s + 30, "global v1", [aggregator]
        )
        finalised = time.time()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        dev1.close()
        aggregator.stop()
    assert opened + timeout_s <= finalised <= opened + timeout_s + 15
    assert observer.statuses["dev2"] == "offline"  # the broker published the killed agent's last will
    assert_states_equal(observer.globals[("shuffle", 1)], reference_fedavg(base, [(100, update)]))


def test_failing_task_is_reported_and_the_other_tasks_go_on(tmp_path, broker, observer):
    bad_folder = tmp_path / "eleven-classes"
    for label in range(11):  # more classes than the 10-class model: the task fails when it loads its data
        (bad_folder / f"c{label}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(bad_folder / f"c{label}" / "x.png")
    with running(
        AggregatorService(aggregator_config(tmp_path, broker, round_timeout_s=600.0)),
        Agent(
            agent_config(
                tmp_path,
                broker,
                "dev1",
                {"shuffle": digits(0), "mobile": {"kind": "imagefolder", "path": str(bad_folder)}},
            )
        ),
        Agent(agent_config(tmp_path, broker, "dev2", {"shuffle": digits(1), "mobile": digits(1)})),
    ) as services:
        observer.wait_for(
            lambda: all(k in observer.globals for k in BOTH_V1), 240, "v1 of both tasks", services
        )
    failures = [e for e in observer.events if e.kind == "failed"]
    assert [(e.device, e.task) for e in failures] == [("dev1", "mobile")]
    assert "classes" in failures[0].message
    by_task = {}
    for manifest, delta in observer.updates.values():
        by_task.setdefault(manifest.task, []).append((manifest.device, manifest.samples, delta))
    assert sorted(d for d, _, _ in by_task["shuffle"]) == ["dev1", "dev2"]
    assert [d for d, _, _ in by_task["mobile"]] == ["dev2"]
    mobile = [(samples, delta) for _, samples, delta in by_task["mobile"]]
    assert_states_equal(
        observer.globals[("mobile", 1)], reference_fedavg(observer.globals[("mobile", 0)], mobile)
    )
