"""Message schemas: every message round-trips; anything malformed raises ProtocolError naming the field."""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from protocol import ProtocolError
from protocol import limits as lim
from protocol import schemas as s
from protocol.schemas import decode, encode, to_builtins
from tests.test_protocol_topics import BAD_IDS

SHA = "0123456789abcdef" * 4
INFO = s.TransferInfo(id="upd-1.r3", size=10, sha256=SHA, chunk_size=4, chunks=3)
DELTA = s.GlobalDelta(base_version=3, base_sha256=SHA, codec="fp16+zstd", transfer=INFO)
MODEL = s.ModelSpec(name="resnet18", num_classes=10, input_size=32)
ASSIGNMENT = s.TaskAssignment(
    task="cifar10",
    model=MODEL,
    optimizer=s.OptimizerSpec(name="adam", lr=1e-3),
    base_version=4,
    base_sha256=SHA,
)

SAMPLES: list[s.Message] = [
    s.CodecSpec(name="topk+zstd", fraction=0.01, momentum=0.5),
    s.Status(state="online", ts=1.5, agent_version="0.1.0"),
    s.Status(state="offline", ts=0.0),
    s.HostInfo(
        hostname="jetson", os="Linux", machine="aarch64", python="3.10.12", cpu_count=6, memory_bytes=8 << 30
    ),
    s.GpuInfo(index=0, name="Orin", backend="jtop", memory_total_bytes=8 << 30),
    s.GpuInfo(
        index=1,
        name="H100",
        backend="nvml",
        memory_total_bytes=80 << 30,
        memory_free_bytes=1,
        compute_capability="9.0",
        sm_count=132,
        clock_sm_mhz=1980,
        clock_memory_mhz=2619,
        power_limit_w=700.0,
        compute_mode="Default",
        mig_mode=False,
        extra={"bus": "0000:01:00.0"},
    ),
    s.MpsInfo(available=False, reason="no control binary"),
    s.TaskData(samples=0),
    s.DeviceProfile(
        device="dev-1",
        ts=2.0,
        agent_version="0.1.0",
        host=s.HostInfo(
            hostname="h", os="Linux", machine="x86_64", python="3.11", cpu_count=16, memory_bytes=1
        ),
        driver_version="550.54",
        cuda_version="12.4",
        gpus=[s.GpuInfo(index=0, name="A", backend="nvml", memory_total_bytes=1)],
        mps=s.MpsInfo(
            available=True, reason="", control_binary="/usr/bin/nvidia-cuda-mps-control", daemon_running=True
        ),
        policies=["fedavg", "mps"],
        predictor="v1.onnx",
        tasks={"cifar10": s.TaskData(samples=500), "mnist": s.TaskData(samples=1)},
    ),
    s.GpuTelemetry(index=0, utilization_percent=99.5, memory_used_bytes=3, power_w=10.0, temperature_c=-5.0),
    s.Telemetry(
        device="dev-1",
        ts=3.0,
        cpu_percent=12.5,
        memory_used_bytes=1,
        memory_total_bytes=2,
        gpus=[s.GpuTelemetry(index=0)],
    ),
    MODEL,
    s.OptimizerSpec(),
    ASSIGNMENT,
    s.Schedule(
        device="dev-1", round=1, issued_at=10.0, deadline=70.0, tasks=[ASSIGNMENT] * 2, policy="fedmt"
    ),
    s.Event(
        device="dev-1",
        ts=4.0,
        kind="finished",
        round=0,
        task="cifar10",
        message="ok",
        metrics={"loss": 0.25, "acc": 0.9},
    ),
    s.Receipt(update_id="upd-1", task="cifar10", round=3, status="rejected", reason="stale base"),
    INFO,
    s.TensorInfo(name="layer1.0.conv1.weight", dtype="float32", shape=[64, 64, 3, 3]),
    s.GlobalManifest(
        task="cifar10",
        version=4,
        model=MODEL,
        tensors=[s.TensorInfo(name="w", dtype="float32", shape=[])],
        transfer=INFO,
        created_at=5.0,
        delta=DELTA,
    ),
    DELTA,
    s.UpdateManifest(
        task="cifar10",
        round=3,
        device="dev-1",
        update_id="upd-1.r3",
        base_version=4,
        samples=500,
        codec="dense",
        transfer=INFO,
        metrics={"loss": 1.0},
    ),
    s.Chunk(transfer="upd-1.r3", index=2, total=3, chunk_size=4, size=10, sha256=SHA, data=b"\x00\xff"),
]
SAMPLES.append(
    s.WholeTransfer(
        manifest=next(m for m in SAMPLES if isinstance(m, s.UpdateManifest)),
        chunk=s.Chunk(
            transfer="upd-1.r3", index=0, total=1, chunk_size=10, size=2, sha256=SHA, data=b"\x00\xff"
        ),
    )
)


def wire_type(message: s.Message) -> type:
    """The type a receiver decodes `message` as (a whole transfer: with its manifest's type)."""
    if isinstance(message, s.WholeTransfer):
        return s.WholeTransfer[type(message.manifest)]
    return type(message)


def all_message_types(base: type = s.Message) -> set[type]:
    found = set()
    for sub in base.__subclasses__():
        found |= {sub} | all_message_types(sub)
    return found


def sample(kind: type) -> s.Message:
    return next(m for m in SAMPLES if type(m) is kind)


def raw(message: s.Message, path: str = "", value=None, *, drop: bool = False) -> bytes:
    """msgpack of `message` with the field at dotted `path` (list indexes as numbers) set to `value` or dropped."""
    data = msgspec.to_builtins(message)
    if path:
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if drop:
            del node[leaf]
        else:
            node[leaf] = value
    return msgspec.msgpack.encode(data)


def rejected(payload: bytes, kind: type) -> str:
    with pytest.raises(ProtocolError) as exc:
        decode(payload, kind)
    return str(exc.value)


def assert_names(message: str, field: str) -> None:
    """The error names `field` as a whole word (so 'size' is not satisfied by 'chunk_size')."""
    assert re.search(rf"\b{re.escape(field)}\b", message), message


# --- round trips ---------------------------------------------------------------------------------------


def test_samples_cover_every_message_type():
    assert all_message_types() == {type(m) for m in SAMPLES}


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    payload = encode(message)
    assert isinstance(payload, bytes)
    assert decode(payload, wire_type(message)) == message
    assert decode(memoryview(payload), wire_type(message)) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_to_builtins_is_json_serialisable_and_re_decodable(message):
    builtins = to_builtins(message)
    json.dumps(builtins)
    if not isinstance(message, s.Chunk | s.WholeTransfer):  # bytes become base64 text in builtins
        assert decode(msgspec.msgpack.encode(builtins), type(message)) == message


def test_optional_fields_take_defaults_when_absent():
    status = decode(msgspec.msgpack.encode({"state": "online", "ts": 1.0}), s.Status)
    assert status == s.Status(state="online", ts=1.0)
    sent = sample(s.Schedule)
    task = msgspec.msgpack.decode(encode(sent))["tasks"][0]
    assert "codec" not in task and "initial_batch_growth" not in task  # defaults stay off the wire
    assert "train_seed" not in task
    assert decode(encode(sent), s.Schedule).tasks[0].codec == s.CodecSpec(name="dense")


def test_a_round_seed_is_the_round_at_train_seed_0_and_distinct_for_every_seed_and_round():
    assignment = sample(s.TaskAssignment)
    assert assignment.train_seed == 0 and assignment.round_seed(7) == 7  # what devices trained with before
    seeds = {
        msgspec.structs.replace(assignment, train_seed=seed).round_seed(round_)
        for seed in (0, 1, lim.MAX_TRAIN_SEED)
        for round_ in (1, 2, lim.MAX_ROUND)
    }
    assert len(seeds) == 9
    assert max(seeds) * 1_000_003 < 2**64  # a data loader's seed arithmetic stays in 64 bits


def test_chunk_is_a_compact_array_on_the_wire():
    chunk = sample(s.Chunk)
    decoded = msgspec.msgpack.decode(encode(chunk))
    assert isinstance(decoded, list) and decoded[-1] == chunk.data
    assert len(encode(chunk)) < len(chunk.data) + 120


def test_messages_are_immutable():
    with pytest.raises(AttributeError):
        sample(s.Status).ts = 2.0


# --- rejections ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b'{"state": "online", "ts": 1}',
        b"\x81",
        bytes(range(200)),
        encode(sample(s.Status))[:-1],
    ],
    ids=["empty", "reserved-byte", "json", "truncated-map", "garbage", "truncated-message"],
)
@pytest.mark.parametrize("kind", [s.Status, s.Schedule, s.Chunk])
def test_non_msgpack_input_raises_protocol_error(payload, kind):
    rejected(payload, kind)


@pytest.mark.parametrize(
    "payload, kind",
    [
        (msgspec.msgpack.encode(["online", 1.0]), s.Status),
        (msgspec.msgpack.encode(None), s.Status),
        (msgspec.msgpack.encode("online"), s.Status),
        (msgspec.msgpack.encode({"transfer": "t"}), s.Chunk),
        (encode(sample(s.Status)), s.Telemetry),
        (encode(sample(s.UpdateManifest)), s.GlobalManifest),
    ],
    ids=["list-for-map", "nil", "string", "map-for-array-chunk", "status-as-telemetry", "update-as-global"],
)
def test_wrong_top_level_shape_raises_protocol_error(payload, kind):
    rejected(payload, kind)


@pytest.mark.parametrize(
    "kind, field",
    [
        (s.Status, "ts"),
        (s.Status, "state"),
        (s.Schedule, "tasks"),
        (s.Schedule, "round"),
        (s.Event, "kind"),
        (s.UpdateManifest, "transfer"),
        (s.UpdateManifest, "samples"),
        (s.TaskAssignment, "base_sha256"),
        (s.DeviceProfile, "host"),
    ],
)
def test_missing_required_field_is_named(kind, field):
    assert_names(rejected(raw(sample(kind), field, drop=True), kind), field)


@pytest.mark.parametrize("kind", [s.Status, s.Schedule, s.UpdateManifest, s.OptimizerSpec])
def test_unknown_extra_field_is_named(kind):
    assert_names(rejected(raw(sample(kind), "sneaky_field", 1), kind), "sneaky_field")


def test_unknown_field_in_nested_message_is_rejected():
    assert_names(
        rejected(raw(sample(s.Schedule), "tasks.0.model.sneaky_field", 1), s.Schedule), "sneaky_field"
    )


def test_extra_element_in_array_chunk_is_rejected():
    fields = msgspec.msgpack.decode(encode(sample(s.Chunk)))
    rejected(msgspec.msgpack.encode(fields + ["extra"]), s.Chunk)
    rejected(msgspec.msgpack.encode(fields[:-1]), s.Chunk)


@pytest.mark.parametrize(
    "kind, path, value",
    [
        (s.Schedule, "round", "3"),
        (s.Schedule, "round", 3.0),
        (s.Schedule, "round", True),
        (s.Schedule, "deadline", "soon"),
        (s.Telemetry, "memory_used_bytes", "1"),
        (s.Telemetry, "gpus", {}),
        (s.Status, "ts", None),
        (s.GpuInfo, "mig_mode", 1),
        (s.Event, "metrics", {"loss": "low"}),
        (s.Chunk, "data", "text"),
        (s.TransferInfo, "size", [10]),
    ],
)
def test_wrong_type_is_rejected_naming_the_field(kind, path, value):
    message = sample(kind)
    if kind is s.Chunk:  # array-like: build the array by hand
        fields = msgspec.msgpack.decode(encode(message))
        fields[-1] = value
        rejected(msgspec.msgpack.encode(fields), kind)
        return
    assert_names(rejected(raw(message, path, value), kind), path.split(".")[-1])


@pytest.mark.parametrize(
    "kind, path, value",
    [
        (s.Schedule, "round", 0),
        (s.Schedule, "round", -1),
        (s.Event, "round", -1),
        (s.Receipt, "round", -1),
        (s.UpdateManifest, "round", 0),
        (s.UpdateManifest, "samples", 0),
        (s.Status, "ts", -0.001),
        (s.Status, "ts", float("nan")),
        (s.Schedule, "deadline", -1.0),
        (s.Telemetry, "cpu_percent", -5.0),
        (s.Telemetry, "gpus.0.utilization_percent", -1.0),
        (s.OptimizerSpec, "lr", 0.0),
        (s.OptimizerSpec, "lr", -0.01),
        (s.OptimizerSpec, "lr", 10.5),
        (s.OptimizerSpec, "momentum", 1.0),
        (s.OptimizerSpec, "weight_decay", -0.1),
        (s.ModelSpec, "num_classes", 1),
        (s.ModelSpec, "input_size", 7),
        (s.ModelSpec, "input_size", 1025),
        (s.TaskAssignment, "batch_size", 0),
        (s.TaskAssignment, "train_seed", -1),
        (s.HostInfo, "cpu_count", 0),
        (s.GpuInfo, "index", -1),
        (s.TransferInfo, "chunk_size", 0),
        (s.TransferInfo, "size", -1),
        (s.Event, "message", "x" * 2001),
        (s.Event, "metrics", {f"m{i}": 1.0 for i in range(lim.MAX_METRICS + 1)}),
        (s.Event, "metrics", {"k" * (lim.MAX_METRIC_NAME + 1): 1.0}),
        (s.TensorInfo, "name", ""),
        (s.TensorInfo, "shape", [3, -1]),
        (s.ModelSpec, "name", "ResNet18"),
        (s.OptimizerSpec, "name", "rmsprop"),
        (s.Status, "state", "sleeping"),
        (s.Event, "kind", "exploded"),
        (s.Receipt, "status", "maybe"),
        (s.UpdateManifest, "codec", "Top-K"),
        (s.UpdateManifest, "codec", "topk+gzip"),
        (s.CodecSpec, "fraction", 0.0),
        (s.CodecSpec, "momentum", 1.0),
        (s.GpuInfo, "backend", "rocm"),
        (s.Schedule, "policy", "greedy"),
    ],
)
def test_out_of_range_value_is_rejected_naming_the_field(kind, path, value):
    assert_names(rejected(raw(sample(kind), path, value), kind), path.split(".")[-1])


@pytest.mark.parametrize(
    "kind, path, value",
    [
        (s.OptimizerSpec, "lr", 10.0),
        (s.OptimizerSpec, "momentum", 0.0),
        (s.ModelSpec, "input_size", 8),
        (s.Event, "message", "x" * 2000),
        (s.Schedule, "tasks", [to_builtins(ASSIGNMENT)] * 64),
        (s.Receipt, "update_id", "a" * 128),
        (s.Telemetry, "device", "A" * 64),
        (s.Telemetry, "device", "9.dev_x-y"),
    ],
)
def test_boundary_values_are_accepted(kind, path, value):
    decoded = decode(raw(sample(kind), path, value), kind)
    assert to_builtins(decoded)[path] == value


@pytest.mark.parametrize(
    "kind, path, value",
    [
        (s.Schedule, "round", lim.MAX_ROUND + 1),
        (s.Event, "round", 2**64 - 1),
        (s.Receipt, "round", 2**63),
        (s.UpdateManifest, "round", lim.MAX_ROUND + 1),
        (s.UpdateManifest, "samples", lim.MAX_SAMPLES + 1),
        (s.UpdateManifest, "base_version", 2**63 - 1),
        (s.TaskData, "samples", 2**64 - 1),  # reached SQLite as an OverflowError before
        (s.GlobalManifest, "version", lim.MAX_ROUND + 1),
        (s.TaskAssignment, "base_version", lim.MAX_ROUND + 1),
        (s.TaskAssignment, "batch_size", lim.MAX_BATCH_SIZE + 1),
        (s.TaskAssignment, "train_seed", lim.MAX_TRAIN_SEED + 1),
        (s.TaskAssignment, "max_batch_size", 2**63),
        (s.TaskAssignment, "local_epochs", lim.MAX_LOCAL_EPOCHS + 1),
        (s.TaskAssignment, "local_steps", lim.MAX_LOCAL_STEPS + 1),
        (s.TransferInfo, "size", lim.MAX_TRANSFER_BYTES + 1),
        (s.TransferInfo, "chunk_size", lim.MAX_CHUNK_BYTES + 1),
        (s.TransferInfo, "chunks", lim.MAX_CHUNKS + 1),
        (s.TransferInfo, "chunks", 0),
        (s.TensorInfo, "shape", [lim.MAX_DIM + 1]),
        (s.TensorInfo, "shape", [1] * (lim.MAX_NDIM + 1)),
        (s.TensorInfo, "dtype", "object"),
        (s.TensorInfo, "name", "n" * (lim.MAX_TENSOR_NAME + 1)),
        (
            s.GlobalManifest,
            "tensors",
            [{"name": "w", "dtype": "float32", "shape": []}] * (lim.MAX_TENSORS + 1),
        ),
        (s.HostInfo, "memory_bytes", 2**64 - 1),
        (s.HostInfo, "cpu_count", lim.MAX_HARDWARE_COUNT + 1),
        (s.HostInfo, "hostname", "h" * (lim.MAX_SHORT_TEXT + 1)),
        (s.GpuInfo, "extra", {f"k{i}": "v" for i in range(lim.MAX_MAP_ENTRIES + 1)}),
        (s.GpuInfo, "sm_count", 2**40),
        (s.MpsInfo, "pipe_dir", "/" * (lim.MAX_PATH + 1)),
        (s.DeviceProfile, "tasks", {f"t{i}": {"samples": 1} for i in range(lim.MAX_TASKS + 1)}),
        (s.DeviceProfile, "policies", ["fedmt"] * 17),
        (s.Telemetry, "gpus", [{"index": 0}] * (lim.MAX_GPUS + 1)),
        (s.Telemetry, "memory_total_bytes", 2**63),
        (s.GpuTelemetry, "temperature_c", float("inf")),
        (s.Status, "ts", float("inf")),
        (s.Schedule, "deadline", lim.MAX_TIMESTAMP * 2),
        (s.Status, "agent_version", "v" * (lim.MAX_SHORT_TEXT + 1)),
    ],
)
def test_values_beyond_the_protocol_limits_are_rejected(kind, path, value):
    assert_names(rejected(raw(sample(kind), path, value), kind), path.split(".")[-1])


@pytest.mark.parametrize(
    "index, value",
    [
        (1, lim.MAX_CHUNKS),
        (2, lim.MAX_CHUNKS + 1),
        (3, lim.MAX_CHUNK_BYTES + 1),
        (4, lim.MAX_TRANSFER_BYTES + 1),
    ],
    ids=["index", "total", "chunk_size", "size"],
)
def test_chunk_header_beyond_the_limits_is_rejected(index, value):
    fields = msgspec.msgpack.decode(encode(sample(s.Chunk)))
    fields[index] = value
    rejected(msgspec.msgpack.encode(fields), s.Chunk)


@pytest.mark.parametrize(
    "kind, path, value",
    [
        (s.Schedule, "round", lim.MAX_ROUND),
        (s.UpdateManifest, "samples", lim.MAX_SAMPLES),
        (s.TaskData, "samples", lim.MAX_SAMPLES),
        (s.TensorInfo, "shape", [lim.MAX_DIM] * lim.MAX_NDIM),
        (s.TransferInfo, "chunks", lim.MAX_CHUNKS),
        (s.TaskAssignment, "local_steps", lim.MAX_LOCAL_STEPS),
        (s.Event, "metrics", {f"m{i}": float("nan") for i in range(lim.MAX_METRICS)}),  # a diverged loss
    ],
)
def test_values_at_the_protocol_limits_are_accepted(kind, path, value):
    decoded = to_builtins(decode(raw(sample(kind), path, value), kind))[path]
    assert decoded == value or (isinstance(value, dict) and decoded.keys() == value.keys())


def test_schedule_with_empty_or_too_many_tasks_is_rejected():
    assert_names(rejected(raw(sample(s.Schedule), "tasks", []), s.Schedule), "tasks")
    assert_names(
        rejected(
            raw(sample(s.Schedule), "tasks", [to_builtins(ASSIGNMENT)] * (lim.MAX_TASKS + 1)), s.Schedule
        ),
        "tasks",
    )


BAD_NAMES = [name for name in BAD_IDS if isinstance(name, str)]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize(
    "kind, path",
    [
        (s.Telemetry, "device"),
        (s.Schedule, "device"),
        (s.Receipt, "task"),
        (s.UpdateManifest, "device"),
        (s.Schedule, "tasks.0.task"),
        (s.Event, "task"),
    ],
)
def test_invalid_device_and_task_ids_are_rejected(name, kind, path):
    assert_names(rejected(raw(sample(kind), path, name), kind), path.split(".")[-1])


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_task_id_as_profile_key_is_rejected(name):
    assert_names(
        rejected(raw(sample(s.DeviceProfile), "tasks", {name: {"samples": 1}}), s.DeviceProfile), "tasks"
    )


@pytest.mark.parametrize("bad", ["a/b", "", "x" * 129, ".x", "a b"])
@pytest.mark.parametrize(
    "kind, path", [(s.TransferInfo, "id"), (s.Receipt, "update_id"), (s.UpdateManifest, "update_id")]
)
def test_invalid_transfer_ids_are_rejected(bad, kind, path):
    assert_names(rejected(raw(sample(kind), path, bad), kind), path)


@pytest.mark.parametrize("bad", [SHA.upper(), SHA[:-1], SHA + "0", "g" * 64, "", SHA[:32] + " " + SHA[33:]])
@pytest.mark.parametrize("kind, path", [(s.TransferInfo, "sha256"), (s.TaskAssignment, "base_sha256")])
def test_invalid_sha256_is_rejected(bad, kind, path):
    assert_names(rejected(raw(sample(kind), path, bad), kind), path)


@pytest.mark.parametrize(
    "kind, path, value",
    [
        (s.Telemetry, "device", "dev-1\n"),
        (s.TransferInfo, "sha256", SHA + "\n"),
        (s.TransferInfo, "id", "upd-1\n"),
    ],
)
def test_trailing_newline_is_not_a_valid_id(kind, path, value):
    rejected(raw(sample(kind), path, value), kind)


def test_a_codec_spec_sends_only_what_differs_from_the_defaults_so_older_agents_read_it():
    import msgspec

    from protocol.schemas import CodecSpec

    class BeforeWarmUp(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """CodecSpec as an agent of an earlier release reads it."""

        name: str = "dense"
        fraction: float | None = None
        momentum: float = 0.0

    plain = msgspec.msgpack.encode(CodecSpec(name="topk", fraction=0.01))
    assert msgspec.msgpack.decode(plain, type=BeforeWarmUp) == BeforeWarmUp(name="topk", fraction=0.01)
    warm = msgspec.msgpack.encode(CodecSpec(name="topk", fraction=0.01, warmup_rounds=2))
    assert msgspec.msgpack.decode(warm, type=CodecSpec).warmup_rounds == 2
    with pytest.raises(msgspec.ValidationError, match="warmup_rounds"):
        msgspec.msgpack.decode(warm, type=BeforeWarmUp)
