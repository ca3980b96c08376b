"""Error feedback for lossy update codecs: what a codec leaves out of one round's update is kept and added to the
next (the residual of the lecture's gradient sparsification), so that nothing a device learned is lost, only
delayed. With `momentum` > 0 this is deep gradient compression's momentum correction: a velocity accumulates the
updates and both velocity and residual are cleared where values were sent (momentum factor masking); meant for
local training without momentum of its own, since the server adds no momentum.

The state is kept per task in one file of the agent's state directory and survives restarts. The update file is
written before the state: a crash in between sends the same mass again next round, never loses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from common.durable import write_atomically
from protocol.codecs import Codec, make_codec
from protocol.codecs.base import FLOAT_DTYPES
from protocol.errors import ProtocolError
from protocol.schemas import CodecSpec
from protocol.tensors import decode_state, describe, encode_state

RESIDUAL, VELOCITY = "residual/", "velocity/"
#: what the payload sends (dense arrays) -> entries of the delta to send instead
Restate = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def write_update(
    delta: Mapping[str, np.ndarray],
    spec: CodecSpec,
    path: Path,
    residual: Path,
    restate: Restate | None = None,
) -> bytes:
    """Encode a round's delta with the task's codec into `path` (durably); a lossy codec keeps what it left out in
    `residual` for the next round. With a codec whose step is sparse (top-k), `restate` gives the entries to send
    instead for what the payload sends (BatchNorm's statistics re-estimated for the weights the payload moves the
    global model to). Returns the update's payload."""
    codec = make_codec(spec.name, spec.fraction)
    if not codec.lossy:
        payload = codec.encode(delta)
        write_atomically(path, payload)
        return payload
    feedback = ErrorFeedback(residual, spec.momentum)
    return feedback.encode(
        codec,
        delta,
        write_update=lambda payload: write_atomically(path, payload),
        restate=restate if codec.sparse_step else None,
    )


class ErrorFeedback:
    """The residual (and velocity) of one task's lossy codec, in the file at `path`."""

    def __init__(self, path: Path, momentum: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.path, self.momentum = Path(path), momentum

    def encode(
        self,
        codec: Codec,
        delta: Mapping[str, np.ndarray],
        write_update: Callable[[bytes], None] | None = None,
        restate: Restate | None = None,
    ) -> bytes:
        """The payload of `delta` plus what earlier rounds left out; `write_update(payload)`, when given, runs
        before the new residual is stored. `restate(sent)` may replace entries (whole tensors) after seeing what
        the payload sends: they are sent as given, and keep no residual beyond the codec's rounding."""
        residual, velocity = self._load(delta)
        floats = [name for name, array in delta.items() if np.asarray(array).dtype.name in FLOAT_DTYPES]
        corrected = dict(delta)
        for name in floats:
            step = np.asarray(delta[name], dtype=residual[name].dtype)
            if self.momentum:
                velocity[name] = self.momentum * velocity[name] + step
                step = velocity[name]
            corrected[name] = (residual[name] + step).astype(np.asarray(delta[name]).dtype)
        payload = codec.encode(corrected)
        sent = codec.decode(payload, describe(corrected)) if codec.lossy or restate is not None else {}
        if restate is not None and (replaced := restate(sent)):
            restated = {name: np.asarray(value, corrected[name].dtype) for name, value in replaced.items()}
            corrected |= restated
            payload = codec.encode(corrected)
            sent |= codec.decode(codec.encode(restated), describe(restated))  # each tensor is coded alone
        if write_update is not None:
            write_update(payload)
        if codec.lossy:
            for name in floats:
                residual[name] = corrected[name].astype(residual[name].dtype) - sent[name]
                if self.momentum:
                    velocity[name][sent[name] != 0] = 0.0
        else:
            residual = {name: np.zeros_like(residual[name]) for name in floats}
        self._store(residual, velocity)
        return payload

    def _load(self, delta: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
        """The stored state where it matches `delta`'s float tensors; zeros for a new or changed model. Kept in
        float32 (float64 for a float64 tensor): the corrected update is cast to the tensor's own type anyway, and
        a ResNet18's state is 45 MB a round to write and read rather than 90."""
        zeros = {
            name: np.zeros(np.shape(array), dtype=np.promote_types(np.asarray(array).dtype, np.float32))
            for name, array in delta.items()
            if np.asarray(array).dtype.name in FLOAT_DTYPES
        }
        try:
            stored = decode_state(self.path.read_bytes())
        except (FileNotFoundError, ProtocolError):
            return zeros, {name: z.copy() for name, z in zeros.items()}
        residual = {n: _matching(stored.get(RESIDUAL + n), z) for n, z in zeros.items()}
        velocity = {n: _matching(stored.get(VELOCITY + n), z) for n, z in zeros.items()}
        return residual, velocity

    def _store(self, residual: dict, velocity: dict) -> None:
        state = {RESIDUAL + name: array for name, array in residual.items()}
        if self.momentum:
            state |= {VELOCITY + name: array for name, array in velocity.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, encode_state(state))


def _matching(stored: np.ndarray | None, zeros: np.ndarray) -> np.ndarray:
    if stored is None or stored.shape != zeros.shape:
        return zeros.copy()
    return stored.astype(zeros.dtype)
