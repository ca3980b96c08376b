"""The versioned MQTT topic tree (v1).

```
fedmt/v1/devices/{device}/status                 retained online/offline (birth + LWT)   agent -> all
fedmt/v1/devices/{device}/profile                retained device profile                  agent -> aggregator
fedmt/v1/devices/{device}/telemetry              periodic load/memory/power               agent -> aggregator
fedmt/v1/devices/{device}/events                 task started/finished/failed             agent -> aggregator
fedmt/v1/devices/{device}/schedule/{task}        retained round plan, one per task        aggregator -> agent
fedmt/v1/devices/{device}/receipts               update accepted/duplicate/rejected       aggregator -> agent
fedmt/v1/tasks/{task}/global/manifest            retained global model manifest           aggregator -> agents
fedmt/v1/tasks/{task}/global/chunks/{i}          retained global model chunks             aggregator -> agents
fedmt/v1/tasks/{task}/global/delta/chunks/{i}    retained chunks of the version as a delta aggregator -> agents
fedmt/v1/tasks/{task}/updates/{device}/manifest  update manifest                          agent -> aggregator
fedmt/v1/tasks/{task}/updates/{device}/chunks/{i} update chunks                           agent -> aggregator
fedmt/v1/tasks/{task}/updates/{device}/whole     an update of one chunk with its manifest agent -> aggregator
```

The device id is the MQTT username, so the broker ACL (`%u`) confines a device to its own topics. Ids are 1-64
characters and chunk indices below protocol.limits.MAX_CHUNKS; anything else is not a v1 topic. A device has one
retained schedule per task, so aggregators that own different tasks publish side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.limits import MAX_CHUNKS

PREFIX = "fedmt/v1"
DEVICE_LEAVES = ("status", "profile", "telemetry", "events", "receipts")
SCHEDULE = "schedule"  # fedmt/v1/devices/{device}/schedule/{task}
RETAINED_BY_DEVICES = ("status", "profile")  # a device's other messages are never retained
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"  # \Z: `$` would admit a trailing newline
_NAME = re.compile(NAME_PATTERN)
_CHUNK_INDEX = re.compile(rf"^(0|[1-9][0-9]{{0,{len(str(MAX_CHUNKS - 1)) - 1}}})\Z")


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid device or task id (one topic level, no wildcards, file-name safe)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProtocolError(
            f"invalid {kind} id {name if not isinstance(name, str) else name[:80]!r}: expected 1-64 of [A-Za-z0-9_.-], not starting with . - _"
        )
    return name


def device(device_id: str, leaf: str) -> str:
    """Topic of one of a device's own channels (`leaf` in DEVICE_LEAVES)."""
    if leaf not in DEVICE_LEAVES:
        raise ValueError(f"unknown device channel {leaf!r}; expected one of {DEVICE_LEAVES}")
    return f"{PREFIX}/devices/{check_name('device', device_id)}/{leaf}"


def schedule(device_id: str, task: str) -> str:
    """Topic of a device's retained schedule for one task."""
    return f"{PREFIX}/devices/{check_name('device', device_id)}/{SCHEDULE}/{check_name('task', task)}"


def schedules(device_id: str) -> str:
    """Subscription filter for all of a device's task schedules."""
    return f"{PREFIX}/devices/{check_name('device', device_id)}/{SCHEDULE}/+"


def retained_by_devices(topic: str) -> bool:
    """Whether a device may leave a retained message on `topic`: only its status and profile."""
    levels = topic.split("/")
    return len(levels) == 5 and levels[2] == "devices" and levels[4] in RETAINED_BY_DEVICES


def global_model(task: str) -> str:
    """Base topic of a task's retained global model transfer."""
    return f"{PREFIX}/tasks/{check_name('task', task)}/global"


def global_delta(task: str) -> str:
    """Base topic of a task's global model as a delta to the version before (its manifest is the global one)."""
    return f"{global_model(task)}/delta"


def update(task: str, device_id: str) -> str:
    """Base topic of a device's update transfers for a task."""
    return f"{PREFIX}/tasks/{check_name('task', task)}/updates/{check_name('device', device_id)}"


def manifest(base: str) -> str:
    return f"{base}/manifest"


def chunk(base: str, index: int) -> str:
    return f"{base}/chunks/{index}"


def whole(base: str) -> str:
    """A transfer of one chunk and its manifest in one message (`schemas.WholeTransfer`)."""
    return f"{base}/whole"


def all_below(base: str) -> str:
    """Subscription filter for everything under a base topic."""
    return f"{base}/#"


def every_device(leaf: str) -> str:
    """Subscription filter for one channel (`leaf` in DEVICE_LEAVES) of every device."""
    if leaf not in DEVICE_LEAVES:
        raise ValueError(f"unknown device channel {leaf!r}; expected one of {DEVICE_LEAVES}")
    return f"{PREFIX}/devices/+/{leaf}"


def every_update(task: str | None = None) -> str:
    """Subscription filter for every device's update transfers of `task` (None: of every task)."""
    return f"{PREFIX}/tasks/{'+' if task is None else check_name('task', task)}/updates/#"


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic. `kind` is a device leaf, 'schedule' (with its task), or 'global' / 'global_delta' /
    'update' for transfers."""

    kind: str  # a device leaf, 'schedule', 'global' or 'update'
    device: str | None = None
    task: str | None = None
    part: str | None = None  # 'manifest', 'chunk' or 'whole' for transfers
    index: int | None = None  # chunk index


def parse(topic: str) -> TopicRef:
    """Parse a v1 topic; raise ProtocolError for anything outside the tree."""
    levels = topic.split("/")
    if levels[:2] != PREFIX.split("/"):
        raise ProtocolError(f"topic {topic[:200]!r} is not under {PREFIX}/")
    rest = levels[2:]
    if len(rest) == 3 and rest[0] == "devices" and rest[2] in DEVICE_LEAVES:
        return TopicRef(kind=rest[2], device=check_name("device", rest[1]))
    if len(rest) == 4 and rest[0] == "devices" and rest[2] == SCHEDULE:
        return TopicRef(kind=SCHEDULE, device=check_name("device", rest[1]), task=check_name("task", rest[3]))
    if len(rest) >= 3 and rest[0] == "tasks":
        task = check_name("task", rest[1])
        if rest[2] == "global" and rest[3:4] == ["delta"] and rest[4:5] == ["chunks"]:
            return _transfer_ref("global_delta", task, None, rest[4:], topic)
        if rest[2] == "global":
            return _transfer_ref("global", task, None, rest[3:], topic)
        if rest[2] == "updates" and len(rest) >= 4:
            return _transfer_ref("update", task, check_name("device", rest[3]), rest[4:], topic)
    raise ProtocolError(f"topic {topic[:200]!r} is not in the v1 topic tree")


def _transfer_ref(kind: str, task: str, device_id: str | None, tail: list[str], topic: str) -> TopicRef:
    if tail == ["manifest"] or (tail == ["whole"] and kind == "update"):  # globals are fetched apart
        return TopicRef(kind=kind, task=task, device=device_id, part=tail[0])
    if len(tail) == 2 and tail[0] == "chunks" and _CHUNK_INDEX.match(tail[1]) and int(tail[1]) < MAX_CHUNKS:
        return TopicRef(kind=kind, task=task, device=device_id, part="chunk", index=int(tail[1]))
    raise ProtocolError(
        f"topic {topic[:200]!r}: expected .../manifest, .../whole or .../chunks/<index below {MAX_CHUNKS}>"
    )
