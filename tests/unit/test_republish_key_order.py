"""Per-key order when a message is sent back into its own partition.

The smallest reproduction of what the reliability suite found on a real cluster
(RELIABILITY.md): a message that hops from a delay topic into the same delay topic (a
*self-hop*: with buckets {1, 10, 60} s a 2.8 s delay goes 1 s, 1 s, then memory) whose hop
is late is overtaken by a later message of its key that entered the partition meanwhile.
Both are released by the same partition, so docs/delays.md promises their order.
In-memory Kafka (tests/kafka_fake.py), a few seconds, no cluster.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from kafka_fake import FakeKafka

from athomic import MessagePriority, MessagingSettings
from athomic.messages import PublishRequest
from athomic.pipeline import Encoded
from athomic.republisher.loop import BucketRepublisher
from athomic.strategies import DelayedPublishStrategy

pytestmark = pytest.mark.timeout(60)


def _request(delay_s: float, value: bytes, published: float) -> PublishRequest:
    return PublishRequest("final", value, b"same-key", [], "application/octet-stream", None,
                          MessagePriority.NORMAL, published + delay_s, str(uuid.uuid4()),
                          published, None)


async def _publish(kafka: FakeKafka, s: MessagingSettings, req: PublishRequest) -> None:
    """What a ProducerActor writes for a delayed request."""
    record = DelayedPublishStrategy(s).build(req, Encoded(req.value, []), req.topic)
    producer = kafka.producer()
    await producer.start()
    try:
        await (await producer.send(record.topic, record.value, key=record.key,
                                   headers=record.headers))
    finally:
        await producer.stop()


async def test_a_late_self_hop_is_not_overtaken_by_a_later_message_of_its_key() -> None:
    kafka = FakeKafka()
    kafka.create_topic("final", 1)
    kafka.create_topic("d.1s", 1)
    s = MessagingSettings(
        delay_topics={1: "d.1s", 10: "d.10s", 60: "d.1m"},
        republisher={"partitions": 1, "linger_ms": 0, "near_window_s": 0.5,
                     "partition_refresh_s": 0.3, "ack_timeout_s": 5.0,
                     "transaction_timeout_ms": 10_000, "dead_letter_topic": "dlq"})
    base = time.time()
    # m1, due at +2.8 s: in d.1s until +1.0, then (1.8 s left) d.1s again until +2.0, then
    # memory until +2.8; the hop at +1.0 is from d.1s into d.1s
    m1 = _request(2.8, b"m1", base)
    await _publish(kafka, s, m1)
    rep = BucketRepublisher(s, "d.1s", clients=kafka)
    await rep.start()
    task = asyncio.create_task(rep.run())
    try:
        # the self-hop's record is appended 2 s late (a slow or failing-over broker;
        # below ack_timeout_s, so the transaction goes on) ...
        kafka.faults.add("producer.send", delay=2.0, times=1,
                         when=lambda **call: call["topic"] == "d.1s"
                         and call["client"].transactional_id is not None)
        # ... and a fetch takes its round trip to the partition's leader
        kafka.faults.add("consumer.getmany", delay=0.2)
        await asyncio.sleep(max(0.0, base + 1.5 - time.time()))
        # m2, same key, due 50 ms after m1, enters d.1s before m1's copy does
        m2 = _request(1.35, b"m2", time.time())
        assert m2.deliver_at is not None and m1.deliver_at is not None
        assert m2.deliver_at > m1.deliver_at
        await _publish(kafka, s, m2)
        deadline = time.monotonic() + 20
        while len(kafka.records("final")) < 2:
            assert time.monotonic() < deadline, "not delivered"
            await asyncio.sleep(0.05)
    finally:
        rep.stop()
        await task
        await rep.close()
    hops = [dict(r.headers)["athomic-hop"] for r in kafka.records("d.1s")]
    assert hops == [b"1", b"1", b"2"], "m1, m2, then m1's late self-hop"
    # Both were released by partition d.1s/0; m1 is due first.
    assert [r.value for r in kafka.records("final")] == [b"m1", b"m2"]


def test_a_copy_that_never_comes_stops_holding_its_key_back() -> None:
    from types import SimpleNamespace

    part: Any = SimpleNamespace(copies={})
    part.copies[b"k"] = {"m1": ((1_000, 5), 9_000)}
    ahead = BucketRepublisher._copy_ahead
    assert ahead(part, b"k", (1_050, 7), now=2_000)  # m1 due first: wait for its copy
    assert not ahead(part, b"k", (900, 9), now=2_000)  # due before m1: goes
    BucketRepublisher._copy_back(part, b"k", "m1", 5)  # the original read again
    assert part.copies == {b"k": {"m1": ((1_000, 5), 9_000)}}
    assert not ahead(part, b"k", (1_050, 7), now=9_000)  # past its time: given up
    assert part.copies == {}
    part.copies[b"k"] = {"m1": ((1_000, 5), 9_000)}
    BucketRepublisher._copy_back(part, b"k", "m1", 12)  # its copy, read back
    assert part.copies == {}


async def test_a_high_message_does_not_overtake_an_earlier_one_of_its_key_on_a_hop() -> None:
    """HIGH goes first when many are due at once, but not past an earlier message of its
    key: both due at once, published NORMAL then HIGH, hop into the same bucket together;
    their copies (and so their final records) keep publish order."""
    kafka = FakeKafka()
    kafka.create_topic("final", 1)
    kafka.create_topic("d.1s", 1)
    s = MessagingSettings(
        delay_topics={1: "d.1s", 10: "d.10s", 60: "d.1m"},
        republisher={"partitions": 1, "linger_ms": 0, "near_window_s": 0.5,
                     "partition_refresh_s": 0.3, "dead_letter_topic": "dlq"})
    base = time.time()
    first = _request(2.8, b"first", base)
    high = PublishRequest("final", b"high", b"same-key", [], "application/octet-stream", None,
                          MessagePriority.HIGH, first.deliver_at, str(uuid.uuid4()), base,
                          None)
    await _publish(kafka, s, first)
    await _publish(kafka, s, high)
    rep = BucketRepublisher(s, "d.1s", clients=kafka)
    await rep.start()
    task = asyncio.create_task(rep.run())
    try:
        deadline = time.monotonic() + 20
        while len(kafka.records("final")) < 2:
            assert time.monotonic() < deadline, "not delivered"
            await asyncio.sleep(0.05)
    finally:
        rep.stop()
        await task
        await rep.close()
    copies = [r.value for r in kafka.records("d.1s")]
    assert len(copies) == 4  # each published, then one hop into the same bucket
    assert [r.value for r in kafka.records("final")] == [b"first", b"high"]
