"""A paused round on disk, so that another worker process continues it (the hand-over, agent/handover.py).

One safetensors file, no pickle: the model's state, the optimiser's tensors and the random generators' states
are tensors; the loop position, the optimiser's parameter groups and other values, and the loss scaler's state
are JSON in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch

from agent.training import LoopPosition, TrainStep

FORMAT = 1
_META = "fedmt.round"


def save_round(path: Path, step: TrainStep, position: LoopPosition) -> None:
    """Write the training state of `step` paused at `position` to `path`."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": _cpu(v) for k, v in step.model.state_dict().items()}
    optimizer = step.optimizer.state_dict()
    values: dict[str, dict] = {}
    for index, entries in optimizer["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = _cpu(value)
            else:
                values.setdefault(str(index), {})[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    if step.device_type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {
        "format": FORMAT,
        "position": msgspec.to_builtins(position),
        "param_groups": [_plain(group) for group in optimizer["param_groups"]],
        "optimizer_values": values,
        "scaler": step.scaler.state_dict(),
    }
    save_file(tensors, str(path), metadata={_META: json.dumps(meta)})


def load_round(path: Path, step: TrainStep) -> LoopPosition:
    """Restore a paused round from `path` into `step` (its model, optimiser, scaler, step count and the random
    generators); return where its loop stood. Raises ValueError for a file that is not such a checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get(_META)
    if header is None:
        raise ValueError(f"{path} is not a round checkpoint")
    meta = json.loads(header)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')}, this agent reads {FORMAT}")
    tensors = load_file(str(path))
    step.model.load_state_dict(
        {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}, strict=True
    )
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta["optimizer_values"].items():
        state.setdefault(int(index), {}).update(entries)
    live_rates = [group["lr"] for group in step.optimizer.param_groups]
    step.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, live in zip(step.optimizer.param_groups, live_rates):
        if isinstance(live, torch.Tensor):  # a captured step reads its rate from this tensor: keep it, filled
            group["lr"] = live.fill_(group["lr"])
    if meta["scaler"]:
        step.scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and step.device_type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    position = msgspec.convert(meta["position"], LoopPosition)
    step.steps = position.steps
    return position


def _plain(group: dict) -> dict:
    """A parameter group's settings as JSON values (a capturable optimiser's rate is a 1-element tensor)."""
    return {key: value.item() if isinstance(value, torch.Tensor) else value for key, value in group.items()}


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()
