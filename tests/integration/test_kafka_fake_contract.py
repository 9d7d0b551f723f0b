"""One set of Kafka behaviour tests, run on the in-memory fake (``tests/kafka_fake.py``)
and on the real broker through athomic's seam (``AIOKAFKA``): what the fake claims to
model, the real broker does.

The fake is configured like ``deploy/kafka/kafka-local`` (auto-created topics get 3
partitions). A real broker writes transaction markers shortly *after* commit/abort
returns, so checks that depend on them poll (``Side.eventually``); on the fake, polling
also moves its clock, which is how transaction timeouts pass there.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aiokafka.errors import (
    ConsumerStoppedError,
    IllegalStateError,
    InvalidPartitionsError,
    KafkaError,
    MessageSizeTooLargeError,
    OffsetMetadataTooLargeError,
    ProducerFenced,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from kafka_fake import FakeKafka, ManualClock

from athomic._kafka import AIOKAFKA, KafkaClients, TopicSpec, stop_quietly
from athomic.errors import ConfigurationError

T = TypeVar("T")
REAL = pytest.param("real", marks=pytest.mark.integration)
STOP_S = 5.0


class Side:
    """The fake or the real broker, behind the same calls. Clients it makes are stopped at
    the end of the test."""

    def __init__(self, name: str, clients: KafkaClients, options: dict[str, Any],
                 clock: ManualClock | None = None) -> None:
        self.name = name
        self.clients = clients
        self.options = options
        self.clock = clock
        self._stops: list[Callable[[], Awaitable[None]]] = []

    async def producer(self, **options: Any) -> Any:
        producer = self.clients.producer(**self.options, **options)
        self._stops.append(lambda: stop_quietly(producer, STOP_S))
        await producer.start()
        return producer

    async def consumer(self, *partitions: TopicPartition, **options: Any) -> Any:
        consumer = self.clients.consumer(**self.options, group_id=None,
                                         enable_auto_commit=False, **options)
        self._stops.append(lambda: stop_quietly(consumer, STOP_S))
        await consumer.start()
        if partitions:
            consumer.assign(list(partitions))
        return consumer

    async def admin(self) -> Any:
        admin = self.clients.admin(**self.options)
        self._stops.append(admin.close)
        await admin.start()
        return admin

    async def topic(self, partitions: int = 1, **config: str) -> str:
        name = f"contract.{uuid.uuid4().hex[:12]}"
        admin = await self.admin()
        await admin.create_topics([TopicSpec(name, partitions, 1, config)])
        return name

    async def eventually(self, probe: Callable[[], Awaitable[T]],
                         until: Callable[[T], bool], timeout: float = 25.0) -> T:
        """Poll ``probe`` until ``until(value)``; on the fake, each round moves its clock
        0.5 s instead of sleeping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await probe()
            if until(value) or loop.time() > deadline:
                return value
            if self.clock is not None:
                self.clock.advance(0.5)
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                await stop()
        self._stops.clear()
        # A fenced aiokafka producer leaves futures whose exception nobody retrieves; their
        # finalizer logs a traceback, and if a collection happens to run it inside
        # ast.parse (pytest's assertion rewriting), CPython 3.11.7 raises "SystemError: AST
        # constructor recursion depth mismatch". Collect here, at a safe point.
        gc.collect()


@pytest.fixture(params=["fake", REAL])
async def kafka(request: pytest.FixtureRequest) -> AsyncIterator[Side]:
    if request.param == "fake":
        clock = ManualClock()
        fake = FakeKafka(auto_create_topics=True, default_partitions=3, clock=clock)
        side = Side("fake", fake, {"bootstrap_servers": "fake:9092"}, clock)
    else:
        side = Side("real", AIOKAFKA,
                    {"bootstrap_servers": request.getfixturevalue("kafka_bootstrap")})
    try:
        yield side
    finally:
        await side.close()


async def read(consumer: Any, count: int, timeout: float = 15.0) -> list[Any]:
    """At least ``count`` records (fewer if they do not come in ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    records: list[Any] = []
    while len(records) < count and loop.time() < deadline:
        for batch in (await consumer.getmany(timeout_ms=200)).values():
            records += batch
    return records


def offsets(records: list[Any]) -> list[int]:
    return [r.offset for r in records]


# --- producing -----------------------------------------------------------------------------
async def test_offsets_partitions_and_record_metadata(kafka: Side) -> None:
    topic = await kafka.topic(3)
    producer = await kafka.producer()
    keyed = (murmur2(b"k1") & 0x7FFFFFFF) % 3
    first = await (await producer.send(topic, b"v0", key=b"k1", timestamp_ms=1234,
                                       headers=[("h", b"1")]))
    second = await (await producer.send(topic, b"v1", key=b"k1"))
    other = (keyed + 1) % 3
    explicit = [await (await producer.send(topic, b"p", partition=other)) for _ in range(2)]
    unkeyed = await (await producer.send(topic, b"u"))
    assert (first.topic, first.partition, first.offset) == (topic, keyed, 0)
    assert first.topic_partition == TopicPartition(topic, keyed)
    assert (first.timestamp, first.timestamp_type) == (1234, 0)
    assert (second.partition, second.offset) == (keyed, 1)
    assert second.timestamp > 1_600_000_000_000
    assert [(m.partition, m.offset) for m in explicit] == [(other, 0), (other, 1)]
    assert unkeyed.partition in range(3)

    consumer = await kafka.consumer(TopicPartition(topic, keyed),
                                    auto_offset_reset="earliest")
    got = (await read(consumer, 2))[:2]  # (the unkeyed record may follow)
    assert [(r.offset, r.key, r.value) for r in got] == [(0, b"k1", b"v0"), (1, b"k1", b"v1")]
    assert got[0].headers == (("h", b"1"),) and got[1].headers == ()
    assert (got[0].timestamp, got[0].timestamp_type) == (1234, 0)
    assert (got[0].topic, got[0].partition) == (topic, keyed)


async def test_send_to_a_partition_the_topic_lacks(kafka: Side) -> None:
    topic = await kafka.topic(2)
    producer = await kafka.producer()
    with pytest.raises(AssertionError, match="Unrecognized partition"):
        await producer.send(topic, b"v", partition=2)


async def test_send_to_a_topic_the_broker_will_not_create(kafka: Side) -> None:
    # kafka-local auto-creates topics, never one with an illegal name
    producer = await kafka.producer(request_timeout_ms=1500)
    with pytest.raises(UnknownTopicOrPartitionError):
        await producer.send("no such topic!", b"v")


async def test_auto_created_topic(kafka: Side) -> None:
    topic = f"contract.auto.{uuid.uuid4().hex[:12]}"
    producer = await kafka.producer()
    meta = await (await producer.send(topic, b"v"))
    assert meta.offset == 0
    admin = await kafka.admin()
    assert await admin.partition_counts([topic]) == {topic: 3}


async def test_record_size_limits(kafka: Side) -> None:
    topic = await kafka.topic()
    producer = await kafka.producer(max_request_size=3_000_000)
    with pytest.raises(MessageSizeTooLargeError):  # over the client's max_request_size
        await producer.send(topic, b"x" * 3_100_000)
    future = await producer.send(topic, b"x" * 1_100_000)  # over the broker's limit
    with pytest.raises(MessageSizeTooLargeError):
        await future
    assert (await (await producer.send(topic, b"x" * 1_048_000))).offset == 0


async def test_acks_zero_resolves_to_none(kafka: Side) -> None:
    topic = await kafka.topic()
    producer = await kafka.producer(acks=0)
    assert await (await producer.send(topic, b"v")) is None


# --- transactions --------------------------------------------------------------------------
async def test_markers_isolation_and_last_stable_offset(kafka: Side) -> None:
    topic = await kafka.topic()
    tp = TopicPartition(topic, 0)
    plain = await kafka.producer()
    tx = await kafka.producer(transactional_id=f"contract.{uuid.uuid4().hex}")
    uncommitted = await kafka.consumer(tp, isolation_level="read_uncommitted")

    async def settled(end: int) -> None:
        got = await kafka.eventually(lambda: uncommitted.end_offsets([tp]),
                                     lambda ends: ends[tp] >= end)
        assert got[tp] == end

    await tx.begin_transaction()
    sent = [await (await tx.send(topic, v)) for v in (b"a0", b"a1")]
    await tx.commit_transaction()
    await settled(3)  # a0, a1, COMMIT marker
    await tx.begin_transaction()
    sent.append(await (await tx.send(topic, b"b0")))
    await tx.abort_transaction()
    await settled(5)  # b0, ABORT marker
    sent.append(await (await plain.send(topic, b"p0")))
    await tx.begin_transaction()
    sent.append(await (await tx.send(topic, b"c0")))  # left open for now
    sent.append(await (await plain.send(topic, b"p1")))
    assert [m.offset for m in sent] == [0, 1, 3, 5, 6, 7]

    committed = await kafka.consumer(tp, isolation_level="read_committed",
                                     auto_offset_reset="earliest")
    assert await committed.end_offsets([tp]) == {tp: 6}  # the LSO: c0's offset
    assert await uncommitted.end_offsets([tp]) == {tp: 8}
    latest_rc = await kafka.consumer(tp, isolation_level="read_committed")
    latest_ru = await kafka.consumer(tp, isolation_level="read_uncommitted")
    assert (await latest_rc.position(tp), await latest_ru.position(tp)) == (6, 8)

    got = await read(committed, 3)
    assert [(r.offset, r.value) for r in got] == [(0, b"a0"), (1, b"a1"), (5, b"p0")]
    assert await committed.getmany(timeout_ms=300) == {}  # p1 is past the LSO
    assert await committed.position(tp) == 6
    everything = await kafka.consumer(tp, isolation_level="read_uncommitted",
                                      auto_offset_reset="earliest")
    assert offsets(await read(everything, 6)) == [0, 1, 3, 5, 6, 7]

    await tx.commit_transaction()
    await settled(9)
    assert offsets(await read(committed, 2)) == [6, 7]
    assert await committed.position(tp) == 9  # past the COMMIT marker
    assert await committed.end_offsets([tp]) == {tp: 9}


async def test_offsets_sent_to_a_transaction_commit_with_it(kafka: Side) -> None:
    topic = await kafka.topic(2)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    group = f"contract.{uuid.uuid4().hex[:8]}"
    admin = await kafka.admin()
    tx = await kafka.producer(transactional_id=f"contract.{uuid.uuid4().hex}")
    await tx.begin_transaction()
    await tx.send_offsets_to_transaction({tp0: OffsetAndMetadata(5, "meta")}, group)
    assert await admin.committed(group, [tp0, tp1]) == {}  # pending until the commit
    await tx.commit_transaction()
    expected = {tp0: (5, "meta")}
    assert await kafka.eventually(lambda: admin.committed(group, [tp0, tp1]),
                                  lambda got: got == expected) == expected

    await tx.begin_transaction()
    await tx.send_offsets_to_transaction({tp0: OffsetAndMetadata(9, "m2"), tp1: 3}, group)
    await tx.abort_transaction()
    await asyncio.sleep(0.3)
    assert await admin.committed(group, [tp0, tp1]) == expected
    reader = await kafka.consumer(tp0, tp1)
    assert await reader.end_offsets([tp0, tp1]) == {tp0: 0, tp1: 0}  # no data markers


async def test_offset_metadata_size_limit(kafka: Side) -> None:
    topic = await kafka.topic()
    tp = TopicPartition(topic, 0)
    group = f"contract.{uuid.uuid4().hex[:8]}"
    tid = f"contract.{uuid.uuid4().hex}"
    tx = await kafka.producer(transactional_id=tid)
    await tx.begin_transaction()
    await tx.send_offsets_to_transaction({tp: OffsetAndMetadata(1, "m" * 4096)}, group)
    await tx.commit_transaction()

    await tx.begin_transaction()
    await (await tx.send(topic, b"stuck"))
    with pytest.raises(KafkaError) as raised:
        await tx.send_offsets_to_transaction({tp: OffsetAndMetadata(2, "m" * 4097)}, group)
    assert type(raised.value) is KafkaError  # aiokafka's sender died on the answer
    assert isinstance(raised.value.__cause__, OffsetMetadataTooLargeError)
    with pytest.raises(AssertionError, match="FATAL_ERROR"):
        await tx.commit_transaction()
    with pytest.raises(AssertionError, match="FATAL_ERROR"):
        await tx.abort_transaction()
    reader = await kafka.consumer(tp, isolation_level="read_committed")
    assert await reader.end_offsets([tp]) == {tp: 0}  # the transaction is still open
    admin = await kafka.admin()
    assert await admin.committed(group, [tp]) == {tp: (1, "m" * 4096)}

    await kafka.producer(transactional_id=tid)  # a new instance aborts it
    ends = await kafka.eventually(lambda: reader.end_offsets([tp]), lambda e: e[tp] > 0)
    assert ends == {tp: 2}


@pytest.mark.parametrize("operation", ["send", "send_same_partition", "send_offsets",
                                       "commit", "abort"])
async def test_a_newer_producer_fences_the_older(kafka: Side, operation: str) -> None:
    topic = await kafka.topic(2)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    tid = f"contract.{uuid.uuid4().hex}"
    old = await kafka.producer(transactional_id=tid)
    await old.begin_transaction()
    await (await old.send(topic, b"old", partition=0))
    new = await kafka.producer(transactional_id=tid)
    reader = await kafka.consumer(tp0, tp1, isolation_level="read_committed",
                                  auto_offset_reset="earliest")
    ends = await kafka.eventually(lambda: reader.end_offsets([tp0, tp1]),
                                  lambda e: e[tp0] == 2)
    assert ends == {tp0: 2, tp1: 0}  # "old" and its ABORT marker

    then: type[BaseException] = AssertionError  # every later call: FATAL_ERROR
    if operation == "send":  # a partition new to the transaction
        future = await old.send(topic, b"x", partition=1)
        with pytest.raises(ProducerFenced):
            await future
    elif operation == "send_same_partition":
        future = await old.send(topic, b"x", partition=0)
        with pytest.raises(ProducerFenced):
            await future
        then = ProducerFenced  # the commit reaches the broker
    elif operation == "send_offsets":
        with pytest.raises(ProducerFenced):
            await old.send_offsets_to_transaction({tp0: OffsetAndMetadata(1, "")}, "g")
    elif operation == "commit":
        with pytest.raises(ProducerFenced):
            await old.commit_transaction()
    else:
        with pytest.raises(ProducerFenced):
            await old.abort_transaction()
    with pytest.raises(then):
        await (old.abort_transaction() if operation == "commit" else
               old.commit_transaction())

    await new.begin_transaction()
    await (await new.send(topic, b"new", partition=0))
    await new.commit_transaction()
    assert [(r.offset, r.value) for r in await read(reader, 1)] == [(2, b"new")]


@pytest.mark.parametrize(
    "kafka", ["fake", pytest.param("real", marks=[pytest.mark.integration, pytest.mark.slow])],
    indirect=True)
async def test_a_transaction_past_its_timeout_is_aborted_and_fenced(kafka: Side) -> None:
    topic = await kafka.topic()
    tp = TopicPartition(topic, 0)
    tx = await kafka.producer(transactional_id=f"contract.{uuid.uuid4().hex}",
                              transaction_timeout_ms=1000)
    await tx.begin_transaction()
    await (await tx.send(topic, b"late"))
    reader = await kafka.consumer(tp, isolation_level="read_committed",
                                  auto_offset_reset="earliest")
    assert await reader.end_offsets([tp]) == {tp: 0}
    ends = await kafka.eventually(lambda: reader.end_offsets([tp]), lambda e: e[tp] > 0)
    assert ends == {tp: 2}  # aborted by the broker: "late" and an ABORT marker
    with pytest.raises(ProducerFenced):
        await tx.commit_transaction()
    assert await reader.getmany(timeout_ms=300) == {}
    everything = await kafka.consumer(tp, auto_offset_reset="earliest")
    assert [r.value for r in await read(everything, 1)] == [b"late"]


async def test_transactional_misuse(kafka: Side) -> None:
    from aiokafka.errors import IllegalOperation

    topic = await kafka.topic()
    tx = await kafka.producer(transactional_id=f"contract.{uuid.uuid4().hex}")
    with pytest.raises(IllegalOperation):
        await tx.send(topic, b"v")
    with pytest.raises(IllegalOperation):
        await tx.send_offsets_to_transaction({TopicPartition(topic, 0): 1}, "g")
    with pytest.raises(AssertionError):
        await tx.commit_transaction()
    await tx.begin_transaction()
    with pytest.raises(AssertionError):
        await tx.begin_transaction()
    await tx.commit_transaction()  # empty: never reaches the broker
    plain = await kafka.producer()
    with pytest.raises(IllegalOperation):
        await plain.begin_transaction()


# --- consuming -----------------------------------------------------------------------------
async def test_consumer_positions_pause_seek_and_waits(kafka: Side) -> None:
    topic = await kafka.topic(2)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = await kafka.producer()
    for i in range(5):
        await (await producer.send(topic, b"%d" % i, partition=0))
    consumer = await kafka.consumer(tp0, tp1, auto_offset_reset="earliest")
    assert consumer.assignment() == {tp0, tp1}
    assert await consumer.beginning_offsets([tp0, tp1]) == {tp0: 0, tp1: 0}
    assert await consumer.end_offsets([tp0, tp1]) == {tp0: 5, tp1: 0}
    assert await consumer.position(tp0) == 0

    batch = await consumer.getmany(tp0, timeout_ms=5000, max_records=2)
    assert {tp: offsets(rs) for tp, rs in batch.items()} == {tp0: [0, 1]}
    assert await consumer.position(tp0) == 2

    consumer.pause(tp0)
    assert consumer.paused() == {tp0}
    assert await consumer.getmany(tp0, timeout_ms=300) == {}
    assert await consumer.getmany(timeout_ms=300) == {}
    assert await consumer.position(tp0) == 2
    consumer.resume(tp0)
    assert consumer.paused() == set()

    consumer.seek(tp0, 4)
    assert offsets(await read(consumer, 1)) == [4]
    assert await consumer.position(tp0) == 5
    consumer.seek(tp0, 100)  # out of range: reset to earliest on the next fetch
    assert await consumer.position(tp0) == 100
    assert offsets(await read(consumer, 5)) == [0, 1, 2, 3, 4]
    latest = await kafka.consumer(tp0)
    assert await latest.position(tp0) == 5
    latest.seek(tp0, 100)  # reset to latest once a fetch finds it out of range

    async def fetched_position() -> int:
        assert await latest.getmany(timeout_ms=200) == {}
        return int(await latest.position(tp0))

    assert await kafka.eventually(fetched_position, lambda p: p == 5) == 5

    with pytest.raises(IllegalStateError):
        consumer.seek(TopicPartition(topic, 7), 1)
    with pytest.raises(ValueError):
        consumer.seek(tp0, -1)
    with pytest.raises(IllegalStateError):
        await consumer.position(TopicPartition(topic, 7))

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await consumer.getmany(tp1, timeout_ms=400) == {}
    assert loop.time() - started >= 0.35

    async def later() -> None:
        await asyncio.sleep(0.3)
        await (await producer.send(topic, b"late", partition=1))

    sending = asyncio.ensure_future(later())
    started = loop.time()
    batch = await consumer.getmany(tp1, timeout_ms=8000)
    await sending
    assert {tp: offsets(rs) for tp, rs in batch.items()} == {tp1: [0]}
    assert loop.time() - started < 6

    consumer.pause(tp1)
    consumer.assign([tp1])
    assert consumer.assignment() == {tp1} and consumer.paused() == set()
    # aiokafka's fetcher, told of the new assignment, cancels its fetches and awaits them
    # with CancelledError suppressed: a stop() landing then has its cancel swallowed and
    # waits for the fetcher forever (seen once in ~14 runs of this test). athomic stops
    # every client through stop_quietly, which cancels the fetcher again.
    await stop_quietly(consumer, STOP_S)
    with pytest.raises(ConsumerStoppedError):
        await consumer.getmany()


# --- admin ---------------------------------------------------------------------------------
async def test_admin(kafka: Side) -> None:
    admin = await kafka.admin()
    topic = await kafka.topic(2)
    custom = await kafka.topic(1, **{"retention.ms": "1234"})
    assert await admin.broker_count() == 1
    assert await admin.partition_counts([topic, "contract.missing"]) == {topic: 2}
    await admin.create_topics([TopicSpec(topic, 5, 1)])  # exists: no error, no change
    assert await admin.partition_counts([topic]) == {topic: 2}
    await admin.create_partitions(topic, 4)
    assert await admin.partition_counts([topic]) == {topic: 4}
    with pytest.raises(InvalidPartitionsError):
        await admin.create_partitions(topic, 4)
    with pytest.raises(UnknownTopicOrPartitionError):
        await admin.create_partitions("contract.missing", 3)
    assert await admin.topic_config([topic, custom, "contract.missing"], "retention.ms") == {
        topic: "604800000", custom: "1234", "contract.missing": None}
    assert await admin.topic_config([topic], "no.such.config") == {topic: None}
    assert await admin.committed("contract.nobody", [TopicPartition(topic, 0)]) == {}
    name = f"contract.{uuid.uuid4().hex[:8]}"
    for spec in (TopicSpec(name + " bad", 1, 1), TopicSpec(name, 0, 1),
                 TopicSpec(name, 1, 3), TopicSpec(name, 1, 1, {"no.such": "1"})):
        with pytest.raises(ConfigurationError):
            await admin.create_topics([spec])
    assert await admin.partition_counts([name]) == {}
