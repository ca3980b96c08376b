"""The agent's uploads: an outbox entry goes out as chunks and a manifest (one message when it fits one chunk),
again after the receipt timeout or soon after the link refused it, and a receipt settles it (retry: later, as a
new transfer)."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import paho.mqtt.client as mqtt

from agent.outbox import Outbox
from agent.uploads import REPUBLISH_S, Uploads
from protocol import topics
from protocol.chunking import describe_transfer, sha256_hex
from protocol.schemas import Chunk, Receipt, UpdateManifest, WholeTransfer, decode
from protocol.tensors import encode_state
from protocol.transport import PublishError, update_messages
from tests.fuzzing import RecordingLink


class RefusingLink(RecordingLink):
    """A link whose paho refuses every message (as when its queue is full)."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False):
        raise PublishError(topic, mqtt.MQTT_ERR_QUEUE_SIZE)


def outbox_entry(tmp_path, update_id: str = "u1", chunk_size: int = 4096):
    payload = encode_state({"w": np.arange(3000, dtype=np.float32)})
    path = tmp_path / "trained.update"
    path.write_bytes(payload)
    manifest = UpdateManifest(
        task="t",
        round=3,
        device="dev1",
        update_id=update_id,
        base_version=2,
        samples=10,
        codec="delta",
        transfer=describe_transfer(update_id, len(payload), sha256_hex(payload), chunk_size=chunk_size),
    )
    outbox = Outbox(tmp_path / "outbox")
    return outbox, outbox.put(manifest, path), payload


def uploads(link, outbox) -> Uploads:
    return Uploads(link, outbox, "dev1", receipt_timeout_s=120.0, retry_after_s=30.0)


def test_an_update_goes_out_as_its_chunks_then_its_manifest_and_again_after_the_receipt_timeout(tmp_path):
    outbox, pending, payload = outbox_entry(tmp_path)
    link = RecordingLink()
    sender = uploads(link, outbox)
    assert sender.due(outbox.pending(), time.monotonic()) == [pending]
    assert sender.send(pending)
    base = topics.update("t", "dev1")
    assert [topic for topic, _, _ in link.published] == [topics.chunk(base, i) for i in range(3)] + [
        topics.manifest(base)
    ]
    assert b"".join(decode(p, Chunk).data for _, p, _ in link.published[:3]) == payload
    now = time.monotonic()
    assert sender.due(outbox.pending(), now + 119) == [] and sender.due(outbox.pending(), now + 121) == [
        pending
    ]
    sender.send_all_again()
    assert sender.due(outbox.pending(), now) == [pending]


def test_an_update_that_fits_one_chunk_goes_out_as_one_message_with_its_manifest(tmp_path):
    outbox, pending, payload = outbox_entry(tmp_path, chunk_size=1 << 20)
    link = RecordingLink()
    assert uploads(link, outbox).send(pending)
    ((topic, message, _),) = link.published
    whole = decode(message, WholeTransfer[UpdateManifest])
    assert topic == topics.whole(topics.update("t", "dev1")) and whole.manifest == pending.manifest
    assert whole.chunk.data == payload and whole.chunk.transfer == pending.manifest.transfer.id


def test_an_update_goes_out_on_the_senders_topics_whatever_its_manifest_names(tmp_path):
    _, pending, payload = outbox_entry(tmp_path)
    spoofed = msgspec.structs.replace(
        pending.manifest, device="dev2"
    )  # the aggregator must see and refuse it
    topics_sent = [topic for topic, _ in update_messages("dev1", spoofed, payload)]
    assert topics_sent and all(topic.startswith(topics.update("t", "dev1") + "/") for topic in topics_sent)


def test_an_update_the_link_refuses_stays_and_goes_again_soon(tmp_path):
    outbox, pending, _ = outbox_entry(tmp_path)
    sender = uploads(RefusingLink(), outbox)
    assert not sender.send(pending)
    now = time.monotonic()
    assert outbox.pending() == [pending]
    assert sender.due(outbox.pending(), now) == [] and sender.due(outbox.pending(), now + REPUBLISH_S + 1)


def test_a_receipt_settles_its_update_and_retry_renews_its_transfer(tmp_path):
    outbox, pending, _ = outbox_entry(tmp_path)
    sender = uploads(RecordingLink(), outbox)
    sender.send(pending)
    answer = Receipt(update_id="u1", task="t", round=3, status="retry", reason="quota")
    retried = sender.settle(answer)
    assert not retried.done and retried.upload_s is None
    (again,) = outbox.pending()
    assert again.manifest.transfer.id != pending.manifest.transfer.id
    assert again.manifest.transfer.sha256 == pending.manifest.transfer.sha256
    assert sender.due(outbox.pending(), time.monotonic() + 29) == []
    accepted = sender.settle(Receipt(update_id="u1", task="t", round=3, status="accepted"))
    assert accepted.done and accepted.upload_s >= 0 and outbox.pending() == []
    assert sender.settle(Receipt(update_id="u1", task="t", round=3, status="accepted")) is None
