"""How a set of co-located tasks becomes the predictor's input: fixed slots, log features, a mask (numpy only).

Shared by training (torch) and run time (onnxruntime), so planning on a device needs no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from predictor.features import FEATURE_NAMES, TaskFeatures, features_as_array

MAX_TASKS = 5
INPUT_NAMES = (*FEATURE_NAMES, "log2_batch", "resource_fraction")
N_INPUTS = len(INPUT_NAMES)


def encode_inputs(
    tasks: Sequence[TaskFeatures], batches: np.ndarray, resources: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs for N configurations of the same n tasks: (N, MAX_TASKS, N_INPUTS) and the (N, MAX_TASKS) mask.

    `batches` and `resources` (percent) have shape (N, n).
    """
    batches, resources = np.atleast_2d(batches), np.atleast_2d(resources)
    n = len(tasks)
    if not 1 <= n <= MAX_TASKS:
        raise ValueError(f"the predictor takes 1..{MAX_TASKS} tasks, got {n}")
    if batches.shape != resources.shape or batches.shape[1] != n:
        raise ValueError(f"batches {batches.shape} and resources {resources.shape} must both be (N, {n})")
    x = np.zeros((batches.shape[0], MAX_TASKS, N_INPUTS), dtype=np.float32)
    x[:, :n, : len(FEATURE_NAMES)] = np.stack([features_as_array(t) for t in tasks])
    x[:, :n, -2] = np.log2(batches)
    x[:, :n, -1] = resources / 100.0
    mask = np.zeros((batches.shape[0], MAX_TASKS), dtype=np.float32)
    mask[:, :n] = 1.0
    return x, mask
