"""The in-memory Kafka alone: fault injection, test controls and introspection (what the
contract test cannot compare with a real broker)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from aiokafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFenced,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata, RecordMetadata, TopicPartition
from kafka_fake import FakeKafka, ManualClock

from athomic._kafka import (
    Batching,
    KafkaClients,
    TopicSpec,
    acked_all,
    futures_of,
    partition_for_key,
    send_batched,
    stop_quietly,
    wait_quietly,
)

TP = TopicPartition("t", 0)


@pytest.fixture
def kafka() -> FakeKafka:
    fake = FakeKafka(clock=ManualClock())
    fake.create_topic("t", 1)
    fake.create_topic("u", 2)
    return fake


async def started(client: object) -> object:
    await client.start()  # type: ignore[attr-defined]
    return client


async def test_is_a_kafka_clients_factory() -> None:
    clients: KafkaClients = FakeKafka()
    producer = clients.producer(bootstrap_servers="ignored:9092", client_id="p",
                                security_protocol="SSL", request_timeout_ms=1)
    await producer.start()
    await producer.stop()


async def test_fault_raises_a_limited_number_of_times_when_it_matches(kafka: FakeKafka
                                                                      ) -> None:
    fault = kafka.faults.add("producer.send", raises=KafkaTimeoutError(), times=2,
                             when=lambda **call: call["topic"] == "t")
    producer = kafka.producer()
    await producer.start()
    for _ in range(2):
        with pytest.raises(KafkaTimeoutError):
            await producer.send("t", b"v")
    assert (await (await producer.send("u", b"v", partition=0))).offset == 0
    assert (await (await producer.send("t", b"v"))).offset == 0  # used up
    assert fault.fired == 2 and not fault.active
    kafka.faults.add("admin.broker_count", raises=KafkaConnectionError)  # a class
    admin = kafka.admin()
    await admin.start()
    with pytest.raises(KafkaConnectionError):
        await admin.broker_count()
    assert kafka.open_clients() == [producer, admin]
    await producer.stop()
    await admin.close()
    assert kafka.open_clients() == []


async def test_fault_hangs_until_cancelled(kafka: FakeKafka) -> None:
    kafka.faults.add("producer.commit_transaction", hang=True, times=1)
    producer = kafka.producer(transactional_id="tx")
    await producer.start()
    await producer.begin_transaction()
    await (await producer.send("t", b"v"))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(producer.commit_transaction(), 0.05)
    assert kafka.open_transactions() == ["tx"]
    assert kafka.last_stable_offset(TP) == 0
    await producer.commit_transaction()  # the fault acted before the call did anything
    assert kafka.values("t") == [b"v"]
    await producer.stop()


async def test_fault_delays(kafka: FakeKafka) -> None:
    kafka.faults.add("consumer.end_offsets", delay=0.05)
    consumer = kafka.consumer()
    await consumer.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await consumer.end_offsets([TP]) == {TP: 0}
    assert loop.time() - began >= 0.045
    await consumer.stop()


async def test_send_futures_that_never_resolve_or_fail(kafka: FakeKafka) -> None:
    kafka.faults.add("producer.send", future_never_resolves=True, times=1)
    kafka.faults.add("producer.send", future_raises=KafkaTimeoutError(), times=1)
    producer = kafka.producer()
    await producer.start()
    future = await producer.send("t", b"lost")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(future), 0.05)
    assert not future.done()
    with pytest.raises(KafkaTimeoutError):
        await (await producer.send("t", b"failed"))
    assert kafka.values("t") == []  # neither was written
    meta = await (await producer.send("t", b"kept"))
    assert isinstance(meta, RecordMetadata) and meta.offset == 0
    future.cancel()
    await producer.stop()


async def test_fault_names_and_synchronous_methods(kafka: FakeKafka) -> None:
    with pytest.raises(ValueError, match="unknown client method"):
        kafka.faults.add("producer.sned", raises=KafkaError)
    with pytest.raises(ValueError, match="synchronous"):
        kafka.faults.add("consumer.seek", hang=True)
    with pytest.raises(ValueError, match=r"producer\.send"):
        kafka.faults.add("producer.flush", future_never_resolves=True)
    kafka.faults.add("consumer.seek", raises=IllegalStateError("gone"))
    seen: list[object] = []

    def never(partitions: object, **call: object) -> bool:
        seen.append(partitions)
        return False

    kafka.faults.add("consumer.getmany", raises=KafkaError, when=never)
    consumer = kafka.consumer()
    await consumer.start()
    consumer.assign([TP])
    with pytest.raises(IllegalStateError, match="gone"):
        consumer.seek(TP, 0)
    assert await consumer.getmany(TP) == {}
    assert seen == [(TP,)]
    kafka.faults.clear()
    consumer.seek(TP, 0)
    await consumer.stop()
    assert ("consumer.seek", {"partition": TP, "offset": 0}) in kafka.calls


async def test_broker_down_and_up(kafka: FakeKafka) -> None:
    producer = kafka.producer()
    consumer = kafka.consumer(auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    consumer.assign([TP])
    kafka.broker_down()
    with pytest.raises(KafkaConnectionError):
        await producer.send("t", b"v")
    with pytest.raises(KafkaConnectionError):
        await consumer.end_offsets([TP])
    with pytest.raises(KafkaConnectionError):
        await kafka.admin().start()
    with pytest.raises(KafkaConnectionError):
        await kafka.producer().start()
    assert await consumer.getmany(timeout_ms=20) == {}
    waiting = asyncio.ensure_future(consumer.getmany(timeout_ms=5000))
    kafka.broker_up()
    await (await producer.send("t", b"v"))
    assert [r.value for r in (await waiting)[TP]] == [b"v"]
    kafka.broker_down()
    await producer.stop()  # stopping works while down
    await consumer.stop()


async def test_fence_on_demand(kafka: FakeKafka) -> None:
    producer = kafka.producer(transactional_id="tx")
    await producer.start()
    assert kafka.epoch("tx") == 0
    await producer.begin_transaction()
    await (await producer.send("t", b"v"))
    kafka.fence("tx")
    assert kafka.epoch("tx") == 1 and kafka.open_transactions() == []
    with pytest.raises(ProducerFenced):
        await producer.commit_transaction()
    assert producer.state == "FATAL_ERROR"
    assert kafka.transactions_aborted == 1 and kafka.transactions_committed == 0
    assert [e.marker for e in kafka.log("t")] == [None, "ABORT"]
    await producer.stop()


async def test_transaction_timeout_follows_the_clock() -> None:
    clock = ManualClock()
    kafka = FakeKafka(clock=clock)
    kafka.create_topic("t")
    producer = kafka.producer(transactional_id="tx", transaction_timeout_ms=10_000)
    await producer.start()
    await producer.begin_transaction()
    clock.advance(60)  # the timeout runs from the first partition, not from begin
    await (await producer.send("t", b"v"))
    clock.advance(9)
    assert kafka.open_transactions() == ["tx"]
    clock.advance(2)
    assert kafka.open_transactions() == [] and kafka.epoch("tx") == 1
    assert kafka.last_stable_offset(TP) == 2
    with pytest.raises(ProducerFenced):
        await producer.commit_transaction()
    await producer.stop()


async def test_a_stopped_producer_leaves_its_transaction_open() -> None:
    clock = ManualClock()
    kafka = FakeKafka(clock=clock)
    kafka.create_topic("t")
    producer = kafka.producer(transactional_id="tx")
    await producer.start()
    await producer.begin_transaction()
    await (await producer.send("t", b"v"))
    await producer.stop()
    assert kafka.last_stable_offset(TP) == 0
    clock.advance(61)  # transaction_timeout_ms defaults to 60 s
    assert kafka.last_stable_offset(TP) == 2
    assert kafka.values("t", isolation_level="read_uncommitted") == [b"v"]


async def test_missing_topic_without_auto_creation() -> None:
    kafka = FakeKafka(metadata_wait_s=0.05)
    producer = kafka.producer()
    await producer.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UnknownTopicOrPartitionError):
        await producer.send("missing", b"v")
    assert loop.time() - began >= 0.045
    kafka.metadata_wait_s = 5
    loop.call_later(0.02, kafka.create_topic, "late", 1)
    assert (await (await producer.send("late", b"v"))).offset == 0  # metadata arrived
    await producer.stop()
    assert kafka.topics() == {"late": 1}


async def test_introspection(kafka: FakeKafka) -> None:
    producer = kafka.producer(transactional_id="tx")
    await producer.start()
    await producer.begin_transaction()
    await (await producer.send("u", b"a", partition=0))
    await (await producer.send("u", b"b", partition=1))
    await producer.send_offsets_to_transaction({TP: OffsetAndMetadata(7, "m")}, "g")
    assert kafka.committed("g") == {}
    await producer.commit_transaction()
    await producer.begin_transaction()
    await (await producer.send("u", b"c", partition=0))
    await producer.abort_transaction()
    await producer.begin_transaction()
    await (await producer.send("u", b"d", partition=1))  # open
    assert kafka.values("u") == [b"a", b"b"]
    assert kafka.values("u", 0, isolation_level="read_uncommitted") == [b"a", b"c"]
    assert kafka.values("u", isolation_level="read_uncommitted") == [b"a", b"c", b"b", b"d"]
    assert [(e.offset, e.marker) for e in kafka.log("u", 0)] == [
        (0, None), (1, "COMMIT"), (2, None), (3, "ABORT")]
    assert kafka.committed("g") == {TP: OffsetAndMetadata(7, "m")}
    assert (kafka.transactions_committed, kafka.transactions_aborted) == (1, 1)
    tp1 = TopicPartition("u", 1)
    assert (kafka.high_watermark(tp1), kafka.last_stable_offset(tp1)) == (3, 2)
    admin = kafka.admin()
    await admin.start()
    assert await admin.committed("g", [TP, tp1]) == {TP: (7, "m")}
    await admin.create_topics([TopicSpec("v", 2, 1, {"retention.ms": "5"})])
    assert kafka.topics()["v"] == 2
    await admin.close()
    await producer.stop()


async def test_getmany_max_records_spans_partitions(kafka: FakeKafka) -> None:
    producer = kafka.producer()
    await producer.start()
    for partition in (0, 1):
        for i in range(3):
            await (await producer.send("u", b"%d" % i, partition=partition))
    consumer = kafka.consumer(auto_offset_reset="earliest", max_poll_records=4)
    await consumer.start()
    tps = [TopicPartition("u", 0), TopicPartition("u", 1)]
    consumer.assign(tps)
    first = await consumer.getmany()
    assert {tp.partition: len(rs) for tp, rs in first.items()} == {0: 3, 1: 1}
    second = await consumer.getmany(max_records=1)
    assert {tp.partition: [r.offset for r in rs] for tp, rs in second.items()} == {1: [1]}
    assert [await consumer.position(tp) for tp in tps] == [3, 2]
    await consumer.stop()
    await producer.stop()


def test_options_are_checked_like_aiokafka() -> None:
    kafka = FakeKafka()
    with pytest.raises(ValueError):
        kafka.producer(acks=2)
    with pytest.raises(ValueError):
        kafka.producer(transactional_id="tx", acks=1)
    with pytest.raises(ValueError):
        kafka.consumer(isolation_level="read_something")
    assert kafka.producer(enable_idempotence=True).acks == -1
    assert kafka.producer().acks == 1


async def test_stop_quietly_closes_what_a_stop_cut_short_leaves_open() -> None:
    """A producer whose stop hangs (pending batches, brokers gone): its sender and its
    connections are closed anyway, within the time given."""
    closed: list[str] = []

    class Part:
        def __init__(self, name: str) -> None:
            self.name = name

        async def close(self) -> None:
            closed.append(self.name)

    class Hanging:
        _sender = Part("sender")
        client = Part("connections")

        async def stop(self) -> None:
            await asyncio.sleep(3600)

    class Stops:
        _sender = Part("other sender")
        client = Part("other connections")

        async def stop(self) -> None:
            closed.append("stopped")

    began = time.monotonic()
    await stop_quietly(Hanging(), 0.2)  # type: ignore[arg-type]
    assert time.monotonic() - began < 2
    assert closed == ["sender", "connections"]
    closed.clear()
    await stop_quietly(Stops(), 1.0)  # type: ignore[arg-type]
    assert closed == ["stopped"]  # a stop that worked is left alone


@pytest.mark.parametrize("count", [1, 3])
async def test_wait_quietly_returns_when_every_future_is_done(count: int) -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(count)]
    for i, future in enumerate(futures):
        loop.call_later(0.01 * (i + 1), future.set_result, i)
    start = time.monotonic()
    await wait_quietly(futures, 5.0)
    assert time.monotonic() - start < 1.0
    assert [f.result() for f in futures] == list(range(count))


@pytest.mark.parametrize("count", [1, 3])
async def test_wait_quietly_ends_at_the_timeout_and_never_cancels(count: int) -> None:
    """A record still pending at the deadline stays with the producer: the wait ends, the
    future is neither cancelled nor left with the wait's callback."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(count)]
    start = time.monotonic()
    await wait_quietly(futures, 0.05)
    assert 0.04 <= time.monotonic() - start < 1.0
    assert not any(f.done() for f in futures)
    if count == 1:
        assert not futures[0]._callbacks  # type: ignore[attr-defined]
    for i, future in enumerate(futures):  # delivered later: still a plain result
        future.set_result(i)
    assert [f.result() for f in futures] == list(range(count))


async def test_wait_quietly_cancelled_leaves_the_future_alone() -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    waiting = asyncio.ensure_future(wait_quietly([future], 5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not future.done() and not future._callbacks  # type: ignore[attr-defined]
    await wait_quietly([future], 0.0)  # done or not, a zero timeout returns
    future.set_result(1)
    await wait_quietly([future], 5.0)  # already done: returns at once


async def test_stop_quietly_cancels_again_a_fetcher_that_swallowed_its_cancel() -> None:
    """aiokafka's fetcher awaits its own cancelled fetches with CancelledError suppressed
    when its assignment changes; a consumer's stop landing then has its cancel swallowed
    and would wait for the fetcher forever. stop_quietly cancels it again: the stop ends
    in about half a second, not at the timeout, and closes its connections."""
    closed: list[str] = []

    async def fetch_routine() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the first cancel is lost
            await asyncio.sleep(3600)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            closed.append("fetcher")

    class Fetcher:
        def __init__(self) -> None:
            self._closed = False
            self._fetch_task = asyncio.ensure_future(fetch_routine())

    class Consumer:
        def __init__(self) -> None:
            self._fetcher = Fetcher()

        async def stop(self) -> None:
            self._fetcher._closed = True
            self._fetcher._fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetcher._fetch_task
            closed.append("connections")

    consumer = Consumer()
    await asyncio.sleep(0)  # the routine is waiting
    began = time.monotonic()
    await stop_quietly(consumer, 20.0)  # type: ignore[arg-type]
    assert time.monotonic() - began < 2
    assert closed == ["fetcher", "connections"]
    assert consumer._fetcher._fetch_task.done()


async def test_stop_quietly_leaves_a_running_fetcher_alone_until_its_close() -> None:
    """Only a fetcher whose close has begun is cancelled again: while a group consumer's
    stop is still leaving its group, the fetcher keeps running."""
    class Fetcher:
        def __init__(self) -> None:
            self._closed = False
            self._fetch_task = asyncio.ensure_future(asyncio.sleep(3600))

    class Consumer:
        def __init__(self) -> None:
            self._fetcher = Fetcher()

        async def stop(self) -> None:
            await asyncio.sleep(1.2)  # leaving the group: two re-cancel rounds pass
            # seen here, asserted outside: stop_quietly swallows what a stop raises
            running.append(not self._fetcher._fetch_task.done())
            self._fetcher._closed = True
            self._fetcher._fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetcher._fetch_task

    running: list[bool] = []
    consumer = Consumer()
    await stop_quietly(consumer, 5.0)  # type: ignore[arg-type]
    assert running == [True]
    assert consumer._fetcher._fetch_task.cancelled()


@pytest.mark.parametrize("per_batch", [None, 2])
async def test_records_sent_in_batches_get_their_own_offsets(kafka: FakeKafka,
                                                             per_batch: int | None) -> None:
    """``send_batched`` groups records by partition (keyed by the client's partitioner) and
    ``acked_all`` gives each record its own offset, its batch's base plus its place in the
    batch, in the order given, whatever the batches' size."""
    producer = kafka.producer(max_batch_size=16384)
    await producer.start()
    try:
        await (await producer.send("u", b"before", partition=0))  # offsets start at 1 there
        keys = [b"k%d" % i for i in range(9)]
        records = [("u", key, b"v%d" % i, [("h", b"%d" % i)]) for i, key in enumerate(keys)]
        sent = await send_batched(producer, records, Batching(), per_batch=per_batch)
        await asyncio.gather(*futures_of(sent).values())
        acked = acked_all(sent)
        count = len(await producer.partitions_for("u"))
        assert [m.partition for m in acked] == [partition_for_key(k, count) for k in keys]
        log = {p: [(e.key, e.value, e.offset) for e in kafka.log("u", p)] for p in (0, 1)}
        for (_, key, value, _), meta in zip(records, acked, strict=True):
            assert (key, value, meta.offset) in log[meta.partition]
        assert len(log[0]) + len(log[1]) == 10  # "before" and the nine
        if per_batch is not None:  # batches of at most 2 records: more than one future
            assert len(futures_of(sent)) >= 5
    finally:
        await producer.stop()
