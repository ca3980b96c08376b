"""The round coordinator on its own: opening, deadlines, minimum updates, round limit, restart, initial weights."""

from __future__ import annotations

import sqlite3
import time
import uuid

import numpy as np
import pytest
from safetensors.numpy import save_file

from aggregator.config import AggregatorConfig, RoundsConfig, TaskConfig
from aggregator.initial import initial_state
from aggregator.limits import UpdateLimits
from aggregator.rounds import Coordinator
from aggregator.strategies.fedprox import FedProxSpec
from aggregator.strategies.median import MedianSpec
from common.config import ConfigError
from protocol import ProtocolError
from protocol.chunking import transfer_info
from protocol.codecs import make_codec
from protocol.schemas import DeviceProfile, HostInfo, ModelSpec, TaskData, UpdateManifest
from protocol.tensors import encode_state

HOST = HostInfo(hostname="h", os="linux", machine="x86_64", python="3.11", cpu_count=2, memory_bytes=1)
BASE = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "steps": np.array(7, dtype=np.int64)}


@pytest.fixture
def config(tmp_path):
    weights = tmp_path / "init.safetensors"
    save_file(BASE, str(weights))
    task = TaskConfig(model=ModelSpec(name="tiny", num_classes=10, input_size=8), init_weights=str(weights))
    return AggregatorConfig(
        state_dir=str(tmp_path / "state"),
        rounds=RoundsConfig(rounds=2, min_devices=2, min_updates=1, round_timeout_s=100.0),
        tasks={"t": task},
    )


def join(coordinator: Coordinator, device: str, samples: int = 10) -> None:
    coordinator.device_status(device, True)
    profile = DeviceProfile(
        device=device, ts=0, agent_version="x", host=HOST, tasks={"t": TaskData(samples=samples)}
    )
    coordinator.device_profile(profile)


def started(config, samples=(10, 10)) -> Coordinator:
    """A started coordinator with devices d1 and d2 online, holding `samples` of the task."""
    coordinator = Coordinator(config)
    coordinator.start()
    join(coordinator, "d1", samples[0])
    join(coordinator, "d2", samples[1])
    return coordinator


def update(
    coordinator: Coordinator,
    tmp_path,
    device: str,
    delta: dict,
    samples: int = 10,
    round_: int = 1,
    sender: str | None = None,
    codec: str = "dense",
    in_memory: bool = False,
):
    """As the service hands it over: screened when its manifest arrives, then its payload accepted (a spool
    file, or `in_memory` its bytes)."""
    payload = make_codec(codec).encode(delta)
    update_id = uuid.uuid4().hex
    version = coordinator.globals["t"].manifest.version
    manifest = UpdateManifest(
        task="t",
        round=round_,
        device=device,
        update_id=update_id,
        base_version=version,
        samples=samples,
        codec=codec,
        transfer=transfer_info(update_id, payload),
    )
    answer = coordinator.screen(manifest, sender or device, "t")
    if answer is not None:
        return answer
    path = tmp_path / f"{update_id}.done"
    path.write_bytes(payload)
    receipt = coordinator.accept_update(manifest, payload if in_memory else path)
    if receipt is None:  # staged: made durable, then folded
        ((_, receipt),) = coordinator.commit()
        coordinator.fold_accepted()
    return receipt


def delta(value: float) -> dict:
    return {"w": np.full((3, 4), value, np.float32), "steps": np.array(2, dtype=np.int64)}


def test_device_statuses_are_written_together_by_the_next_commit_and_again_after_a_failed_one(
    config, monkeypatch
):
    coordinator = Coordinator(config)
    coordinator.start()
    coordinator.device_status("d1", True)
    # noted; written with the group's commit
    assert coordinator.ledger.devices() == [] and coordinator.online == {"d1"}

    def fails(statuses):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(coordinator.ledger, "record_devices", fails)
    assert coordinator.commit() == []
    monkeypatch.undo()
    coordinator.device_status("d1", True)  # its retained status again: not recorded yet, so written now
    coordinator.device_status("d2", True)
    coordinator.device_status("d2", False)
    coordinator.commit()
    assert [(d.device, d.online) for d in coordinator.ledger.devices()] == [("d1", True), ("d2", False)]


def test_a_round_opens_only_with_enough_devices_and_schedules_them(config):
    coordinator = Coordinator(config)
    published = coordinator.start().globals
    assert [m.manifest.version for m in published] == [0]
    join(coordinator, "d1")
    assert coordinator.tick(now=1000).schedules == []  # min_devices = 2
    join(coordinator, "d2")
    out = coordinator.tick(now=1000)
    assert sorted(s.device for s in out.schedules) == ["d1", "d2"]
    schedule = out.schedules[0]
    assert (schedule.round, schedule.deadline) == (1, 1100)
    assert schedule.tasks[0].base_sha256 == coordinator.globals["t"].manifest.transfer.sha256


def test_a_task_finalises_when_every_expected_device_reported(config, tmp_path):
    coordinator = started(config, (10, 30))
    coordinator.tick(now=1000)
    assert update(coordinator, tmp_path, "d1", delta(1.0), samples=10).status == "accepted"
    assert coordinator.tick(now=1001).globals == []  # d2 still expected
    assert update(coordinator, tmp_path, "d2", delta(-1.0), samples=30).status == "accepted"
    payloads = [u.payload_path for u in coordinator.ledger.updates_for("t", 1)]
    assert len(payloads) == 2 and all(p.is_file() for p in payloads)
    out = coordinator.tick(now=1002)
    new = out.globals[0]
    assert new.manifest.version == 1
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 1.0 + 30 * -1.0) / 40, rtol=1e-6)
    assert new.state["steps"] == 9
    assert [s.round for s in out.schedules] == [2, 2]  # round 2 opens right away
    coordinator.close()  # waits for the payloads' removal, which runs off the round's path
    assert not any(p.exists() for p in payloads)


def test_the_deadline_finalises_with_min_updates_or_extends_without(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=1000)
    assert coordinator.tick(now=1101).globals == []  # nobody reported: the deadline moves
    assert coordinator.round.deadline == pytest.approx(1201)
    update(coordinator, tmp_path, "d1", delta(0.5))
    assert coordinator.tick(now=1150).globals == []  # d2 may still report before the new deadline
    out = coordinator.tick(now=1202)
    assert [m.manifest.version for m in out.globals] == [1]


def test_failed_devices_are_not_waited_for(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=1000)
    update(coordinator, tmp_path, "d1", delta(0.5))
    coordinator.task_failed("d2", "t", 1)
    assert [m.manifest.version for m in coordinator.tick(now=1001).globals] == [1]


def test_the_round_limit_stops_the_federation(config, tmp_path):
    coordinator = started(config)
    for number in (1, 2):
        coordinator.tick(now=1000 * number)
        for device in ("d1", "d2"):
            assert update(coordinator, tmp_path, device, delta(0.1), round_=number).status == "accepted"
    out = coordinator.tick(now=5000)
    assert [m.manifest.version for m in out.globals] == [2] and out.schedules == []
    assert coordinator.tick(now=6000).schedules == []


def test_a_restarted_coordinator_resumes_the_open_round(config, tmp_path):
    first = started(config, (10, 30))
    first.tick(now=1000)
    update(first, tmp_path, "d1", delta(1.0), samples=10)
    first.ledger.close()
    second = Coordinator(config)  # same state directory
    resumed = second.start()
    assert [s.round for s in resumed.schedules] == [1, 1]
    update(second, tmp_path, "d2", delta(-1.0), samples=30)
    new = second.tick(now=1001).globals[0]
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 1.0 + 30 * -1.0) / 40, rtol=1e-6)


def test_updates_held_in_memory_share_a_segment_that_a_restart_folds_and_finalisation_removes(
    config, tmp_path
):
    first = started(config, (10, 30))
    first.tick(now=1000)
    for device, value, samples in (("d1", 1.0, 10), ("d2", -1.0, 30)):
        assert update(first, tmp_path, device, delta(value), samples, in_memory=True).status == "accepted"
    records = first.ledger.updates_for("t", 1)
    segment = records[0].payload_path
    assert [r.payload_path for r in records] == [segment, segment] and segment.suffix == ".segment"
    assert [r.payload_offset for r in records] == [0, records[0].payload_size]
    assert segment.stat().st_size == sum(r.payload_size for r in records)
    first.ledger.close()  # the process stops before the task round is final
    second = Coordinator(config)
    second.start()
    new = second.tick(now=1001).globals[0]
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 1.0 + 30 * -1.0) / 40, rtol=1e-6)
    second.close()
    assert not segment.exists()


def test_initial_weights_come_from_the_configured_file_and_must_be_finite(config, tmp_path):
    task = config.tasks["t"]
    state = initial_state("t", task)
    assert set(state) == {"w", "steps"} and np.array_equal(state["w"], BASE["w"])
    bad = tmp_path / "nan.safetensors"
    save_file({"w": np.array([np.nan], np.float32)}, str(bad))
    with pytest.raises(ProtocolError, match="non-finite"):
        initial_state("t", TaskConfig(model=task.model, init_weights=str(bad)))
    with pytest.raises(ConfigError, match="tasks.t.init_weights: .* does not exist"):
        initial_state("t", TaskConfig(model=task.model, init_weights=str(tmp_path / "absent.safetensors")))
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(ConfigError, match="tasks.t.init_weights: .* not a safetensors file"):
        initial_state("t", TaskConfig(model=task.model, init_weights=str(tmp_path / "text.safetensors")))


def test_updates_for_unscheduled_devices_or_inflated_samples_are_rejected(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=time.time())
    assert "not scheduled" in update(coordinator, tmp_path, "d9", delta(0.1)).reason
    assert "declared 10" in update(coordinator, tmp_path, "d1", delta(0.1), samples=11).reason
    assert coordinator.task_rounds["t"].strategy.count == 0


def test_the_configured_policy_travels_with_every_schedule(config):
    config.rounds.policy = "isolated"
    coordinator = started(config)
    assert {s.policy for s in coordinator.tick(now=1000).schedules} == {"isolated"}


def test_the_weight_cap_and_norm_bound_are_applied_recorded_and_resumed(config, tmp_path):
    config.tasks["t"].limits = UpdateLimits(max_samples=20, max_norm=1.0)
    first = started(config, (10, 10**6))
    first.tick(now=1000)
    receipt = update(first, tmp_path, "d2", delta(5.0), samples=10**6)
    norm = float(np.linalg.norm(delta(5.0)["w"]))  # 12 x 5.0: 17.3, the int tensor is not part of it
    assert receipt.status == "accepted"
    assert (
        receipt.reason
        == f"weight capped at 20 samples (declared 1000000); delta norm {norm:.4g} clipped to 1"
    )
    (recorded,) = first.ledger.updates_for("t", 1)
    assert (recorded.samples, recorded.weight, recorded.scale) == (10**6, 20, pytest.approx(1 / norm))
    first.ledger.close()
    config.tasks["t"].limits = UpdateLimits()  # what was recorded counts, not the config of the restart
    second = Coordinator(config)
    second.start()
    assert update(second, tmp_path, "d1", delta(0.1), samples=10).reason == ""
    new = second.tick(now=1001).globals[0]
    clipped = np.float32(5.0) * np.float32(1 / norm)
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 0.1 + 20 * clipped) / 30, rtol=1e-6)
    assert new.state["steps"] == 9  # integer tensors are neither part of the norm nor scaled


def test_rejecting_limits_refuse_the_update_and_keep_nothing(config, tmp_path):
    config.tasks["t"].limits = UpdateLimits(
        max_samples=20, samples_excess="reject", max_norm=1.0, norm_excess="reject"
    )
    coordinator = started(config, (10**6, 10))
    coordinator.tick(now=1000)
    assert (
        "above the task's cap of 20" in update(coordinator, tmp_path, "d1", delta(0.1), samples=10**6).reason
    )
    assert "exceeds the task's bound of 1" in update(coordinator, tmp_path, "d2", delta(5.0)).reason
    assert coordinator.ledger.updates_for("t", 1) == [] and coordinator.task_rounds["t"].strategy.count == 0
    assert not any(coordinator.updates_dir.rglob("*.state"))  # the payload file stays the caller's
    assert update(coordinator, tmp_path, "d1", delta(0.1), samples=20).status == "accepted"


def test_registered_samples_weigh_an_update_instead_of_the_devices_word(config, tmp_path):
    config.registered_samples = {"d2": {"t": 30}}
    coordinator = started(config, (10, 10**6))
    coordinator.tick(now=1000)
    update(coordinator, tmp_path, "d1", delta(1.0), samples=10)
    assert "registry" in update(coordinator, tmp_path, "d2", delta(-1.0), samples=10**6).reason
    new = coordinator.tick(now=1001).globals[0]
    np.testing.assert_allclose(new.state["w"], BASE["w"] + (10 * 1.0 + 30 * -1.0) / 40, rtol=1e-6)


def test_a_windowed_strategy_survives_restarts_mid_round(config, tmp_path):
    config.tasks["t"].strategy = MedianSpec(window=2)
    coordinator = started(config)
    join(coordinator, "d3")
    coordinator.tick(now=1000)
    for device, value in (
        ("d1", 1.0),
        ("d2", -3.0),
        ("d3", 0.5),
    ):  # restart with a partial, then a full window
        assert update(coordinator, tmp_path, device, delta(value), samples=10).status == "accepted"
        coordinator.ledger.close()
        coordinator = Coordinator(config)
        coordinator.start()
    new = coordinator.tick(now=1001).globals[0]
    # windows (d1, d2) and (d3): median(1, -3) = -1 for two updates, 0.5 for one: (2 * -1 + 0.5) / 3
    np.testing.assert_allclose(new.state["w"], BASE["w"] + np.float32(-0.5), rtol=1e-6)


def test_the_strategys_proximal_mu_travels_with_every_schedule(config):
    assert {a.proximal_mu for s in started(config).tick(now=1000).schedules for a in s.tasks} == {0.0}
    config.tasks["t"].strategy = FedProxSpec(mu=0.3)
    config.state_dir += "-fedprox"
    assert {a.proximal_mu for s in started(config).tick(now=1000).schedules for a in s.tasks} == {0.3}


def test_the_batch_rules_and_training_seed_of_the_task_config_travel_with_every_schedule(config):
    config.tasks["t"].lr_scaling, config.tasks["t"].initial_batch_growth = "sqrt", 4
    config.tasks["t"].train_seed = 3
    (assignment,) = {a for s in started(config).tick(now=1000).schedules for a in s.tasks}
    assert (assignment.lr_scaling, assignment.initial_batch_growth) == ("sqrt", 4)
    assert assignment.train_seed == 3


def test_an_update_naming_another_device_than_its_sender_is_rejected(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=1000)
    receipt = update(coordinator, tmp_path, "d2", delta(0.1), sender="d1")
    assert receipt.status == "rejected" and "names device d2, task t; sent as d1" in receipt.reason
    assert coordinator.ledger.updates_for("t", 1) == [] and list(tmp_path.glob("*.done")) == []


def test_a_rounds_float64_buffers_serve_the_next_round(config, tmp_path):
    coordinator = started(config)
    coordinator.tick(now=1000)
    pool = coordinator.buffers["t"]
    assert pool.held_bytes == 0  # round 1 holds its sums
    for device in ("d1", "d2"):
        update(coordinator, tmp_path, device, delta(0.1))
    out = coordinator.tick(now=1001)  # round 1 final, its buffers given back; round 2 opens and takes them
    assert [m.manifest.version for m in out.globals] == [1] and coordinator.round.round == 2
    assert pool.held_bytes == 0
    for device in ("d1", "d2"):
        update(coordinator, tmp_path, device, delta(0.2), round_=2)
    coordinator.tick(now=1002)  # the last round: nothing takes them back
    assert pool.held_bytes > 0
    np.testing.assert_allclose(coordinator.globals["t"].state["w"], BASE["w"] + 0.3, rtol=1e-6)


def test_a_task_takes_updates_in_its_codecs_only_and_folds_what_they_decode_to(config, tmp_path):
    import msgspec

    from protocol.schemas import CodecSpec
    from protocol.tensors import describe

    task = msgspec.structs.replace(
        config.tasks["t"], codec=CodecSpec(name="topk", fraction=0.25), accept_codecs=["fp16+zstd"]
    )
    config = msgspec.structs.replace(config, tasks={"t": task})
    coordinator = started(config, (10, 30))
    schedules = coordinator.tick(now=1000).schedules
    assert {s.tasks[0].codec for s in schedules} == {CodecSpec(name="topk", fraction=0.25)}
    refused = update(coordinator, tmp_path, "d1", delta(1.0), samples=10)
    assert refused.status == "rejected" and "update codec 'dense'" in refused.reason
    rising = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "steps": np.array(2, dtype=np.int64)}
    assert update(coordinator, tmp_path, "d1", rising, samples=10, codec="topk").status == "accepted"
    assert (
        update(coordinator, tmp_path, "d2", delta(-1.0), samples=30, codec="fp16+zstd").status == "accepted"
    )
    sent = make_codec("topk").decode(make_codec("topk").encode(rising), describe(rising))["w"]
    assert np.array_equal(sent, rising["w"])  # a 3 x 4 matrix is below CUT_ELEMENTS: it travels whole
    expected = BASE["w"] + (10 * sent + 30 * -1.0) / 40
    coordinator = Coordinator(config)  # restarted before the tick: the ledger knows each update's codec
    coordinator.start()
    np.testing.assert_allclose(coordinator.tick(now=1002).globals[0].state["w"], expected, rtol=1e-6)


def test_a_codec_warm_up_sends_each_round_its_share_by_the_version_it_trains_from(config, tmp_path):
    import msgspec

    from protocol.schemas import CodecSpec

    spec = CodecSpec(name="topk", fraction=0.01, warmup_rounds=2)
    task = msgspec.structs.replace(config.tasks["t"], codec=spec)
    coordinator = started(msgspec.structs.replace(config, tasks={"t": task}))
    shares = []
    for round_ in (1, 2):
        schedules = coordinator.tick(now=1000 + round_).schedules
        shares.append({s.tasks[0].codec.fraction for s in schedules})
        for device in ("d1", "d2"):
            assert (
                update(coordinator, tmp_path, device, delta(1.0), round_=round_, codec="topk").status
                == "accepted"
            )
    assert shares == [{0.04}, {0.02}]
    with pytest.raises(ValueError, match="warmup_rounds needs a codec that keeps a part"):
        msgspec.structs.replace(task, codec=CodecSpec(name="fp16+zstd", warmup_rounds=1))


def test_a_task_config_naming_an_unknown_codec_is_refused(config):
    import msgspec

    from protocol.schemas import CodecSpec

    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        msgspec.structs.replace(config.tasks["t"], codec=CodecSpec(name="zip"))
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        msgspec.structs.replace(config.tasks["t"], accept_codecs=["lz4"])


def test_a_download_codec_publishes_the_version_its_delta_rebuilds(config, tmp_path):
    import msgspec

    from protocol.deltas import apply
    from protocol.tensors import describe

    task = msgspec.structs.replace(config.tasks["t"], download_codec="fp16")
    coordinator = started(msgspec.structs.replace(config, tasks={"t": task}))
    coordinator.tick(now=1000)
    v0 = coordinator.globals["t"]
    assert v0.manifest.delta is None and v0.delta_payload is None  # nothing before the first version
    third = {"w": np.full((3, 4), 1 / 3, np.float32), "steps": np.array(2, dtype=np.int64)}
    update(coordinator, tmp_path, "d1", third)
    update(coordinator, tmp_path, "d2", third)
    v1 = coordinator.tick(now=1001).globals[0]
    assert (v1.manifest.delta.base_version, v1.manifest.delta.base_sha256) == (0, v0.manifest.transfer.sha256)
    assert (
        v1.manifest.delta.transfer.size == len(v1.delta_payload) < v1.manifest.transfer.size
    )  # headers weigh here
    rebuilt = apply(v0.state, make_codec("fp16").decode(v1.delta_payload, describe(v0.state)))
    assert encode_state(rebuilt) == v1.payload  # what a device rebuilds is what is published, bit for bit
    assert not np.array_equal(v1.state["w"], BASE["w"] + np.float32(1 / 3))  # float16's rounding of the step
    np.testing.assert_allclose(v1.state["w"], BASE["w"] + 1 / 3, atol=1e-3)
    assert v1.state["steps"] == 9


def test_a_coordinator_restarted_between_rounds_numbers_on_and_clears_the_last_schedules(config, tmp_path):
    coordinator = started(config)
    for number in (1, 2):
        coordinator.tick(now=1000 * number)
        for device in ("d1", "d2"):
            update(coordinator, tmp_path, device, delta(0.1), round_=number)
    coordinator.tick(now=3000)  # round 2 finalises: the round limit is reached
    coordinator.ledger.close()
    restarted = Coordinator(config)
    out = restarted.start()
    assert sorted(out.cleared_schedules) == [("d1", "t"), ("d2", "t")] and out.schedules == []
    join(restarted, "d1")
    join(restarted, "d2")
    assert restarted.tick(now=4000).schedules == [] and restarted.round.round == 2
    config.rounds.rounds = 3
    restarted.ledger.close()
    third = Coordinator(config)
    third.start()
    join(third, "d1")
    join(third, "d2")
    assert {s.round for s in third.tick(now=5000).schedules} == {3}


def test_a_payload_that_cannot_be_removed_is_logged_and_the_rest_removed(tmp_path, caplog):
    from aggregator.removal import BackgroundRemover

    kept_dir = tmp_path / "not-a-file"
    (kept_dir / "inside").mkdir(parents=True)  # unlink of a folder fails
    files = [tmp_path / "a", tmp_path / "b"]
    for path in files:
        path.write_bytes(b"x")
    remover = BackgroundRemover()
    remover.remove([files[0], kept_dir, files[1], tmp_path / "gone"]).result()
    remover.close()
    assert not any(p.exists() for p in files) and kept_dir.is_dir()
    assert "could not remove 1 files" in caplog.text
