"""Pre (FedMT Eq. 4): one multi-input multi-output regressor (f_i, m_i, B_i, R_i) for all tasks -> (P_1..P_n).

Two networks, both permutation-equivariant over up to MAX_TASKS slots (unused slots are masked, so task order
never matters and 1..MAX_TASKS tasks share one network), inputs standardised inside the network (the exported
ONNX file is self-contained):
- `deepsets`: each slot is embedded by phi, the embeddings of the *other* tasks are summed, and rho maps [own
  embedding, others' sum, own inputs] to log-throughput. Flexible: it fits rich profiling data best.
- `factored`: log P_i = a(x_i) - s(x_i) * sum_{j != i} d(x_j), with s, d >= 0: a task alone is a(x_i), and each
  co-runner only slows it down, by its own demand d times the task's sensitivity s. Fewer degrees of freedom: it
  carries what a short calibration measured alone and in a few co-locations over to combinations it never saw.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from predictor.encoding import MAX_TASKS, N_INPUTS


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class _Network(nn.Module):
    """Standardised inputs in, images/s per slot out; subclasses give the log-throughput and say what they are."""

    kind: str

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(N_INPUTS))
        self.register_buffer("std", torch.ones(N_INPUTS))

    def standardised(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask.unsqueeze(-1) > 0
        return torch.where(valid, (x - self.mean) / self.std, 0.0)  # where, not *: 0 * inf would leak NaN

    def log_throughput(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Natural log of images/s per slot, (N, MAX_TASKS); masked slots are 0."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images/s per slot (0 in masked slots): the exported graph."""
        return torch.where(mask > 0, torch.exp(self.log_throughput(x, mask)), 0.0)


class DeepSets(_Network):
    """DeepSets with a context term (the `deepsets` network)."""

    kind = "ensemble of DeepSets regressors (phi, rho MLPs, sum of the other tasks' embeddings), mean of log-throughput"

    def __init__(self, hidden: int = 32) -> None:
        super().__init__(hidden)
        self.phi = _mlp([N_INPUTS, hidden, hidden])
        self.rho = _mlp([2 * hidden + N_INPUTS, hidden, hidden, 1])

    def log_throughput(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.standardised(x, mask)
        h = torch.where(mask.unsqueeze(-1) > 0, self.phi(z), 0.0)
        others = h.sum(dim=1, keepdim=True) - h
        return torch.where(mask > 0, self.rho(torch.cat([h, others, z], dim=-1)).squeeze(-1), 0.0)


class Factored(_Network):
    """A task's throughput alone, slowed by each co-runner's demand times its sensitivity (the `factored` network)."""

    kind = (
        "ensemble of factored regressors (log-throughput alone minus the task's sensitivity times the sum of the "
        "other tasks' demands), mean of log-throughput"
    )

    def __init__(self, hidden: int = 32) -> None:
        super().__init__(hidden)
        self.alone = _mlp([N_INPUTS, hidden, hidden, 1])
        self.sensitivity = _mlp([N_INPUTS, hidden, 1])
        self.demand = _mlp([N_INPUTS, hidden, 1])

    def log_throughput(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.standardised(x, mask)
        demand = nn.functional.softplus(self.demand(z).squeeze(-1)) * mask
        others = demand.sum(dim=1, keepdim=True) - demand
        slowdown = nn.functional.softplus(self.sensitivity(z).squeeze(-1)) * others
        return torch.where(mask > 0, self.alone(z).squeeze(-1) - slowdown, 0.0)


NETWORKS: dict[str, type[_Network]] = {"deepsets": DeepSets, "factored": Factored}


class Ensemble(nn.Module):
    """Members trained from different seeds, averaged in log space: lower variance on small profiling sets."""

    def __init__(self, members: Sequence[_Network]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def log_throughput(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.log_throughput(x, mask) for m in self.members]).mean(dim=0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask > 0, torch.exp(self.log_throughput(x, mask)), 0.0)


def ensemble(hidden: int, members: int, network: str = "deepsets") -> Ensemble:
    return Ensemble([NETWORKS[network](hidden) for _ in range(members)])


HIDDEN, MEMBERS = 32, 5
EPOCHS = 8000  # chosen with bench.predictor_tuning (validation split of the H200 training data)


def train(
    x: np.ndarray,
    mask: np.ndarray,
    throughput: np.ndarray,
    *,
    hidden: int = HIDDEN,
    members: int = MEMBERS,
    epochs: int = EPOCHS,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    network: str = "deepsets",
) -> Ensemble:
    """Fit `members` networks of one kind (NETWORKS; seeds seed, seed+1, ...) on log-throughput (so the loss weighs
    relative errors), full batch, AdamW with cosine decay, and return their ensemble.

    The members train as one batched computation (torch.func.vmap over their stacked parameters). Each member's
    loss depends on its own parameters only, and AdamW updates every element on its own, so this fits each
    member exactly as alone, in a fraction of the time: the networks are small, and a step is mostly overhead.
    """
    valid = mask.astype(bool)
    nets = [_initial(network, hidden, x[valid], seed + i) for i in range(members)]
    params, buffers = torch.func.stack_module_state(nets)  # leaves with a leading member axis
    skeleton = _LogThroughput(copy.deepcopy(nets[0]).to("meta"))  # the layout; calls take the stacked values
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    target = torch.from_numpy(np.where(valid, np.log(np.maximum(throughput, 1e-3)), 0.0).astype(np.float32))

    def member_log_throughput(p: dict, b: dict) -> torch.Tensor:
        return torch.func.functional_call(skeleton, {f"net.{k}": v for k, v in (p | b).items()}, (xt, mt))

    every_member = torch.func.vmap(member_log_throughput)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    count = mt.sum()
    for _ in range(epochs):
        optimizer.zero_grad()
        member_losses = ((every_member(params, buffers) - target) ** 2 * mt).sum(dim=(1, 2)) / count
        member_losses.sum().backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        for i, net in enumerate(nets):
            for name, value in net.named_parameters():
                value.copy_(params[name][i])
    return Ensemble(nets).eval()


def _initial(network: str, hidden: int, inputs: np.ndarray, seed: int) -> _Network:
    """A new network initialised from `seed`, standardising `inputs` (the valid slots' rows)."""
    torch.manual_seed(seed)
    net = NETWORKS[network](hidden)
    net.mean.copy_(torch.from_numpy(inputs.mean(0)))
    net.std.copy_(torch.from_numpy(inputs.std(0) + 1e-6))
    return net


class _LogThroughput(nn.Module):
    """A network's log-throughput as its forward: what `torch.func.functional_call` runs."""

    def __init__(self, net: _Network) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net.log_throughput(x, mask)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x), torch.from_numpy(mask)).numpy()


def export_onnx(model: nn.Module, path: str) -> None:
    """ONNX with a dynamic batch axis: a whole plan search is one inference call."""
    x = torch.zeros(2, MAX_TASKS, N_INPUTS)
    mask = torch.ones(2, MAX_TASKS)
    torch.onnx.export(
        model.eval(),
        (x, mask),
        path,
        input_names=["features", "mask"],
        output_names=["throughput"],
        dynamic_axes={"features": {0: "n"}, "mask": {0: "n"}, "throughput": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
