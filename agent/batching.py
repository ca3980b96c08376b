"""How a round trains when its plan changed the task's batch size: the learning-rate rule (torch-free).

The plan (agent/planning.py, Eq. 6) may set a batch size B other than the task's configured B0. The task's
config says how training keeps its accuracy (`lr_scaling` and `batch_policy`, sent in the TaskAssignment):

- `batch_policy = "scale_lr"` (default): the round processes the images it would at B0 (its local epochs, or
  local_steps x B0 images), so it takes about B0/B times the steps, and the learning rate follows `lr_scaling`:
  `linear` lr x B/B0 (Goyal et al. 2017), `sqrt` lr x sqrt(B/B0) (for Adam with its averaging horizons
  shortened to match, Malladi et al. 2022: 1 - beta x B/B0, eps / sqrt(B/B0); DenseNet121 on digits at 32 px,
  one round of 60 steps at B0 = 16 from scratch, 30 seeds: 94.2% at 26 with the rate alone, 95.3% with the
  betas too, 95.4% at 16 over 12), `none`, or `auto`: linear for SGD, none for Adam (a round's fresh Adam
  moves every weight by about the rate in its first steps; ResNet18 from scratch at 4 x B0, 32 px, rounds 2-4:
  2.5 points behind B0 with the rate kept, 2.6 with the square root, 8.6 linear; bench/results/batch_rules.json).
  When the rate grows it ramps up linearly from the configured rate over the first WARMUP_SHARE of the round's
  steps (every round starts a fresh optimiser) and back down to it over the last COOLDOWN_SHARE: a round that
  ends at the grown rate ends wherever its last batches threw it (DenseNet121 at 26 of 16 with the linear rule,
  H100, 128 px, the agents' round-1 data order: 3.6 +- 0.7 points behind B0 over four initial models, 1.25 +-
  0.6 over eight with the cool-down; bench/results/README.md).
- `batch_policy = "hold_steps"`: the round takes the optimiser steps it would at B0, at the configured rate,
  and so processes B/B0 times the images.

Either way a plan grows the batch at most BATCH_GROWTH-fold per global version the task has trained
(`batch_ceiling`): by default a model from scratch trains at B0 and the batch grows as it learns. Large batches
from a random start lose accuracy in the first rounds that the rate rules do not win back (ShuffleNet at 8 x B0
with the linear rule after round 1: 8.6% against 96.1% at B0 on the H200, 14.9% against 83.3% on the CPU);
growing the batch instead of decaying the rate is Smith et al. 2018. A task whose rounds take many steps (or
whose initial model is pretrained) may let the initial model train at up to `initial_batch_growth` x B0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.schemas import TaskAssignment

WARMUP_SHARE = 0.1  # of a round's steps, when the learning rate grows
COOLDOWN_SHARE = 0.1  # of a round's steps, at its end, when the learning rate grew
BATCH_GROWTH = 2  # the most a plan multiplies a task's batch size by per global version trained
#: the most a plan multiplies an Adam task's batch size by under `auto` (bench/results/batch_rules.json: ResNet18
#: from scratch at 4x 2.5 points behind B0 over rounds 2-4 with its rate kept; ramped to 2x, +0.1)
ADAM_AUTO_GROWTH = 2
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, the configured batch's


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Optimiser steps of one epoch: a trailing batch of one sample joins the previous batch."""
    full, rest = divmod(samples, batch_size)
    return full + (rest > 1 or full == 0)


def batch_ceiling(assignment: TaskAssignment) -> int:
    """The largest batch size a plan may give the task: its configured size times `initial_batch_growth` for
    version 0, the initial model, and BATCH_GROWTH more per global version trained; for Adam under `auto` at
    most ADAM_AUTO_GROWTH times the configured size."""
    growth = assignment.initial_batch_growth * BATCH_GROWTH ** min(assignment.base_version, 10)
    ceiling = assignment.batch_size * growth
    if assignment.optimizer.name == "adam" and assignment.lr_scaling == "auto":
        ceiling = min(ceiling, ADAM_AUTO_GROWTH * assignment.batch_size)
    return ceiling


def adam_moments(horizon_scale: float) -> dict[str, tuple[float, float] | float]:
    """Adam's betas and eps (torch's defaults at scale 1) for a batch `horizon_scale` times the configured one
    under the square-root rule: 1 - beta grows with the batch (an average over as many images, in fewer steps; a
    beta never below 0) and eps shrinks with the rate's square root."""
    betas = tuple(max(0.0, 1 - horizon_scale * (1 - beta)) for beta in ADAM_BETAS)
    return {"betas": betas, "eps": ADAM_EPS / math.sqrt(horizon_scale)}


def lr_factor(assignment: TaskAssignment, ratio: float) -> float:
    """The learning-rate multiplier for a batch `ratio` B/B0 under the assignment's `lr_scaling`."""
    rule = assignment.lr_scaling
    if rule == "auto":
        rule = "linear" if assignment.optimizer.name == "sgd" else "none"
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


@dataclass(frozen=True)
class RoundRecipe:
    """A round's optimiser steps and learning rate: `lr` between a warm-up from `base_lr` over the first
    `warmup_steps` and a cool-down back to `base_lr` over the last `cooldown_steps`; Adam's averaging horizons
    (1 / (1 - beta)) are divided by `horizon_scale` (see adam_moments)."""

    steps: int
    lr: float
    base_lr: float
    warmup_steps: int = 0
    cooldown_steps: int = 0
    horizon_scale: float = 1.0

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based); the last step takes `base_lr` after a cool-down."""
        if step < self.warmup_steps:
            return self.base_lr + (self.lr - self.base_lr) * step / self.warmup_steps
        after = self.steps - 1 - step  # the round's steps after this one
        if after < self.cooldown_steps:
            return self.base_lr + (self.lr - self.base_lr) * max(after, 0) / self.cooldown_steps
        return self.lr


def round_recipe(assignment: TaskAssignment, samples: int, reference_batch: int | None = None) -> RoundRecipe:
    """Steps and learning rate of a round at `assignment.batch_size` for a task configured at `reference_batch`
    (None: the assignment's batch size is the configured one) holding `samples` local samples."""
    batch, base_lr = assignment.batch_size, assignment.optimizer.lr
    reference = reference_batch or batch
    if batch == reference or assignment.batch_policy == "hold_steps":
        steps = assignment.local_steps or assignment.local_epochs * steps_per_epoch(samples, reference)
        return RoundRecipe(steps, base_lr, base_lr)
    if assignment.local_steps:
        steps = math.ceil(assignment.local_steps * reference / batch)
    else:
        steps = assignment.local_epochs * steps_per_epoch(samples, batch)
    ratio = batch / reference
    lr = base_lr * lr_factor(assignment, ratio)
    grows = lr > base_lr
    adam_sqrt = assignment.optimizer.name == "adam" and assignment.lr_scaling == "sqrt"
    return RoundRecipe(
        steps,
        lr,
        base_lr,
        warmup_steps=math.ceil(WARMUP_SHARE * steps) if grows else 0,
        cooldown_steps=math.ceil(COOLDOWN_SHARE * steps) if grows else 0,
        horizon_scale=ratio if adam_sqrt else 1.0,
    )


def round_images(assignment: TaskAssignment, samples: int, reference_batch: int | None = None) -> int:
    """About how many images the round trains on: the work a plan's makespan is estimated from."""
    reference = reference_batch or assignment.batch_size
    if assignment.local_steps is None and (
        assignment.batch_policy == "scale_lr" or assignment.batch_size == reference
    ):
        return assignment.local_epochs * samples
    return round_recipe(assignment, samples, reference_batch).steps * assignment.batch_size
