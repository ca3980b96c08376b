"""Codecs end to end against a real Mosquitto: agents send top-k updates with error feedback as the schedule asks,
the aggregator folds what they decode to, and a later round fetches the global model as an fp16 delta."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from agent.service import Agent
from aggregator.service import AggregatorService
from protocol.schemas import CodecSpec
from protocol.tensors import decode_state
from tests.federation import SMALL_TASKS, agent_config, aggregator_config, digits, reference_fedavg, running
from tests.test_round_integration import assert_states_equal

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_topk_updates_and_delta_downloads_over_two_rounds(tmp_path, broker, observer):
    task = msgspec.structs.replace(
        SMALL_TASKS["shuffle"],
        codec=CodecSpec(name="topk+zstd", fraction=0.05),
        download_codec="fp16+zstd",
        local_steps=3,
    )
    agents = [Agent(agent_config(tmp_path, broker, f"dev{i + 1}", {"shuffle": digits(i)})) for i in range(2)]
    with running(
        AggregatorService(aggregator_config(tmp_path, broker, {"shuffle": task}, rounds=2)), *agents
    ) as services:
        observer.wait_for(lambda: ("shuffle", 2) in observer.globals, 300, "v2", services)
        observer.wait_for(
            lambda: sum(e.kind == "acknowledged" for e in observer.events) >= 4, 30, "acknowledgements"
        )

    updates = list(observer.updates.values())
    assert len(updates) == 4 and {m.codec for m, _ in updates} == {"topk+zstd"}
    for version in (1, 2):
        sent = [(m.samples, d) for m, d in updates if m.base_version == version - 1]
        expected = reference_fedavg(observer.globals[("shuffle", version - 1)], sent)
        base = observer.globals[("shuffle", version - 1)]
        published = observer.globals[("shuffle", version)]  # the base moved by the fp16 delta of the round
        for name, array in expected.items():
            if array.dtype.kind == "f":  # the step within fp16's rounding (2^-11 of it)
                np.testing.assert_allclose(
                    published[name] - base[name], array - base[name], rtol=1e-3, atol=1e-6, err_msg=name
                )
    finished = [e for e in observer.events if e.kind == "finished"]
    whole = sum(a.nbytes for a in observer.globals[("shuffle", 0)].values())
    # ShuffleNetV2 x0.5 keeps 45% of its weights in kernels below CUT_ELEMENTS (whole, as float16: 0.23 of the
    # float32 model) and cuts the rest to 5%: about half of an fp16 update
    assert all(e.metrics["update_bytes"] < 0.3 * whole for e in finished)

    for agent in agents:  # v0 whole; v1 as an fp16 delta of v0: about half a second whole model, not a whole
        downloaded = agent.metrics.download_bytes.labels("shuffle")._value.get()
        assert whole < downloaded < 1.6 * whole, downloaded
        rebuilt = decode_state(agent.cache.payload_path("shuffle", 1).read_bytes())
        assert_states_equal(rebuilt, observer.globals[("shuffle", 1)])  # bit for bit: its sha256 was checked
