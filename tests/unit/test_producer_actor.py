"""ProducerActor's failure paths, on the in-memory Kafka: each Kafka fault becomes the typed
error a caller sees, nothing is reported acknowledged that was not, and no wait is
unbounded. (The happy paths run against the real broker in tests/integration.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
)
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
from athomic.actors.producer import ProducerActor
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
    assert sum(1 for c in kafka.clients if type(c).__name__ == "FakeProducer") == 1
