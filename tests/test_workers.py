"""Warm task workers: reuse across rounds, restart on a new SM share, replacement of crashed or hung workers,
clean stop, the SM check, waves and cooperative stop (real worker processes on the CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from agent import jobs
from agent.data import SyntheticData
from agent.runner import TaskWork, run_round
from agent.worker import PARENT_GONE
from agent.workers import Launch, TaskFailed, WorkerGone, WorkerPool, start_worker
from common.models import build_model, state_to_numpy
from protocol.chunking import sha256_hex
from protocol.schemas import ModelSpec, OptimizerSpec, TaskAssignment
from protocol.tensors import encode_state

pytestmark = pytest.mark.slow
MODEL = ModelSpec(name="shufflenet_v2_x0_5", num_classes=10, input_size=16)
CPU = jobs.Init(device="cpu", threads=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    payload = encode_state(state_to_numpy(build_model(MODEL, seed=0)))
    path = tmp_path_factory.mktemp("base") / "v0.state"
    path.write_bytes(payload)
    return path, sha256_hex(payload)


@pytest.fixture
def pool(tmp_path):
    with WorkerPool(CPU, log_dir=tmp_path) as pool:
        yield pool


def prepare(samples: int) -> jobs.Prepare:
    return jobs.Prepare(model=MODEL, data=SyntheticData(samples=samples))


def work(base, tmp_path, task: str, samples: int, round_: int = 1) -> TaskWork:
    path, sha = base
    assignment = TaskAssignment(
        task=task, model=MODEL, optimizer=OptimizerSpec(), base_version=0, base_sha256=sha, batch_size=8
    )
    train = jobs.Train(
        assignment=assignment,
        base_path=str(path),
        output_path=str(tmp_path / f"{task}-r{round_}.update"),
        seed=round_,
    )
    return TaskWork(prepare(samples), train)


def run(pool, launches, works, **kwargs) -> dict:
    outcomes = {}
    run_round(launches, works, pool, lambda o: outcomes.__setitem__(o.task, o), **kwargs)
    return outcomes


def pid(pool: WorkerPool, key) -> int:
    lease = pool.acquire(key, pool.launch_of(key))
    pool.release(key)
    return lease.ready.pid


def test_a_worker_that_sees_the_wrong_sm_count_is_an_error_not_a_fallback():
    with pytest.raises(TaskFailed) as failure:
        start_worker(Launch("t", expected_sms=66), CPU)
    assert failure.value.failure.code == "mps"
    assert "got None SMs, expected 66" in str(failure.value)


def test_a_worker_is_started_and_prepared_once_and_reused_round_after_round(pool, base, tmp_path):
    leases = []
    for round_ in (1, 2, 3):
        outcomes = run(
            pool,
            [Launch("a")],
            {"a": work(base, tmp_path, "a", 32, round_)},
            on_started=lambda task, lease: leases.append(lease),
        )
        trained = outcomes["a"].trained
        assert trained is not None and trained.samples == 32
        written = (tmp_path / f"a-r{round_}.update").read_bytes()  # the agent need not read it to describe it
        assert (trained.size, trained.sha256) == (len(written), sha256_hex(written))
    assert len({lease.ready.pid for lease in leases}) == 1
    assert [lease.started_process for lease in leases] == [True, False, False]
    # prepared once, ahead of the first round (whose lease tells what that took), reused after
    assert [lease.prepared.reused for lease in leases] == [False, True, True]
    cold = pool.start_seconds["cold"]
    assert leases[1].start_s < 1.0 and len(cold) == 1 and not pool.start_seconds["spare"]  # one start, timed
    assert leases[0].start_s >= 0.5 * cold[0]  # the round waited for (most of) it
    assert pool.expected_start_s(default=99.0) == cold[0]  # no spare held: the next start is one from scratch
    assert all((tmp_path / f"a-r{r}.update").stat().st_size > 0 for r in (1, 2, 3))


def test_ending_idle_workers_spares_the_kept_and_the_leased_ones(pool):
    for key in ("idle", "kept", "leased"):
        pool.acquire(key, Launch(key))
    pool.release("idle")
    pool.release("kept")
    first = pid(pool, "idle")
    assert pool.end_idle(keep={"kept"}) == 1
    assert pool.launch_of("idle") is None and pool.launch_of("kept") is not None
    assert pool.launch_of("leased") is not None  # still out: its holder may be using it
    pool.release("leased")
    assert pool.acquire("idle", Launch("idle")).ready.pid != first  # started again when next wanted
    pool.release("idle")


def test_a_new_launch_environment_restarts_the_worker_and_new_data_re_prepares_it(pool):
    first = pool.acquire("a", Launch("a", env={"X": "1"}), prepare(16))
    pool.release("a")
    same = pool.acquire(
        "a", Launch("a", wave=2, env={"X": "1"}), prepare(24)
    )  # the wave is no process setting
    pool.release("a")
    moved = pool.acquire("a", Launch("a", env={"X": "2"}), prepare(24))
    pool.release("a")
    assert same.ready.pid == first.ready.pid and not same.started_process and not same.prepared.reused
    assert same.prepared.samples == 24
    assert moved.ready.pid != first.ready.pid and moved.started_process
    assert not first.worker.alive and pool.launch_of("a").env == {"X": "2"}


def test_a_worker_that_died_between_rounds_is_replaced(pool, base, tmp_path):
    first = pool.acquire("a", Launch("a"), prepare(16))
    pool.release("a")
    first.worker.proc.send_signal(signal.SIGKILL)
    first.worker.proc.wait(10)
    outcomes = run(pool, [Launch("a")], {"a": work(base, tmp_path, "a", 16)})
    assert outcomes["a"].trained is not None and pid(pool, "a") != first.ready.pid


def test_a_crashed_task_is_reported_while_the_other_finishes_and_is_replaced_next_round(pool, base, tmp_path):
    def kill_doomed(task: str, lease) -> None:
        if task == "doomed":
            lease.worker.proc.send_signal(signal.SIGKILL)

    launches = [Launch("doomed"), Launch("healthy")]
    works = {"doomed": work(base, tmp_path, "doomed", 4000), "healthy": work(base, tmp_path, "healthy", 32)}
    outcomes = run(pool, launches, works, on_started=kill_doomed)
    assert outcomes["doomed"].failure is not None and outcomes["doomed"].trained is None
    assert "exited" in outcomes["doomed"].failure.error
    assert outcomes["healthy"].trained is not None and outcomes["healthy"].trained.samples == 32
    again = run(pool, [Launch("doomed")], {"doomed": work(base, tmp_path, "doomed", 16, round_=2)})
    assert again["doomed"].trained is not None


def test_a_hung_worker_is_cut_off_and_replaced(pool, base, tmp_path):
    def freeze(task: str, lease) -> None:
        lease.worker.proc.send_signal(signal.SIGSTOP)

    frozen = run(
        pool, [Launch("a")], {"a": work(base, tmp_path, "a", 16)}, on_started=freeze, stall_timeout_s=2
    )
    assert frozen["a"].failure is not None and "sent nothing for 2 s" in frozen["a"].failure.error
    assert pool.launch_of("a") is None  # discarded
    outcomes = run(pool, [Launch("a")], {"a": work(base, tmp_path, "a", 16, round_=2)})
    assert outcomes["a"].trained is not None


def test_closing_the_pool_ends_every_worker_cleanly(tmp_path):
    pool = WorkerPool(CPU, log_dir=tmp_path)
    leases = [pool.acquire(key, Launch(key), prepare(8)) for key in ("a", "b")]
    for key in ("a", "b"):
        pool.release(key)
    pool.close()
    assert [lease.worker.proc.returncode for lease in leases] == [0, 0]
    assert pool.launch_of("a") is None


def test_a_worker_streaming_an_image_folder_through_reader_processes_exits_promptly(base, tmp_path):
    import numpy as np
    from PIL import Image

    from agent.data import ImageFolderData

    for i in range(12):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"c{i % 2}" / f"{i}.jpg")
    streamed = jobs.Prepare(
        model=MODEL, data=ImageFolderData(path=str(tmp_path)), budget_bytes=0, loader_workers=2
    )
    pool = WorkerPool(CPU, log_dir=tmp_path)
    outcome = run(pool, [Launch("a")], {"a": TaskWork(streamed, work(base, tmp_path, "a", 8).train)})["a"]
    assert outcome.failure is None
    lease = pool.acquire("a", Launch("a"), streamed)
    pool.release("a")
    assert lease.prepared.reused and lease.prepared.placement == "stream"
    worker = lease.worker
    began = time.monotonic()
    pool.close(grace_s=10)
    assert worker.proc.returncode == 0 and time.monotonic() - began < 5


def test_a_failed_preparation_is_reported_and_the_pool_stays_usable(pool, tmp_path):
    from agent.data import ImageFolderData

    missing = jobs.Prepare(model=MODEL, data=ImageFolderData(path=str(tmp_path / "nowhere")))
    with pytest.raises(TaskFailed, match="nowhere"):
        pool.acquire("a", Launch("a"), missing)
    lease = pool.acquire("a", Launch("a"), prepare(8))  # not left locked
    pool.release("a")
    assert lease.prepared.samples == 8


def test_every_process_of_the_pool_imports_its_preload_before_the_first_command(tmp_path):
    with WorkerPool(CPU, log_dir=tmp_path, preload=["agent.tests_no_such_module", "colorsys"]) as pool:
        pool.keep_spares(1)
        lease = pool.acquire("a", Launch("a"), prepare(8))
        pool.release("a")
        assert (
            lease.started_process and lease.prepared.samples == 8
        )  # a module that fails to import is no failure
        (spare,) = pool._spares
        assert spare.proc.args[-3:] == ["--preload", "agent.tests_no_such_module", "colorsys"]
    assert "could not preload agent.tests_no_such_module" in (tmp_path / "spare-0.log").read_text()


def test_the_preload_imports_each_module_and_passes_over_one_that_does_not_import(capsys):
    from agent.worker import preload

    sys.modules.pop("colorsys", None)
    preload(["agent.tests_no_such_module", "colorsys"])
    assert "colorsys" in sys.modules
    assert "could not preload agent.tests_no_such_module" in capsys.readouterr().err


def test_prestart_readies_a_worker_that_a_later_acquire_waits_for(pool):
    thread = pool.prestart("a", Launch("a"), prepare(8))
    lease = pool.acquire("a", Launch("a"), prepare(8))
    pool.release("a")
    thread.join(5)
    # started for this lease, by the prestart, whose Prepare (not the lease's, a reuse) says what preparing took
    assert lease.started_process and not lease.prepared.reused and lease.prepared.seconds > 0
    assert (
        lease.start_s >= 0.5 * pool.start_seconds["cold"][0]
    )  # the wait for the start ahead is the lease's start time
    again = pool.acquire("a", Launch("a"), prepare(8))
    pool.release("a")
    assert not again.started_process and again.ready.pid == lease.ready.pid


def test_stop_asks_the_task_to_end_cooperatively(pool, base, tmp_path):
    stop = threading.Event()
    started = time.monotonic()
    outcomes = run(
        pool,
        [Launch("long")],
        {"long": work(base, tmp_path, "long", 100_000)},
        stop=stop,
        on_started=lambda task, lease: stop.set(),
    )
    assert outcomes["long"].failure.code == "stopped"
    assert time.monotonic() - started < 60  # a 100k-sample epoch would take far longer
    assert not (tmp_path / "long-r1.update").exists()
    assert run(pool, [Launch("long")], {"long": work(base, tmp_path, "long", 16, round_=2)})["long"].trained


def test_waves_run_one_after_another(pool, base, tmp_path):
    started, finished = {}, {}
    launches = [Launch("first", wave=0), Launch("second", wave=1)]
    works = {t: work(base, tmp_path, t, 64) for t in ("first", "second")}
    run_round(
        launches,
        works,
        pool,
        lambda o: finished.__setitem__(o.task, time.monotonic()),
        on_started=lambda task, lease: started.setdefault(task, (time.monotonic(), lease)),
    )
    assert set(finished) == {"first", "second"}
    assert started["second"][0] > finished["first"]
    second = started["second"][1]
    assert (
        second.started_process and second.start_s < 1.0
    )  # started for this round, while the first wave trained


def test_a_worker_whose_parent_is_gone_ends_quietly():
    worker = subprocess.Popen(
        [sys.executable, "-m", "agent.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    worker.stdout.close()  # the parent stops listening (as when it is killed)
    _, stderr = worker.communicate(jobs.encode_line(CPU), timeout=60)
    assert worker.returncode == PARENT_GONE
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr


def test_talking_to_an_exited_worker_raises_worker_gone(pool):
    lease = pool.acquire("a", Launch("a"))
    lease.worker.proc.kill()
    lease.worker.proc.wait(10)
    with pytest.raises(WorkerGone):
        lease.worker.call(prepare(8), jobs.Prepared, timeout_s=10)
    pool.release("a", healthy=False)


def test_a_lossy_codec_writes_its_update_and_keeps_the_residual_across_rounds(pool, base, tmp_path):
    import msgspec
    import numpy as np

    from agent.compression import RESIDUAL
    from protocol.codecs import make_codec
    from protocol.codecs.base import CUT_ELEMENTS
    from protocol.schemas import CodecSpec
    from protocol.tensors import decode_state, describe

    residual = tmp_path / "residuals" / "a.state"
    sizes = []
    for round_ in (1, 2):
        task = work(base, tmp_path, "a", 16, round_)
        assignment = msgspec.structs.replace(
            task.train.assignment, codec=CodecSpec(name="topk", fraction=0.05)
        )
        train = msgspec.structs.replace(task.train, assignment=assignment, residual_path=str(residual))
        outcome = run(pool, [Launch("a")], {"a": TaskWork(task.prepare, train)})["a"]
        assert outcome.failure is None
        payload = (tmp_path / f"a-r{round_}.update").read_bytes()
        sizes.append(outcome.trained.metrics["update_bytes"])
        assert sizes[-1] == len(payload)
        layout = describe(decode_state(base[0].read_bytes()))
        sent = make_codec("topk").decode(payload, layout)
        kept = decode_state(residual.read_bytes())
        name = next(n for n in sent if sent[n].dtype == np.float32 and sent[n].size >= CUT_ELEMENTS)
        assert np.count_nonzero(sent[name]) == int(np.ceil(0.05 * sent[name].size))
        at_sent = sent[name] != 0  # what was sent is not kept, but for its float16 rounding
        assert np.all(np.abs(kept[RESIDUAL + name][at_sent]) <= 1e-3 * np.abs(sent[name][at_sent]))
        assert np.count_nonzero(kept[RESIDUAL + name][~at_sent]) > 0.9 * (~at_sent).sum()
    assert sizes[0] < 0.3 * base[0].stat().st_size  # 45% of ShuffleNetV2 x0.5 in small kernels, sent whole


def test_a_lease_out_when_the_pool_closes_ends_with_it_and_nothing_starts_after(tmp_path):
    pool = WorkerPool(CPU, log_dir=tmp_path)
    lease = pool.acquire("a", Launch("a"), prepare(8))
    pool.close()  # e.g. the agent stops while a standby worker is still leased
    assert lease.worker.proc.returncode == 0
    pool.release("a", healthy=False)  # the standby's thread lets go late: nothing left to do, no error
    with pytest.raises(WorkerGone, match="closed"):
        pool.acquire("b", Launch("b"), prepare(8))


def test_the_worker_applies_its_launch_environment_before_the_device_initialises(monkeypatch):
    import io

    from agent.worker import Worker

    monkeypatch.delenv("FEDMT_LAUNCH_PROBE", raising=False)  # set by the worker below; removed after the test
    out = io.BytesIO()
    Worker(io.BytesIO(), out).init(
        jobs.Init(device="cpu", threads=torch_threads(), env={"FEDMT_LAUNCH_PROBE": "42"})
    )
    assert os.environ["FEDMT_LAUNCH_PROBE"] == "42"
    assert isinstance(jobs.decode_event(out.getvalue().splitlines()[0]), jobs.Ready)


@pytest.mark.parametrize("ending", [jobs.Exit(), None], ids=["exit", "parent gone"])
def test_a_worker_warmed_up_for_a_window_that_is_called_off_ends_quietly(ending):
    import io

    from agent.worker import Worker

    commands = [
        jobs.Init(device="cpu", threads=torch_threads()),
        prepare(16),
        jobs.Measure(batch=8, seconds=0.1, warmup_steps=1, wait_go=True),
        *([ending] if ending else []),
    ]
    out = io.BytesIO()
    assert Worker(io.BytesIO(b"".join(map(jobs.encode_line, commands))), out).serve() == 0
    events = [type(jobs.decode_event(line)) for line in out.getvalue().splitlines()]
    assert events == [jobs.Ready, jobs.Prepared, jobs.Warm]  # no Failed for a window it was never started in


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_spares_are_given_to_worker_starts_and_each_one_given_is_replaced(base, tmp_path):
    import msgspec

    with WorkerPool(CPU, log_dir=tmp_path) as pool:
        assert pool.expected_start_s(default=99.0) == 99.0  # nothing measured yet
        pool.keep_spares(2)
        leases, given = [], []
        for key in ("a", "b", "c"):  # more starts than spares kept: the third takes a replacement
            given.append(pool._spares[0].proc.pid)
            leases.append(pool.acquire(key, Launch(key, env={"X": key}), prepare(8)))
            pool.release(key)
        assert [lease.ready.pid for lease in leases] == given and len(set(given)) == 3
        assert pool.spares == 2 and not set(given) & {spare.proc.pid for spare in pool._spares}
        assert all(lease.started_process and lease.prepared.samples == 8 for lease in leases)
        spare_starts = pool.start_seconds["spare"]
        assert len(spare_starts) == 3 and not pool.start_seconds["cold"]
        assert pool.expected_start_s(default=99.0) == sum(spare_starts) / 3  # the next start takes a spare
        assert [lease.worker.name for lease in leases] == ["a", "b", "c"]
        # a spare's output goes to its task's log once it is given one (here: a failed command's traceback)
        missing = msgspec.structs.replace(
            work(base, tmp_path, "a", 8).train, base_path=str(tmp_path / "none")
        )
        with pytest.raises(TaskFailed, match="none"):
            leases[0].worker.call(missing, jobs.Trained, timeout_s=60)
        assert "Traceback" in (tmp_path / "a.log").read_text()
        assert "Traceback" not in (tmp_path / "spare-0.log").read_text()


def test_a_spare_that_died_is_skipped_a_lower_count_and_a_closed_pool_end_spares(tmp_path):
    pool = WorkerPool(CPU, log_dir=tmp_path)
    pool.keep_spares(2)
    dead, kept = pool._spares
    dead.proc.kill()
    dead.proc.wait(10)
    lease = pool.acquire("a", Launch("a"))
    pool.release("a")
    assert lease.ready.pid == kept.proc.pid and pool.spares == 2  # both replaced
    surplus = pool._spares[1]
    pool.keep_spares(1)  # a lower count ends the spares beyond it
    assert pool.spares == 1 and surplus.proc.returncode is not None
    idle = list(pool._spares)
    pool.close()
    assert [spare.proc.returncode for spare in idle] == [0] and pool.spares == 0
    with pytest.raises(WorkerGone):
        pool.keep_spares(1)


def test_waiting_for_spares_ends_once_each_has_loaded_or_died_and_gives_up_at_its_deadline_or_stop(tmp_path):
    stop = threading.Event()
    with WorkerPool(CPU, log_dir=tmp_path) as pool:
        pool.keep_spares(2)
        assert not pool.wait_for_spares(0, stop)  # nobody imports torch in no time
        dead, loading = pool._spares
        dead.proc.kill()
        assert pool.wait_for_spares(120, stop)
        assert dead.loaded.is_set() and loading.loaded.is_set() and loading.alive
        pool.keep_spares(3)
        stop.set()
        started = time.monotonic()
        assert not pool.wait_for_spares(120, stop) and time.monotonic() - started < 5
