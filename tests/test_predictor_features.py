"""predictor.features and predictor.workload: FLOP/parameter/activation features and the Eq. 3 fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.models import build_model
from predictor.features import FEATURE_NAMES, TaskFeatures, _compute, extract, features_as_array, remember
from predictor.workload import WorkloadModel, fit_workload
from protocol.schemas import ModelSpec


def spec(name: str, input_size: int = 32, num_classes: int = 10) -> ModelSpec:
    return ModelSpec(name=name, num_classes=num_classes, input_size=input_size)


def forward_flops_per_image(model_spec: ModelSpec) -> float:
    model = build_model(model_spec, seed=0).to("meta").train()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, model_spec.input_size, model_spec.input_size, device="meta"))
    return counter.get_total_flops() / 2


def test_bigger_models_cost_more() -> None:
    small, r18, r50 = (
        extract(spec("mobilenet_v3_small")),
        extract(spec("resnet18")),
        extract(spec("resnet50")),
    )
    assert small.flops_per_sample < r18.flops_per_sample < r50.flops_per_sample
    assert small.param_bytes < r18.param_bytes < r50.param_bytes


def test_resnet18_training_flops_match_the_known_scale() -> None:
    # torchvision: resnet18 at 224x224 is 1.82 GMACs = 3.64 GFLOPs forward; training is about 3x forward
    # (forward, grad of inputs, grad of weights; the first convolution needs no input gradient).
    features = extract(spec("resnet18", input_size=224, num_classes=1000))
    assert features.flops_per_sample == pytest.approx(3 * 3.64e9, rel=0.15)


def test_depthwise_weight_gradients_are_counted_per_group() -> None:
    # torch's own formula counts a depthwise convolution's weight gradient as a dense one (~20x forward here).
    model_spec = spec("mobilenet_v3_small")
    ratio = extract(model_spec).flops_per_sample / forward_flops_per_image(model_spec)
    assert 2.5 < ratio < 3.1


def test_parameter_bytes_are_exact() -> None:
    model = build_model(spec("resnet18"), seed=0)
    assert extract(spec("resnet18")).param_bytes == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    assert extract(spec("resnet18")).param_bytes == 11_181_642 * 4


def test_doubling_the_input_side_quadruples_flops_and_activations() -> None:
    low, high = extract(spec("resnet18", 32)), extract(spec("resnet18", 64))
    assert high.flops_per_sample / low.flops_per_sample == pytest.approx(4, rel=0.05)
    assert high.activation_bytes_per_sample / low.activation_bytes_per_sample == pytest.approx(4, rel=0.05)
    assert high.param_bytes == low.param_bytes


def test_features_are_cached_and_deterministic(monkeypatch) -> None:
    first = extract(spec("resnet18"))
    assert extract(spec("resnet18")) is first
    monkeypatch.setattr("predictor.features._known", {})  # what this process knew, forgotten
    again = extract(spec("resnet18"))
    assert again is not first and again == first
    assert (first.model, first.input_size, first.num_classes) == ("resnet18", 32, 10)


def test_remembered_features_are_taken_as_they_are_and_others_still_computed(monkeypatch) -> None:
    monkeypatch.setattr("predictor.features._known", {})
    known = TaskFeatures("edge_net", 32, 10, 1e9, 4_000_000, 200_000)  # no torchvision model of that name
    remember([known])
    assert extract(spec("edge_net")) is known
    assert extract(spec("resnet18")) == _compute("resnet18", 32, 10)  # not remembered: computed
    with pytest.raises(ValueError):
        extract(spec("edge_net", input_size=64))  # another input size is another workload


def test_features_as_array_is_log10_in_name_order() -> None:
    features = extract(spec("resnet18"))
    vector = features_as_array(features)
    assert vector.shape == (len(FEATURE_NAMES),) == (3,) and vector.dtype == np.float32
    expected = np.log10(
        [features.flops_per_sample, features.param_bytes, features.activation_bytes_per_sample]
    )
    np.testing.assert_allclose(vector, expected, rtol=1e-6)
    np.testing.assert_array_equal(vector, features_as_array(features))


# --- workload (Eq. 3) ------------------------------------------------------------------------------------


def synthetic(flops: float, activations: int) -> TaskFeatures:
    return TaskFeatures("m", 32, 10, flops, 1_000_000, activations)


MODELS = [
    synthetic(2e8, 600_000),
    synthetic(5e8, 2_600_000),
    synthetic(1.3e7, 380_000),
    synthetic(2.6e9, 2.5e6),
]


def measurements(alpha: float, beta: float, gamma0: float, noise: float = 0.0) -> list:
    rng = np.random.default_rng(0)
    samples = []
    for features in MODELS:
        for batch in (8, 16, 32, 64, 128):
            seconds = gamma0 + batch * (
                alpha * features.flops_per_sample + beta * features.activation_bytes_per_sample
            )
            samples.append((features, batch, seconds * (1 + noise * rng.standard_normal())))
    return samples


def test_fit_recovers_known_coefficients() -> None:
    model = fit_workload(measurements(alpha=1e-13, beta=2e-11, gamma0=0.004))
    assert model.alpha == pytest.approx(1e-13, rel=1e-6)
    assert model.beta == pytest.approx(2e-11, rel=1e-6)
    assert model.gamma0 == pytest.approx(0.004, rel=1e-6)
    assert model.gamma1 == 1.0


def test_fit_tolerates_noise_and_keeps_coefficients_non_negative() -> None:
    model = fit_workload(measurements(alpha=1e-13, beta=2e-11, gamma0=0.004, noise=0.02))
    assert model.alpha == pytest.approx(1e-13, rel=0.1)
    assert model.beta == pytest.approx(2e-11, rel=0.25)
    compute_only = fit_workload(measurements(alpha=1e-13, beta=0.0, gamma0=0.0, noise=0.02))
    assert compute_only.beta >= 0 and compute_only.gamma0 >= 0
    assert compute_only.alpha == pytest.approx(1e-13, rel=0.1)


def test_workload_and_step_time() -> None:
    model = WorkloadModel(alpha=1e-13, beta=2e-11, gamma0=0.004)
    features = MODELS[0]
    per_image = 1e-13 * 2e8 + 2e-11 * 600_000
    assert model.workload(features, 32) == pytest.approx(32 * per_image)
    assert model.step_time(features, 32) == pytest.approx(0.004 + 32 * per_image)
    np.testing.assert_allclose(
        model.step_time(features, np.array([1, 2])), 0.004 + np.array([1, 2]) * per_image
    )


def test_fit_rejects_too_few_or_bad_samples() -> None:
    with pytest.raises(ValueError):
        fit_workload(measurements(1e-13, 2e-11, 0.004)[:2])
    with pytest.raises(ValueError):
        fit_workload([(MODELS[0], 0, 0.1), (MODELS[1], 8, 0.1), (MODELS[2], 8, 0.1)])
