"""Updates waiting for the aggregator's receipt. They survive restarts and are resent until acknowledged."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import msgspec

from common.durable import move_durably, write_atomically
from protocol import ProtocolError
from protocol.schemas import UpdateManifest, decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    manifest: UpdateManifest
    payload_path: Path


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, manifest: UpdateManifest, payload_file: Path) -> Pending:
        """Keep the payload and its manifest durably (the manifest last: it marks the entry complete)."""
        payload = self.root / f"{manifest.update_id}.payload"
        move_durably(payload_file, payload)
        write_atomically(self.root / f"{manifest.update_id}.manifest", encode(manifest))
        return Pending(manifest, payload)

    def pending(self) -> list[Pending]:
        entries = []
        for path in sorted(self.root.glob("*.manifest")):
            try:
                manifest = decode(path.read_bytes(), UpdateManifest)
            except ProtocolError as exc:
                log.error("dropping unreadable outbox entry %s: %s", path.name, exc)
                path.unlink()
                continue
            entries.append(Pending(manifest, path.with_suffix(".payload")))
        return entries

    def get(self, update_id: str) -> Pending | None:
        """The waiting update with this id, if any."""
        return next((p for p in self.pending() if p.manifest.update_id == update_id), None)

    def renew_transfer(self, pending: Pending) -> Pending:
        """The same update as a new transfer (a fresh transfer id): a transfer the aggregator refused stays
        refused there, while the update it carries is still wanted."""
        transfer = msgspec.structs.replace(pending.manifest.transfer, id=uuid.uuid4().hex)
        manifest = msgspec.structs.replace(pending.manifest, transfer=transfer)
        write_atomically(self.root / f"{manifest.update_id}.manifest", encode(manifest))
        return Pending(manifest, pending.payload_path)

    def find(self, task: str, round_: int) -> Pending | None:
        return next(
            (p for p in self.pending() if (p.manifest.task, p.manifest.round) == (task, round_)), None
        )

    def remove(self, update_id: str) -> bool:
        manifest = self.root / f"{update_id}.manifest"
        existed = manifest.exists()
        manifest.unlink(missing_ok=True)
        (self.root / f"{update_id}.payload").unlink(missing_ok=True)
        return existed

    def drop_older_than(self, round_: int, tasks: Collection[str]) -> list[str]:
        """Forget updates of `tasks` for rounds before `round_`: the aggregator that owns them closed those."""
        stale = [
            p.manifest.update_id
            for p in self.pending()
            if p.manifest.round < round_ and p.manifest.task in tasks
        ]
        for update_id in stale:
            self.remove(update_id)
        return stale
