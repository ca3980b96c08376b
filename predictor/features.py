"""Static workload features of a task's model (f_i, m_i of the paper's Eq. 3-4), measured once per model spec.

A process that already knows some (a predictor's model card lists those of the workloads it was fitted on) says
so with `remember`, and `extract` then takes them as they are: no torch import, no FLOP counting (seconds on a
CPU core) before a round's first plan.

FLOPs come from torch's FlopCounterMode over one training step (forward + backward) of a batch of two images,
run on the meta device: shapes only, no arithmetic, so it is fast and independent of CPU load (and attention
is decomposed into countable matmuls rather than a fused CPU kernel the counter does not know). torch's
weight-gradient formula for grouped convolutions ignores `groups` (it counts a depthwise convolution's weight
gradient as a dense one), so that one formula is replaced here by the per-group count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from common.models import build_model
from protocol.schemas import ModelSpec

FEATURE_NAMES = ("log10_flops_per_sample", "log10_param_bytes", "log10_activation_bytes_per_sample")
_BATCH = 2  # BatchNorm needs more than one value per channel in training mode


@dataclass(frozen=True)
class TaskFeatures:
    """Per-image training cost of one model at one input size."""

    model: str
    input_size: int
    num_classes: int
    flops_per_sample: float  # forward + backward FLOPs (2 per multiply-add) of one image
    param_bytes: int
    activation_bytes_per_sample: int  # bytes of every leaf module's forward outputs, per image


#: (name, input_size, num_classes) -> the features known in this process, extracted or remembered
_known: dict[tuple[str, int, int], TaskFeatures] = {}


def extract(spec: ModelSpec) -> TaskFeatures:
    """Features of `spec`, computed once per (name, input_size, num_classes) in this process unless remembered."""
    key = (spec.name, spec.input_size, spec.num_classes)
    if key not in _known:
        _known[key] = _compute(*key)
    return _known[key]


def remember(features: Iterable[TaskFeatures]) -> None:
    """Take `features` as known in this process (what `extract` would compute for their specs)."""
    _known.update(((f.model, f.input_size, f.num_classes), f) for f in features)


def features_as_array(features: TaskFeatures) -> np.ndarray:
    """The predictor's per-task input vector, in FEATURE_NAMES order (float32)."""
    values = (features.flops_per_sample, features.param_bytes, features.activation_bytes_per_sample)
    return np.log10(np.array(values, dtype=np.float64)).astype(np.float32)


def _compute(name: str, input_size: int, num_classes: int) -> TaskFeatures:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    spec = ModelSpec(name=name, num_classes=num_classes, input_size=input_size)
    model = build_model(spec, seed=0).to("meta").train()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    activation_bytes = 0

    def count_outputs(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal activation_bytes
        activation_bytes += sum(t.numel() * t.element_size() for t in _tensors(output))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count_outputs) for m in leaves]
    images = torch.zeros(_BATCH, 3, input_size, input_size, device="meta")
    labels = torch.zeros(_BATCH, dtype=torch.long, device="meta")
    try:
        counter = FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}
        )
        with counter:
            torch.nn.functional.cross_entropy(model(images), labels).backward()
    finally:
        for handle in handles:
            handle.remove()
    return TaskFeatures(
        model=name,
        input_size=input_size,
        num_classes=num_classes,
        flops_per_sample=counter.get_total_flops() / _BATCH,
        param_bytes=param_bytes,
        activation_bytes_per_sample=activation_bytes // _BATCH,
    )


def _tensors(value: object) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    groups,
    output_mask,
    out_shape,
) -> int:
    """torch's convolution_backward formula with the weight-gradient term counted per group."""
    from torch.utils.flop_counter import conv_flop_count

    def swap(shape) -> list[int]:
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input: a (transposed) convolution of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: a convolution of input and grad_out with batch and channels swapped
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(swap(a), swap(b), swap(out_shape[1]), transposed=False) // groups
    return flops
