"""Durable file writes: a reader sees the old file or the whole new one, and it survives a crash once we return."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a folder (its entries) or a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(paths: Iterable[Path]) -> None:
    """fsync folders (their entries) or files, one after another."""
    for path in paths:
        fsync_path(path)


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` via a fsynced temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def move_durably(source: Path, target: Path) -> None:
    """Rename `source` to `target` (same file system) once its bytes are on disk."""
    with open(source, "rb") as f:
        os.fsync(f.fileno())
    os.replace(source, target)
    fsync_path(target.parent)
