"""Initial global weights of a task: a safetensors file, or the torchvision model built with a fixed seed."""

from __future__ import annotations

import numpy as np

from aggregator.checkpoints import load_safetensors
from aggregator.config import TaskConfig
from protocol.tensors import check_finite


def initial_state(task: str, config: TaskConfig) -> dict[str, np.ndarray]:
    if config.init_weights:
        state = load_safetensors(config.init_weights)
    else:
        try:
            from common.models import build_model, state_to_numpy

            state = state_to_numpy(build_model(config.model, seed=config.init_seed))
        except ImportError as exc:
            raise RuntimeError(
                f"task {task}: building {config.model.name} needs torch and torchvision ({exc.name} is missing); "
                "install fedmt-edge[models] or set init_weights to a safetensors file"
            ) from None
    check_finite(state, f"initial weights of {task}")
    return state
