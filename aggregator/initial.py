"""Initial global weights of a task: a safetensors file (no torch needed), or the torchvision model built with a
fixed seed where torch is installed."""

from __future__ import annotations

import importlib.util

import numpy as np

from aggregator.checkpoints import load_safetensors
from aggregator.config import TaskConfig
from common.config import ConfigError
from protocol.tensors import check_finite

MODELS_EXTRA = "pip install 'fedmt-edge[models]'"


def initial_state(task: str, config: TaskConfig) -> dict[str, np.ndarray]:
    """The task's version-0 weights; a missing or unreadable file, or a model this install cannot build, is a
    ConfigError naming the key and what to do."""
    if config.init_weights:
        try:
            state = load_safetensors(config.init_weights)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tasks.{task}.init_weights: {exc}") from None
    else:
        problem = build_problem(task, config)
        if problem:
            raise ConfigError(problem)
        from common.models import build_model, state_to_numpy

        state = state_to_numpy(build_model(config.model, seed=config.init_seed))
    check_finite(state, f"initial weights of {task}")
    return state


def torch_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


def build_problem(task: str, config: TaskConfig) -> str | None:
    """Why this install cannot make the task's initial weights (no file, and no torch to build the model)."""
    if config.init_weights or torch_installed():
        return None
    model = config.model
    return (
        f"task {task}: building {model.name} needs torch, which this install lacks; set "
        f'tasks.{task}.init_weights = "FILE.safetensors", made where torch is installed with '
        f"`fedmt-aggregator init-weights --model {model.name} --num-classes {model.num_classes} "
        f"--input-size {model.input_size} --seed {config.init_seed} --out FILE.safetensors`, "
        f"or {MODELS_EXTRA} here"
    )
