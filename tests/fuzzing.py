"""Hostile MQTT traffic for the fuzz tests (Hypothesis strategies), and a link that records instead of sending.

Traffic covers every topic either service subscribes to, plus topics outside the tree. Payloads are random
bytes, empty or truncated msgpack, valid messages, and valid messages mutated field by field (integers across
the whole msgpack range, NaN and infinities, long strings, wrong types, missing and unknown fields, long lists);
and complete transfers (chunks and manifest, or one `whole` message) of update or global model payloads that are
right, or wrong in one way: non-finite values, another shape or dtype, a tensor too many or too few, absurd
dimensions, not a state dict at all. Each generated item is a list of (topic, payload) messages.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import msgspec
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocol import ProtocolError, topics
from protocol import limits as lim
from protocol.chunking import sha256_hex, split, transfer_info
from protocol.schemas import (
    DeviceProfile,
    Event,
    GlobalManifest,
    GpuInfo,
    GpuTelemetry,
    HostInfo,
    Message,
    ModelSpec,
    MpsInfo,
    OptimizerSpec,
    Receipt,
    Schedule,
    Status,
    TaskAssignment,
    TaskData,
    Telemetry,
    UpdateManifest,
    WholeTransfer,
    decode,
    encode,
)
from protocol.tensors import describe, encode_state
from protocol.transport import Incoming, MqttLink, MqttSettings

SHA = "ab" * 32
_SERIAL = itertools.count()
#: well-formed rounds ("round" traffic) are numbered from here and fuzzed schedules stay below: an agent never goes
#: back to an earlier round, so one fuzzed schedule for, say, round 28350281 ended training for the rest of a run
ROUND_FLOOR = 1 << 30
MODEL = ModelSpec(name="tiny", num_classes=2, input_size=8)  # the aggregator needs no torchvision name
TRAINABLE = ModelSpec(name="mobilenet_v3_small", num_classes=2, input_size=32)  # one an agent can plan for
#: a small global model: float, integer (BatchNorm's counter) and bool tensors
LAYOUT = {
    "b": np.zeros(2, np.float32),
    "mask": np.ones(2, np.bool_),
    "steps": np.zeros((), np.int64),
    "w": np.zeros((3, 2), np.float32),
}

INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(
        [-1, 0, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
        + [lim.MAX_ROUND + 1, lim.MAX_SAMPLES + 1, lim.MAX_CHUNKS, lim.MAX_TRANSFER_BYTES + 1]
    ),
)
FLOATS = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 1e11 + 1]))
STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "dev1", "dev3", "t", "../../etc/passwd", "a/b", "+", "#", "x" * 300, "y" * 5000]),
)
LEAVES = st.one_of(INTS, FLOATS, STRINGS, st.booleans(), st.none(), st.binary(max_size=64))
ANY = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(STRINGS, inner, max_size=4)),
    max_leaves=8,
)


@st.composite
def mutated(draw, value):
    """`value` (msgpack builtins) with parts replaced by extreme or wrongly typed values, dropped or added."""
    if draw(st.integers(0, 7)) == 0:
        return draw(ANY)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            action = draw(st.integers(0, 7))
            if action == 0:
                continue
            out[key] = draw(mutated(item)) if action <= 2 else item
        if draw(st.integers(0, 9)) == 0:
            out[draw(STRINGS)] = draw(ANY)
        return out
    if isinstance(value, list):
        items = [draw(mutated(item)) if draw(st.integers(0, 3)) == 0 else item for item in value]
        if items and draw(st.integers(0, 9)) == 0:
            items = items * draw(st.sampled_from([2, 70, 300]))
        return items
    if isinstance(value, bool):
        return draw(st.booleans())
    if isinstance(value, int):
        return draw(INTS)
    if isinstance(value, float):
        return draw(FLOATS)
    if isinstance(value, str):
        return draw(STRINGS)
    if isinstance(value, bytes):
        return draw(st.binary(max_size=300))
    return value


@st.composite
def payload_of(draw, message: Message) -> bytes:
    """`message` as sent, mutated, truncated, replaced by random bytes, or empty."""
    valid = encode(message)
    form = draw(st.sampled_from(["mutated", "mutated", "mutated", "valid", "truncated", "bytes", "empty"]))
    if form == "valid":
        return valid
    if form == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if form == "bytes":
        return draw(st.binary(max_size=200))
    if form == "empty":
        return b""
    return msgspec.msgpack.encode(draw(mutated(msgspec.to_builtins(message, builtin_types=(bytes,)))))


# --- what a device sends --------------------------------------------------------------------------------


def device_message(leaf: str, device: str, task: str) -> Message:
    """A valid message of a device's own channel `leaf`, naming `device` and `task`."""
    now = time.time()
    if leaf == "status":
        return Status(state="online", ts=now, agent_version="0.1.0")
    if leaf == "profile":
        return DeviceProfile(
            device=device,
            ts=now,
            agent_version="0.1.0",
            host=HostInfo(
                hostname="h", os="Linux", machine="x86_64", python="3.11", cpu_count=2, memory_bytes=1
            ),
            gpus=[
                GpuInfo(index=0, name="GPU", backend="nvml", memory_total_bytes=1, extra={"uuid": "GPU-1"})
            ],
            mps=MpsInfo(available=False, reason="none"),
            policies=["concurrent"],
            tasks={task: TaskData(samples=50)},
        )
    if leaf == "telemetry":
        gpus = [GpuTelemetry(index=0, utilization_percent=50.0, memory_used_bytes=1, temperature_c=40.0)]
        return Telemetry(
            device=device, ts=now, cpu_percent=1.0, memory_used_bytes=1, memory_total_bytes=2, gpus=gpus
        )
    return Event(device=device, ts=now, kind="failed", round=1, task=task, message="x", metrics={"loss": 1.0})


@st.composite
def state_payload(
    draw, layout: dict[str, np.ndarray], good: bool = False
) -> tuple[bytes, dict[str, np.ndarray] | None]:
    """An encoded state: a well-formed delta of `layout` (also returned; always when `good`), or one that is
    wrong in one way."""
    delta = {name: draw(arrays(a.dtype, a.shape, elements=_elements(a.dtype))) for name, a in layout.items()}
    wrong = ["nonfinite", "shape", "dtype", "extra", "missing", "absurd", "junk"]
    variant = "good" if good else draw(st.sampled_from(["good"] * 3 + wrong))
    first = sorted(layout)[0]
    if variant == "good":
        return encode_state(delta), delta
    if variant == "nonfinite":
        delta["w"] = delta["w"].copy()
        delta["w"].flat[draw(st.integers(0, delta["w"].size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
    elif variant == "shape":
        delta[first] = np.zeros(draw(st.sampled_from([(), (7,), (2, 2, 2)])), delta[first].dtype)
    elif variant == "dtype":
        delta[first] = delta[first].astype(draw(st.sampled_from([np.float64, np.int32, np.uint8])))
    elif variant == "extra":
        delta["zz.extra"] = np.zeros(1, np.float32)
    elif variant == "missing":
        del delta[first]
    elif variant == "absurd":
        shape = draw(st.sampled_from([[0] + [lim.MAX_DIM] * (lim.MAX_NDIM - 1), [2**40, 0], [1] * 9]))
        return msgspec.msgpack.encode({first: ["float32", shape, b""]}), None
    else:
        return draw(st.binary(max_size=300)), None
    return encode_state(delta), None


def _elements(dtype: np.dtype):
    if dtype.kind == "f":
        return st.floats(-1e3, 1e3, width=32)
    if dtype.kind == "b":
        return st.booleans()
    return st.integers(-1000, 1000)


def update_manifest(task: str, device: str, update_id: str, payload_size: int) -> UpdateManifest:
    """The manifest of an update of `payload_size` bytes for round 1 (1 MiB chunks)."""
    info = transfer_info(update_id, bytes(payload_size), 1 << 20)
    return UpdateManifest(
        task=task,
        round=1,
        device=device,
        update_id=update_id,
        base_version=0,
        samples=1,
        codec="dense",
        transfer=info,
    )


@dataclass(frozen=True)
class SentUpdate:
    """A well-formed update a generated transfer carried (the aggregator may still refuse it)."""

    update_id: str
    samples: int
    delta: dict[str, np.ndarray]


@st.composite
def transfer_messages(
    draw, base: str, manifest_of, payload: bytes, *, whole: bool = False
) -> tuple[list[tuple[str, bytes]], str]:
    """Chunks (in any order, one maybe twice or missing) and the manifest (maybe first) of one transfer, or, when
    it fits one chunk and may go `whole` (an update), maybe one whole message (maybe twice); and its id."""
    update_id = f"{draw(st.uuids()).hex[:16]}-{next(_SERIAL)}"  # unique: each id names one payload
    info = transfer_info(update_id, payload, draw(st.sampled_from([64, 1000, 1 << 20])))
    manifest = manifest_of(update_id, info)
    if whole and info.chunks == 1 and draw(st.booleans()):
        message = WholeTransfer(manifest=manifest, chunk=next(split(payload, info)))
        return [(topics.whole(base), encode(message))] * draw(st.integers(1, 2)), update_id
    chunks = draw(st.permutations([(topics.chunk(base, c.index), encode(c)) for c in split(payload, info)]))
    fault = draw(st.sampled_from(["none", "none", "none", "duplicate", "drop", "manifest-first"]))
    if fault == "duplicate":
        chunks = [*chunks, chunks[0]]
    elif fault == "drop" and len(chunks) > 1:
        chunks = chunks[1:]
    sent = (topics.manifest(base), encode(manifest))
    return ([sent, *chunks] if fault == "manifest-first" else [*chunks, sent]), update_id


@st.composite
def update_transfer(draw, task: str, device: str, declared: int, base_version: int = 0):
    """(messages, SentUpdate or None) of one update transfer from `device` for its scheduled round 1."""
    payload, delta = draw(state_payload(LAYOUT))
    samples, round_, version, claimed = draw(st.integers(1, declared)), 1, base_version, device
    if draw(st.booleans()):  # a manifest that is wrong, or fits another round
        samples = draw(st.sampled_from([samples, declared + 1]))
        round_ = draw(st.sampled_from([1, 2]))
        version = draw(st.sampled_from([base_version, base_version + 1]))
        claimed = draw(st.sampled_from([device, "dev1"]))

    def manifest_of(update_id, info):
        return UpdateManifest(
            task=task,
            round=round_,
            device=claimed,
            update_id=update_id,
            base_version=version,
            samples=samples,
            codec="dense",
            transfer=info,
        )

    messages, update_id = draw(
        transfer_messages(topics.update(task, device), manifest_of, payload, whole=True)
    )
    return messages, (SentUpdate(update_id, samples, delta) if delta is not None else None)


ODD_TOPIC_TAILS = [
    "chunks/" + "9" * 5000,
    "chunks/-1",
    "chunks/007",
    "chunks/1048576",
    "junk",
    "manifest/x",
    "",
]


@st.composite
def odd_topic(draw, device: str, task: str) -> str:
    """A topic at the edge of (or outside) the v1 tree."""
    tail = draw(st.sampled_from(ODD_TOPIC_TAILS))
    return draw(
        st.sampled_from(
            [
                f"{topics.update(task, device)}/{tail}",
                f"{topics.global_model(task)}/{tail}",
                f"{topics.PREFIX}/devices/{device}/{tail or 'nothing'}",
                f"{topics.PREFIX}/tasks/{'t' * 65}/updates/{device}/manifest",
                f"{topics.PREFIX}/devices/{'d' * 65}/status",
                "fedmt/v2/devices/x/status",
                draw(st.text(max_size=60)),
            ]
        )
    )


@st.composite
def aggregator_traffic(draw, devices: list[str], tasks: list[str], declared: int = 50):
    """(messages, SentUpdate or None): what devices send the aggregator, hostile in every way."""
    device, task = draw(st.sampled_from(devices)), draw(st.sampled_from(tasks))
    kind = draw(
        st.sampled_from(
            ["status", "profile", "telemetry", "events", "manifest", "chunk", "whole", "odd"]
            + ["transfer"] * 4
        )
    )
    if kind in topics.DEVICE_LEAVES:
        claimed = draw(st.sampled_from([device, device, "dev1", "dev9"]))
        payload = draw(payload_of(device_message(kind, claimed, task)))
        return [(topics.device(device, kind), payload)], None
    if kind == "transfer":
        return draw(update_transfer(task, device, declared))
    if kind == "odd":
        return [(draw(odd_topic(device, task)), draw(st.binary(max_size=64)))], None
    base = topics.update(task, device)
    info = transfer_info(draw(st.uuids()).hex, b"\0" * 100, draw(st.sampled_from([64, 100])))
    manifest = UpdateManifest(
        task=task,
        round=1,
        device=device,
        update_id=info.id,
        base_version=0,
        samples=1,
        codec="dense",
        transfer=info,
    )
    if kind == "manifest":
        return [(topics.manifest(base), draw(payload_of(manifest)))], None
    chunk = next(split(b"\0" * 100, info))
    if kind == "whole":  # the first of two chunks, or the only one
        return [(topics.whole(base), draw(payload_of(WholeTransfer(manifest=manifest, chunk=chunk))))], None
    index = draw(st.sampled_from([0, 1, 2**20 - 1]))
    return [(topics.chunk(base, index), draw(payload_of(chunk)))], None


# --- what the aggregator sends an agent -----------------------------------------------------------------


def assignment(
    task: str, base_version: int = 0, sha256: str = SHA, model: ModelSpec = TRAINABLE
) -> TaskAssignment:
    return TaskAssignment(
        task=task,
        model=model,
        optimizer=OptimizerSpec(),
        base_version=base_version,
        base_sha256=sha256,
        local_steps=1,
        batch_size=4,
    )


@st.composite
def global_transfer(draw, task: str, version: int, good: bool = False) -> tuple[list[tuple[str, bytes]], str]:
    """Messages of one global model transfer for `task` (right, or wrong in one way) and the payload's sha256."""
    payload, delta = draw(state_payload(LAYOUT, good))
    tensors = describe(delta if delta is not None else LAYOUT)

    def manifest_of(transfer_id, info):
        return GlobalManifest(
            task=task, version=version, model=MODEL, tensors=tensors, transfer=info, created_at=time.time()
        )

    return draw(transfer_messages(topics.global_model(task), manifest_of, payload))[0], sha256_hex(payload)


@st.composite
def agent_traffic(draw, device: str, tasks: list[str]):
    """Messages the aggregator (or a broken one) could send an agent: schedules, receipts, global models."""
    task = draw(st.sampled_from(tasks))
    kind = draw(
        st.sampled_from(["schedule", "round", "round", "receipts", "manifest", "chunk", "transfer", "odd"])
    )
    now = time.time()
    if kind == "round":  # a round as the aggregator runs it: its global model, then the schedule that uses it
        version = draw(st.integers(0, 3))
        messages, sha256 = draw(
            global_transfer(task, version, good=draw(st.sampled_from([True, True, False])))
        )
        schedule = Schedule(
            device=device,
            round=ROUND_FLOOR + next(_SERIAL),  # rounds move on (an agent skips rounds below one it took)
            issued_at=now,
            deadline=now + 600,
            tasks=[assignment(task, version, sha256)],
            policy=draw(st.sampled_from([None, "concurrent", "fedmt", "temporal"])),
        )
        return [*messages, (topics.schedule(device, task), encode(schedule))]
    if kind == "schedule":
        schedule = Schedule(
            device=draw(st.sampled_from([device, device, "dev2"])),
            round=draw(st.integers(1, 5)),
            issued_at=now,
            deadline=draw(st.sampled_from([now - 10, now + 600])),
            tasks=[
                assignment(task, draw(st.integers(0, 3)), model=draw(st.sampled_from([MODEL, TRAINABLE])))
            ],
            policy=draw(st.sampled_from([None, "concurrent", "fedmt", "temporal"])),
        )
        return [(topics.schedule(device, task), draw(payload_of(schedule).filter(_below_round_floor)))]
    if kind == "receipts":
        receipt = Receipt(
            update_id=draw(st.uuids()).hex,
            task=task,
            round=draw(st.integers(0, 5)),
            status=draw(st.sampled_from(["accepted", "duplicate", "rejected"])),
        )
        return [(topics.device(device, "receipts"), draw(payload_of(receipt)))]
    if kind == "transfer":
        return draw(global_transfer(task, draw(st.integers(0, 3))))[0]
    if kind == "odd":
        return [(draw(odd_topic(device, task)), draw(st.binary(max_size=64)))]
    base = topics.global_model(task)
    info = transfer_info(f"{task}.v9", b"\0" * 100, 64)
    if kind == "manifest":
        manifest = GlobalManifest(
            task=task, version=9, model=MODEL, tensors=describe(LAYOUT), transfer=info, created_at=now
        )
        return [(topics.manifest(base), draw(payload_of(manifest)))]
    chunk = next(split(b"\0" * 100, info))
    return [(topics.chunk(base, draw(st.sampled_from([0, 1, 2**20 - 1]))), draw(payload_of(chunk)))]


def _below_round_floor(payload: bytes) -> bool:
    """Whether a fuzzed schedule payload, if an agent takes it at all, names a round below ROUND_FLOOR."""
    try:
        return decode(payload, Schedule).round < ROUND_FLOOR
    except ProtocolError:
        return True


# --- a link that records ----------------------------------------------------------------------------------


class RecordingLink(MqttLink):
    """An MqttLink that never connects: what a service publishes is recorded, so a test can call the service's
    handlers directly and read its receipts, schedules and models."""

    def __init__(self) -> None:
        super().__init__(MqttSettings(username="recording"))
        self.connected.set()
        self.published: list[tuple[str, bytes, bool]] = []
        self.acked: list[Incoming] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False):
        self.published.append((topic, bytes(payload), retain))

    def ack(self, message: Incoming) -> None:
        self.acked.append(message)

    def on(self, topic_end: str) -> list[bytes]:
        """Payloads published so far on topics ending with `topic_end`."""
        return [payload for topic, payload, _ in self.published if topic.endswith(topic_end)]

    def updates_sent(self) -> list[UpdateManifest]:
        """The manifests of the update transfers published so far, in order (sent apart or whole)."""
        sent = []
        for topic, payload, _ in self.published:
            ref = topics.parse(topic)
            if ref.kind == "update" and ref.part == "manifest":
                sent.append(decode(payload, UpdateManifest))
            elif ref.kind == "update" and ref.part == "whole":
                sent.append(decode(payload, WholeTransfer[UpdateManifest]).manifest)
        return sent
