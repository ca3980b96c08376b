"""The exported predictor at run time: onnxruntime, one inference per search, checked against its model card."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from predictor.encoding import MAX_TASKS, N_INPUTS, encode_inputs
from predictor.features import TaskFeatures

PREDICTOR_DIR = Path(__file__).resolve().parent / "models"  # predictors shipped with the package


class PredictorUnavailable(RuntimeError):
    """No usable predictor: the file is missing, unreadable, or made for another GPU or input layout."""


def card_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".card.json")


def card_features(card: dict, path: Path) -> list[TaskFeatures]:
    """The features a model card lists for the workloads its predictor was fitted on (none in older cards)."""
    try:
        features = msgspec.convert(card.get("features", []), list[TaskFeatures])
    except msgspec.ValidationError as exc:
        raise PredictorUnavailable(f"model card {path} lists malformed features: {exc}") from None
    for f in features:
        values = (
            f.input_size,
            f.num_classes,
            f.flops_per_sample,
            f.param_bytes,
            f.activation_bytes_per_sample,
        )
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise PredictorUnavailable(f"model card {path} lists features out of range: {f}")
    return features


class OnnxPredictor:
    """Callable as `predictor.search.Predict`: (tasks, batches (N, n), resources (N, n)) -> throughputs (N, n)."""

    def __init__(self, path: Path, gpu: str | None = None) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise PredictorUnavailable(f"predictor {path} does not exist (run fedmt-predictor fit/export)")
        try:
            self.card = json.loads(card_path(path).read_text())
        except (OSError, ValueError) as exc:
            raise PredictorUnavailable(
                f"model card {card_path(path)} is missing or unreadable: {exc}"
            ) from None
        if gpu is not None and self.card.get("gpu") != gpu:
            raise PredictorUnavailable(
                f"predictor {path.name} was fitted on {self.card.get('gpu')}, this GPU is {gpu}"
            )
        try:
            low, high = self.card["data"]["batch_range"]
        except (KeyError, TypeError, ValueError):
            raise PredictorUnavailable(
                f"model card {card_path(path)} lacks the profiled batch range (data.batch_range): "
                "re-run fedmt-predictor fit and export"
            ) from None
        # the batch sizes, SM shares and input sizes the predictor has seen; outside them it extrapolates
        self.batch_range = (int(low), int(high))
        # (cards written before shares were recorded: any share)
        self.share_range = tuple(map(float, self.card["data"].get("share_range") or (0.0, 100.0)))
        self.input_sizes = frozenset(self.card["data"].get("input_sizes") or [self.card.get("resolution")])
        # whether its training steps were replayed from CUDA graphs (None: a card written before this was recorded)
        self.cuda_graphs: bool | None = self.card["data"].get("cuda_graphs")
        self.features = card_features(self.card, card_path(path))
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types for bad files
            raise PredictorUnavailable(f"cannot load {path}: {exc}") from None
        shapes = {i.name: i.shape[1:] for i in self.session.get_inputs()}
        if shapes != {"features": [MAX_TASKS, N_INPUTS], "mask": [MAX_TASKS]}:
            raise PredictorUnavailable(
                f"{path.name} has inputs {shapes}; this code expects the {MAX_TASKS}-task layout"
            )
        self.path = path

    def __call__(
        self, tasks: Sequence[TaskFeatures], batches: np.ndarray, resources: np.ndarray
    ) -> np.ndarray:
        x, mask = encode_inputs(tasks, batches, resources)
        (out,) = self.session.run(["throughput"], {"features": x, "mask": mask})
        return out[:, : len(tasks)].astype(np.float64)


def find_predictor(models_dir: Path, gpu: str) -> OnnxPredictor:
    """The predictor shipped for `gpu` in `models_dir` (file name: the GPU name as a slug)."""
    from predictor.records import dataset_path

    return OnnxPredictor(dataset_path(models_dir, gpu).with_suffix(".onnx"), gpu=gpu)
