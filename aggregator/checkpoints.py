"""Global model checkpoints: one safetensors file per task and version, written atomically.

Layout: `root/{task}/v{version:06d}.safetensors`, with metadata {"task", "version"}. A save writes a temporary
file in the same folder, fsyncs it, renames it over the target and fsyncs the folder, so a crash leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from protocol.topics import check_name

_CHECKPOINT = re.compile(r"^v(\d{6,})\.safetensors$")


@dataclass(frozen=True)
class CheckpointRef:
    task: str
    version: int
    path: Path


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Metadata and tensors of a safetensors file; FileNotFoundError or ValueError naming `path` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="np") as f:
            return dict(f.metadata() or {}), {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {exc}") from None


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file; FileNotFoundError or ValueError (naming `path`) otherwise."""
    return read_safetensors(path)[1]


class CheckpointStore:
    """Versioned global states of each task under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, task: str, version: int) -> Path:
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        return self.root / check_name("task", task) / f"v{version:06d}.safetensors"

    def save(self, task: str, version: int, state: Mapping[str, np.ndarray]) -> CheckpointRef:
        """Write (or atomically overwrite) a task's checkpoint and make it durable before returning."""
        target = self.path(task, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        # safetensors reads raw memory, so non-contiguous arrays need a C-ordered copy (np.ascontiguousarray
        # would also turn 0-d arrays such as BatchNorm's num_batches_tracked into shape (1,)).
        tensors = {name: np.require(array, requirements="C") for name, array in state.items()}
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            save_file(tensors, tmp, metadata={"task": task, "version": str(version)})
            _fsync(tmp, os.O_RDWR)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync(target.parent, os.O_RDONLY)
        return CheckpointRef(task, version, target)

    def load(self, task: str, version: int) -> dict[str, np.ndarray]:
        """A task's checkpoint; ValueError if the file's metadata names another task or version."""
        path = self.path(task, version)
        metadata, tensors = read_safetensors(path)
        if metadata.get("task") != task or metadata.get("version") != str(version):
            raise ValueError(f"checkpoint {path} holds task/version {metadata}, expected {task!r} v{version}")
        return tensors

    def versions(self, task: str) -> list[int]:
        """The task's stored versions, ascending."""
        folder = self.root / check_name("task", task)
        if not folder.is_dir():
            return []
        found = (_CHECKPOINT.match(entry.name) for entry in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_version(self, task: str) -> int | None:
        versions = self.versions(task)
        return versions[-1] if versions else None

    def prune(self, task: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` (>= 1) versions of a task; return the deleted versions."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the latest checkpoint is never deleted), got {keep}")
        doomed = self.versions(task)[:-keep]
        for version in doomed:
            self.path(task, version).unlink(missing_ok=True)
        return doomed


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
