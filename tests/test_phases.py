"""testbed.phases: round phases from hand-built agent events, and the monitor's record of schedule times."""

from __future__ import annotations

import pytest

from protocol import topics
from protocol.schemas import Event, ModelSpec, OptimizerSpec, Schedule, TaskAssignment, encode
from protocol.transport import Incoming, MqttSettings
from testbed import monitor as monitor_module
from testbed.phases import phase_tables, plot_phases, round_detail, round_wall_s, union_length

ISSUED_AT = {("d1", 1): 100.0, ("d2", 1): 100.5}
SEEN_AT = {("a", 1): 130.0, ("b", 1): 135.0}


def event(
    device: str, kind: str, ts: float, task: str | None = None, message: str = "", **metrics: float
) -> Event:
    return Event(device=device, ts=ts, kind=kind, round=1, task=task, message=message, metrics=metrics)


def task_events(device: str, task: str, train: tuple[float, float], acked: float) -> list[Event]:
    """A task's started, finished and acknowledged events; it trains over `train`, its receipt arrives at `acked`."""
    start, end = train
    return [
        event(
            device,
            "started",
            start,
            task,
            plan_s=0.3,
            wait_global_s=1.0,
            worker_start_s=0.5,
            worker_restarted=0.0,
        ),
        event(device, "finished", end, task, train_s=end - start, train_started_at=start, train_ended_at=end),
        event(device, "uploaded", end + 0.5, task, bytes=1e6),
        event(device, "acknowledged", acked, task, upload_s=acked - end),
    ]


@pytest.fixture
def events() -> list[Event]:
    """Two devices, two tasks; d1 trains over [102, 115], d2 over [103, 120] and its last receipt comes last."""
    return [
        event("d1", "plan", 100.2, **{"R.a": 50.0, "B.a": 16.0, "restarted": 0.0}),
        *task_events("d1", "a", (102.0, 110.0), acked=112.0),
        *task_events("d1", "b", (105.0, 115.0), acked=117.0),
        *task_events("d2", "a", (103.0, 120.0), acked=125.0),
        *task_events("d2", "b", (104.0, 118.0), acked=127.0),
        event("d2", "plan", 100.7),
    ]


def test_union_counts_overlaps_once_and_ignores_empty_intervals():
    assert union_length([(1.0, 3.0), (0.0, 2.0), (5.0, 6.0), (5.2, 5.5), (7.0, 7.0), (9.0, 8.0)]) == 4.0
    assert union_length([]) == 0.0


def test_the_critical_device_is_the_one_acknowledged_last(events):
    detail = round_detail(1, events, ISSUED_AT, SEEN_AT)
    assert detail["wall_s"] == 35.0  # first schedule 100.0 -> last global seen 135.0
    assert detail["critical_device"] == "d2"
    assert detail["non_training_fraction"] == pytest.approx(1 - 17 / 35)
    assert detail["device_non_training_fraction"] == pytest.approx({"d1": 1 - 13 / 35, "d2": 1 - 17 / 35})
    assert detail["missing"] == []


def test_phases_come_from_the_events_and_aggregation_from_the_tasks_last_receipt(events):
    phases = round_detail(1, events, ISSUED_AT, SEEN_AT)["phases"]
    assert phases["d1"]["a"] == pytest.approx(
        {
            "plan_s": 0.3,
            "wait_global_s": 1.0,
            "worker_start_s": 0.5,
            "train_s": 8.0,
            "upload_s": 2.0,
            "aggregation_s": 5.0,
        }
    )
    assert phases["d1"]["a"]["aggregation_s"] == phases["d2"]["a"]["aggregation_s"] == 130.0 - 125.0
    assert phases["d1"]["b"]["aggregation_s"] == phases["d2"]["b"]["aggregation_s"] == 135.0 - 127.0


def test_a_started_process_gives_its_start_in_parts_and_a_warm_worker_none(events):
    restarted = event(
        "d2",
        "started",
        104.5,
        "b",
        worker_start_s=1.9,
        worker_init_s=1.2,
        worker_prepare_s=0.4,
        worker_restarted=1,
    )
    starts = round_detail(1, [*events, restarted], ISSUED_AT, SEEN_AT)["worker_starts"]
    assert starts == {"d2": {"b": {"init_s": 1.2, "prepare_s": 0.4}}}


def test_each_task_says_what_it_trained_with_and_ended_at(events):
    finished = event(
        "d2",
        "finished",
        118.0,
        "b",
        batch_size=26.0,
        lr=8.1e-4,
        images=9594.0,
        train_loss=0.2,
        train_accuracy=0.95,
    )
    training = round_detail(1, [*events, finished], ISSUED_AT, SEEN_AT)["training"]
    assert training["d2"]["b"] == {
        "batch_size": 26.0,
        "lr": 8.1e-4,
        "images": 9594.0,
        "train_loss": 0.2,
        "train_accuracy": 0.95,
    }
    assert training["d1"]["a"] == dict.fromkeys(
        ("batch_size", "lr", "images", "train_loss", "train_accuracy")
    )
    failed = [e for e in events if not (e.task == "a" and e.kind == "finished")]
    unfinished = round_detail(1, failed, ISSUED_AT, SEEN_AT)["training"]["d1"]
    assert set(unfinished) == {"b"}  # no finish, no figures


def test_the_plan_of_every_device_is_kept(events):
    plan = round_detail(1, events, ISSUED_AT, SEEN_AT)["plan"]
    assert plan == {"d1": {"R.a": 50.0, "B.a": 16.0, "restarted": 0.0}, "d2": {}}


def test_a_failed_task_leaves_its_fields_none_and_says_so(events):
    kept = [e for e in events if not (e.device == "d1" and e.task == "b" and e.kind != "started")]
    kept.append(event("d1", "failed", 111.0, "b", message="out of memory"))
    detail = round_detail(1, kept, ISSUED_AT, SEEN_AT)
    assert detail["phases"]["d1"]["b"]["train_s"] is None
    assert detail["phases"]["d1"]["b"]["upload_s"] is None
    assert detail["phases"]["d1"]["b"]["wait_global_s"] == 1.0
    assert detail["device_non_training_fraction"]["d1"] == pytest.approx(1 - 8 / 35)  # only task a trained
    assert detail["missing"] == ["d1/b: no train_s, upload_s (failed: out of memory)"]


def test_the_wall_time_is_unknown_until_every_global_of_the_round_is_seen(events):
    seen = {("a", 1): 130.0}
    assert round_wall_s(1, ["a", "b"], ISSUED_AT, seen) is None
    detail = round_detail(1, events, ISSUED_AT, seen)
    assert detail["wall_s"] is None and detail["non_training_fraction"] is None
    assert detail["phases"]["d2"]["b"]["aggregation_s"] is None
    assert any(note.startswith("wall time unknown") for note in detail["missing"])


def test_a_round_without_events_does_not_crash():
    detail = round_detail(3, [], {}, {})
    assert detail["phases"] == {} and detail["critical_device"] is None and detail["wall_s"] is None


def test_the_plot_and_the_table_show_complete_and_incomplete_rounds(events, tmp_path):
    detail = [round_detail(1, events, ISSUED_AT, SEEN_AT), round_detail(2, events, ISSUED_AT, SEEN_AT)]
    path = tmp_path / "phases.png"
    plot_phases(detail, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(phase_tables(detail))
    text = console.export_text()
    assert "critical: d2" in text and "wall 35.00 s, 51% not training" in text


class _NoLink:
    """Stands in for MqttLink: hands the monitor the messages in `inbox`."""

    inbox: list[Incoming] = []

    def __init__(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        pass

    def wait_connected(self, timeout_s: float) -> bool:
        return True

    def received(self, timeout_s: float):
        yield from self.inbox


def test_the_monitor_remembers_when_every_schedule_was_issued(monkeypatch, tmp_path):
    def schedule(device: str, round_: int, issued_at: float) -> Incoming:
        spec = ModelSpec(name="resnet18", num_classes=10, input_size=32)
        task = TaskAssignment(
            task="a", model=spec, optimizer=OptimizerSpec(), base_version=0, base_sha256="0" * 64
        )
        message = Schedule(
            device=device, round=round_, issued_at=issued_at, deadline=issued_at + 60, tasks=[task]
        )
        return Incoming(topics.schedule(device, "a"), encode(message), retain=True)

    monkeypatch.setattr(monitor_module, "MqttLink", _NoLink)
    monkeypatch.setattr(
        _NoLink, "inbox", [schedule("d1", 1, 10.0), schedule("d2", 1, 11.0), schedule("d1", 2, 50.0)]
    )
    monitor = monitor_module.Monitor(MqttSettings(), tmp_path)
    monitor.pump()
    assert monitor.schedule_issued_at == {("d1", 1): 10.0, ("d2", 1): 11.0, ("d1", 2): 50.0}
    assert monitor.schedules["d1"].round == 2


def test_the_monitor_counts_an_update_of_an_unknown_codec_as_malformed_and_goes_on(monkeypatch, tmp_path):
    # a hostile-traffic CI run stopped the monitor here: the codec's name came from the fuzzed manifest
    import msgspec

    from protocol.transport import update_messages
    from tests.fuzzing import update_manifest

    payload = bytes(64)
    manifest = msgspec.structs.replace(update_manifest("a", "d1", "u1", len(payload)), codec="dev1")
    (message,) = (Incoming(t, m, retain=False) for t, m in update_messages("d1", manifest, payload))
    monkeypatch.setattr(monitor_module, "MqttLink", _NoLink)
    monkeypatch.setattr(_NoLink, "inbox", [message])
    monitor = monitor_module.Monitor(MqttSettings(), tmp_path)
    monitor.globals[("a", 0)] = {}  # the update's base global was seen: its codec decides
    monitor.pump()
    assert monitor.malformed == 1 and monitor.updates == {}
