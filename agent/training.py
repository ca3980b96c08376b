"""The one training path of a task worker.

`TaskRuntime` holds a task's model and its training data on the worker's device for as long as the worker lives;
`train` (a round: from a global model to a delta) and `measure` (a timed window, for calibration and the
benchmarks) both run `TrainStep` through `run_steps` over that data. There is no other training loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import msgspec
import numpy as np
import torch

from agent.batching import RoundRecipe, adam_moments, round_recipe
from agent.data import DataSpec, TrainingData
from agent.data.prefetch import Prefetched
from agent.step_graph import WARMUP_STEPS as GRAPH_WARMUP_STEPS
from agent.step_graph import GraphedStep
from common.models import build_model, load_numpy_state, state_to_numpy
from protocol.schemas import ModelSpec, OptimizerSpec, Precision, TaskAssignment

DEFAULT_OPTIMIZER = OptimizerSpec()
#: images, and the smallest batch, that estimate BatchNorm's running statistics afresh
#: (`TaskRuntime.restated_statistics`; forward passes only, so larger batches than training's are cheap)
STATISTICS_IMAGES, STATISTICS_BATCH = 256, 64
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(Exception):
    """Training was cancelled through `should_stop`."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


def uses_channels_last(device: str, precision: Precision) -> bool:
    """NHWC pays where tensor cores run the convolutions: reduced precision on a GPU."""
    return device.startswith("cuda") and precision != "fp32"


def make_optimizer(
    spec: OptimizerSpec, params, capturable: bool = False, horizon_scale: float = 1.0
) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, or Adam (which ignores `momentum`; its betas and eps follow
    `horizon_scale`, agent.batching.adam_moments). `capturable` (parameters on a GPU): a step a CUDA graph can
    capture, whose learning rate lives on the device, so that `set_lr` changes it between replays; Adam then keeps
    its step count on the device, SGD runs fused."""
    params = list(params)
    lr = torch.tensor(spec.lr, device=params[0].device) if capturable else spec.lr
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay, fused=capturable
        )
    moments = adam_moments(horizon_scale)
    return torch.optim.Adam(params, lr=lr, weight_decay=spec.weight_decay, capturable=capturable, **moments)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate: in place where it is a tensor (a captured step reads it)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def grad_scaler(device: str, precision: Precision) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a no-op otherwise). Kept with the model across rounds: a fresh scaler skips its
    first steps while it finds the scale."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


class ProximalTerm:
    """FedProx's mu/2 * ||w - w_start||^2 on the local loss, where w_start are the weights when the term is made
    (the round's global model). It is applied as its gradient, mu * (w - w_start), added to the parameters'
    gradients with foreach ops: no autograd graph, one extra copy of the parameters."""

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        """Add the term's gradient to every parameter that has one (those the loss reached)."""
        pairs = [(p, w) for p, w in zip(self.params, self.start) if p.grad is not None]
        if pairs:
            params, start = zip(*pairs)
            torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, start), alpha=self.mu)


class TrainStep:
    """One optimiser step on a batch: forward under autocast for bf16/fp16, fp16 gradients scaled; with
    `proximal_mu` > 0, FedProx's proximal term around the weights the model has when the step is made. With
    `cuda_graphs`, on a GPU and without loss scaling, the steps are replayed from CUDA graphs (agent/step_graph.py;
    the optimiser must be made `capturable`, so that a warm-up's rates reach the graph too)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        device: str,
        scaler: torch.amp.GradScaler | None = None,
        proximal_mu: float = 0.0,
        lr_at: Callable[[int], float] | None = None,
        cuda_graphs: bool = False,
    ):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.device_type = torch.device(device).type
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.channels_last = uses_channels_last(device, precision)
        self.scaler = scaler or grad_scaler(device, precision)
        self.proximal = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None
        self.lr_at = lr_at  # step index -> learning rate (a warm-up); None keeps the optimiser's
        self._lr: float | None = None  # the rate lr_at last set
        self.steps = 0
        self.graphed = None
        if cuda_graphs and self.device_type == "cuda" and not self.scaler.is_enabled():
            if lr_at is not None and not all(
                isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups
            ):
                raise ValueError(
                    "a graphed step whose rate changes needs a capturable optimiser (its lr a tensor)"
                )
            self.graphed = GraphedStep(self._step)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch; the detached loss and logits (left on the device: no synchronisation)."""
        if self.lr_at is not None and (lr := self.lr_at(self.steps)) != self._lr:
            set_lr(self.optimizer, lr)
            self._lr = lr
        self.steps += 1
        if self.graphed is not None:
            return self.graphed(images, labels)
        return self._step(images, labels)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.proximal is not None:
            self.scaler.unscale_(self.optimizer)  # the term's gradient is added unscaled (fp16)
            self.proximal.add_gradient()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()


@dataclass
class LoopStats:
    """What `run_steps` did: steps and images, timing (wall clock comparable across processes), and the loss and
    accuracy over the last (possibly partial) epoch."""

    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    train_loss: float = math.nan
    train_accuracy: float = math.nan


class LoopPosition(msgspec.Struct, kw_only=True, frozen=True):
    """Where a round's loop stands between two steps: what another process needs to continue it."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained
    steps: int = 0
    images: int = 0  # of the finished epochs
    epoch_images: int = 0  # of `epoch` so far, with its loss sum and correct predictions
    loss_sum: float = 0.0
    correct: int = 0
    finite: bool = True  # every loss so far was finite
    seconds: float = 0.0  # of training so far
    started_at: float = 0.0


class TrainingPaused(Exception):
    """`should_pause` turned true: the loop stopped between two steps at `position`."""

    def __init__(self, position: LoopPosition) -> None:
        super().__init__(f"paused at step {position.steps}")
        self.position = position


def run_steps(
    step: TrainStep,
    data: TrainingData,
    batch_size: int,
    seed: int,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    start: LoopPosition | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    should_pause: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
    label: str = "training",
) -> LoopStats:
    """Step over seeded epochs of `data` until `steps` are done or `seconds` have passed (exactly one given),
    from the beginning or from a paused loop's `start` (the batches before it in its epoch are drawn and skipped,
    so the data order is the same as without the pause).

    Before every step: TrainingStopped when `should_stop()` turns true, TrainingPaused when `should_pause()`
    does. TrainingDiverged when an epoch's loss was not finite (checked once, at the end: the loop never waits
    for the device)."""
    if (steps is None) == (seconds is None):
        raise ValueError("give exactly one of steps or seconds")
    at = start or LoopPosition(started_at=time.time())
    stats = LoopStats(steps=at.steps, images=at.images, started_at=at.started_at)
    began = time.perf_counter()

    def done() -> bool:
        return stats.steps == steps or (seconds is not None and time.perf_counter() - began >= seconds)

    finite = torch.tensor(at.finite, device=step.device)
    for epoch in count(at.epoch):
        resumed = epoch == at.epoch
        loss_sum = torch.tensor(at.loss_sum if resumed else 0.0, device=step.device)
        correct = torch.tensor(at.correct if resumed else 0, dtype=torch.int64, device=step.device)
        epoch_images = at.epoch_images if resumed else 0
        with closing(data.epoch(batch_size, seed=seed * 1_000_003 + epoch)) as batches:
            for index, (images, labels) in enumerate(batches):
                if resumed and index < at.batch:
                    continue
                if should_stop():
                    raise TrainingStopped(f"{label} stopped at step {stats.steps}")
                if should_pause():
                    ok = bool((finite & torch.isfinite(loss_sum)).item())
                    raise TrainingPaused(
                        LoopPosition(
                            epoch=epoch,
                            batch=index,
                            steps=stats.steps,
                            images=stats.images,
                            epoch_images=epoch_images,
                            loss_sum=loss_sum.item() if ok else 0.0,
                            correct=int(correct.item()),
                            finite=ok,
                            seconds=at.seconds + time.perf_counter() - began,
                            started_at=stats.started_at,
                        )
                    )
                loss, logits = step(images, labels)
                loss_sum += loss * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                epoch_images += len(labels)
                stats.steps += 1
                if progress is not None:
                    progress(stats.steps, steps or 0)
                if done():
                    break
        stats.images += epoch_images
        finite &= torch.isfinite(loss_sum)
        if done():
            break
    if not finite:
        raise TrainingDiverged(f"{label}: non-finite training loss")
    if step.device_type == "cuda":
        torch.cuda.synchronize()
    stats.seconds = at.seconds + time.perf_counter() - began
    # a resumed loop's training time leaves out the hand-over; its end is the clock's
    stats.ended_at = time.time() if start is not None else stats.started_at + stats.seconds
    stats.train_loss = loss_sum.item() / epoch_images
    stats.train_accuracy = correct.item() / epoch_images
    return stats


@dataclass(frozen=True)
class TrainResult:
    delta: dict[str, np.ndarray]
    samples: int
    stats: LoopStats
    recipe: RoundRecipe


def open_data(
    spec: DataSpec, model: ModelSpec, device: str, budget_bytes: int, loader_workers: int
) -> TrainingData:
    """A task's training data as the runtime trains on it: held on the device, or streamed and made ahead in a
    thread beside the training step."""
    data = spec.open(model, device, budget_bytes, loader_workers)
    return Prefetched(data, device) if data.placement == "stream" else data


class TaskRuntime:
    """A task's model and training data on this worker's device, built once and kept across rounds."""

    def __init__(
        self,
        model: ModelSpec,
        data: DataSpec,
        *,
        device: str,
        precision: Precision = "fp32",
        budget_bytes: int = 1 << 30,
        loader_workers: int = 2,
        seed: int = 0,
        cuda_graphs: bool = False,
    ) -> None:
        self.spec, self.device, self.precision = model, device, precision
        self.cuda_graphs = cuda_graphs and torch.device(device).type == "cuda"  # TrainStep's
        with torch.device(device):  # initialise the weights where they live (large models are slow on a CPU)
            self.model = build_model(model, seed=seed).train()
        if uses_channels_last(device, precision):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data = open_data(data, model, device, budget_bytes, loader_workers)
        self.scaler = grad_scaler(device, precision)
        self._measuring: TrainStep | None = None

    def close(self) -> None:
        """End what the data runs beside this process (reader processes); the runtime is unusable after."""
        self.data.close()

    def train(
        self,
        assignment: TaskAssignment,
        base: Mapping[str, np.ndarray],
        *,
        seed: int,
        reference_batch: int | None = None,
        resume_from: Path | None = None,
        pause_to: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        should_pause: Callable[[], bool] = lambda: False,
        progress: Callable[[int, int], None] | None = None,
    ) -> TrainResult:
        """A round from `base`: the steps and learning rate of `round_recipe` (the task configured at
        `reference_batch`, default the assignment's), with FedProx's proximal term around `base` when
        `assignment.proximal_mu` > 0; the delta is local minus base, per entry (a fresh optimiser each round, as
        FedAvg's local training starts).

        A round can move between processes: when `should_pause()` turns true before a step, the model, optimiser,
        loss scaler, random state and loop position are written to `pause_to` and TrainingPaused is raised;
        `resume_from` such a file continues that round here (same `base`, `seed` and assignment)."""
        if assignment.model != self.spec or assignment.precision != self.precision:
            raise ValueError(
                f"task {assignment.task}: the worker was prepared for another model or precision"
            )
        from agent import checkpoint

        recipe = round_recipe(assignment, self.data.samples, reference_batch)
        load_numpy_state(self.model, base)
        self.model.train()
        self._measuring = None  # its optimiser points at weights the round now owns
        step = self._train_step(
            assignment.optimizer,
            recipe.horizon_scale,
            scaler=self.scaler,
            proximal_mu=assignment.proximal_mu,
            lr_at=recipe.lr_at if recipe.lr != recipe.base_lr else None,
        )
        start = None
        if resume_from is not None:
            start = checkpoint.load_round(resume_from, step)
        try:
            stats = run_steps(
                step,
                self.data,
                assignment.batch_size,
                seed,
                steps=recipe.steps,
                start=start,
                should_stop=should_stop,
                should_pause=should_pause if pause_to is not None else lambda: False,
                progress=progress,
                label=f"task {assignment.task}",
            )
        except TrainingPaused as paused:
            checkpoint.save_round(pause_to, step, paused.position)
            raise
        delta = _delta(state_to_numpy(self.model), base, assignment.task)
        return TrainResult(delta=delta, samples=self.data.samples, stats=stats, recipe=recipe)

    def _train_step(self, optimizer: OptimizerSpec, horizon_scale: float = 1.0, **options) -> TrainStep:
        """A training step of this runtime's model with a fresh `optimizer` (Adam's horizons scaled, see
        make_optimizer), replayed from CUDA graphs where the runtime uses them (the optimiser then made
        capturable); `options` are TrainStep's."""
        return TrainStep(
            self.model,
            make_optimizer(optimizer, self.model.parameters(), self.cuda_graphs, horizon_scale),
            self.precision,
            self.device,
            cuda_graphs=self.cuda_graphs,
            **options,
        )

    @torch.no_grad()
    def restated_statistics(
        self,
        base: Mapping[str, np.ndarray],
        sent: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        images: int = STATISTICS_IMAGES,
    ) -> dict[str, np.ndarray]:
        """BatchNorm's running means and variances of the model at `base` + `sent` (a delta), estimated afresh on
        about `images` of this task's data (batches of `batch_size`, at least STATISTICS_BATCH) under the training
        precision (torch.optim.swa_utils.update_bn), as deltas to `base`; empty for a model without BatchNorm.
        A top-k update moves the global weights by `sent` only, and the statistics its local training ended with
        belong to other weights: evaluated with them, a ShuffleNet trained with top-k at 1% stayed at 14% where
        re-estimated statistics gave 74%."""
        names = [
            f"{name}.{statistic}"
            for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for statistic in ("running_mean", "running_var")
        ]
        if not names:
            return {}
        load_numpy_state(
            self.model, {name: np.add(base[name], sent[name], dtype=base[name].dtype) for name in base}
        )
        device_type = torch.device(self.device).type
        dtype = AUTOCAST_DTYPES.get(self.precision)
        batch_size = max(batch_size, STATISTICS_BATCH)
        with (
            closing(self.data.epoch(batch_size, seed=seed)) as epoch,
            torch.autocast(device_type, dtype=dtype, enabled=dtype is not None),
        ):
            torch.optim.swa_utils.update_bn(islice(epoch, max(1, images // batch_size)), self.model)
        buffers = dict(self.model.named_buffers())
        return {
            name: np.subtract(buffers[name].float().cpu().numpy(), base[name], dtype=base[name].dtype)
            for name in names
        }

    def measure(
        self,
        batch_size: int,
        *,
        images: int | None = None,
        seconds: float | None = None,
        warmup_steps: int = 3,
        optimizer: OptimizerSpec = DEFAULT_OPTIMIZER,
        before_window: Callable[[], None] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> LoopStats:
        """Throughput of the training step on this data: `warmup_steps`, then `before_window()` (a synchronised
        start), then a timed window of `images` (whole batches) or `seconds`."""
        if (images is None) == (seconds is None):
            raise ValueError("give exactly one of images or seconds")
        if self._measuring is None:
            self._measuring = self._train_step(optimizer)
        if self._measuring.graphed is not None:  # the capture belongs to the warm-up, not the window
            warmup_steps = max(warmup_steps, GRAPH_WARMUP_STEPS + 1)
        if warmup_steps:
            run_steps(
                self._measuring, self.data, batch_size, seed=0, steps=warmup_steps, should_stop=should_stop
            )
        before_window()
        return run_steps(
            self._measuring,
            self.data,
            batch_size,
            seed=1,
            steps=-(-images // batch_size) if images is not None else None,
            seconds=seconds,
            should_stop=should_stop,
        )


def _delta(
    local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], task: str
) -> dict[str, np.ndarray]:
    delta = {}
    for name, array in local.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise TrainingDiverged(f"task {task}: tensor {name!r} became non-finite")
        delta[name] = np.subtract(array, base[name], dtype=base[name].dtype)
    return delta


@torch.no_grad()
def evaluate(
    model: ModelSpec,
    state: Mapping[str, np.ndarray],
    dataset: torch.utils.data.Dataset,
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of the model with `state` over `dataset`, in [0, 1]."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    net = build_model(model)
    load_numpy_state(net, state)
    net.to(device).eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        labels = labels.to(device, non_blocking=True)
        correct += (net(images.to(device, non_blocking=True)).argmax(1) == labels).sum()
    return correct.item() / len(dataset)
