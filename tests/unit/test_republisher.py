"""The republisher's promises under faults, on the in-memory Kafka: any accepted delay is
delivered, exactly once (retries, restarts, layout changes, two connections), never
stalled by one bad message, every wait bounded, per-key order kept, hostile envelopes
dead-lettered. The same paths run end to end against the real broker in
tests/integration/test_delay.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka.errors import (
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NotEnoughReplicasError,
    TopicAuthorizationFailedError,
)
from kafka_fake import FakeKafka, ManualClock

from athomic import MessagePriority, MessagingSettings
from athomic.envelope import Envelope, decode, encode, envelope_keys
from athomic.messages import PublishRequest, new_message_id
from athomic.pipeline import Encoded
from athomic.republisher.loop import OWNED, RELEASED, BucketRepublisher
from athomic.strategies import DelayedPublishStrategy, delay_headers
from athomic.strategies import envelope_keys as keys_of

BUCKETS = {1: "d.1s", 10: "d.10s", 60: "d.1m"}
FAST = {"partitions": 1, "linger_ms": 0, "near_window_s": 0.5, "partition_refresh_s": 0.3,
        "ack_timeout_s": 1.0, "transaction_timeout_ms": 2000, "retry_backoff_max_s": 0.2,
        "dead_letter_topic": "dlq"}


def settings(**overrides: Any) -> MessagingSettings:
    rep = {**FAST, **overrides.pop("republisher", {})}
    return MessagingSettings(delay_topics=overrides.pop("delay_topics", BUCKETS),
                             republisher=rep, **overrides)


@pytest.fixture
def kafka() -> FakeKafka:
    fake = FakeKafka()
    fake.create_topic("final", 1)
    return fake


@contextlib.asynccontextmanager
async def running(s: MessagingSettings, kafka: FakeKafka, topic: str, replica: int = 0,
                  replicas: int = 1, generation: int = 0) -> AsyncIterator[BucketRepublisher]:
    rep = BucketRepublisher(s, topic, replica, replicas, generation=generation,
                            clients=kafka)
    await rep.start()
    task = asyncio.create_task(rep.run())
    try:
        yield rep
    finally:
        rep.stop()
        await task
        await rep.close()


@contextlib.asynccontextmanager
async def all_buckets(s: MessagingSettings, kafka: FakeKafka, replicas: int = 1,
                      generation: int = 0) -> AsyncIterator[list[BucketRepublisher]]:
    async with contextlib.AsyncExitStack() as stack:
        reps = [await stack.enter_async_context(running(s, kafka, t, r, replicas, generation))
                for t in s.delay_topics.values() for r in range(replicas)]
        yield reps


def request(topic: str = "final", delay_s: float = 0.3, *, key: bytes | None = b"k",
            value: bytes = b"v", message_id: str | None = None,
            published: float | None = None, priority: MessagePriority = MessagePriority.NORMAL
            ) -> PublishRequest:
    published = time.time() if published is None else published
    return PublishRequest(topic, value, key, [], "application/octet-stream", None, priority,
                          published + delay_s, message_id or new_message_id(), published,
                          uuid.uuid4().bytes if message_id else None)


async def publish(kafka: FakeKafka, s: MessagingSettings, req: PublishRequest, *,
                  copies: int = 1, now: float | None = None) -> str:
    """What a ProducerActor writes for a delayed request (``copies`` times, as a retried
    call would); returns the delay topic."""
    record = DelayedPublishStrategy(s, keys_of(s)).build(req, Encoded(req.value, []),
                                                         req.topic, now=now)
    await write(kafka, record.topic, record.value, record.key, record.headers, copies)
    return record.topic


async def write(kafka: FakeKafka, topic: str, value: bytes | None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, copies: int = 1,
                partition: int | None = None) -> None:
    if topic not in kafka.topics():
        kafka.create_topic(topic, 1)
    producer = kafka.producer()
    await producer.start()
    try:
        for _ in range(copies):
            await (await producer.send(topic, value, key=key, headers=headers or [],
                                       partition=partition))
    finally:
        await producer.stop()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def delivered(kafka: FakeKafka, topic: str = "final") -> list[Any]:
    return kafka.records(topic) if topic in kafka.topics() else []


def ids(records: list[Any]) -> list[str]:
    return [dict(r.headers)["message-id"].decode() for r in records]


def closed(kafka: FakeKafka) -> bool:
    return kafka.open_clients() == []


# --- delivery ------------------------------------------------------------------------------
async def test_mixed_delays_delivered_once_never_early(kafka: FakeKafka) -> None:
    s = settings()
    reqs = [request(delay_s=0.1 + (i % 7) * 0.25, key=f"k{i % 3}".encode()) for i in range(40)]
    async with all_buckets(s, kafka):
        for r in reqs:
            await publish(kafka, s, r)
        await until(lambda: len(delivered(kafka)) >= 40)
        await asyncio.sleep(0.3)
    records = delivered(kafka)
    assert sorted(ids(records)) == sorted(r.message_id for r in reqs)
    for record in records:
        assert record.timestamp >= int(dict(record.headers)["athomic-deliver-at"])
    assert closed(kafka)


async def test_a_hop_past_255_cascades_on_and_the_partition_moves_on(kafka: FakeKafka
                                                                      ) -> None:
    """A 5 h delay over {1, 10, 60} s takes 300 hops; version-1 envelopes stopped at 255 and
    the republisher crash-looped on the message forever."""
    s = settings()
    now = int(time.time() * 1000)
    far = Envelope(topic="final", key=b"k", value=b"far", headers=(),
                   deliver_at_ms=now + 3_600_000, hold_until_ms=now, published_ms=now,
                   hop=255, priority=MessagePriority.NORMAL, message_id=new_message_id())
    await write(kafka, "d.1m", encode(far), b"k", delay_headers(far))
    after = request(delay_s=0.2, key=b"k", value=b"after")
    topic = await publish(kafka, s, after)
    async with running(s, kafka, "d.1m"), running(s, kafka, topic):
        await until(lambda: len(delivered(kafka)) == 1)
        await until(lambda: any(decode(r.value).hop == 256 for r in kafka.records("d.1m")))
    assert [r.value for r in delivered(kafka)] == [b"after"]


async def _write_envelopes(kafka: FakeKafka, topic: str, due_ms: list[int]) -> list[str]:
    """Envelopes leaving ``topic`` for the final topic at ``due_ms`` (one producer)."""
    producer = kafka.producer()
    await producer.start()
    sent = []
    try:
        for i, due in enumerate(due_ms):
            mid = new_message_id()
            env = Envelope(topic="final", key=f"k{i}".encode(), value=b"v",
                           headers=(("message-id", mid.encode()),), deliver_at_ms=due,
                           hold_until_ms=due, published_ms=due - 10_000, hop=1,
                           priority=MessagePriority.NORMAL, message_id=mid)
            await producer.send(topic, encode(env), key=env.key, headers=delay_headers(env))
            sent.append(env.message_id)
    finally:
        await producer.stop()
    return sent


async def test_a_woken_partition_reads_about_what_it_used_not_a_whole_batch(
        kafka: FakeKafka) -> None:
    """A partition waking for its near head reads on to the next record not near and pauses
    again; the client decodes every record a fetch returns. Asking for ``max_batch`` each
    time (to use a few) blocked a bucket actor's event loop for up to 300 ms per wake."""
    s = settings(republisher={"max_batch": 5000})
    kafka.create_topic("d.10s", 1)
    now = int(time.time() * 1000)
    stream = await _write_envelopes(kafka, "d.10s", [now + 1000 + 10 * i for i in range(150)])
    async with running(s, kafka, "d.10s") as rep:
        consumer = rep.consumer
        assert consumer is not None
        asks: list[tuple[int, int]] = []  # (max_records asked, records returned)
        real = consumer.getmany

        async def counted(*partitions: Any, **options: Any) -> Any:
            got = await real(*partitions, **options)
            asks.append((options["max_records"], sum(len(r) for r in got.values())))
            return got

        consumer.getmany = counted  # type: ignore[method-assign]
        await until(lambda: len(delivered(kafka)) == 150)
        woken = [ask for ask, got in asks if got]
        assert len(woken) >= 5  # read a few at a time as they came near
        assert woken[0] == 5000  # nothing known yet: a whole batch
        assert max(woken[1:]) <= 1000, asks  # then about what it used, not 5000 each time
        # a burst all due at once: the asks grow until it is read
        asks.clear()
        burst = await _write_envelopes(kafka, "d.10s", [now + 4000] * 3000)
        await until(lambda: len(delivered(kafka)) == 3150)
        grown = [ask for ask, got in asks if got]
        assert grown[-1] >= 4096 and len(grown) <= 10, asks  # x4 while it uses all it gets
    records = delivered(kafka)
    assert sorted(ids(records)) == sorted(stream + burst)
    for record in records:
        assert record.timestamp >= int(dict(record.headers)["athomic-deliver-at"])


async def test_a_message_read_near_its_release_is_parsed_once(
        kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message read within a second of its release keeps its envelope decoded until it
    leaves; one read earlier is decoded again when it leaves (not kept while it waits).
    Parsing every envelope twice took about a fifth of a bucket actor's time."""
    from athomic import envelope as envelope_module

    parsed: list[bytes] = []
    real = envelope_module._parse

    def counting(data: bytes, *args: Any, **kwargs: Any) -> Any:
        parsed.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(envelope_module, "_parse", counting)
    s = settings(republisher={"near_window_s": 3.0})
    kafka.create_topic("d.10s", 1)
    now = int(time.time() * 1000)
    soon = await _write_envelopes(kafka, "d.10s", [now - 50] * 20 + [now + 300] * 20)
    later = await _write_envelopes(kafka, "d.10s", [now + 2500] * 10)
    async with running(s, kafka, "d.10s"):
        await until(lambda: len(delivered(kafka)) == 50)
    records = delivered(kafka)
    assert sorted(ids(records)) == sorted(soon + later)
    for record in records:  # and none early
        assert record.timestamp >= int(dict(record.headers)["athomic-deliver-at"])
    times: dict[str, int] = {}
    for data in parsed:
        head = real(data, None, True, full=False, head=True)[0]
        times[head.message_id] = times.get(head.message_id, 0) + 1
    assert all(times[m] == 1 for m in soon), times
    assert all(times[m] == 2 for m in later), times


async def test_memory_is_given_back_once_a_burst_of_reading_ends(
        kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """While messages come and go, freed memory is given back at most once a second; a
    fetch that finds nothing ends a burst (here of 30 messages), and what it freed is
    given back then; a fetch finding nothing after a few messages does not trim."""
    from athomic.republisher import loop as loop_module

    trims: list[float] = []
    monkeypatch.setattr(loop_module, "_TRIM", lambda pad: trims.append(time.monotonic()) or 1)
    monkeypatch.setattr(loop_module, "_TRIM_EVERY_S", 60.0)  # only the idle path can trim
    monkeypatch.setattr(loop_module, "_TRIM_BURST", 30)
    s = settings(republisher={"near_window_s": 30.0})
    kafka.create_topic("d.10s", 1)
    async with running(s, kafka, "d.10s") as rep:
        await asyncio.sleep(0.5)
        rep._trimmed = rep.heartbeat  # trimmed just now: the next in a minute, unless idle
        trims.clear()
        now = int(time.time() * 1000)
        wrote = time.monotonic()
        await _write_envelopes(kafka, "d.10s", [now + 20_000] * 30)
        await until(lambda: rep.held == 30)
        await until(lambda: bool(trims), timeout=5.0)
        assert trims[0] - wrote < 2.0
        count = len(trims)
        await asyncio.sleep(1.0)  # nothing read since: nothing more to give back
        assert len(trims) == count
        await _write_envelopes(kafka, "d.10s", [now + 20_000] * 10)  # not a burst
        await until(lambda: rep.held == 40)
        await asyncio.sleep(1.0)
        assert len(trims) == count


async def test_a_transaction_hands_all_its_records_to_the_client_at_once(
        kafka: FakeKafka) -> None:
    """The client adds the partitions of the records it holds to the transaction in one
    request before sending them; a record handed over after the client ran (a wait between
    two records) costs one more round trip to the coordinator. So no other task may run
    between a transaction's first record and its last (released-id markers included)."""
    s = settings()
    kafka.create_topic("wide", 3)
    t = time.time()
    small = [request("wide", 0.4, key=f"a{i}".encode(), published=t) for i in range(5)]
    large = [request("wide", 0.8, key=f"b{i}".encode(), published=t) for i in range(20)]
    for r in small + large:
        await publish(kafka, s, r)
    ticking = True

    async def ticker() -> None:  # runs whenever the event loop gets to other tasks
        while ticking:
            kafka.calls.append(("tick", {}))
            await asyncio.sleep(0)

    async with running(s, kafka, "d.1s"):
        tick = asyncio.create_task(ticker())
        await until(lambda: len(delivered(kafka, "wide")) == 25)
        ticking = False
        await tick
    sends: list[list[str]] = []  # per transaction: its sends and ticks, in order
    current: list[str] | None = None
    for name, call in kafka.calls:
        if name == "producer.begin_transaction":
            current = []
        elif name in ("producer.commit_transaction", "producer.abort_transaction") and \
                current is not None:
            sends.append(current)
            current = None
        elif current is not None and name in ("producer.send", "producer.send_batch", "tick"):
            current.append(name if name == "tick" else call["topic"])
    with_records = [txn for txn in sends if any(x != "tick" for x in txn)]
    assert len(with_records) >= 2
    for txn in with_records:
        first = next(i for i, x in enumerate(txn) if x != "tick")
        last = max(i for i, x in enumerate(txn) if x != "tick")
        assert "tick" not in txn[first:last], txn
        assert s.released_topic in txn[first:last + 1]  # the markers went with them
    assert sorted(ids(delivered(kafka, "wide"))) == sorted(r.message_id for r in small + large)


# --- exactly once --------------------------------------------------------------------------
async def test_a_retried_publish_is_delivered_once(kafka: FakeKafka) -> None:
    s = settings()
    twice = request(delay_s=0.3)
    await publish(kafka, s, twice, copies=2)  # a call Ray retried after the actor died
    late = request(delay_s=0.3)
    await publish(kafka, s, late)
    async with all_buckets(s, kafka) as reps:
        await until(lambda: len(delivered(kafka)) >= 2)
        await asyncio.sleep(0.5)
        # the retry of ``late`` reached the producer after its due time: it goes straight
        # to the partition that released the first copy, which releases an id once
        await publish(kafka, s, late, now=time.time() + 1)
        await until(lambda: sum(r.counts["duplicate"] for r in reps) >= 2)
    assert sorted(ids(delivered(kafka))) == sorted([twice.message_id, late.message_id])


async def test_a_restarted_republisher_still_knows_what_it_released(kafka: FakeKafka) -> None:
    s = settings()
    req = request(delay_s=0.2)
    topic = await publish(kafka, s, req)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka)) == 1)
    await publish(kafka, s, req, now=time.time() + 5)  # a copy, after the restart
    async with running(s, kafka, topic) as rep:
        await until(lambda: rep.counts["duplicate"] == 1)
    assert ids(delivered(kafka)) == [req.message_id]


async def test_a_restart_knows_every_id_of_a_large_transaction(kafka: FakeKafka) -> None:
    s = settings()
    reqs = [request(delay_s=0.2, key=f"k{i}".encode()) for i in range(40)]
    for req in reqs:
        topic = await publish(kafka, s, req)
    async with running(s, kafka, topic) as rep:
        # The records are visible once the commit is; the counts follow when the
        # republisher's task resumes after it (an event-loop turn later): wait for both.
        await until(lambda: len(delivered(kafka)) == 40 and rep.counts["final"] >= 40)
        assert rep.counts["final"] == 40
    # released in one or a few transactions, each naming its ids in one record
    assert 1 <= len(kafka.records(s.released_topic)) < 40
    for req in reqs:  # copies, after the restart
        await publish(kafka, s, req, now=time.time() + 5)
    async with running(s, kafka, topic) as rep:
        await until(lambda: rep.counts["duplicate"] == 40)
    assert sorted(ids(delivered(kafka))) == sorted(r.message_id for r in reqs)


async def test_a_batch_too_large_for_its_topic_is_split_and_only_the_large_one_is_dead(
        kafka: FakeKafka) -> None:
    """Kafka applies max.message.bytes to a record batch: a batch refused as too large is
    not every record's fault."""
    s = settings(republisher={"max_attempts": 2})
    kafka.create_topic("small", 1, {"max.message.bytes": "2000"})
    small = [request("small", delay_s=0.2, value=bytes([i]) * 200, key=f"s{i}".encode())
             for i in range(20)]
    big = request("small", delay_s=0.2, value=b"x" * 2500, key=b"big")
    for req in [*small[:10], big, *small[10:]]:
        topic = await publish(kafka, s, req)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka, "small")) == 20
                    and len(delivered(kafka, "dlq")) == 1)
    assert sorted(ids(delivered(kafka, "small"))) == sorted(r.message_id for r in small)
    (dead,) = delivered(kafka, "dlq")
    assert decode(dead.value).message_id == big.message_id
    assert b"MessageSizeTooLarge" in dict(dead.headers)["athomic-error"]


async def test_layout_changes_2_3_1_during_traffic_deliver_each_message_once() -> None:
    kafka = FakeKafka()
    kafka.create_topic("final", 3)
    s = settings(delay_topics={1: "d.1s"}, republisher={"partitions": 6})
    sent: list[str] = []

    async def traffic(waves: int) -> None:
        for _ in range(waves):
            for i in range(20):
                r = request(delay_s=0.05 + (i % 5) * 0.1, key=f"key-{i}".encode())
                await publish(kafka, s, r)
                sent.append(r.message_id)
            await asyncio.sleep(0.05)

    async with contextlib.AsyncExitStack() as two:
        old = [await two.enter_async_context(running(s, kafka, "d.1s", r, 2, generation=1))
               for r in range(2)]
        await traffic(4)
        async with contextlib.AsyncExitStack() as three:
            new = [await three.enter_async_context(
                running(s, kafka, "d.1s", r, 3, generation=2)) for r in range(3)]
            await traffic(4)
            await until(lambda: all(p.state == RELEASED for rep in old
                                    for p in rep.parts.values()
                                    if any(q.tp == p.tp and q.state == OWNED
                                           for n in new for q in n.parts.values())))
            await two.aclose()  # the old layout goes
            await traffic(4)
            async with running(s, kafka, "d.1s", 0, 1, generation=3) as one:
                await traffic(4)
                await three.aclose()
                await traffic(4)
                await until(lambda: len(delivered(kafka)) >= len(sent), timeout=20)
                await asyncio.sleep(0.5)
                assert sorted(p.tp.partition for p in one.parts.values()
                              if p.state == OWNED) == list(range(6))
    assert sorted(ids(delivered(kafka))) == sorted(sent)  # none lost, none twice
    assert closed(kafka)


async def test_a_second_connection_on_the_same_delay_topics_is_refused(kafka: FakeKafka
                                                                       ) -> None:
    a = settings(connection_name="a")
    b = settings(connection_name="b")
    first = request(delay_s=0.2)
    topic = await publish(kafka, a, first)
    async with running(a, kafka, topic):
        await until(lambda: len(delivered(kafka)) == 1)
        async with running(b, kafka, topic) as other:
            await until(lambda: other.refused() != [])
            assert "owned by connection 'a'" in other.refused()[0]
            second = request(delay_s=0.2)
            await publish(kafka, a, second)
            await until(lambda: len(delivered(kafka)) == 2)
            await asyncio.sleep(0.3)
    assert sorted(ids(delivered(kafka))) == sorted([first.message_id, second.message_id])


async def test_partitions_added_to_a_delay_topic_are_picked_up(kafka: FakeKafka) -> None:
    s = settings()
    async with running(s, kafka, "d.1s") as rep:
        admin = kafka.admin()
        await admin.start()
        await admin.create_partitions("d.1s", 3)
        await admin.close()
        req = request(delay_s=0.2)
        record = DelayedPublishStrategy(s).build(req, Encoded(b"v", []), "final")
        await write(kafka, "d.1s", record.value, record.key, record.headers, partition=2)
        await until(lambda: len(delivered(kafka)) == 1)
        assert sorted(p.partition for p in rep.parts) == [0, 1, 2]


async def test_republish_producers_retry_busy_coordinators_soon(kafka: FakeKafka) -> None:
    """A transaction begun right after the previous one meets CONCURRENT_TRANSACTIONS
    until the brokers wrote the previous markers: retried after txn_retry_backoff_ms,
    not the clients' general retry backoff (100 ms on every such transaction)."""
    s = settings(republisher={"txn_retry_backoff_ms": 7})
    async with running(s, kafka, "d.1s") as rep:
        await until(rep.ready)
    options = [c.options for c in kafka.clients if "transactional_id" in c.options]
    assert options and all(o["retry_backoff_ms"] == 7 for o in options)
    others = [c.options for c in kafka.clients if "transactional_id" not in c.options]
    assert others and all(o["retry_backoff_ms"] == s.producer.retry_backoff_ms
                          for o in others)


async def test_created_delay_topics_have_one_partition_per_replica(kafka: FakeKafka) -> None:
    s = settings(republisher={"partitions": None, "replicas": 2})
    async with running(s, kafka, "d.1s", replica=0, replicas=2) as first, \
            running(s, kafka, "d.1s", replica=1, replicas=2) as second:
        admin = kafka.admin()
        await admin.start()
        assert (await admin.partition_counts(["d.1s"]))["d.1s"] == 2
        await admin.close()
        assert [p.partition for p in first.parts] == [0]
        assert [p.partition for p in second.parts] == [1]


async def test_a_replica_beyond_the_partitions_stands_by_then_takes_added_ones(
        kafka: FakeKafka) -> None:
    s = settings(republisher={"partitions": None, "replicas": 1})  # topics: 1 partition
    async with running(s, kafka, "d.1s", replica=0, replicas=2) as only, \
            running(s, kafka, "d.1s", replica=1, replicas=2) as idle:
        # the second owns nothing, yet is ready (standing by)
        assert [p.partition for p in only.parts] == [0] and idle.parts == {}
        assert idle.ready()
        admin = kafka.admin()
        await admin.start()
        await admin.create_partitions("d.1s", 2)
        await admin.close()
        req = request(delay_s=0.2)
        record = DelayedPublishStrategy(s).build(req, Encoded(b"v", []), "final")
        await write(kafka, "d.1s", record.value, record.key, record.headers, partition=1)
        await until(lambda: len(delivered(kafka)) == 1)
        assert [p.partition for p in idle.parts] == [1]


# --- failures: never stalled, transient retried, permanent dead-lettered --------------------
async def test_a_missing_final_topic_neither_stalls_the_partition_nor_retries_forever(
        kafka: FakeKafka) -> None:
    s = settings(republisher={"max_attempts": 3})
    lost = request("nowhere", delay_s=0.1, key=b"a")
    fine = request(delay_s=0.15, key=b"b")
    topic = await publish(kafka, s, lost)
    await publish(kafka, s, fine)
    start = time.monotonic()
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka)) == 1)
        assert time.monotonic() - start < 3  # not behind the missing topic's waits
        await until(lambda: len(delivered(kafka, "dlq")) == 1)
    (dead,) = delivered(kafka, "dlq")
    assert b"'nowhere' does not exist" in dict(dead.headers)["athomic-error"]
    assert decode(dead.value).message_id == lost.message_id


async def test_transient_errors_retry_and_never_dead_letter(kafka: FakeKafka) -> None:
    s = settings()
    async with running(s, kafka, "d.1s") as rep:
        await until(rep.ready)
        kafka.faults.add("producer.commit_transaction", raises=KafkaTimeoutError(), times=5)
        await publish(kafka, s, request(delay_s=0.1))
        await until(lambda: len(delivered(kafka)) == 1)
        assert rep.counts["aborted"] >= 5
    assert delivered(kafka, "dlq") == []


async def test_a_send_timing_out_is_retried_not_dead_lettered(kafka: FakeKafka) -> None:
    """aiokafka's KafkaTimeoutError (a full batch queue while min ISR is short) is not
    ``retriable`` by its own flag; counted as attempts it would dead-letter a good message
    after ``max_attempts``."""
    s = settings(republisher={"max_attempts": 2})
    req = request(delay_s=0.1)
    topic = await publish(kafka, s, req)
    kafka.faults.add("producer.send", future_raises=KafkaTimeoutError(), times=6,
                     when=lambda **call: call["topic"] == "final")
    async with running(s, kafka, topic) as rep:
        await until(lambda: len(delivered(kafka)) == 1)
        assert rep.counts["aborted"] >= 3  # more aborts than max_attempts, still delivered
    assert ids(delivered(kafka)) == [req.message_id]
    assert delivered(kafka, "dlq") == []


@pytest.mark.parametrize("error", [TopicAuthorizationFailedError, InvalidTopicError])
async def test_a_permanent_refusal_is_dead_lettered_and_the_rest_goes_on(
        kafka: FakeKafka, error: type[Exception]) -> None:
    """Not authorised to write the final topic, or an invalid topic: a permanent fault,
    dead-lettered after ``max_attempts`` with the broker's error named; the next message of
    the partition (another topic) is delivered meanwhile."""
    s = settings(republisher={"max_attempts": 2})
    kafka.create_topic("refused", 1)
    bad = request("refused", delay_s=0.1, key=b"a")
    ok = request(delay_s=0.1, key=b"b")
    topic = await publish(kafka, s, bad)
    await publish(kafka, s, ok)
    kafka.faults.add("producer.send", future_raises=error(),
                     when=lambda **call: call["topic"] == "refused")
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka, "dlq")) == 1 and len(delivered(kafka)) == 1)
    assert ids(delivered(kafka)) == [ok.message_id]
    (dead,) = delivered(kafka, "dlq")
    assert error.__name__.encode() in dict(dead.headers)["athomic-error"]
    assert kafka.records("refused") == []


async def test_transient_errors_beyond_the_retry_window_dead_letter(kafka: FakeKafka) -> None:
    s = settings(republisher={"retry_window_s": 0.5})
    kafka.faults.add("producer.send", future_raises=NotEnoughReplicasError(),
                     when=lambda **call: call["topic"] == "final")
    req = request(delay_s=0.1)
    topic = await publish(kafka, s, req)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka, "dlq")) == 1)
    (dead,) = delivered(kafka, "dlq")
    assert b"NotEnoughReplicasError" in dict(dead.headers)["athomic-error"]


async def test_a_record_too_large_for_its_topic_is_dead_lettered_alone(kafka: FakeKafka
                                                                        ) -> None:
    s = settings(republisher={"max_attempts": 2})
    kafka.create_topic("small", 1, {"max.message.bytes": "100"})
    big = request("small", delay_s=0.1, value=b"x" * 500, key=b"big")
    ok = request(delay_s=0.1, key=b"ok")
    topic = await publish(kafka, s, big)
    await publish(kafka, s, ok)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka, "dlq")) == 1 and len(delivered(kafka)) == 1)
    assert b"MessageSizeTooLarge" in dict(delivered(kafka, "dlq")[0].headers)["athomic-error"]


async def test_a_commit_that_never_returns_is_bounded_and_delivered_once(kafka: FakeKafka
                                                                          ) -> None:
    s = settings()
    req = request(delay_s=0.1)
    async with running(s, kafka, "d.1s") as rep:
        await until(rep.ready)
        kafka.faults.add("producer.commit_transaction", hang=True, times=1)
        await publish(kafka, s, req)
        await until(lambda: len(delivered(kafka)) == 1, timeout=10)
        await asyncio.sleep(0.3)
        assert rep.counts["restarted"] >= 1
    assert ids(delivered(kafka)) == [req.message_id]


async def test_a_newer_holder_fences_the_older_which_stands_back() -> None:
    kafka = FakeKafka()
    kafka.create_topic("final", 1)
    s = settings()
    async with running(s, kafka, "d.1s", generation=1) as old:
        await until(old.ready)
        async with running(s, kafka, "d.1s", generation=2) as new:
            await until(new.ready)
            reqs = [request(delay_s=0.1, key=f"k{i}".encode()) for i in range(10)]
            for r in reqs:
                await publish(kafka, s, r)
            await until(lambda: len(delivered(kafka)) == 10)
            await asyncio.sleep(1.0)  # the old one re-checks: a newer layout holds it
            (part,) = old.parts.values()
            assert part.state == RELEASED and "newer layout" in part.note
    assert sorted(ids(delivered(kafka))) == sorted(r.message_id for r in reqs)


async def test_its_own_transaction_timing_out_is_not_a_fence() -> None:
    clock = ManualClock(start=time.monotonic())
    kafka = FakeKafka(clock=clock)
    kafka.create_topic("final", 1)
    s = settings()
    kafka.faults.add("producer.send_offsets_to_transaction", delay=0.3, times=1,
                     when=lambda **call: call["offsets"] and clock.advance(5) is None)
    req = request(delay_s=0.1)
    topic = await publish(kafka, s, req)
    async with running(s, kafka, topic) as rep:
        await until(lambda: len(delivered(kafka)) == 1, timeout=10)
        await until(lambda: all(p.state == OWNED for p in rep.parts.values()))
    assert ids(delivered(kafka)) == [req.message_id]


async def test_one_key_keeps_its_order_through_aborts_and_a_blocked_message(
        kafka: FakeKafka) -> None:
    s = settings(republisher={"max_attempts": 50})
    # the third message fails for a while (its topic appears later): the later ones wait
    kafka.create_topic("later", 1)
    base = time.time()
    reqs = [request("later" if i == 2 else "final", delay_s=0.2 + i * 0.01, key=b"same",
                    value=str(i).encode(), published=base) for i in range(8)]
    blocker = kafka.faults.add("producer.partitions_for", raises=KafkaTimeoutError(),
                               when=lambda **call: call["topic"] == "later")
    async with running(s, kafka, "d.1s") as rep:
        await until(rep.ready)
        kafka.faults.add("producer.commit_transaction", raises=KafkaTimeoutError(), times=2)
        for r in reqs:
            await publish(kafka, s, r)
        await asyncio.sleep(1.0)
        assert [r.value for r in delivered(kafka)] == [b"0", b"1"]  # 2 holds back 3..7
        kafka.faults.remove(blocker)
        await until(lambda: len(delivered(kafka)) + len(delivered(kafka, "later")) == 8)
    records = sorted(delivered(kafka) + delivered(kafka, "later"),
                     key=lambda r: (r.timestamp, r.topic != "later", r.offset))
    assert [r.value for r in delivered(kafka)] == [b"0", b"1", b"3", b"4", b"5", b"6", b"7"]
    assert delivered(kafka, "later")[0].timestamp <= delivered(kafka)[2].timestamp
    assert len(records) == 8


# --- hostile and malformed input -----------------------------------------------------------
async def test_a_forged_hold_until_is_dead_lettered_and_the_partition_moves_on(
        kafka: FakeKafka) -> None:
    s = settings()
    now = int(time.time() * 1000)
    forged = Envelope(topic="final", key=b"k", value=b"x", headers=(),
                      deliver_at_ms=2**63 - 1, hold_until_ms=2**63 - 1, published_ms=now,
                      hop=1, priority=MessagePriority.NORMAL, message_id=new_message_id())
    await write(kafka, "d.1s", encode(forged), b"k")
    after = request(delay_s=0.1, key=b"k")
    await publish(kafka, s, after)
    async with running(s, kafka, "d.1s"):
        await until(lambda: len(delivered(kafka)) == 1 and len(delivered(kafka, "dlq")) == 1)
    assert b"beyond what bucket" in dict(delivered(kafka, "dlq")[0].headers)["athomic-error"]


async def test_with_keys_set_an_unauthenticated_envelope_is_refused_unless_migrating(
        kafka: FakeKafka) -> None:
    import base64
    import os

    key = base64.b64encode(os.urandom(32)).decode()
    signed = settings(republisher={"auth": {"keys": {"k1": key}, "primary": "k1"}})
    plain = settings()
    old = request(delay_s=0.1, key=b"old")
    await publish(kafka, plain, old)  # written before authentication was turned on
    async with running(signed, kafka, "d.1s"):
        await until(lambda: len(delivered(kafka, "dlq")) == 1)
    migrating = settings(republisher={"auth": {"keys": {"k1": key}, "primary": "k1"},
                                      "accept_unauthenticated": True})
    again = request(delay_s=0.1, key=b"again")
    await publish(kafka, plain, again)
    new = request(delay_s=0.1, key=b"new")
    await publish(kafka, signed, new)
    async with running(migrating, kafka, "d.1s"):
        await until(lambda: len(delivered(kafka)) == 2)
    assert sorted(ids(delivered(kafka))) == sorted([again.message_id, new.message_id])
    assert keys_of(signed) == envelope_keys({"k1": base64.b64decode(key)}, "k1")


async def test_clock_skew_is_measured_against_the_brokers(kafka: FakeKafka) -> None:
    s = settings()
    async with running(s, kafka, "d.1s") as rep:
        assert rep.skew_known  # athomic created its topics with LogAppendTime
        await publish(kafka, s, request(delay_s=0.2))  # read, then released: both bounds
        await until(lambda: rep.stats()["clock_skew_ms"] is not None)
        assert abs(rep.stats()["clock_skew_ms"]) < 1000


async def test_clock_skew_is_a_metric(kafka: FakeKafka) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from athomic.settings import TelemetrySettings
    from athomic.telemetry import Telemetry

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    s = settings()
    async with running(s, kafka, "d.1s") as rep:
        rep.telemetry = Telemetry(TelemetrySettings(traces=False), servers=[],
                                  meter_provider=meters)
        await publish(kafka, s, request(delay_s=0.2))
        await until(lambda: rep.stats()["clock_skew_ms"] is not None)
        data = reader.get_metrics_data()
        assert data is not None
        (gauge,) = [m for rm in data.resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics if m.name == "athomic.delay.clock_skew"]
        (point,) = gauge.data.data_points
        assert dict(point.attributes)["athomic.delay.topic"] == "d.1s"
        assert point.value == pytest.approx(rep.skew.estimate() / 1000)
    meters.shutdown()


# --- replaying dead letters ----------------------------------------------------------------
async def test_dead_letters_replay_once_each_where_they_belong(kafka: FakeKafka) -> None:
    from athomic.republisher.dlq import replay

    s = settings(republisher={"max_attempts": 1})
    due = request("gone", delay_s=0.05, key=b"a", value=b"due")
    topic = await publish(kafka, s, due)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka, "dlq")) == 1)
    not_yet = request(delay_s=30, key=b"b", value=b"later")
    record = DelayedPublishStrategy(s).build(not_yet, Encoded(b"later", []), "final")
    await write(kafka, "dlq", record.value, record.key, record.headers)
    await write(kafka, "dlq", b"garbage", b"c")
    kafka.create_topic("gone", 1)  # the missing topic exists now
    dry = await replay(s, dry_run=True, clients=kafka)
    assert (dry.delivered, dry.delayed, len(dry.left)) == (1, 1, 1)
    assert delivered(kafka, "gone") == []
    report = await replay(s, clients=kafka)
    assert (report.delivered, report.delayed) == (1, 1)
    assert "not a delay envelope" in report.left[0]
    (final,) = delivered(kafka, "gone")
    assert final.value == b"due" and dict(final.headers)["message-id"] == \
        due.message_id.encode()
    assert dict(final.headers)["athomic-replayed-from"] == b"dlq/0/0"
    waiting = [decode(r.value) for r in kafka.records("d.10s")]
    assert [e.message_id for e in waiting] == [not_yet.message_id]
    again = await replay(s, clients=kafka)  # nothing twice
    assert (again.delivered, again.delayed, again.left) == (0, 0, [])
    assert len(delivered(kafka, "gone")) == 1
    assert closed(kafka)


async def test_a_replay_whose_consumer_cannot_start_leaves_nothing_open(
        kafka: FakeKafka) -> None:
    """A consumer whose start fails may hold connections already: the replay stops it
    (and its producer) before raising."""
    from athomic.republisher.dlq import replay

    s = settings()
    await write(kafka, "dlq", b"garbage", b"c")
    kafka.faults.add("consumer.start", raises=KafkaConnectionError(), times=1)
    with pytest.raises(KafkaConnectionError):
        await replay(s, clients=kafka)
    (consumer,) = [c for c in kafka.clients if c.kind == "consumer"]
    assert not consumer.started and consumer.closed and closed(kafka)


# --- cancel and replace by message id --------------------------------------------------------
async def record_id(kafka: FakeKafka, s: MessagingSettings, message_id: str, kind: int,
                    req: PublishRequest | None = None, *, signed: bool = True) -> None:
    """What a ProducerActor writes to the ids topic (scheduled after a publish, cancelled
    on cancel)."""
    from athomic.envelope import IdEvent, encode_id_event

    event = IdEvent(kind, int(time.time() * 1000),
                    int((req.deliver_at or 0) * 1000) if req else 0,
                    (req.version or b"") if req else b"\0" * 16)
    keys = keys_of(s) if signed else None
    await write(kafka, s.ids_topic, encode_id_event(message_id, event, keys),
                message_id.encode())


async def publish_with_id(kafka: FakeKafka, s: MessagingSettings, req: PublishRequest
                          ) -> None:
    from athomic.envelope import SCHEDULED

    await publish(kafka, s, req)
    await record_id(kafka, s, req.message_id, SCHEDULED, req)


async def test_a_cancel_before_the_due_time_wins(kafka: FakeKafka) -> None:
    from athomic.envelope import CANCELLED

    s = settings()
    async with all_buckets(s, kafka) as reps:
        kept = request(delay_s=0.4, message_id="keep-1")
        gone = request(delay_s=0.4, message_id="order-42-reminder")
        for r in (kept, gone):
            await publish_with_id(kafka, s, r)
        await record_id(kafka, s, "order-42-reminder", CANCELLED)
        await until(lambda: len(delivered(kafka)) == 1)
        await until(lambda: sum(r.counts["cancelled"] for r in reps) == 1)
    assert ids(delivered(kafka)) == ["keep-1"]


async def test_replace_earlier_later_and_with_a_new_payload(kafka: FakeKafka) -> None:
    s = settings()
    base = time.time()
    async with all_buckets(s, kafka) as reps:
        # moved earlier: 2 s -> 0.3 s; moved later: 0.3 s -> 1.2 s; new payload, same time
        for mid, first, second in [("earlier", 2.0, 0.3), ("later", 0.3, 1.2),
                                   ("payload", 0.5, 0.5)]:
            old = request(delay_s=first, message_id=mid, value=b"old", published=base)
            new = request(delay_s=second, message_id=mid, value=b"new", published=base)
            await publish_with_id(kafka, s, old)
            await publish_with_id(kafka, s, new)
        await until(lambda: len(delivered(kafka)) == 3, timeout=10)
        await asyncio.sleep(2.3 - (time.time() - base))  # past every old due time
        assert sum(r.counts["replaced"] for r in reps) == 3
    records = delivered(kafka)
    assert sorted(ids(records)) == ["earlier", "later", "payload"]
    assert {r.value for r in records} == {b"new"}
    for record in records:
        due = int(dict(record.headers)["athomic-deliver-at"])
        assert record.timestamp >= due
        expected = {"earlier": 0.3, "later": 1.2, "payload": 0.5}[ids([record])[0]]
        assert due == pytest.approx((base + expected) * 1000, abs=2)


async def test_a_cancel_survives_a_restart_of_every_republisher(kafka: FakeKafka) -> None:
    from athomic.envelope import CANCELLED

    s = settings()
    gone = request(delay_s=1.0, message_id="gone")
    async with all_buckets(s, kafka):
        await publish_with_id(kafka, s, gone)
        await record_id(kafka, s, "gone", CANCELLED)
        await asyncio.sleep(0.2)
    await publish(kafka, s, request(delay_s=0.5, message_id="after"))  # no id record
    async with all_buckets(s, kafka) as reps:  # restarted: reads the ids topic again
        await until(lambda: len(delivered(kafka)) == 1)
        await asyncio.sleep(1.0)
        assert sum(r.counts["cancelled"] for r in reps) == 1
    assert ids(delivered(kafka)) == ["after"]


async def test_the_ids_topic_is_read_closely_only_while_a_message_waits_for_it(
        kafka: FakeKafka) -> None:
    s = settings()
    async with running(s, kafka, "d.1s") as rep:
        consumer = rep.ids._consumer
        assert consumer is not None
        polls: list[float] = []
        real = consumer.getmany

        async def counted(*partitions: Any, **options: Any) -> Any:
            polls.append(time.monotonic())
            return await real(*partitions, **options)

        consumer.getmany = counted  # type: ignore[method-assign]
        await asyncio.sleep(1.5)
        idle = len(polls)
        assert 1 <= idle <= 5  # about twice a second: nothing waits for it
        polls.clear()
        await publish_with_id(kafka, s, request(delay_s=1.0, message_id="waits"))
        await until(lambda: len(delivered(kafka)) == 1)
        assert len(polls) >= 4 * idle  # closely, from when it was read until it left
    assert ids(delivered(kafka)) == ["waits"]


async def test_a_forged_cancel_is_ignored_when_keys_are_set(kafka: FakeKafka) -> None:
    import base64
    import os

    from athomic.envelope import CANCELLED

    key = base64.b64encode(os.urandom(32)).decode()
    s = settings(republisher={"auth": {"keys": {"k1": key}, "primary": "k1"}})
    req = request(delay_s=0.3, message_id="paid")
    async with all_buckets(s, kafka) as reps:
        await publish_with_id(kafka, s, req)
        await record_id(kafka, s, "paid", CANCELLED, signed=False)  # no key: forged
        await until(lambda: len(delivered(kafka)) == 1)
        # every republisher ignores it (those holding no such message read it later)
        await until(lambda: all(r.ids.refused >= 1 for r in reps))
    assert ids(delivered(kafka)) == ["paid"]


async def test_a_release_waits_for_the_ids_topic_to_be_read(kafka: FakeKafka) -> None:
    from athomic.envelope import CANCELLED

    s = settings()
    async with all_buckets(s, kafka):
        getmany = kafka.faults.add("consumer.getmany", delay=0.6,
                                   when=lambda **call: any(
                                       tp.topic == s.ids_topic
                                       for tp in call["partitions"]))
        req = request(delay_s=0.2, message_id="racing")
        await publish_with_id(kafka, s, req)
        await record_id(kafka, s, "racing", CANCELLED)  # before the due time ...
        await asyncio.sleep(1.5)  # ... though the reader is slow to see it
        kafka.faults.remove(getmany)
        await asyncio.sleep(0.5)
    assert delivered(kafka) == []


async def test_a_bucket_actor_that_cannot_start_again_and_again_exits(
        kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """Brokers unreachable: the loop retries with backoff, the caller of ready() learns
    why at once, and after MAX_FAILED_STARTS failures in a row the process exits (Ray
    restarts the actor in a fresh one)."""
    from athomic.actors import delay_bucket
    from athomic.errors import MessagingConnectionError

    exits: list[int] = []
    monkeypatch.setattr(delay_bucket, "MAX_FAILED_STARTS", 2)
    monkeypatch.setattr(delay_bucket.os, "_exit", exits.append)
    kafka.faults.add("consumer.start", raises=KafkaConnectionError())
    kafka.faults.add("admin.start", raises=KafkaConnectionError())
    kafka.faults.add("producer.start", raises=KafkaConnectionError())
    actor = delay_bucket.DelayBucketActor(settings(), "d.1s", clients=kafka)
    try:
        with pytest.raises(MessagingConnectionError):
            await actor.ready(timeout_s=5)
        await until(lambda: exits == [1], timeout=10)
        assert (await actor.stats())["restarts"] >= 2
    finally:
        await actor.stop()


def test_the_ids_log_forgets_an_id_after_the_cancel_horizon() -> None:
    """What a republisher remembers of caller-chosen ids is bounded: an id is forgotten
    ``cancel_horizon_s`` (plus the retention margin) after its last event or due time, and
    a tombstone forgets it at once."""
    from types import SimpleNamespace

    from athomic import envelope as env_mod
    from athomic.republisher.ids import CANCELLED, IdLog

    s = settings(republisher={"cancel_horizon_s": 60, "retention_margin_s": 10})
    log = IdLog(s, FakeKafka(), None)

    def record(mid: str, event: Any) -> Any:
        value = None if event is None else env_mod.encode_id_event(mid, event)
        return SimpleNamespace(key=mid.encode(), value=value, partition=0, offset=0)

    t = 1_000_000
    log._apply(record("a", env_mod.IdEvent(env_mod.CANCELLED, t)))
    log._apply(record("b", env_mod.IdEvent(env_mod.SCHEDULED, t, t + 30_000, b"v" * 16)))
    log._apply(record("c", env_mod.IdEvent(env_mod.CANCELLED, t)))
    log._apply(record("c", None))  # a tombstone
    assert log.verdict("a", b"v" * 16) == CANCELLED and set(log.ids) == {"a", "b"}
    log._expire(t + 70_000 + 1)  # past a's horizon, not b's (counted from its due time)
    assert set(log.ids) == {"b"}
    log._expire(t + 30_000 + 70_000 + 1)
    assert log.ids == {} and log.verdict("a", b"v" * 16) is None


@pytest.mark.parametrize("compact_after_s", [1.0, None])
async def test_held_messages_wait_compactly_unless_turned_off(
        kafka: FakeKafka, compact_after_s: float | None) -> None:
    """``republisher.compact_after_s``: read 3 s before due, a message waits in the compact
    store by default, as objects with ``None``; delivered the same either way."""
    s = settings(republisher={"near_window_s": 5.0, "compact_after_s": compact_after_s})
    req = request(delay_s=3.0)
    topic = await publish(kafka, s, req)
    async with running(s, kafka, topic) as rep:
        await until(lambda: rep.held == 1)
        (part,) = [p for p in rep.parts.values() if len(p.store)]
        assert part.store.cold == (1 if compact_after_s is not None else 0)
        await until(lambda: len(delivered(kafka)) == 1, timeout=10)
    assert ids(delivered(kafka)) == [req.message_id]


async def test_a_released_ids_reader_whose_start_fails_is_stopped(kafka: FakeKafka) -> None:
    """Claiming a partition reads the released-ids topic with a consumer of its own. When
    that consumer's start fails (or the claim is cut short while it starts), it may hold
    connections already: it is stopped like one that started, so none is left open for
    the garbage collector to find."""
    s = settings()
    req = request(delay_s=0.2)
    topic = await publish(kafka, s, req)

    def the_reader(client: Any, **_: Any) -> bool:
        # started after the republisher's own two (the ids topic's, the delay topic's)
        return client in [c for c in kafka.clients if c.kind == "consumer"][2:]

    kafka.faults.add("consumer.start", raises=KafkaConnectionError(), times=1,
                     when=the_reader)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka)) == 1)  # claimed on the next try
    readers = [c for c in kafka.clients if c.kind == "consumer" and the_reader(c)]
    assert len(readers) >= 2 and not readers[0].started  # the one whose start failed
    assert all(c.closed for c in kafka.clients if c.kind == "consumer")


async def test_the_released_ids_topic_is_looked_up_before_it_is_fetched(
        kafka: FakeKafka) -> None:
    """A claim looks up where to read the released-ids topic from (its end, the offset of
    a time) while its reader does not fetch the partition: a broker answers the requests
    of a connection one at a time, and a fetch waiting at the end of the partition held
    the lookups back for the fetch's whole wait (half a second, on the real broker, in a
    third of the claims)."""
    s = settings()
    topic = await publish(kafka, s, request(delay_s=0.2))
    paused_at_lookup: list[bool] = []

    def lookup(client: Any, **call: Any) -> bool:
        tps = list(call.get("partitions") or call.get("timestamps") or ())
        if any(tp.topic == s.released_topic for tp in tps):
            paused_at_lookup.append(set(tps) <= client.paused())
        return False  # watched, not failed

    kafka.faults.add("consumer.end_offsets", when=lookup)
    kafka.faults.add("consumer.offsets_for_times", when=lookup)
    async with running(s, kafka, topic):
        await until(lambda: len(delivered(kafka)) == 1)
    assert len(paused_at_lookup) == 2 and all(paused_at_lookup)


async def test_an_ids_reader_whose_start_fails_is_stopped_on_close(kafka: FakeKafka) -> None:
    """The republisher's ids-topic consumer, likewise: its start fails, the republisher's
    start raises, and its close (what a bucket actor runs after every failed start)
    stops that consumer too."""
    s = settings()
    topic = await publish(kafka, s, request(delay_s=0.2))
    kafka.faults.add("consumer.start", raises=KafkaConnectionError(), times=1,
                     when=lambda client, **_: client.options.get("fetch_max_wait_ms") == 20)
    rep = BucketRepublisher(s, topic, 0, 1, clients=kafka)
    with pytest.raises(KafkaConnectionError):
        await rep.start()
    await rep.close()
    consumers = [c for c in kafka.clients if c.kind == "consumer"]
    assert any(not c.started for c in consumers)  # the one whose start failed
    assert all(c.closed for c in consumers)
