"""agent.training: the task runtime's deltas, progress, cancellation, divergence, precision, measurement windows,
evaluation."""

from __future__ import annotations

import math
from contextlib import closing
from itertools import islice

import msgspec
import numpy as np
import pytest
import torch

from agent.data import DataSpec, DigitsData, SyntheticData
from agent.data.digits import digits_test_set
from agent.training import TaskRuntime, TrainingDiverged, TrainingStopped, TrainResult, TrainStep, evaluate
from common.models import build_model, state_to_numpy
from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment

MODEL = ModelSpec(name="resnet18", num_classes=10, input_size=16)


def assignment(epochs: int = 1, batch_size: int = 16, **optimizer) -> TaskAssignment:
    return TaskAssignment(
        task="digits",
        model=MODEL,
        optimizer=OptimizerSpec(**({"name": "adam", "lr": 1e-3} | optimizer)),
        base_version=0,
        base_sha256="0" * 64,
        local_epochs=epochs,
        batch_size=batch_size,
    )


def train_task(
    assignment: TaskAssignment, data: DataSpec, base: dict[str, np.ndarray], *, seed: int = 0, **kwargs
) -> TrainResult:
    """One round on a freshly prepared runtime."""
    runtime = TaskRuntime(assignment.model, data, device="cpu", precision=assignment.precision)
    return runtime.train(assignment, base, seed=seed, **kwargs)


def apply(base: dict[str, np.ndarray], result: TrainResult) -> dict[str, np.ndarray]:
    return {name: base[name] + result.delta[name] for name in base}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in a task process: OpenMP threads spinning on a busy 2-core host crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    return state_to_numpy(build_model(MODEL, seed=0))


@pytest.fixture(scope="module")
def trained(base) -> tuple[TrainResult, dict[str, np.ndarray]]:
    """Two epochs on a third of the digits training split."""
    result = train_task(assignment(epochs=2), DigitsData(num_partitions=3), base, seed=1)
    return result, apply(base, result)


def test_delta_matches_the_base_layout(base) -> None:
    steps: list[tuple[int, int]] = []
    result = train_task(
        assignment(epochs=2), SyntheticData(samples=40), base, progress=lambda *s: steps.append(s)
    )
    assert list(result.delta) == list(base)
    for name, array in base.items():
        assert result.delta[name].dtype == array.dtype and result.delta[name].shape == array.shape, name
    assert np.abs(result.delta["conv1.weight"]).max() > 0
    assert result.samples == 40 and result.stats.steps == 6  # 3 batches (16, 16, 8) per epoch
    assert steps == [(i, 6) for i in range(1, 7)]
    assert result.delta["bn1.num_batches_tracked"] == 6
    assert result.stats.images == 80  # two epochs of 40
    assert result.stats.ended_at - result.stats.started_at == pytest.approx(result.stats.seconds)


def test_same_seed_gives_the_same_delta(base) -> None:
    a, b = (train_task(assignment(), SyntheticData(samples=20), base, seed=7) for _ in range(2))
    assert all(np.array_equal(a.delta[name], b.delta[name]) for name in base)


def test_single_sample_tail_joins_the_previous_batch(base) -> None:
    # resnet18 at 16x16 has 1x1 feature maps: BatchNorm cannot train on a batch of one
    result = train_task(assignment(batch_size=16), SyntheticData(samples=17), base)
    assert result.stats.steps == 1 and result.samples == 17


@pytest.mark.slow
def test_training_reduces_loss_and_beats_chance(trained) -> None:
    result, state = trained
    assert result.samples == DigitsData(num_partitions=3).sample_count()
    assert result.stats.train_loss < 0.5 * math.log(10)  # an untrained 10-way classifier sits near ln 10
    assert result.stats.train_accuracy > 0.5
    assert evaluate(MODEL, state, digits_test_set(MODEL)) > 0.3


def test_untrained_model_is_near_chance(base) -> None:
    assert 0.0 <= evaluate(MODEL, base, digits_test_set(MODEL)) < 0.3


def test_should_stop_cancels_training(base) -> None:
    calls = iter([False, False, True])
    steps: list[int] = []
    with pytest.raises(TrainingStopped):
        train_task(
            assignment(),
            SyntheticData(samples=64),
            base,
            should_stop=lambda: next(calls),
            progress=lambda step, total: steps.append(step),
        )
    assert steps == [1, 2]


def test_non_finite_base_weight_diverges(base) -> None:
    poisoned = dict(base)
    poisoned["fc.weight"] = base["fc.weight"].copy()
    poisoned["fc.weight"][0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train_task(assignment(), SyntheticData(samples=32), poisoned)


def test_non_finite_buffer_never_becomes_a_delta(base) -> None:
    poisoned = dict(base)
    poisoned["bn1.running_mean"] = np.full_like(base["bn1.running_mean"], np.nan)  # the loss stays finite
    with pytest.raises(TrainingDiverged, match="bn1.running_mean"):
        train_task(assignment(), SyntheticData(samples=32), poisoned)


def test_evaluate_rejects_an_empty_dataset(base) -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate(MODEL, base, [])


def test_local_steps_replace_epochs_and_may_end_mid_epoch():
    model = ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=16)
    base = state_to_numpy(build_model(model, seed=0))
    assignment = TaskAssignment(
        task="t",
        model=model,
        optimizer=OptimizerSpec(),
        base_version=0,
        base_sha256="0" * 64,
        batch_size=8,
        local_epochs=5,
        local_steps=7,
    )
    steps = []
    result = train_task(
        assignment, SyntheticData(samples=40), base, progress=lambda step, total: steps.append((step, total))
    )
    assert result.stats.steps == 7 and steps[-1] == (7, 7)  # 5 batches per epoch: one epoch and two steps
    assert result.stats.images == 56 and result.samples == 40


def test_a_runtime_trains_round_after_round_on_the_data_it_prepared_once(base) -> None:
    runtime = TaskRuntime(MODEL, SyntheticData(samples=24), device="cpu")
    data = runtime.data
    first = runtime.train(assignment(), base, seed=3)
    second = runtime.train(assignment(), base, seed=3)
    assert runtime.data is data  # nothing reloaded
    assert all(
        np.array_equal(first.delta[n], second.delta[n]) for n in base
    )  # each round starts from its base
    with pytest.raises(ValueError, match="another model"):
        runtime.train(msgspec.structs.replace(assignment(), precision="bf16"), base, seed=3)


@pytest.mark.parametrize(("precision", "input_size"), [("bf16", 64), ("fp16", 16)])
def test_reduced_precision_trains_fp32_weights(precision, input_size) -> None:
    # reduced precision is slow on a CPU: a few small steps (fp16 skips some while it finds its loss scale). At
    # 16 px ResNet18's last stage sees 1x1 maps, where one CI machine's bf16 CPU kernels gave non-finite weight
    # gradients; at 64 px every map is at least 2x2 (and bf16 is cheap there). fp16 has no such trouble, and is slow.
    model = msgspec.structs.replace(MODEL, input_size=input_size)
    base = state_to_numpy(build_model(model, seed=0))
    task = msgspec.structs.replace(assignment(batch_size=4), model=model, precision=precision, local_steps=12)
    result = train_task(task, SyntheticData(samples=48), base)
    assert all(result.delta[n].dtype == base[n].dtype for n in base)
    assert all(np.isfinite(result.delta[n]).all() for n in base if base[n].dtype.kind == "f")
    assert np.abs(result.delta["conv1.weight"]).max() > 0 and math.isfinite(result.stats.train_loss)


def test_fp16_keeps_its_loss_scale_across_rounds_and_bf16_scales_nothing(base) -> None:
    runtimes = {
        p: TaskRuntime(MODEL, SyntheticData(samples=64), device="cpu", precision=p) for p in ("fp16", "bf16")
    }
    assert runtimes["fp16"].scaler.is_enabled() and not runtimes["bf16"].scaler.is_enabled()
    fp16 = msgspec.structs.replace(assignment(), precision="fp16")
    runtimes["fp16"].train(fp16, base, seed=0)
    scale = runtimes["fp16"].scaler.get_scale()
    assert scale < 2.0**16  # overflowing first steps lowered it
    second = runtimes["fp16"].train(fp16, base, seed=0)
    assert runtimes["fp16"].scaler.get_scale() <= scale and np.abs(second.delta["conv1.weight"]).max() > 0


def test_a_measurement_window_runs_whole_batches_after_its_warm_up() -> None:
    runtime = TaskRuntime(MODEL, SyntheticData(samples=40), device="cpu")
    calls = []
    stats = runtime.measure(16, images=40, warmup_steps=2, before_window=lambda: calls.append("go"))
    assert calls == ["go"] and stats.images == 40 and stats.steps == 3 and stats.seconds > 0  # 16, 16, 8
    timed = runtime.measure(8, seconds=0.2, warmup_steps=0)
    assert timed.seconds >= 0.2 and timed.images == 8 * timed.steps
    with pytest.raises(ValueError, match="exactly one"):
        runtime.measure(8, warmup_steps=0)


def plain_training(mu: float, steps: int = 6) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A small net trained by a hand-written loop (SGD with momentum) whose loss carries the lecture's proximal
    term mu/2 * ||w - w_start||^2, and the same net trained by TrainStep with `proximal_mu=mu`."""
    torch.manual_seed(0)
    images, labels = torch.randn(steps, 8, 3, 6, 6), torch.randint(0, 4, (steps, 8))
    nets = []
    for by_hand in (True, False):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 4))
        start = [p.detach().clone() for p in net.parameters()]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        step = TrainStep(net, optimizer, "fp32", "cpu", proximal_mu=mu)
        assert (step.proximal is None) == (mu == 0)
        for x, y in zip(images, labels):
            if by_hand:
                loss = torch.nn.functional.cross_entropy(net(x), y)
                loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(net.parameters(), start))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            else:
                step(x, y)
        nets.append({name: value.detach() for name, value in net.state_dict().items()})
    return nets[0], nets[1]


def test_mu_zero_is_exactly_the_plain_training_step() -> None:
    by_hand, stepped = plain_training(0.0)
    assert all(torch.equal(by_hand[name], stepped[name]) for name in by_hand)


def test_the_proximal_gradient_equals_the_proximal_term_on_the_loss() -> None:
    by_hand, stepped = plain_training(0.5)
    for name in by_hand:
        torch.testing.assert_close(stepped[name], by_hand[name], rtol=1e-5, atol=1e-6)
    unregularised, _ = plain_training(0.0)
    assert not torch.allclose(unregularised["2.weight"], stepped["2.weight"], atol=1e-4)


def parameter_distance(delta: dict[str, np.ndarray]) -> float:
    """L2 norm of the delta of the model's parameters (the weights the proximal term is about)."""
    names = {name for name, _ in build_model(MODEL).named_parameters()}
    return float(np.sqrt(sum(np.sum(np.square(delta[n], dtype=np.float64)) for n in names)))


def test_fedprox_keeps_the_local_model_closer_to_the_global_one(base) -> None:
    def drift(mu: float) -> float:
        task = msgspec.structs.replace(
            assignment(batch_size=8, name="sgd", lr=0.05), local_steps=10, proximal_mu=mu
        )
        return parameter_distance(train_task(task, SyntheticData(samples=80), base, seed=4).delta)

    free, held = drift(0.0), drift(2.0)
    assert held < 0.8 * free, (held, free)


def test_the_proximal_term_is_added_unscaled_under_fp16_loss_scaling() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)  # the gradients stay finite at this scale
    step = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.0), "fp16", "cpu", scaler, proximal_mu=3.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # one away from where the term was made
    step(x, y)
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    for with_term, without in zip(plain, (p.grad for p in net.parameters())):
        torch.testing.assert_close(with_term, without + 3.0, rtol=1e-3, atol=1e-3)  # + mu * (w - w_start)


def test_restated_statistics_are_those_of_the_sent_weights_on_the_tasks_data(base) -> None:
    runtime = TaskRuntime(MODEL, SyntheticData(samples=256), device="cpu")
    sent = {name: np.zeros_like(array) for name, array in base.items()}
    sent["conv1.weight"] = np.full_like(base["conv1.weight"], 0.01)  # the payload moves the first convolution
    restated = runtime.restated_statistics(
        base, sent, batch_size=16, seed=5, images=3 * 64
    )  # 3 batches of 64
    assert set(restated) == {n for n in base if n.endswith((".running_mean", ".running_var"))}
    with closing(runtime.data.epoch(64, seed=5)) as epoch:
        images = torch.cat([batch for batch, _ in islice(epoch, 3)])
    weight = torch.from_numpy(base["conv1.weight"] + sent["conv1.weight"])
    first = torch.nn.functional.conv2d(images, weight, stride=2, padding=3)  # ResNet18's conv1, before bn1
    np.testing.assert_allclose(
        base["bn1.running_mean"] + restated["bn1.running_mean"],
        first.mean(dim=(0, 2, 3)).numpy(),
        rtol=1e-4,
        atol=1e-6,
    )
    trained = train_task(
        msgspec.structs.replace(assignment(), local_steps=3), SyntheticData(samples=64), base
    )
    assert not np.allclose(restated["bn1.running_mean"], trained.delta["bn1.running_mean"])


def test_a_model_without_batch_norm_has_no_statistics_to_restate() -> None:
    model = ModelSpec(name="squeezenet1_1", num_classes=10, input_size=64)
    base = state_to_numpy(build_model(model, seed=0))
    runtime = TaskRuntime(model, SyntheticData(samples=8), device="cpu")
    assert runtime.restated_statistics(base, base, batch_size=4, seed=0) == {}
