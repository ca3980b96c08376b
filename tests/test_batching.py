"""agent.batching: the learning-rate rule when a plan changes a task's batch size, and that it keeps accuracy."""

from __future__ import annotations

import math

import pytest

from agent.batching import (
    ADAM_BETAS,
    ADAM_EPS,
    COOLDOWN_SHARE,
    WARMUP_SHARE,
    adam_moments,
    round_images,
    round_recipe,
    steps_per_epoch,
)
from protocol.schemas import ModelSpec, OptimizerSpec, ProtocolError, TaskAssignment, decode, encode

MODEL = ModelSpec(name="resnet18", num_classes=10, input_size=16)


def assignment(batch: int, optimizer: str = "sgd", lr: float = 0.01, **fields) -> TaskAssignment:
    return TaskAssignment(
        task="t",
        model=MODEL,
        optimizer=OptimizerSpec(name=optimizer, lr=lr),
        base_version=0,
        base_sha256="0" * 64,
        batch_size=batch,
        **fields,
    )


def test_the_configured_batch_trains_as_configured():
    recipe = round_recipe(assignment(16), samples=100)
    assert recipe.steps == steps_per_epoch(100, 16) == 7 and recipe.lr == recipe.base_lr == 0.01
    assert recipe.warmup_steps == 0 and [recipe.lr_at(s) for s in (0, 6)] == [0.01, 0.01]
    assert round_recipe(assignment(64), samples=100, reference_batch=64) == round_recipe(assignment(64), 100)


@pytest.mark.parametrize(
    ("optimizer", "scaling", "factor"),
    [
        ("sgd", "auto", 4.0),
        ("adam", "auto", 1.0),
        ("sgd", "sqrt", 2.0),
        ("adam", "linear", 4.0),
        ("sgd", "none", 1),
    ],
)
def test_a_four_times_larger_batch_scales_the_rate_by_the_rule(optimizer, scaling, factor):
    recipe = round_recipe(assignment(64, optimizer, lr_scaling=scaling), samples=640, reference_batch=16)
    assert recipe.steps == 10  # the configured epoch's images, in a quarter of the steps
    assert recipe.lr == pytest.approx(0.01 * factor) and recipe.base_lr == 0.01


@pytest.mark.parametrize(
    ("optimizer", "scaling", "batch", "scale"),
    [
        ("adam", "sqrt", 64, 4.0),
        ("adam", "sqrt", 8, 0.5),
        ("adam", "auto", 64, 1.0),
        ("adam", "linear", 64, 1.0),
    ]
    + [("sgd", "sqrt", 64, 1.0), ("adam", "sqrt", 16, 1.0)],
)
def test_only_adam_under_the_square_root_rule_shortens_its_horizons_with_the_batch(
    optimizer, scaling, batch, scale
):
    recipe = round_recipe(assignment(batch, optimizer, lr_scaling=scaling), samples=640, reference_batch=16)
    assert recipe.horizon_scale == scale


def test_adam_moments_follow_the_square_root_rule_and_stay_valid():
    assert adam_moments(1.0) == {"betas": ADAM_BETAS, "eps": ADAM_EPS}
    four = adam_moments(4.0)
    assert four["betas"] == pytest.approx((0.6, 0.996)) and four["eps"] == pytest.approx(ADAM_EPS / 2)
    assert adam_moments(20.0)["betas"][0] == 0.0 and 0 < adam_moments(20.0)["betas"][1] < 1


def test_a_rounds_adam_takes_the_recipes_moments():
    """The runtime's round builds Adam with the betas of its recipe: a grown batch under `sqrt` shortens them."""
    import torch

    from agent.data import SyntheticData
    from agent.training import TaskRuntime
    from common.models import build_model, state_to_numpy

    runtime = TaskRuntime(MODEL, SyntheticData(samples=64), device="cpu")
    built = []
    original = torch.optim.Adam.__init__

    def recording(self, params, **options):
        built.append(options)
        original(self, params, **options)

    state = state_to_numpy(build_model(MODEL, seed=0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "__init__", recording)
        runtime.train(
            assignment(32, "adam", local_steps=2, lr_scaling="sqrt"), state, seed=0, reference_batch=16
        )
        runtime.train(
            assignment(16, "adam", local_steps=2, lr_scaling="sqrt"), state, seed=0, reference_batch=16
        )
    assert [b["betas"] for b in built] == [pytest.approx((0.8, 0.998)), ADAM_BETAS]


def test_a_growing_rate_warms_up_linearly_over_the_first_steps():
    recipe = round_recipe(assignment(64), samples=6400, reference_batch=16)
    assert recipe.steps == 100 and recipe.warmup_steps == math.ceil(WARMUP_SHARE * 100) == 10
    rates = [recipe.lr_at(s) for s in range(12)]
    assert rates[0] == pytest.approx(0.01) and rates[5] == pytest.approx(0.025) and rates[10:] == [0.04, 0.04]
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))


def test_a_grown_rate_cools_down_to_the_configured_one_over_the_last_steps():
    recipe = round_recipe(assignment(64), samples=6400, reference_batch=16)
    assert recipe.cooldown_steps == math.ceil(COOLDOWN_SHARE * 100) == 10
    rates = [recipe.lr_at(s) for s in range(88, 100)]
    assert rates[:2] == [0.04, 0.04] and rates[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))  # falling from step 90 to the last


def test_a_one_step_round_with_a_grown_batch_takes_the_configured_rate():
    recipe = round_recipe(assignment(32, local_steps=2), samples=640, reference_batch=16)
    assert recipe.steps == 1 and recipe.lr_at(0) == pytest.approx(0.01)


def test_a_smaller_batch_lowers_the_rate_at_once():
    recipe = round_recipe(assignment(8), samples=640, reference_batch=32)
    assert recipe.lr == pytest.approx(0.0025) and recipe.steps == 80
    assert recipe.warmup_steps == recipe.cooldown_steps == 0


def test_hold_steps_keeps_the_configured_steps_and_rate():
    held = assignment(64, batch_policy="hold_steps")
    recipe = round_recipe(held, samples=640, reference_batch=16)
    assert recipe.steps == 40 and recipe.lr == 0.01 and recipe.warmup_steps == recipe.cooldown_steps == 0
    assert round_images(held, 640, reference_batch=16) == 40 * 64  # four times the images
    assert round_images(assignment(64), 640, reference_batch=16) == 640  # scale_lr: the configured images


def test_local_steps_keep_their_images_under_scale_lr():
    recipe = round_recipe(assignment(64, local_steps=100), samples=10_000, reference_batch=16)
    assert recipe.steps == 25 and recipe.lr == pytest.approx(0.04)
    assert round_images(assignment(64, local_steps=100), 10_000, reference_batch=16) == 1600
    assert round_recipe(assignment(64, local_steps=100, batch_policy="hold_steps"), 10_000, 16).steps == 100


def test_the_rule_travels_in_the_assignment_and_bad_values_are_rejected():
    sent = assignment(32, lr_scaling="sqrt", batch_policy="hold_steps")
    assert decode(encode(sent), TaskAssignment) == sent
    assert assignment(32).lr_scaling == "auto" and assignment(32).batch_policy == "scale_lr"
    bad = encode(sent).replace(b"hold_steps", b"hold_stepz")
    with pytest.raises(ProtocolError, match="batch_policy"):
        decode(bad, TaskAssignment)


def test_the_initial_batch_growth_is_sent_only_when_set_and_bounded():
    assert b"initial_batch_growth" not in encode(assignment(32))  # an older agent reads the default schedule
    grown = assignment(32, initial_batch_growth=4)
    assert decode(encode(grown), TaskAssignment).initial_batch_growth == 4
    for bad in (b"\x00", b"\x41"):  # 0 and 65
        with pytest.raises(ProtocolError, match="initial_batch_growth"):
            decode(
                encode(grown).replace(b"initial_batch_growth\x04", b"initial_batch_growth" + bad),
                TaskAssignment,
            )


def test_the_aggregator_task_config_sets_the_rule():
    import msgspec

    from aggregator.config import TaskConfig

    config = msgspec.convert(
        {"model": msgspec.to_builtins(MODEL), "lr_scaling": "linear", "batch_policy": "hold_steps"},
        TaskConfig,
    )
    assert (config.lr_scaling, config.batch_policy) == ("linear", "hold_steps")
    with pytest.raises(msgspec.ValidationError, match="lr_scaling"):
        msgspec.convert({"model": msgspec.to_builtins(MODEL), "lr_scaling": "cubic"}, TaskConfig)


@pytest.mark.slow
@pytest.mark.parametrize(("model_seed", "partition"), [(0, 0), (1, 1)])
def test_a_four_times_batch_with_linear_scaling_keeps_the_accuracy_the_fixed_rate_loses(
    model_seed, partition
):
    """Three rounds of local SGD (momentum 0.9, lr 0.001 at the configured batch 16) on half the digits, each
    from the previous round's model: at batch 64 the linear rule ends within 4 points of batch 16, and above
    batch 64 at the configured rate over the rounds."""
    import torch

    from agent.data import DigitsData
    from agent.data.digits import digits_test_set
    from agent.training import TaskRuntime, evaluate
    from common.models import build_model, state_to_numpy

    torch.set_num_threads(1)
    data, test = DigitsData(num_partitions=2, partition_index=partition), digits_test_set(MODEL)

    def accuracies(batch: int, scaling: str) -> list[float]:
        torch.manual_seed(0)
        task = assignment(batch, lr=0.001, lr_scaling=scaling)  # SGD, momentum 0.9
        state = state_to_numpy(build_model(MODEL, seed=model_seed))
        runtime = TaskRuntime(MODEL, data, device="cpu")
        result = []
        for round_ in range(3):
            delta = runtime.train(task, state, seed=round_, reference_batch=16).delta
            state = {name: state[name] + delta[name] for name in state}
            result.append(evaluate(MODEL, state, test))
        return result

    configured, fixed, linear = accuracies(16, "none"), accuracies(64, "none"), accuracies(64, "linear")
    assert linear[-1] >= configured[-1] - 0.04, (configured, linear)
    assert sum(linear) - sum(fixed) > 0.1 and linear[-1] > fixed[-1], (fixed, linear)
