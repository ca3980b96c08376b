"""Verified global models on disk, by task and version: the payload as received plus its manifest."""

from __future__ import annotations

from pathlib import Path

from common.durable import move_durably, write_atomically
from protocol import ProtocolError
from protocol.chunking import sha256_hex
from protocol.codecs import make_codec
from protocol.deltas import apply
from protocol.schemas import GlobalManifest, decode, encode
from protocol.tensors import check_finite, check_layout, decode_state, describe, encode_state


class ModelCache:
    def __init__(self, root: Path, keep_versions: int = 2) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions

    def payload_path(self, task: str, version: int) -> Path:
        return self.root / task / f"v{version:06d}.state"

    def get(self, task: str, version: int) -> GlobalManifest | None:
        manifest_path = self.payload_path(task, version).with_suffix(".manifest")
        if not manifest_path.exists() or not self.payload_path(task, version).exists():
            return None
        return decode(manifest_path.read_bytes(), GlobalManifest)

    def has(self, task: str, version: int, sha256: str) -> bool:
        manifest = self.get(task, version)
        return manifest is not None and manifest.transfer.sha256 == sha256

    def store(self, manifest: GlobalManifest, payload_file: Path) -> Path:
        """Check the payload against its manifest (names, shapes, dtypes, finite) and keep it; idempotent."""
        state = decode_state(payload_file.read_bytes())
        what = f"global model {manifest.task} v{manifest.version}"
        check_layout(state, manifest.tensors, what)
        check_finite(state, what)
        target = self.payload_path(manifest.task, manifest.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        move_durably(payload_file, target)
        write_atomically(target.with_suffix(".manifest"), encode(manifest))
        self._prune(manifest.task)
        return target

    def holds_base_of(self, manifest: GlobalManifest) -> bool:
        """Whether the version that `manifest`'s delta starts from is here, so the delta is all to fetch."""
        delta = manifest.delta
        return delta is not None and self.has(manifest.task, delta.base_version, delta.base_sha256)

    def rebuild(self, manifest: GlobalManifest, delta_file: Path) -> Path:
        """The version `manifest` describes, rebuilt from its delta (in `delta_file`) and the cached base, as a
        payload file next to `delta_file`; ProtocolError unless it is that version bit for bit (its sha256)."""
        delta = manifest.delta
        base = decode_state(self.payload_path(manifest.task, delta.base_version).read_bytes())
        changes = make_codec(delta.codec).decode(delta_file.read_bytes(), describe(base))
        payload = encode_state(apply(base, changes))
        if sha256_hex(payload) != manifest.transfer.sha256:
            raise ProtocolError(
                f"global model {manifest.task} v{manifest.version} rebuilt from its delta does not match its sha256"
            )
        rebuilt = delta_file.with_suffix(".rebuilt")
        rebuilt.write_bytes(payload)
        return rebuilt

    def _prune(self, task: str) -> None:
        manifests = sorted((self.root / task).glob("v*.manifest"))
        for old in manifests[: -self.keep_versions]:
            old.with_suffix(".state").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
