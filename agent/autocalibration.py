"""The agent calibrates its GPU by itself when no predictor covers its tasks (`[calibration] auto = true`).

Only between rounds: after a round, `maybe_start` starts calibration (agent/calibration.py) in a thread for the
round's tasks when the planner's predictor was not profiled with them; a new schedule `pause`s it (it stops after
its current window and keeps every record; the next idle time resumes with what is left of the measuring budget,
which `calibration.json` in the state directory remembers). When the budget is spent the predictor is fitted and
exported there, and `on_ready(onnx path)` hands it to the agent, which plans with it from the next round on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from agent.calibration import (
    WINDOW_S,
    Result,
    Target,
    calibrate_gpu,
    fit_and_export,
    measuring_left,
    target_for,
)
from common.durable import write_atomically
from predictor.encoding import MAX_TASKS
from protocol.schemas import TaskAssignment

log = logging.getLogger(__name__)


class CalibrationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The agent's [calibration] table."""

    auto: bool = True  # calibrate between rounds when no predictor was profiled with the tasks
    budget_s: Annotated[float, Meta(gt=0)] = 900.0  # measuring and fitting, over all idle times
    window_s: Annotated[float, Meta(gt=0)] = WINDOW_S
    repeats: Annotated[int, Meta(ge=1, le=10)] = 3
    epochs: Annotated[int, Meta(ge=1)] | None = None  # predictor training epochs; None: the default


class AutoCalibration:
    """Calibration in the background of an agent, between its rounds. `measure` is calibrate_gpu (tests give
    another); it runs with fit=False, and the fit follows in the same thread, on the CPU only, so a round need not
    wait for it."""

    def __init__(
        self,
        config: CalibrationConfig,
        directory: Path,
        sharing,
        on_ready: Callable[[Path], None],
        measure: Callable[..., Result] = calibrate_gpu,
        cuda_graphs: bool = False,
    ) -> None:
        self.config, self.directory, self.sharing = config, Path(directory), sharing
        self.cuda_graphs = cuda_graphs  # measure steps as the agent's rounds run them
        self.on_ready, self._measure = on_ready, measure
        self._stop = threading.Event()
        self._idle = threading.Event()  # the GPU is not being measured
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._state_path = self.directory / "calibration.json"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def maybe_start(self, assignments: Sequence[TaskAssignment], planner) -> bool:
        """Start calibrating for these tasks if it is on, MPS is there, a predictor could plan them (at most
        MAX_TASKS), none was profiled with them and this target's budget is not spent; whether it started."""
        if (
            not self.config.auto
            or self.running
            or self.sharing.mps_env is None
            or len(assignments) > MAX_TASKS
            or planner.profiled(assignments)
        ):
            return False
        target = target_for(assignments, self.cuda_graphs)
        state = self._state(target)
        if state["finished"]:
            return False
        left = measuring_left(self.config.budget_s, state["measured_s"])
        self._stop.clear()
        self._idle.clear()
        self._thread = threading.Thread(
            target=self._calibrate, args=(target, state, left), name="calibration", daemon=True
        )
        self._thread.start()
        log.info(
            "calibrating this GPU for %s between rounds (%.0f s of measuring left)", target.workloads, left
        )
        return True

    def pause(self) -> None:
        """Stop measuring after the current window (a round is about to start); a fit under way continues."""
        if self.running:
            self._stop.set()
            self._idle.wait()

    def _calibrate(self, target: Target, state: dict, measure_s: float) -> None:
        def progress(done: int, total: int | None) -> None:
            if done % 10 == 0:
                log.info("calibration: %d of about %s windows", done, total)

        try:
            result = self._measure(
                target,
                self.directory,
                self.sharing,
                measure_s=measure_s,
                window_s=self.config.window_s,
                repeats=self.config.repeats,
                stop=self._stop,
                on_progress=progress,
                fit=False,
            )
            self._save(state | {"measured_s": state["measured_s"] + result.measured_s})
            self._idle.set()
            if result.stopped:
                return
            path = fit_and_export(result.data, target, self.config.epochs)
        except Exception:  # noqa: BLE001 - calibration must never take the agent down
            log.exception("calibration failed; the agent keeps planning without it")
            self._save(self._state(target) | {"finished": True})
            return
        finally:
            self._idle.set()
        self._save(self._state(target) | {"finished": True})
        log.info("calibrated predictor %s ready for the next round", path)
        self.on_ready(path)

    def _state(self, target: Target) -> dict:
        """What was done for `target` so far (a new target starts afresh)."""
        key = _key(target)
        try:
            state = json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("target") != key:
            state = {"target": key, "measured_s": 0.0, "finished": False}
        return state

    def _save(self, state: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self._state_path, (json.dumps(state, indent=2) + "\n").encode())


def _key(target: Target) -> list:
    """The target as `calibration.json` names it; an eager one as before the kind of step was recorded, so that
    an upgraded agent does not calibrate its tasks again."""
    key = sorted([list(w), list(target.batches[w])] for w in target.workloads)
    return [*key, "cuda_graphs"] if target.cuda_graphs else key
