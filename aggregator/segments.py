"""Small update payloads appended to one file per task round (a segment) rather than a file each: creating,
linking and deleting a file per update is most of what a burst of small updates costs on ext4. The ledger keeps
each payload's segment, offset and size; what was appended is durable once the group's sync has fsynced the
paths `written` names (a new segment's folder with it), and a segment goes with its round's other payloads after
finalisation. Bytes appended for an update the ledger did not take stay in the segment unreferenced."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from protocol.chunking import write_all


class Segments:
    """The open segment of each task round under `root`/<task>/r<round>/."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._open: dict[tuple[str, int], tuple[Path, int]] = {}  # (task, round) -> (segment, fd)
        # segments appended to since the last `written`, and the folders of new ones
        self._written: set[Path] = set()

    def append(self, task: str, round_: int, data: bytes) -> tuple[Path, int]:
        """Append a payload to the task round's segment; its path and the payload's offset there."""
        segment = self._open.get((task, round_))
        if segment is None:
            folder = self.root / task / f"r{round_:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{uuid.uuid4().hex}.segment"
            segment = self._open[(task, round_)] = (path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._written.add(folder)
        path, fd = segment
        offset = os.fstat(fd).st_size
        write_all(fd, data, offset)
        self._written.add(path)
        return path, offset

    def written(self) -> set[Path]:
        """The segments appended to since the last call, and the folders of those created since: what the next
        sync must make durable."""
        written, self._written = self._written, set()
        return written

    def close(self, task: str, round_: int) -> None:
        """A task round is final: its segment takes no more payloads."""
        segment = self._open.pop((task, round_), None)
        if segment is not None:
            os.close(segment[1])

    def close_all(self) -> None:
        for task, round_ in list(self._open):
            self.close(task, round_)
