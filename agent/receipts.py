"""The rounds whose updates the aggregator acknowledged, per task, so a restart never trains them again."""

from __future__ import annotations

from pathlib import Path

import msgspec

from common.durable import write_atomically


class ReceiptLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._done: dict[str, int] = (
            msgspec.json.decode(self.path.read_bytes(), type=dict[str, int]) if self.path.exists() else {}
        )

    def done(self, task: str, round_: int) -> bool:
        return self._done.get(task, 0) >= round_

    def mark_done(self, task: str, round_: int) -> None:
        if self._done.get(task, 0) < round_:
            self._done[task] = round_
            write_atomically(self.path, msgspec.json.encode(self._done))
