"""torchvision classification models by name, and their state dicts as numpy arrays.

Shared by the agent and the aggregator: torch and torchvision are imported inside the functions, so importing
this module costs nothing on a server that never builds a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from protocol.schemas import ModelSpec

if TYPE_CHECKING:
    import torch


def build_model(spec: ModelSpec, seed: int | None = None) -> torch.nn.Module:
    """A freshly initialised (no pretrained weights) torchvision classifier.

    With `seed`, initialisation is deterministic and the global RNG is left as it was.
    """
    import torch
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if spec.name not in available:
        raise ValueError(f"unknown model {spec.name!r}; available: {', '.join(available)}")
    if seed is None:
        return torchvision.models.get_model(spec.name, weights=None, num_classes=spec.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(spec.name, weights=None, num_classes=spec.num_classes)


def state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A copy of the module's state dict as C-contiguous CPU arrays, in state-dict order (bfloat16 becomes float32)."""
    import torch

    state = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        state[name] = np.array(tensor.numpy(), order="C", copy=True)
    return state


def load_numpy_state(module: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy arrays into the module; names, shapes and dtypes must match `state_to_numpy(module)` exactly."""
    import torch

    own = module.state_dict()
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise ValueError(f"state dict names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tensors = {}
    for name, target in own.items():
        array = np.asarray(state[name])
        want = torch.float32 if target.dtype == torch.bfloat16 else target.dtype
        tensor = torch.tensor(array)  # a copy: arrays may be read-only views into a payload
        if tensor.dtype != want or tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"tensor {name!r} is {array.dtype}{list(array.shape)}, "
                f"expected {str(want).removeprefix('torch.')}{list(target.shape)}"
            )
        tensors[name] = tensor
    module.load_state_dict(tensors, strict=True)
