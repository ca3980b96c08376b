"""Hostile input against a real Mosquitto with the production ACL: fuzzed traffic while a real round runs,
retained poison across restarts, spool quotas and a full disk. Both services keep running and the round's
result is exactly the reference FedAvg of the legitimate updates."""

from __future__ import annotations

import collections
import errno
import math
import os
import time
from pathlib import Path

import msgspec
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agent.service import Agent
from aggregator.config import TransferConfig
from aggregator.service import AggregatorService
from protocol import ProtocolError, topics
from protocol.chunking import DEFAULT_CHUNK_SIZE
from protocol.schemas import GlobalManifest, Schedule, Status, decode, encode
from protocol.tensors import encode_state
from protocol.transport import Incoming, MqttLink, PublishError
from tests.federation import (
    USERS,
    RawDevice,
    Running,
    agent_config,
    aggregator_config,
    digits,
    mqtt,
    random_delta,
    reference_fedavg,
    running,
)
from tests.fuzzing import agent_traffic, aggregator_traffic, update_manifest
from tests.test_faults_integration import ONE_TASK
from tests.test_round_integration import assert_states_equal

pytestmark = [pytest.mark.slow, pytest.mark.broker]
MESSAGES_PER_SERVICE = 10_000


def generated(strategy, examples: int) -> list:
    """`examples` values of a Hypothesis strategy (random generation only: nothing to shrink here)."""
    values = []

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value):
        values.append(value)

    collect()
    return values


def count_messages(service) -> collections.Counter:
    """Messages the service's own handler is given (the aggregator's takes them in groups), by the device or
    task level of their topic."""
    handled = collections.Counter()

    def count(item):
        if isinstance(item, Incoming):
            handled["all"] += 1
            handled["dev3" if "/dev3/" in item.topic else "other"] += 1

    if isinstance(service, AggregatorService):
        receive = service.receive

        def receiving(items):
            for item in items:
                count(item)
            receive(items)

        service.receive = receiving
    else:
        handle = service.handle

        def handling(item):
            count(item)
            handle(item)

        service.handle = handling
    return handled


def publishable(topic: str) -> bool:
    """Topics a client may publish to at all (a broker disconnects a client that sends a malformed one)."""
    return (
        bool(topic) and topic.isprintable() and not set(topic) & {"+", "#"} and len(topic.encode()) < 60_000
    )


def harmless_to_the_round(topic: str, payload: bytes) -> bool:
    """False for what the aggregator may legitimately send dev1 and would change the real round: a valid
    schedule for it, or a valid global model manifest of the round's task."""
    try:
        ref = topics.parse(topic)
        if ref.kind == "schedule":
            return decode(payload, Schedule).device != "dev1"
        if ref.kind == "global" and ref.part == "manifest":
            return decode(payload, GlobalManifest).task != "shuffle"
    except ProtocolError:
        return True
    return True


def test_ten_thousand_fuzzed_messages_per_service_leave_both_running_and_the_round_exact(
    tmp_path, broker, observer
):
    """dev3 (valid credentials, unscheduled) sends the aggregator hostile traffic on every topic the ACL lets it
    use; the aggregator's own connection sends dev1 hostile schedules, receipts and global model transfers;
    all while dev1 and dev2 train round 1 for real."""
    aggregator = AggregatorService(aggregator_config(tmp_path, broker, ONE_TASK, round_timeout_s=300.0))
    agents = [Agent(agent_config(tmp_path, broker, f"dev{i + 1}", {"shuffle": digits(i)})) for i in range(2)]
    to_aggregator, to_agent = count_messages(aggregator), count_messages(agents[0])
    attacker = MqttLink(mqtt(broker, "dev3"))
    attacker.start()
    assert attacker.wait_connected(10)
    with running(aggregator, *agents) as services:
        observer.wait_for(
            lambda: {"dev1", "dev2"} <= set(observer.schedules), 60, "round 1's schedules", services
        )
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 60, "global v0", services)
        # what dev1 gets from the real round: two global versions, schedules and receipts
        legit = (
            2 * (math.ceil(len(encode_state(observer.globals[("shuffle", 0)])) / DEFAULT_CHUNK_SIZE) + 1) + 8
        )
        sent = collections.Counter()
        for _ in range(10):  # batches until each service handled its share (QoS 0 may lose some)
            if min(to_aggregator["dev3"], to_agent["all"] - legit) >= MESSAGES_PER_SERVICE:
                break
            batch = generated(
                st.lists(aggregator_traffic(["dev3"], ["shuffle", "other"]), min_size=20, max_size=20), 250
            )
            for topic, payload in (m for items in batch for messages, _ in items for m in messages):
                if publishable(topic):
                    try:
                        attacker.publish(topic, payload, qos=0)
                    except PublishError:  # the broker dropped dev3 (once: "oversize packet"); it reconnects
                        assert attacker.wait_connected(30)
                        continue
                    sent["aggregator"] += 1
            batch = generated(st.lists(agent_traffic("dev1", ["shuffle"]), min_size=20, max_size=20), 250)
            for topic, payload in (m for items in batch for messages in items for m in messages):
                if publishable(topic) and harmless_to_the_round(topic, payload):
                    aggregator.link.publish(topic, payload, qos=0)
                    sent["agent"] += 1
            observer.wait_for(lambda: not aggregator.link.client.want_write(), 60, "the fuzz sent", services)
            observer.pump(2.0)
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 300, "global v1", services)
        for service in services:
            service()  # still running
    attacker.stop()
    assert min(sent.values()) >= MESSAGES_PER_SERVICE, sent
    assert to_aggregator["dev3"] >= MESSAGES_PER_SERVICE, (to_aggregator, sent)
    assert to_agent["all"] - legit >= MESSAGES_PER_SERVICE, (to_agent, legit, sent)
    assert_exact_round(observer)


def assert_exact_round(observer) -> None:
    """Global v1 is the reference FedAvg of the updates the aggregator accepted: dev1's and dev2's only."""
    accepted = {r.update_id for r in observer.receipts if r.status == "accepted"}
    updates = [
        (manifest, delta) for manifest, delta in observer.updates.values() if manifest.update_id in accepted
    ]
    assert sorted(manifest.device for manifest, _ in updates) == ["dev1", "dev2"]
    expected = reference_fedavg(
        observer.globals[("shuffle", 0)], [(m.samples, delta) for m, delta in updates]
    )
    assert_states_equal(observer.globals[("shuffle", 1)], expected)


# --- retained poison -----------------------------------------------------------------------------------------

HUGE_INDEX = "9" * 5000  # int() of it raised ValueError inside the topic parser


def publish_retained(broker, user: str, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"poison-{user}", protocol=paho.MQTTv5)
    client.username_pw_set(user, USERS[user])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_retained_poison_does_not_stop_a_restart(tmp_path, broker, observer):
    """Retained messages that used to crash a service at every start (an integer SQLite cannot hold in a device
    profile, a 5000-digit chunk index, a schedule of absurd values) are dropped: the services start, restart
    and run a round whose result is exact."""
    profile = {
        "device": "dev3",
        "ts": 1.0,
        "agent_version": "x",
        "host": {
            "hostname": "h",
            "os": "o",
            "machine": "m",
            "python": "3",
            "cpu_count": 1,
            "memory_bytes": 1,
        },
        "tasks": {"shuffle": {"samples": 2**64 - 1}},
    }
    publish_retained(
        broker,
        "dev3",
        [
            (topics.device("dev3", "status"), encode(online())),
            (topics.device("dev3", "profile"), msgspec.msgpack.encode(profile)),
            (f"{topics.update('shuffle', 'dev3')}/chunks/{HUGE_INDEX}", b"\x00"),
            (topics.manifest(topics.update("shuffle", "dev3")), msgspec.msgpack.encode({"round": 2**64 - 1})),
            (topics.device("dev3", "telemetry"), b"\xc1"),  # never valid msgpack
        ],
    )
    schedule = {
        "device": "dev1",
        "round": 2**64 - 1,
        "issued_at": 1e300,
        "deadline": float("inf"),
        "tasks": [],
    }
    publish_retained(
        broker,
        "aggregator",
        [
            (topics.schedule("dev1", "shuffle"), msgspec.msgpack.encode(schedule)),
            (f"{topics.global_model('shuffle')}/chunks/{HUGE_INDEX}", b"\x00"),
            (topics.manifest(topics.global_model("shuffle")), b"\x85\xa4task"),  # truncated
        ],
    )
    config = aggregator_config(tmp_path, broker, ONE_TASK)
    first = [AggregatorService(config), Agent(agent_config(tmp_path, broker, "dev1", {"shuffle": digits(0)}))]
    counts = [count_messages(service) for service in first]
    with running(*first) as services:  # two devices open a round: with one, nothing but the poison happens
        observer.wait_for(lambda: all(c["all"] >= 3 for c in counts), 30, "the poison delivered", services)
        for service in services:
            service()
    restarted = [
        AggregatorService(config),
        Agent(agent_config(tmp_path, broker, "dev1", {"shuffle": digits(0)})),
        Agent(agent_config(tmp_path, broker, "dev2", {"shuffle": digits(1)})),
    ]
    counts = [count_messages(service) for service in restarted[:2]]
    with running(*restarted) as services:
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 300, "global v1", services)
    assert all(c["all"] >= 3 for c in counts), counts
    assert_exact_round(observer)


def retained_topics(broker, timeout_s: float = 2.0) -> set[str]:
    """Topics under fedmt/v1 on which the broker holds a retained message (as the auditor, who reads updates too)."""
    link = MqttLink(mqtt(broker, "auditor"), [f"{topics.PREFIX}/#"])
    link.start()
    try:
        assert link.wait_connected(10)
        return {m.topic for m in link.received(timeout_s) if m.retain and m.payload}
    finally:
        link.stop()


def test_retained_junk_on_a_devices_topics_is_cleared_from_the_broker(tmp_path, broker):
    """The ACL lets a device write its own telemetry, events and update topics, retained or not; the aggregator
    clears what a device left retained there, before it started or while it runs."""
    before = [
        (topics.device("dev3", "telemetry"), b"junk"),
        (f"{topics.update('t', 'dev3')}/chunks/1", b"junk"),
    ]
    after = [(topics.device("dev3", "events"), b"junk"), (f"{topics.update('t', 'dev3')}/a/b/c", b"junk")]
    publish_retained(broker, "dev3", before)
    assert {t for t, _ in before} <= retained_topics(broker)
    aggregator = Running(AggregatorService(aggregator_config(tmp_path, broker, ONE_TASK)))
    try:
        publish_retained(broker, "dev3", [*after, (topics.device("dev3", "status"), encode(online()))])
        time.sleep(1.0)
        aggregator()
    finally:
        aggregator.stop()
    left = retained_topics(broker)
    assert not {t for t, _ in before + after} & left, left
    assert topics.device("dev3", "status") in left  # a device's status stays retained


def online() -> Status:
    return Status(state="online", ts=time.time())


# --- quotas and a full disk ----------------------------------------------------------------------------------


def test_quota_and_full_disk_refusals_reach_the_device_and_the_round_stays_exact(
    tmp_path, broker, observer, monkeypatch
):
    mib = 1 << 20
    transfers = TransferConfig(
        max_update_bytes=8 * mib,
        max_device_spool_bytes=8 * mib,
        max_spool_bytes=24 * mib,
        max_device_transfers=4,
    )
    config = msgspec.structs.replace(aggregator_config(tmp_path, broker, ONE_TASK), transfers=transfers)
    aggregator = Running(AggregatorService(config))
    dev1, dev2 = RawDevice(broker, "dev1", {"shuffle": 100}), RawDevice(broker, "dev2", {"shuffle": 50})
    attacker = RawDevice(broker, "dev3", None)  # never announced, so never scheduled
    try:
        dev1.wait(lambda: dev1.schedules, 30, "a schedule")
        observer.wait_for(lambda: ("shuffle", 0) in observer.globals, 30, "global v0")
        base = observer.globals[("shuffle", 0)]
        good1, good2 = random_delta(base, 1), random_delta(base, 2)

        for update_id, size in (
            ("hold", 6 * mib),
            ("over", 3 * mib),
        ):  # manifests first: they hold their size
            manifest = update_manifest("shuffle", "dev3", update_id, size)
            attacker.link.publish(topics.manifest(topics.update("shuffle", "dev3")), encode(manifest))
        refused = attacker.receipt_for("over")
        assert refused.status == "retry" and "max_device_spool_bytes" in refused.reason, refused

        spool = Path(config.state_dir) / "spool"
        real_pwrite = os.pwrite

        def full_disk(fd, data, offset):  # ENOSPC for the aggregator's spool only
            if Path(os.readlink(f"/proc/self/fd/{fd}")).parent == spool:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full_disk)
        full = dev1.receipt_for(dev1.send_update("shuffle", good1, samples=100))
        assert full.status == "retry" and "No space left on device" in full.reason, full
        monkeypatch.undo()

        assert dev1.receipt_for(dev1.send_update("shuffle", good1, samples=100)).status == "accepted"
        assert dev2.receipt_for(dev2.send_update("shuffle", good2, samples=50)).status == "accepted"
        observer.wait_for(lambda: ("shuffle", 1) in observer.globals, 30, "global v1", [aggregator])
        aggregator()
    finally:
        for device in (dev1, dev2, attacker):
            device.close()
        aggregator.stop()
    assert_states_equal(observer.globals[("shuffle", 1)], reference_fedavg(base, [(100, good1), (50, good2)]))
