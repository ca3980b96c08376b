"""The v1 topic tree: builders and parse() are inverse; anything outside the tree is a ProtocolError."""

from __future__ import annotations

import pytest

from protocol import ProtocolError
from protocol import topics as t
from protocol.limits import MAX_CHUNKS
from protocol.topics import TopicRef, parse

DEVICES = ["dev-1", "jetson.orin_02", "A", "x" * 64, "0"]
TASKS = ["cifar10", "image.net-1k_v2", "T"]
#: invalid device and task ids (one topic level, file-name safe); the schema tests use the string ones too
BAD_IDS = [
    "",
    "a/b",
    "a+b",
    "a#b",
    "+",
    "#",
    "dev+",
    "dev#",
    "a b",
    " a",
    "x" * 65,
    ".hidden",
    "-dash",
    "_under",
    "ä",
    "a\0b",
    None,
    7,
]


@pytest.mark.parametrize("leaf", t.DEVICE_LEAVES)
@pytest.mark.parametrize("dev", DEVICES)
def test_device_topics_round_trip(dev, leaf):
    topic = t.device(dev, leaf)
    assert topic == f"fedmt/v1/devices/{dev}/{leaf}"
    assert parse(topic) == TopicRef(kind=leaf, device=dev)


def test_device_leaves_are_the_documented_five():
    assert set(t.DEVICE_LEAVES) == {"status", "profile", "telemetry", "events", "receipts"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("dev", DEVICES)
def test_a_device_has_one_schedule_topic_per_task(dev, task):
    topic = t.schedule(dev, task)
    assert topic == f"fedmt/v1/devices/{dev}/schedule/{task}"
    assert parse(topic) == TopicRef(kind="schedule", device=dev, task=task)
    assert t.schedules(dev) == f"fedmt/v1/devices/{dev}/schedule/+"
    assert not t.retained_by_devices(topic)


@pytest.mark.parametrize("task", TASKS)
def test_global_manifest_and_chunk_topics_round_trip(task):
    base = t.global_model(task)
    assert t.manifest(base) == f"fedmt/v1/tasks/{task}/global/manifest"
    assert parse(t.manifest(base)) == TopicRef(kind="global", task=task, part="manifest")
    for index in (0, 1, 9, 10, 12345):
        assert t.chunk(base, index) == f"fedmt/v1/tasks/{task}/global/chunks/{index}"
        assert parse(t.chunk(base, index)) == TopicRef(kind="global", task=task, part="chunk", index=index)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("dev", DEVICES)
def test_update_manifest_and_chunk_topics_round_trip(task, dev):
    base = t.update(task, dev)
    assert t.manifest(base) == f"fedmt/v1/tasks/{task}/updates/{dev}/manifest"
    assert parse(t.manifest(base)) == TopicRef(kind="update", task=task, device=dev, part="manifest")
    assert t.whole(base) == f"fedmt/v1/tasks/{task}/updates/{dev}/whole"
    assert parse(t.whole(base)) == TopicRef(kind="update", task=task, device=dev, part="whole")
    for index in (0, 3, 100000):
        ref = parse(t.chunk(base, index))
        assert ref == TopicRef(kind="update", task=task, device=dev, part="chunk", index=index)


def test_ids_named_like_tree_keywords_are_still_ids():
    assert parse(t.manifest(t.update("global", "manifest"))) == TopicRef(
        kind="update", task="global", device="manifest", part="manifest"
    )
    assert parse(t.device("devices", "status")) == TopicRef(kind="status", device="devices")
    assert parse(t.chunk(t.global_model("chunks"), 2)) == TopicRef(
        kind="global", task="chunks", part="chunk", index=2
    )


def test_all_below_is_a_multilevel_wildcard_under_the_base():
    assert t.all_below(t.global_model("cifar10")) == "fedmt/v1/tasks/cifar10/global/#"
    assert t.all_below(t.update("cifar10", "dev-1")) == "fedmt/v1/tasks/cifar10/updates/dev-1/#"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "/",
        "fedmt",
        "fedmt/v1",
        "fedmt/v1/",
        "other/v1/devices/dev-1/status",
        "fedmt/v2/devices/dev-1/status",
        "fedmt/v0/tasks/t/global/manifest",
        "FEDMT/v1/devices/dev-1/status",
        "/fedmt/v1/devices/dev-1/status",
        "prefix/fedmt/v1/devices/dev-1/status",
        # device channels
        "fedmt/v1/devices",
        "fedmt/v1/devices/dev-1",
        "fedmt/v1/devices/dev-1/unknown",
        "fedmt/v1/devices/dev-1/Status",
        "fedmt/v1/devices/dev-1/status/extra",
        "fedmt/v1/devices/dev-1/status/",
        "fedmt/v1/devices//status",
        "fedmt/v1/devices/dev-1/manifest",
        "fedmt/v1/devices/dev-1/schedule",
        "fedmt/v1/devices/dev-1/schedule/",
        "fedmt/v1/devices/dev-1/schedule/+",
        "fedmt/v1/devices/dev-1/schedule/t/extra",
        "fedmt/v1/device/dev-1/status",
        # global transfers
        "fedmt/v1/tasks",
        "fedmt/v1/tasks/t",
        "fedmt/v1/tasks/t/global",
        "fedmt/v1/tasks/t/global/",
        "fedmt/v1/tasks/t/global/manifest/extra",
        "fedmt/v1/tasks/t/global/chunks",
        "fedmt/v1/tasks/t/global/chunks/",
        "fedmt/v1/tasks/t/global/chunks/x",
        "fedmt/v1/tasks/t/global/chunks/-1",
        "fedmt/v1/tasks/t/global/chunks/1.5",
        "fedmt/v1/tasks/t/global/chunks/ 1",
        "fedmt/v1/tasks/t/global/chunks/0x1",
        "fedmt/v1/tasks/t/global/chunks/1/2",
        "fedmt/v1/tasks/t/global/chunk/1",
        "fedmt/v1/tasks/t/global/whole",  # only updates travel whole
        "fedmt/v1/tasks/t/global/delta/whole",
        "fedmt/v1/tasks/t/global/status",
        "fedmt/v1/tasks/t/other/manifest",
        "fedmt/v1/tasks//global/manifest",
        # update transfers
        "fedmt/v1/tasks/t/updates",
        "fedmt/v1/tasks/t/updates/dev-1",
        "fedmt/v1/tasks/t/updates/manifest",
        "fedmt/v1/tasks/t/updates/dev-1/chunks",
        "fedmt/v1/tasks/t/updates/dev-1/chunks/a",
        "fedmt/v1/tasks/t/updates/dev-1/manifest/x",
        "fedmt/v1/tasks/t/updates/dev-1/whole/0",
        "fedmt/v1/tasks/t/updates//manifest",
        "fedmt/v1/tasks/t/update/dev-1/manifest",
    ],
)
def test_parse_rejects_topics_outside_the_tree(topic):
    with pytest.raises(ProtocolError):
        parse(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "fedmt/v1/devices/+/status",
        "fedmt/v1/devices/#/status",
        "fedmt/v1/devices/#",
        "fedmt/v1/devices/dev+1/status",
        "fedmt/v1/+/dev-1/status",
        "fedmt/v1/tasks/+/global/manifest",
        "fedmt/v1/tasks/t#/global/manifest",
        "fedmt/v1/tasks/t/updates/+/manifest",
        "fedmt/v1/tasks/t/updates/#",
        "fedmt/v1/tasks/t/global/chunks/+",
        "fedmt/v1/tasks/t/global/#",
        "fedmt/+/devices/dev-1/status",
        "#",
    ],
)
def test_parse_rejects_wildcards(topic):
    with pytest.raises(ProtocolError):
        parse(topic)


@pytest.mark.parametrize("bad", [".hidden", "-x", "a b", "x" * 65, "ä"])
def test_parse_rejects_invalid_ids_in_every_position(bad):
    for topic in (
        f"fedmt/v1/devices/{bad}/status",
        f"fedmt/v1/tasks/{bad}/global/manifest",
        f"fedmt/v1/tasks/t/updates/{bad}/manifest",
        f"fedmt/v1/tasks/{bad}/updates/dev-1/chunks/0",
    ):
        with pytest.raises(ProtocolError):
            parse(topic)


@pytest.mark.parametrize("index", ["\u00b2", "\u0661\u0662", "\uff11"])
def test_parse_rejects_non_ascii_digit_chunk_index(index):
    with pytest.raises(ProtocolError):
        parse(f"fedmt/v1/tasks/t/global/chunks/{index}")


def test_id_with_trailing_newline_is_rejected():
    with pytest.raises(ProtocolError):
        t.check_name("device", "dev-1\n")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_builders_reject_invalid_ids(bad):
    for build in (
        lambda: t.device(bad, "status"),
        lambda: t.global_model(bad),
        lambda: t.update(bad, "dev-1"),
        lambda: t.update("cifar10", bad),
        lambda: t.check_name("device", bad),
    ):
        with pytest.raises(ProtocolError):
            build()


def test_check_name_returns_valid_name_and_error_names_the_kind():
    assert t.check_name("task", "cifar10") == "cifar10"
    with pytest.raises(ProtocolError, match="task"):
        t.check_name("task", "a/b")


@pytest.mark.parametrize("leaf", ["unknown", "", "Status", "manifest", "status/extra"])
def test_device_builder_rejects_unknown_channel(leaf):
    with pytest.raises(ValueError):
        t.device("dev-1", leaf)


@pytest.mark.parametrize(
    "index",
    ["9" * 5000, str(MAX_CHUNKS), "99999999", "007", "00"],
    ids=["5000-digits", "max-chunks", "8-digits", "leading-zero", "double-zero"],
)
def test_parse_rejects_chunk_indices_beyond_the_limit_or_not_canonical(index):
    """A 5000-digit index used to raise ValueError (int() refuses it), which stopped a service."""
    for base in (t.global_model("t"), t.update("t", "dev-1")):
        with pytest.raises(ProtocolError):
            parse(f"{base}/chunks/{index}")


def test_parse_accepts_the_last_chunk_index():
    assert parse(t.chunk(t.global_model("t"), MAX_CHUNKS - 1)).index == MAX_CHUNKS - 1
    assert parse(t.chunk(t.global_model("t"), 0)).index == 0


def test_invalid_id_error_quotes_a_long_id_only_in_part():
    with pytest.raises(ProtocolError) as exc:
        t.check_name("device", "-" + "x" * 60_000)
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize("sharded", [False, True])
def test_the_aggregators_subscriptions_match_every_device_message_it_reads_and_nothing_it_writes(sharded):
    from paho.mqtt.client import topic_matches_sub

    from aggregator.config import AggregatorConfig, TaskConfig
    from aggregator.service import subscriptions
    from protocol.schemas import ModelSpec

    task = TaskConfig(
        model=ModelSpec(name="tiny", num_classes=10, input_size=8), init_weights="w.safetensors"
    )
    filters = subscriptions(AggregatorConfig(tasks={"cifar": task}, sharded=sharded))

    def matched(topic: str) -> bool:
        return any(topic_matches_sub(sub, topic) for sub in filters)

    for leaf in ("status", "profile", "telemetry", "events"):
        assert matched(t.device("jetson-7", leaf)) and t.every_device(leaf) in filters
    assert matched(t.manifest(t.update("cifar", "jetson-7")))
    assert matched(t.chunk(t.update("cifar", "jetson-7"), 12))
    assert matched(t.manifest(t.update("other", "jetson-7"))) is not sharded  # another aggregator's task
    for own in (t.schedule("jetson-7", "cifar"), t.device("jetson-7", "receipts")):
        assert not matched(own)
    assert not matched(t.manifest(t.global_model("cifar")))


def test_filters_for_every_device_or_update_are_single_level_wildcards():
    assert t.every_device("events") == "fedmt/v1/devices/+/events"
    assert t.every_update() == "fedmt/v1/tasks/+/updates/#"
    assert t.every_update("cifar") == "fedmt/v1/tasks/cifar/updates/#"
    with pytest.raises(ValueError):
        t.every_device("secrets")
    with pytest.raises(ProtocolError):
        t.every_update("a/b")
