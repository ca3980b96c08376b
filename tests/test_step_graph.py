"""agent.step_graph: training steps replayed from CUDA graphs compute what the eager steps do; steps that cannot
be captured run eagerly. The GPU tests run where torch sees a GPU (the device machine); on the CPU the option
must change nothing."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from agent.data import SyntheticData
from agent.step_graph import WARMUP_STEPS, GraphedStep
from agent.training import TaskRuntime, TrainStep, make_optimizer
from common.models import build_model, state_to_numpy
from protocol.schemas import OptimizerSpec, TaskAssignment
from tests.test_batching import MODEL, assignment

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def task(optimizer: str = "adam", epochs: int = 5, batch: int = 16) -> TaskAssignment:
    lr = 1e-3 if optimizer == "adam" else 0.05
    return assignment(batch, optimizer, lr, local_epochs=epochs, lr_scaling="linear")


def deltas(device: str, graphs: bool, assigned: TaskAssignment, samples: int = 70) -> dict[str, np.ndarray]:
    """A round's delta; a task at batch 32 trains as one configured at 16 (twice the rate, after a warm-up)."""
    base = state_to_numpy(build_model(MODEL, seed=0))
    runtime = TaskRuntime(MODEL, SyntheticData(samples=samples), device=device, cuda_graphs=graphs)
    return runtime.train(assigned, base, seed=1, reference_batch=16).delta


def test_on_the_cpu_a_runtime_asked_for_graphs_trains_exactly_as_without() -> None:
    one_epoch = task(epochs=1)
    runtime = TaskRuntime(MODEL, SyntheticData(samples=32), device="cpu", cuda_graphs=True)
    assert not runtime.cuda_graphs
    with_option, without = deltas("cpu", True, one_epoch, 32), deltas("cpu", False, one_epoch, 32)
    assert all(np.array_equal(with_option[n], without[n]) for n in without)


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's default backward kernels accumulate with atomics: two eager rounds differ, and Adam, which moves a
    weight by ~lr whatever its gradient's size, turns those differences into deltas as large as the deltas
    themselves (the likely reading of this test's first GPU run, which compared default kernels and failed on
    both optimisers). Deterministic kernels make the rounds comparable."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@GPU
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("batch", [16, 32])
def test_a_graphed_round_computes_what_the_eager_round_does(
    optimizer, batch, deterministic_cudnn, monkeypatch
):
    # 70 samples: at batch 16 four full batches and one of 6 per epoch, so both shapes get captured in 5 epochs;
    # at batch 32 the rate is doubled between a warm-up and a cool-down of 2 of the round's 15 steps each,
    # captured and replayed too.
    # The eager rounds run the same capturable optimiser with every step eager (the round's only difference).
    assigned = task(optimizer, batch=batch)
    graphed = deltas("cuda", True, assigned)
    monkeypatch.setattr(GraphedStep, "__call__", lambda self, images, labels: self.step(images, labels))
    eager, repeated = deltas("cuda", True, assigned), deltas("cuda", True, assigned)
    assert all(np.array_equal(repeated[n], eager[n]) for n in eager)  # the comparison below means something
    assert all(np.array_equal(graphed[n], eager[n]) for n in eager)
    assert any(np.abs(v).max() > 0 for v in eager.values())


@GPU
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_every_replayed_step_leaves_the_weights_the_eager_step_leaves(optimizer, deterministic_cudnn) -> None:
    eager, graphed = (cuda_step(task(optimizer).optimizer, graphs) for graphs in (False, True))
    for images, labels in [batch(size) for size in (16, 16, 16, 16, 6)] * 5:  # both shapes captured, replayed
        eager(images, labels)
        graphed(images, labels)
        for name, value in eager.model.state_dict().items():
            assert torch.equal(graphed.model.state_dict()[name], value), name
    assert len(graphed.graphed.graphs) == 2


def cuda_step(spec: OptimizerSpec | None = None, graphs: bool = True, **options) -> TrainStep:
    """A step with a capturable optimiser (default: the task's Adam), replayed from CUDA graphs or not."""
    model = build_model(MODEL, seed=0).cuda().train()
    optimizer = make_optimizer(spec or task().optimizer, model.parameters(), capturable=True)
    return TrainStep(model, optimizer, "fp32", "cuda", cuda_graphs=graphs, **options)


def batch(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    return images.cuda(), torch.randint(0, 10, (size,), generator=generator).cuda()


@GPU
def test_each_batch_shape_is_captured_after_its_warm_up_and_replays_train() -> None:
    step = cuda_step()
    full = (torch.Size([16, 3, 16, 16]), torch.Size([16]))
    for _ in range(WARMUP_STEPS):
        step(*batch())
    assert step.graphed.graphs == {}
    step(*batch())  # captured, then replayed for this batch
    assert list(step.graphed.graphs) == [full]
    weight = step.model.conv1.weight.detach().clone()
    step(*batch())
    assert not torch.equal(weight, step.model.conv1.weight)  # a replay is an optimiser step
    for _ in range(WARMUP_STEPS):
        step(*batch(6))  # an epoch's last, partial batch: a shape of its own
    assert list(step.graphed.graphs) == [full]
    loss, logits = step(*batch(6))
    assert len(step.graphed.graphs) == 2 and logits.shape == (6, 10) and torch.isfinite(loss)


@GPU
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_steps_under_a_warm_up_are_replayed_at_each_steps_rate(optimizer, deterministic_cudnn) -> None:
    rates = [1e-4 * min(i + 1, 8) for i in range(WARMUP_STEPS + 8)]
    eager, graphed = (
        cuda_step(task(optimizer).optimizer, graphs, lr_at=rates.__getitem__) for graphs in (False, True)
    )
    for images, labels in [batch() for _ in rates]:
        eager(images, labels)
        graphed(images, labels)
        for name, value in eager.model.state_dict().items():
            assert torch.equal(graphed.model.state_dict()[name], value), name
    assert len(graphed.graphed.graphs) == 1  # captured inside the warm-up, replayed at the later rates
    assert graphed.optimizer.param_groups[0]["lr"].item() == pytest.approx(8e-4)


@GPU
def test_a_graphed_step_whose_rate_changes_needs_its_rate_on_the_device() -> None:
    model = build_model(MODEL, seed=0).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    with pytest.raises(ValueError, match="capturable"):
        TrainStep(model, optimizer, "fp32", "cuda", lr_at=lambda step: 1e-3, cuda_graphs=True)


@GPU
def test_a_step_that_cannot_be_captured_runs_eagerly() -> None:
    eager = cuda_step()

    def synchronising(images, labels):
        loss, logits = eager._step(images, labels)
        loss.item()  # a host synchronisation: not allowed while capturing
        return loss, logits

    graphed = GraphedStep(synchronising)
    for _ in range(WARMUP_STEPS + 2):
        loss, _ = graphed(*batch())
    assert graphed.failed and graphed.graphs == {} and torch.isfinite(loss)


@GPU
def test_a_capture_survives_a_collection_that_frees_an_older_graph() -> None:
    # A finished round's step and its graphs are garbage in a reference cycle (step -> GraphedStep -> bound method
    # -> step) until the cyclic collector runs, which it may at any allocation, a capture's too: here the step
    # collects while it is being captured.
    finished = cuda_step()
    for _ in range(WARMUP_STEPS + 1):
        finished(*batch())
    assert finished.graphed.graphs
    eager = cuda_step()

    def collecting(images, labels):
        if torch.cuda.is_current_stream_capturing():
            gc.collect()
        return eager._step(images, labels)

    gc.disable()  # `finished` stays uncollected until then
    try:
        del finished
        graphed = GraphedStep(collecting)
        for _ in range(WARMUP_STEPS + 2):
            loss, _ = graphed(*batch())
    finally:
        gc.enable()
    assert not graphed.failed and len(graphed.graphs) == 1 and torch.isfinite(loss)


@GPU
def test_fp16_loss_scaling_is_never_captured() -> None:
    model = build_model(MODEL, seed=0).cuda()
    optimizer = make_optimizer(OptimizerSpec(name="adam"), model.parameters(), capturable=True)
    assert TrainStep(model, optimizer, "fp16", "cuda", cuda_graphs=True).graphed is None
    assert TrainStep(model, optimizer, "bf16", "cuda", cuda_graphs=True).graphed is not None
