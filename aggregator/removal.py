"""Deleting files off the service's thread: a finalised round's update payloads are garbage once its global
version is durable, and a thousand unlinks of freshly synced files take ~160 ms on ext4, which would otherwise
stand between a round's last update and its new global version."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)


class BackgroundRemover:
    """Removes files on one thread of its own, in the order asked; `close` waits for what was asked. A file that
    cannot be removed is logged and left (the next start removes what no open round holds)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remove-files")

    def remove(self, paths: Iterable[Path]) -> Future[None]:
        return self._pool.submit(_remove, list(paths))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _remove(paths: list[Path]) -> None:
    failed = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            failed.append(f"{path}: {exc}")
    if failed:
        log.warning("could not remove %d files: %s", len(failed), failed[:3])
