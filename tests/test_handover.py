"""The standby hand-over: a round paused in one process continues in another (agent.checkpoint, agent.training),
and a round on a faked MPS GPU gives a finished task's share to the tasks still training (agent.handover,
agent.runner, agent.planning), with real worker processes on the CPU."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from agent import jobs
from agent.checkpoint import load_round, save_round
from agent.data import DigitsData, SyntheticData
from agent.handover import Training, standby_key
from agent.mps import GpuSharing, MpsConfig, MpsDaemon
from agent.planning import Planner
from agent.runner import TaskWork, run_round
from agent.training import LoopPosition, TaskRuntime, TrainingPaused, TrainStep, make_optimizer
from agent.workers import WorkerPool
from common.models import build_model, state_to_numpy
from protocol.chunking import sha256_hex
from protocol.schemas import ModelSpec, MpsInfo, OptimizerSpec, TaskAssignment
from protocol.tensors import decode_state, encode_state

DROPOUT_MODEL = ModelSpec(name="mobilenet_v3_small", num_classes=10, input_size=16)  # dropout: global RNG
FAST_MODEL = ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assignment(model: ModelSpec, optimizer: OptimizerSpec, **fields) -> TaskAssignment:
    return TaskAssignment(
        task="t", model=model, optimizer=optimizer, base_version=0, base_sha256="0" * 64, **fields
    )


class PauseAt:
    """should_pause that turns true before step `step` (0-based)."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls == self.step + 1


# a pause before step 1 or 10 of 12: inside the rate's warm-up (steps 0-1) or its cool-down (10-11)
@pytest.mark.parametrize("pause", [1, 10])
@pytest.mark.parametrize(
    "optimizer", [OptimizerSpec(name="sgd", lr=0.05, momentum=0.9), OptimizerSpec(name="adam", lr=1e-3)]
)
def test_a_paused_round_continues_in_another_runtime_as_if_never_paused(tmp_path, optimizer, pause):
    """Batch 32 for a task configured at 16 (its rate ramping at the pause), two epochs, paused mid-epoch: the
    continued round takes the same steps over the same data order and ends with the same weights."""
    task = assignment(DROPOUT_MODEL, optimizer, batch_size=32, local_epochs=2, lr_scaling="linear")
    base = state_to_numpy(build_model(DROPOUT_MODEL, seed=0))
    data = DigitsData(num_partitions=8, partition_index=3)

    def runtime() -> TaskRuntime:
        made = TaskRuntime(DROPOUT_MODEL, data, device="cpu")
        torch.manual_seed(0)  # the dropout stream each round starts from
        return made

    whole = runtime().train(task, base, seed=5, reference_batch=16)
    checkpoint = tmp_path / "t.handover"
    with pytest.raises(TrainingPaused) as paused:
        runtime().train(
            task, base, seed=5, reference_batch=16, pause_to=checkpoint, should_pause=PauseAt(pause)
        )
    position = paused.value.position
    steps_per_epoch = data.sample_count() // 32 + 1
    assert position.steps == pause and (position.epoch, position.batch) == divmod(pause, steps_per_epoch)
    recipe = whole.recipe  # the rate ramps at the pause:
    assert recipe.steps == 12 and recipe.base_lr < recipe.lr_at(pause) < recipe.lr
    continued = TaskRuntime(DROPOUT_MODEL, data, device="cpu").train(
        task, base, seed=5, reference_batch=16, resume_from=checkpoint
    )
    assert continued.stats.steps == whole.stats.steps and continued.stats.images == whole.stats.images
    assert continued.stats.train_loss == whole.stats.train_loss
    for name, delta in whole.delta.items():
        np.testing.assert_array_equal(continued.delta[name], delta, err_msg=name)


def test_a_checkpoint_is_safetensors_with_a_json_header_and_a_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    task = assignment(FAST_MODEL, OptimizerSpec(), batch_size=8, local_steps=6)
    base = state_to_numpy(build_model(FAST_MODEL, seed=0))
    checkpoint = tmp_path / "t.handover"
    with pytest.raises(TrainingPaused):
        TaskRuntime(FAST_MODEL, SyntheticData(samples=32), device="cpu").train(
            task, base, seed=0, pause_to=checkpoint, should_pause=PauseAt(3)
        )
    raw = checkpoint.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["fedmt.round"])
    assert meta["position"]["steps"] == 3 and meta["param_groups"][0]["momentum"] == 0.9
    assert "rng/cpu" in header and any(k.startswith("optimizer/") for k in header)
    model = build_model(FAST_MODEL)
    step = TrainStep(model, make_optimizer(OptimizerSpec(), model.parameters()), "fp32", "cpu")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a round checkpoint"):
        load_round(foreign, step)


def test_a_paused_step_keeps_the_rate_tensor_a_captured_step_reads(tmp_path):
    """A capturable optimiser's rate is a tensor (on a GPU, the one its CUDA graphs read): the checkpoint stores its
    value mid-warm-up, and the resumed step keeps its own tensor, filled with that value, and goes on exactly as
    the step that never paused."""
    rates = [0.01 * min(i + 1, 4) for i in range(6)]

    def step() -> TrainStep:
        model = build_model(FAST_MODEL, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.01), momentum=0.9)
        return TrainStep(model, optimizer, "fp32", "cpu", lr_at=rates.__getitem__)

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,))) for _ in rates]
    whole, paused = step(), step()
    for images, labels in batches[:2]:
        whole(images, labels)
        paused(images, labels)
    checkpoint = tmp_path / "t.handover"
    save_round(checkpoint, paused, LoopPosition(steps=2))
    resumed = step()
    rate = resumed.optimizer.param_groups[0]["lr"]
    assert load_round(checkpoint, resumed).steps == 2
    assert resumed.optimizer.param_groups[0]["lr"] is rate and rate.item() == pytest.approx(rates[1])
    for images, labels in batches[2:]:
        whole(images, labels)
        resumed(images, labels)
    assert rate.item() == pytest.approx(rates[-1])
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


# --- a round on a faked MPS GPU ------------------------------------------------------------------------------


def fake_mps(tmp_path: Path) -> GpuSharing:
    """MPS "available" with no SM count to check: launches carry shares and MPS environments, CPU workers
    ignore them."""
    daemon = MpsDaemon(MpsConfig(pipe_dir=str(tmp_path / "pipe"), log_dir=str(tmp_path / "log")))
    daemon.info = MpsInfo(available=True, reason="faked for the test")
    return GpuSharing(daemon, None, tmp_path)


@pytest.mark.slow
def test_a_finished_tasks_share_moves_to_standby_workers_that_finish_the_same_training(tmp_path):
    """Three tasks at the heuristic's 70% each (R_v 210%): `short` ends first; `b` and `c` (the same training)
    move to 100% through standby workers and still take their 600 steps, ending where a round without a
    hand-over ends."""
    base = state_to_numpy(build_model(FAST_MODEL, seed=0))
    payload = encode_state(base)
    base_path = tmp_path / "base.state"
    base_path.write_bytes(payload)
    data = SyntheticData(samples=64, seed=1)

    def work(task: str, steps: int) -> TaskWork:
        a = TaskAssignment(
            task=task,
            model=FAST_MODEL,
            optimizer=OptimizerSpec(lr=0.02),
            base_version=0,
            base_sha256=sha256_hex(payload),
            batch_size=8,
            local_steps=steps,
        )
        train = jobs.Train(
            assignment=a,
            base_path=str(base_path),
            output_path=str(tmp_path / f"{task}.update"),
            seed=3,
            handover_path=str(tmp_path / f"{task}.handover"),
        )
        return TaskWork(jobs.Prepare(model=FAST_MODEL, data=data), train)

    # `short` trains long enough for the others to report their pace twice (every 0.5 s) before it ends
    works = {"short": work("short", 150), "b": work("b", 600), "c": work("c", 600)}
    planner = Planner(fake_mps(tmp_path))
    plan = planner.plan("fedmt", [w.train.assignment for w in works.values()], dict.fromkeys(works, 64))
    assert plan.resources == {"short": 70.0, "b": 70.0, "c": 70.0}
    reallocate = planner.reallocation(plan, restart_cost_s=0.0)
    launches = {launch.task: launch for launch in plan.launches}
    moves = reallocate("short", [Training(t, launches[t], 0, 600, 1.0) for t in ("b", "c")])
    outcomes, pids = {}, {}
    with WorkerPool(jobs.Init(device="cpu"), log_dir=tmp_path) as pool:
        for task, launch in moves.items():  # warm, as an agent's would be by a later round: the hand-over
            pool.prestart(standby_key(task), launch, works[task].prepare)  # then happens on any machine load
        run_round(
            plan.launches,
            works,
            pool,
            lambda o: outcomes.__setitem__(o.task, o),
            on_started=lambda task, lease: pids.__setitem__(task, lease.worker),
            reallocate=reallocate,
        )
        moved = [t for t in ("b", "c") if outcomes[t].handovers]
        assert moved, "no task was handed over"
        for task in moved:
            assert pool.launch_of(task).percent == 100.0
            assert pool.launch_of(task).env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
            assert not pids[task].alive  # the paused worker ended
            assert not Path(works[task].train.handover_path).exists()
    for task in ("short", "b", "c"):
        assert outcomes[task].failure is None, outcomes[task].failure
    assert outcomes["short"].handovers == 0 and outcomes["short"].co_run_images_per_s is None
    for task in ("b", "c"):
        trained = outcomes[task].trained
        assert trained.steps == 600 and trained.metrics["resumed"] == float(task in moved)
        assert outcomes[task].co_run_images_per_s > 0  # its pace while `short` still trained
    reference = TaskRuntime(FAST_MODEL, data, device="cpu").train(works["b"].train.assignment, base, seed=3)
    for task in ("b", "c"):
        delta = decode_state((tmp_path / f"{task}.update").read_bytes())
        for name, expected in reference.delta.items():
            np.testing.assert_array_equal(delta[name], expected, err_msg=f"{task}: {name}")
