"""ProducerActor's failure paths, on the in-memory Kafka: each Kafka fault becomes the typed
error a caller sees, nothing is reported acknowledged that was not, and no wait is
unbounded. (The happy paths run against the real broker in tests/integration.)"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
)
from aiokafka.partitioner import murmur2
from hypothesis import given
from hypothesis import strategies as st
from kafka_fake import FakeKafka

from athomic import (
    MessagePriority,
    MessagingConnectionError,
    MessagingSettings,
    ProducerClosedError,
    PublishError,
    PublishingOutcome,
    RecordTooLargeError,
)
from athomic.actors.producer import BATCH_FROM, ProducerActor
from athomic.messages import PublishRequest, new_message_id


def request(topic: str = "orders", value: bytes = b'{"a":1}', key: bytes | None = b"k",
            deliver_at: float | None = None, **fields: Any) -> PublishRequest:
    return PublishRequest(topic, value, key, [("x-app", b"1")], "application/json", None,
                          fields.get("priority", MessagePriority.NORMAL), deliver_at,
                          new_message_id(), time.time())


@pytest.fixture
def kafka() -> FakeKafka:
    fake = FakeKafka()
    fake.create_topic("orders", 3)
    return fake


def actor(kafka: FakeKafka, **settings: Any) -> ProducerActor:
    producer = {"connect_timeout_s": 0.3, "delivery_timeout_ms": 1000,
                **settings.pop("producer", {})}
    return ProducerActor(MessagingSettings(producer=producer, **settings), clients=kafka)


async def test_acknowledged_records_are_in_the_log_with_their_headers(kafka: FakeKafka
                                                                      ) -> None:
    a = actor(kafka)
    req = request()
    assert await a.publish(req) is PublishingOutcome.SUCCESS_DIRECT
    (record,) = kafka.records("orders")
    headers = dict(record.headers)
    assert record.value == b'{"a":1}' and record.key == b"k"
    assert headers["message-id"] == req.message_id.encode() and headers["x-app"] == b"1"
    await a.stop()
    assert kafka.open_clients() == []


async def test_unreachable_brokers_give_a_connection_error_within_the_timeout(
        kafka: FakeKafka) -> None:
    kafka.broker_down()
    a = actor(kafka)
    with pytest.raises(MessagingConnectionError):
        await a.publish(request())
    kafka.broker_up()
    kafka.faults.add("producer.start", hang=True)  # a port that never answers
    start = time.monotonic()
    with pytest.raises(MessagingConnectionError, match=r"within 0\.3s"):
        await a.publish(request())
    assert time.monotonic() - start < 2
    assert kafka.open_clients() == []  # the half-started client was closed


async def test_a_record_the_client_refuses_as_too_large_is_typed(kafka: FakeKafka) -> None:
    kafka.faults.add("producer.send", raises=MessageSizeTooLargeError(), times=1)
    a = actor(kafka)
    with pytest.raises(RecordTooLargeError):
        await a.publish(request())
    assert kafka.records("orders") == []


@pytest.mark.parametrize("stages", [False, True])
async def test_a_record_over_max_request_size_fails_its_batch_before_anything_is_sent(
        kafka: FakeKafka, stages: bool) -> None:
    """With or without byte stages (two ways to build a batch's records), a record over
    ``producer.max_request_size`` fails the call, naming its index; nothing is sent."""
    stage = [{"stage": "serialize"}, {"stage": "compress"}] if stages else None
    a = actor(kafka, producer={"max_request_size": 2048},
              **({"pipeline": stage} if stage else {}))
    assert bool(a.pipeline.stages) is stages
    big = os.urandom(4000)  # random: compression cannot shrink it
    requests = [request()._replace(value=big if i == 2 else b"v", message_id=f"id-{i}")
                for i in range(4)]
    with pytest.raises(RecordTooLargeError, match="message #2") as caught:
        await a.publish_batch(requests)
    assert caught.value.index == 2
    assert kafka.records("orders") == []
    assert await a.publish_batch(requests[:2]) == [PublishingOutcome.SUCCESS_DIRECT] * 2


async def test_an_ack_that_fails_is_a_publish_error(kafka: FakeKafka) -> None:
    kafka.faults.add("producer.send", future_raises=NotEnoughReplicasError(), times=1)
    a = actor(kafka)
    with pytest.raises(PublishError) as caught:
        await a.publish(request())
    assert isinstance(caught.value.__cause__, NotEnoughReplicasError)
    assert (await a.stats())["failed"] == 1


async def test_an_ack_that_never_comes_ends_at_the_delivery_timeout(kafka: FakeKafka
                                                                    ) -> None:
    kafka.faults.add("producer.send", future_never_resolves=True, times=1)
    a = actor(kafka)
    start = time.monotonic()
    with pytest.raises(PublishError, match="in time"):
        await a.publish(request())
    assert 0.9 < time.monotonic() - start < 3


async def test_a_batch_says_which_messages_were_acknowledged(kafka: FakeKafka) -> None:
    reqs = [request(key=f"k{i}".encode()) for i in range(6)]
    bad = {reqs[1].message_id, reqs[4].message_id}

    def failing(**call: Any) -> bool:
        return dict(call["headers"])["message-id"].decode() in bad

    kafka.faults.add("producer.send", future_raises=KafkaTimeoutError(), when=failing)
    a = actor(kafka)
    with pytest.raises(PublishError) as caught:
        await a.publish_batch(reqs)
    error = caught.value
    assert set(error.failures) == {1, 4}
    assert all("KafkaTimeoutError" in why for why in error.failures.values())
    assert error.outcomes == [PublishingOutcome.SUCCESS_DIRECT, None,
                              PublishingOutcome.SUCCESS_DIRECT,
                              PublishingOutcome.SUCCESS_DIRECT, None,
                              PublishingOutcome.SUCCESS_DIRECT]
    delivered = {dict(r.headers)["message-id"].decode() for r in kafka.records("orders")}
    assert delivered == {r.message_id for r in reqs} - bad


async def test_a_missing_topic_is_a_publish_error_naming_it(kafka: FakeKafka) -> None:
    a = actor(kafka)
    with pytest.raises(PublishError, match="'nowhere' does not exist"):
        await a.publish(request(topic="nowhere"))


async def test_a_delayed_publish_to_a_missing_topic_is_a_publish_error(kafka: FakeKafka
                                                                         ) -> None:
    """Refused at the call, not accepted into a delay topic to fail at its due time."""
    kafka.create_topic("d.1s", 1)
    a = actor(kafka, delay_topics={1: "d.1s"})
    with pytest.raises(PublishError, match="'nowhere' does not exist"):
        await a.publish(request(topic="nowhere", deliver_at=time.time() + 30))
    assert kafka.records("d.1s") == []
    await a.publish(request(deliver_at=time.time() + 30))  # an existing topic: accepted
    assert len(kafka.records("d.1s")) == 1


async def test_a_stopped_producer_refuses_and_flushes_first(kafka: FakeKafka) -> None:
    a = actor(kafka)
    await a.publish(request())
    await a.stop()
    with pytest.raises(ProducerClosedError):
        await a.publish(request())
    await a.stop()  # idempotent


async def test_connection_lost_mid_batch_reports_every_message(kafka: FakeKafka) -> None:
    kafka.faults.add("producer.send", raises=KafkaConnectionError(), times=2)
    a = actor(kafka)
    with pytest.raises(PublishError) as caught:
        await a.publish_batch([request(key=f"k{i}".encode()) for i in range(4)])
    assert set(caught.value.failures) == {0, 1}
    assert caught.value.outcomes is not None and caught.value.outcomes[2:] == [
        PublishingOutcome.SUCCESS_DIRECT] * 2


async def test_concurrent_first_calls_start_one_producer(kafka: FakeKafka) -> None:
    kafka.faults.add("producer.start", delay=0.1)
    a = actor(kafka)
    outcomes = await asyncio.gather(*(a.publish(request()) for _ in range(5)))
    assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 5
    # one start: a producer per connection, each started once
    producers = [c for c in kafka.clients if type(c).__name__ == "FakeProducer"]
    assert len(producers) == a.settings.producer.connections == 2


# --- calls of BATCH_FROM records or more go out as one record batch per partition ---------

def partition_of(key: bytes, count: int) -> int:
    """Kafka's default partitioner (the Java client's and aiokafka's)."""
    return (murmur2(key) & 0x7FFFFFFF) % count


@given(st.binary(max_size=80))
def test_the_partitioner_hashes_as_kafka_clients_do(key: bytes) -> None:
    """athomic's murmur2 (for records sent in record batches) gives the values of
    aiokafka's, which gives the Java client's: a key lands where any client puts it."""
    from athomic._kafka import murmur2 as ours
    from athomic._kafka import partition_for_key

    assert ours(key) == murmur2(key)
    for count in (1, 3, 7, 64):
        assert partition_for_key(key, count) == partition_of(key, count)


def test_the_partitioner_matches_the_java_clients_known_values() -> None:
    # values of org.apache.kafka.common.utils.Utils.murmur2 (as unsigned 32 bits)
    from athomic._kafka import murmur2 as ours

    assert ours(b"21") == (-973932308) & 0xFFFFFFFF
    assert ours(b"foobar") == (-790332482) & 0xFFFFFFFF
    assert ours(b"a-little-bit-long-string") == (-985981536) & 0xFFFFFFFF
    assert ours(b"a-little-bit-longer-string") == (-1486304829) & 0xFFFFFFFF
    assert ours(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == \
        (-58897971) & 0xFFFFFFFF
    assert ours(b"abc") == 479470107


async def test_a_large_batch_lands_where_send_would_put_it_in_key_order(
        kafka: FakeKafka) -> None:
    reqs = [request(key=f"k{i % 5}".encode(), value=str(i).encode()) for i in range(40)]
    assert len(reqs) >= BATCH_FROM
    a = actor(kafka)
    assert await a.publish_batch(reqs) == [PublishingOutcome.SUCCESS_DIRECT] * 40
    by_key: dict[bytes, list[int]] = {}
    for p in range(3):
        for r in kafka.records("orders", p):
            assert r.key is not None and p == partition_of(r.key, 3)
            by_key.setdefault(r.key, []).append(int(r.value))
            assert dict(r.headers)["x-app"] == b"1"
    assert by_key == {f"k{k}".encode(): list(range(k, 40, 5)) for k in range(5)}
    # one request per partition, not one per record
    sends = [c for c in kafka.calls if c[0] == "producer.send_batch"]
    assert len(sends) == len({partition_of(f"k{k}".encode(), 3) for k in range(5)})


async def test_records_without_a_key_stick_to_one_partition_per_call(
        kafka: FakeKafka) -> None:
    a = actor(kafka)
    for call in range(3):
        await a.publish_batch([request(key=None, value=f"{call}.{i}".encode())
                               for i in range(BATCH_FROM)])
    per_partition = [[r.value for r in kafka.records("orders", p)] for p in range(3)]
    assert per_partition == [[f"{call}.{i}".encode() for i in range(BATCH_FROM)]
                             for call in range(3)]


async def test_a_failed_batch_fails_exactly_its_partition(kafka: FakeKafka) -> None:
    reqs = [request(key=f"k{i}".encode()) for i in range(30)]
    kafka.faults.add("producer.send_batch", future_raises=NotEnoughReplicasError(),
                     when=lambda **call: call["partition"] == 1)
    a = actor(kafka)
    with pytest.raises(PublishError) as caught:
        await a.publish_batch(reqs)
    lost = {i for i, r in enumerate(reqs) if partition_of(r.key or b"", 3) == 1}
    assert lost and set(caught.value.failures) == lost
    assert all("NotEnoughReplicas" in why for why in caught.value.failures.values())
    delivered = {dict(r.headers)["message-id"].decode() for r in kafka.records("orders")}
    assert delivered == {r.message_id for i, r in enumerate(reqs) if i not in lost}


async def test_a_missing_topic_in_a_large_batch_fails_only_its_messages(
        kafka: FakeKafka) -> None:
    kafka.create_topic("audit", 1)
    reqs = [request(topic=("orders", "nowhere", "audit")[i % 3], key=f"k{i}".encode())
            for i in range(24)]
    a = actor(kafka)
    with pytest.raises(PublishError) as caught:
        await a.publish_batch(reqs)
    assert set(caught.value.failures) == set(range(1, 24, 3))
    assert all("'nowhere' does not exist" in why for why in caught.value.failures.values())
    assert len(kafka.records("orders")) == len(kafka.records("audit")) == 8


async def test_a_batch_larger_than_max_batch_size_goes_out_in_several(
        kafka: FakeKafka) -> None:
    a = actor(kafka, producer={"max_batch_size": 4096})
    reqs = [request(key=b"same", value=bytes([i]) * 1000) for i in range(20)]
    assert await a.publish_batch(reqs) == [PublishingOutcome.SUCCESS_DIRECT] * 20
    assert [r.value for r in kafka.records("orders")] == [r.value for r in reqs]
    assert len([c for c in kafka.calls if c[0] == "producer.send_batch"]) >= 5


async def test_a_batch_too_large_for_its_topic_fails_only_the_record_too_large(
        kafka: FakeKafka) -> None:
    """Kafka applies max.message.bytes to a record batch, not to each record."""
    kafka.create_topic("small", 1, {"max.message.bytes": "2000"})
    reqs = [request(topic="small", key=f"k{i}".encode(), value=bytes([i]) * 200)
            for i in range(20)]
    reqs[7] = request(topic="small", key=b"big", value=b"x" * 2500)
    a = actor(kafka)
    with pytest.raises(PublishError) as caught:
        await a.publish_batch(reqs)
    assert set(caught.value.failures) == {7}
    assert "MessageSizeTooLarge" in caught.value.failures[7]
    assert [r.value for r in kafka.records("small")] == [
        r.value for i, r in enumerate(reqs) if i != 7]


# --- several connections ---------------------------------------------------------------
def watch_sends(kafka: FakeKafka, topic: str) -> dict[int, set[int]]:
    """Filled as records are sent: per producer (its place among the FakeProducers), the
    partitions it sent to (``None``: the client's choice)."""
    seen: dict[int, set[int]] = {}

    def saw(client: Any, **call: Any) -> bool:
        if call["topic"] == topic:
            producers = [c for c in kafka.clients if type(c).__name__ == "FakeProducer"]
            seen.setdefault(producers.index(client), set()).add(call["partition"])
        return False  # a watch, not a fault

    for name in ("producer.send", "producer.send_batch"):
        kafka.faults.add(name, when=saw)
    return seen


async def test_each_partition_goes_through_one_of_the_connections(kafka: FakeKafka
                                                                  ) -> None:
    a = actor(kafka, producer={"connections": 2})
    sends = watch_sends(kafka, "orders")
    keys = [f"user-{i}".encode() for i in range(60)]
    batch = [request(key=k, value=str(i).encode()) for i, k in enumerate(keys)]
    assert await a.publish_batch(batch) == [PublishingOutcome.SUCCESS_DIRECT] * 60
    for i, k in enumerate(keys[:6]):  # one at a time: send(), its partition picked here
        assert await a.publish(request(key=k, value=f"single-{i}".encode())) is (
            PublishingOutcome.SUCCESS_DIRECT)
    assert sends == {0: {0, 2}, 1: {1}}  # partition p through connection p % 2
    # partitioned as the client partitions a keyed record, batch and single alike
    records = kafka.records("orders")
    assert len(records) == 66
    for record in records:
        assert record.partition == (murmur2(record.key) & 0x7FFFFFFF) % 3
    # a key's records in the order they were published
    for k in keys[:6]:
        values = [r.value for r in records if r.key == k]
        assert values[-1].startswith(b"single-") and len(values) == 2
    await a.stop()
    assert kafka.open_clients() == []


async def test_one_connection_is_one_plain_producer(kafka: FakeKafka) -> None:
    a = actor(kafka, producer={"connections": 1})
    sends = watch_sends(kafka, "orders")
    await a.publish_batch([request(key=f"k{i}".encode()) for i in range(30)])
    assert await a.publish(request(key=None)) is PublishingOutcome.SUCCESS_DIRECT
    # the client picks a single record's partition itself (None), as without athomic
    assert sends == {0: {0, 1, 2, None}}
    await a.stop()


async def test_keyless_records_over_several_connections_land_on_every_partition(
        kafka: FakeKafka) -> None:
    a = actor(kafka, producer={"connections": 2})
    sends = watch_sends(kafka, "orders")
    for _ in range(40):
        assert await a.publish(request(key=None)) is PublishingOutcome.SUCCESS_DIRECT
    assert {r.partition for r in kafka.records("orders")} == {0, 1, 2}
    assert sends == {0: {0, 2}, 1: {1}}
    await a.stop()


async def test_a_connection_that_cannot_start_leaves_none_open(kafka: FakeKafka) -> None:
    starts = iter(range(100))
    kafka.faults.add("producer.start", raises=KafkaConnectionError, times=1,
                     when=lambda **_: next(starts) == 1)  # the second connection's
    a = actor(kafka, producer={"connections": 2})
    with pytest.raises(MessagingConnectionError):
        await a.publish(request())
    assert kafka.open_clients() == []  # the first, started, was stopped again
    assert await a.publish(request()) is PublishingOutcome.SUCCESS_DIRECT  # next call
    await a.stop()
    assert kafka.open_clients() == []


async def test_stop_closes_every_connection_even_when_one_fails_to_flush(
        kafka: FakeKafka) -> None:
    a = actor(kafka, producer={"connections": 3})
    await a.publish_batch([request(key=f"k{i}".encode()) for i in range(30)])
    kafka.faults.add("producer.flush", raises=KafkaConnectionError, times=1)
    with pytest.raises(KafkaConnectionError):
        await a.stop()
    assert kafka.open_clients() == []
