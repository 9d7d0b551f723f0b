"""The seam between athomic and its Kafka client library, and the one place where Kafka
errors become athomic errors.

Code that talks to Kafka (the ProducerActor, the republisher, topic administration, the
CLI) never builds a client itself: it asks a ``KafkaClients`` factory, as httpx takes a
``transport=``. Production passes ``AIOKAFKA`` (aiokafka's clients); tests pass the
in-memory Kafka in ``tests/kafka_fake.py``, which injects faults per call. The producer and
consumer protocols are the subset of aiokafka's API athomic uses; the admin protocol is
athomic's own, small and typed, because aiokafka's admin client answers in raw protocol
tuples.

Factory arguments are aiokafka's constructor keywords (``bootstrap_servers``,
``transactional_id``, ``isolation_level``, ...). A fake honours the ones with meaning
inside Kafka (transactions, isolation, acks) and ignores the connection ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka.errors import (
    InvalidTopicError as KafkaInvalidTopicError,
)
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OffsetMetadataTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata, RecordMetadata, TopicPartition

from .errors import (
    AthomicError,
    ConfigurationError,
    MessagingConnectionError,
    PublishError,
    RecordTooLargeError,
)

__all__ = [
    "AIOKAFKA",
    "Batching",
    "Fault",
    "KafkaAdmin",
    "KafkaClients",
    "KafkaConsumer",
    "KafkaProducer",
    "NoTransactions",
    "OffsetAndMetadata",
    "PartitionedProducer",
    "RecordMetadata",
    "TopicPartition",
    "TopicSpec",
    "acked_all",
    "classify",
    "futures_of",
    "send_batched",
    "too_large",
    "translate",
]


# --- the client protocols ---------------------------------------------------------------
class ConsumedRecord(Protocol):
    """A record as a consumer returns it (aiokafka's ConsumerRecord)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class KafkaProducer(Protocol):
    """A producer, plain or transactional (``transactional_id=``)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def flush(self) -> None: ...

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: list[tuple[str, bytes]] | None = None
                   ) -> asyncio.Future[RecordMetadata]:
        """Queue a record; the returned future resolves on the broker's acknowledgement."""

    def create_batch(self) -> Any:
        """An empty record batch: ``append(key=, value=, timestamp=None, headers=)`` gives
        the record's metadata (its ``offset`` relative to the batch: 0 for the first record,
        then one more per record) or None when full."""

    async def send_batch(self, batch: Any, topic: str, *, partition: int
                         ) -> asyncio.Future[RecordMetadata]:
        """Queue a whole batch for one partition; the future resolves with the batch's
        base offset on the broker's acknowledgement."""

    async def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions, waiting for its metadata (UnknownTopicOrPartitionError
        after ``request_timeout_ms`` when it does not exist and is not auto-created)."""

    async def begin_transaction(self) -> None: ...
    async def commit_transaction(self) -> None: ...
    async def abort_transaction(self) -> None: ...

    async def send_offsets_to_transaction(
            self, offsets: dict[TopicPartition, OffsetAndMetadata], group_id: str) -> None: ...


class KafkaConsumer(Protocol):
    """A consumer with manually assigned partitions (athomic never joins a group)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    async def position(self, partition: TopicPartition) -> int: ...

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None
                      ) -> dict[TopicPartition, list[Any]]: ...

    async def beginning_offsets(self, partitions: list[TopicPartition]
                                ) -> dict[TopicPartition, int]: ...

    async def end_offsets(self, partitions: list[TopicPartition]
                          ) -> dict[TopicPartition, int]: ...

    def highwater(self, partition: TopicPartition) -> int | None:
        """The high watermark the last fetch of ``partition`` reported."""

    def last_poll_timestamp(self, partition: TopicPartition) -> int | None:
        """When (epoch ms, this host) the last fetch of ``partition`` was answered."""

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]
                                ) -> dict[TopicPartition, Any]:
        """Per partition, ``(offset, timestamp)`` of the first record at or after the
        given epoch milliseconds, or None."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic to create."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


class KafkaAdmin(Protocol):
    """The administrative calls athomic makes, with plain answers."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def broker_count(self) -> int: ...

    async def partition_counts(self, topics: Iterable[str]) -> dict[str, int]:
        """Partitions of each topic that exists (missing topics are left out)."""

    async def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        """Create topics; one that already exists is not an error."""

    async def create_partitions(self, topic: str, total: int) -> None:
        """Grow ``topic`` to ``total`` partitions."""

    async def topic_config(self, topics: Iterable[str], name: str) -> dict[str, str | None]:
        """The value of config ``name`` of each topic."""

    async def committed(self, group_id: str, partitions: Sequence[TopicPartition]
                        ) -> dict[TopicPartition, tuple[int, str]]:
        """Committed ``(offset, metadata)`` of a group, for partitions with a commit."""


class KafkaClients(Protocol):
    """Builds Kafka clients (aiokafka in production, the in-memory Kafka in tests)."""

    def producer(self, **options: Any) -> KafkaProducer: ...
    def consumer(self, **options: Any) -> KafkaConsumer: ...
    def admin(self, **options: Any) -> KafkaAdmin: ...


# --- sending many records at once ----------------------------------------------------------
BATCH_FROM = 8
"""Calls that send this many records or more send them with ``send_batched``."""

Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]
"""A record to send: topic, key, value, headers."""

Sent = Any
"""Per record sent by ``send_batched``: ``(future, place in its batch)`` or the error that
kept it from being sent."""


def partition_for_key(key: bytes, count: int) -> int:
    """Kafka's default partitioner (the Java client's and aiokafka's): murmur2 of the key."""
    return (murmur2(key) & 0x7FFFFFFF) % count


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS = struct.Struct("<I").iter_unpack


def murmur2(data: bytes) -> int:
    """MurmurHash2 as Kafka's Java client computes it (unsigned 32 bits), the same values
    as aiokafka's ``murmur2``: words read four bytes at a time and a mask per product, a
    key of 10 bytes in 1.2 µs against 1.9 (it runs for every keyed record sent)."""
    length = len(data)
    h = 0x9747B28C ^ length
    n4 = length & ~3
    for (k,) in _WORDS(data[:n4]):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        if extra == 3:
            h ^= data[n4 + 2] << 16
        if extra >= 2:
            h ^= data[n4 + 1] << 8
        h = ((h ^ data[n4]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


class NoTransactions:
    """The transaction half of the ``KafkaProducer`` protocol, for a producer without
    transactions: each method raises NotImplementedError with ``no_transactions``."""

    no_transactions = "this producer has no transactions"

    async def begin_transaction(self) -> None:
        raise NotImplementedError(self.no_transactions)

    async def commit_transaction(self) -> None:
        raise NotImplementedError(self.no_transactions)

    async def abort_transaction(self) -> None:
        raise NotImplementedError(self.no_transactions)

    async def send_offsets_to_transaction(
            self, offsets: dict[TopicPartition, OffsetAndMetadata], group_id: str) -> None:
        raise NotImplementedError(self.no_transactions)


class PartitionedProducer(NoTransactions):
    """Several producers as one: partition ``p`` of every topic is always sent through
    ``producers[p % len(producers)]``, so each partition has one producer and keeps its
    order (and its idempotent sequence) as with one. The client keeps one request in
    flight per connection; with two, one producer's request is on the broker while the
    other's is built and sent (BENCHMARKS.md, *Publishing*). ``send`` without a partition
    picks it as the client's default partitioner does (murmur2 of the key; a random
    partition for a record without one). As with one producer, a failed ``start`` leaves
    stopping them to the owner."""

    no_transactions = "a PartitionedProducer has no transactions"

    def __init__(self, producers: Sequence[KafkaProducer]) -> None:
        self.producers = list(producers)

    async def start(self) -> None:
        await _all(producer.start() for producer in self.producers)

    async def stop(self) -> None:
        await _all(producer.stop() for producer in self.producers)

    async def flush(self) -> None:
        await _all(producer.flush() for producer in self.producers)

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: list[tuple[str, bytes]] | None = None
                   ) -> asyncio.Future[RecordMetadata]:
        if partition is None:
            count = len(await self.partitions_for(topic))
            partition = (random.randrange(count) if key is None
                         else partition_for_key(key, count))
        return await self.producers[partition % len(self.producers)].send(
            topic, value, key=key, partition=partition, timestamp_ms=timestamp_ms,
            headers=headers)

    def create_batch(self) -> Any:
        return self.producers[0].create_batch()  # a batch belongs to no producer

    async def send_batch(self, batch: Any, topic: str, *, partition: int
                         ) -> asyncio.Future[RecordMetadata]:
        return await self.producers[partition % len(self.producers)].send_batch(
            batch, topic, partition=partition)

    async def partitions_for(self, topic: str) -> set[int]:
        return await self.producers[0].partitions_for(topic)


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Run ``calls`` together, each to its end; then raise the first error, if any."""
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


class Batching:
    """What ``send_batched`` keeps between the calls on one producer: per topic, the
    partition records without a key go to next; per partition, a lock. (aiokafka's
    ``send_batch`` waits for the partition's pending batch to be sent; with several calls
    waiting, its timeout shrinks faster than time passes and it gives up with
    KafkaTimeoutError, so calls take turns per partition.)"""

    def __init__(self) -> None:
        self.sticky: dict[str, int] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    def lock(self, topic: str, partition: int) -> asyncio.Lock:
        found = self._locks.get((topic, partition))
        if found is None:
            found = self._locks[(topic, partition)] = asyncio.Lock()
        return found


async def send_batched(producer: KafkaProducer, records: Sequence[Outgoing],
                       batching: Batching,
                       before: Callable[[int], None] | None = None, *,
                       per_batch: int | None = None) -> list[Sent]:
    """Send ``records`` as one record batch per partition (``create_batch`` /
    ``send_batch``): about half the client's work per record of ``send()``, which builds a
    future and looks up the partition for each. Partitions are chosen as ``send()`` chooses
    them (murmur2 of the key); records without a key go to one partition per call and
    topic (sticky, as Kafka's), the next call to the next (``batching`` keeps the place).
    ``before(i)`` runs before the batch whose first record is ``records[i]`` is sent.
    Records of one partition keep their order; records of different partitions may be
    sent in another order than given. ``per_batch`` caps the records of a batch (1: each
    record alone, so the broker judges each against ``max.message.bytes``, which Kafka
    applies to a whole batch)."""
    sent: list[Sent] = [None] * len(records)
    groups: dict[tuple[str, int], list[int]] = {}
    counts: dict[str, int] = {}
    failed: dict[str, BaseException] = {}
    # looked up when the topic changes from the record before (a call has one, in practice)
    topic, count, sticky, error = None, 0, 0, None
    for i, (record_topic, key, _, _) in enumerate(records):
        if record_topic != topic:
            topic = record_topic
            if topic not in counts:
                try:  # waits on the client's bounded metadata timeout
                    counts[topic] = len(await producer.partitions_for(topic))
                except Exception as exc:  # e.g. the topic does not exist
                    counts[topic], failed[topic] = 0, exc
            count, sticky, error = counts[topic], batching.sticky.get(topic, 0), \
                failed.get(topic)
        if error is not None:
            sent[i] = error
            continue
        partition = sticky % count if key is None else partition_for_key(key, count)
        groups.setdefault((topic, partition), []).append(i)
    for topic in counts:
        batching.sticky[topic] = batching.sticky.get(topic, 0) + 1
    cap = len(records) if per_batch is None else per_batch
    for (topic, partition), indices in groups.items():
        batch = producer.create_batch()
        # a record's place in its batch is its place in ``members``: the client counts
        # a batch's records from 0
        members: list[int] = []
        for i in indices:
            _, key, value, headers = records[i]
            appended = None if len(members) >= cap else batch.append(
                key=key, value=value, timestamp=None, headers=headers)
            if appended is None:  # full: send it, start the next (which takes any record)
                await _submit(producer, batching, batch, topic, partition, members, sent,
                              before)
                batch, members = producer.create_batch(), []
                batch.append(key=key, value=value, timestamp=None, headers=headers)
            members.append(i)
        if members:
            await _submit(producer, batching, batch, topic, partition, members, sent,
                          before)
    return sent


async def _submit(producer: KafkaProducer, batching: Batching, batch: Any, topic: str,
                  partition: int, members: list[int], sent: list[Sent],
                  before: Callable[[int], None] | None) -> None:
    if before is not None:
        before(members[0])
    try:
        async with batching.lock(topic, partition):
            future = await producer.send_batch(batch, topic, partition=partition)
    except Exception as exc:
        for i in members:
            sent[i] = exc
        return
    for position, i in enumerate(members):
        sent[i] = (future, position)


def too_large(exc: BaseException) -> bool:
    """Whether the brokers refused a record batch (or a record) as too large."""
    return isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError))


def futures_of(sent: Sequence[Sent]) -> dict[int, asyncio.Future[Any]]:
    """The distinct futures of records sent (a record batch's records share one)."""
    return {id(item[0]): item[0] for item in sent if isinstance(item, tuple)}


async def wait_quietly(futures: Sequence[asyncio.Future[Any]], timeout: float) -> None:
    """Wait until every future is done or ``timeout`` has passed, whichever is first, and
    never cancel them (a record still pending at the deadline stays with the producer,
    which may yet deliver it; only the wait ends): ``asyncio.wait`` semantics. One future
    (a single publish) is waited on directly, without the sets and counters of
    ``asyncio.wait``."""
    if len(futures) != 1:
        await asyncio.wait(futures, timeout=timeout)
        return
    future = futures[0]
    if future.done():
        return
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = waiter.get_loop().call_later(timeout, wake)
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


def acked_all(sent: Sequence[Sent], late: BaseException | None = None, *,
              offsets: bool = True) -> list[Any]:
    """What each record sent by ``send()`` (``(future, None)``) or by ``send_batched``
    became: its RecordMetadata (offset included) or the error; ``late`` for one whose
    future is not done yet. Each future (a record batch's records share one) is looked at
    once. Without ``offsets``, a record of a batch gets its batch's metadata (the offset of
    the batch's first record), a copy less per record."""
    outcome: dict[int, Any] = {}
    results: list[Any] = []
    for item in sent:
        if not isinstance(item, tuple):  # the error that kept it from being sent
            results.append(item)
            continue
        future, position = item
        found = outcome.get(id(future), outcome)
        if found is outcome:
            if not future.done():
                found = late
            else:
                error = future.exception()
                found = error if error is not None else future.result()
            outcome[id(future)] = found
        if not offsets or position is None or found is None or \
                isinstance(found, BaseException):
            results.append(found)
        else:
            results.append(found._replace(offset=found.offset + position))
    return results


_RECANCEL_S = 0.5


async def _stop_within(client: KafkaProducer | KafkaConsumer, timeout_s: float) -> None:
    """``client.stop()`` within ``timeout_s``. An aiokafka consumer's fetcher, when its
    assignment changes (a group consumer's stop leaves the group, which revokes it),
    cancels its fetches and awaits them with CancelledError suppressed; the cancel its
    close() sends in that moment is swallowed and the stop waits for the fetcher forever.
    While the stop runs and the fetcher is closing, its task is cancelled again every
    ``_RECANCEL_S``, so such a stop ends in about that time, not at the timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stopping = asyncio.ensure_future(client.stop())
    try:
        while not stopping.done():
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{type(client).__name__}.stop() took over {timeout_s} s")
            await asyncio.wait({stopping}, timeout=min(_RECANCEL_S, left))
            fetcher = getattr(client, "_fetcher", None)
            task = getattr(fetcher, "_fetch_task", None)
            if getattr(fetcher, "_closed", False) is True and isinstance(task, asyncio.Task) \
                    and not task.done():
                task.cancel()
        stopping.result()
    finally:
        if not stopping.done():  # cut short; never wait unbounded for its cancel
            stopping.cancel()
            await asyncio.wait({stopping}, timeout=_RECANCEL_S)


async def stop_quietly(client: KafkaProducer | KafkaConsumer, timeout_s: float) -> None:
    """Stop a client within ``timeout_s``, whatever it raises. An aiokafka producer's stop
    waits for its pending batches (forever, with the brokers gone or the producer fenced);
    cut short, it leaves its sender running and its connections open, so they are then
    closed here: nothing of the client outlives this call."""
    try:
        await _stop_within(client, timeout_s)
        return
    except BaseException:  # a client being let go: nothing to report
        pass
    with contextlib.suppress(BaseException):
        sender = getattr(client, "_sender", None)
        if sender is not None:  # aiokafka's producer: cancels its task and awaits it
            await asyncio.wait_for(sender.close(), timeout_s)
    with contextlib.suppress(BaseException):
        fetcher = getattr(client, "_fetcher", None)
        if fetcher is not None:  # aiokafka's consumer
            await asyncio.wait_for(fetcher.close(), timeout_s)
    with contextlib.suppress(BaseException):
        kafka = getattr(client, "_client", None) or getattr(client, "client", None)
        if kafka is not None:
            await asyncio.wait_for(kafka.close(), timeout_s)


# --- aiokafka ------------------------------------------------------------------------------
_TOPIC_ALREADY_EXISTS = 36


class _AIOKafkaAdmin:
    """``KafkaAdmin`` over aiokafka's admin client (whose answers are protocol tuples)."""

    def __init__(self, **options: Any) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(**options)

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await self._admin.close()

    async def broker_count(self) -> int:
        return len((await self._admin.describe_cluster())["brokers"])

    async def partition_counts(self, topics: Iterable[str]) -> dict[str, int]:
        names = list(topics)
        if not names:
            return {}
        existing = set(await self._admin.list_topics())
        wanted = [t for t in names if t in existing]
        if not wanted:
            return {}
        meta = await self._admin.describe_topics(wanted)
        return {t["topic"]: len(t["partitions"]) for t in meta if not t.get("error_code")}

    async def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        from aiokafka.admin import NewTopic

        if not topics:
            return
        response = await self._admin.create_topics([
            NewTopic(t.name, t.partitions, t.replication_factor, topic_configs=t.config)
            for t in topics])
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = entry[2] if len(entry) > 2 else ""
                raise ConfigurationError(f"cannot create topic {name!r}: error {code} "
                                         f"{message}")

    async def create_partitions(self, topic: str, total: int) -> None:
        from aiokafka.admin import NewPartitions

        await self._admin.create_partitions({topic: NewPartitions(total_count=total)})

    async def topic_config(self, topics: Iterable[str], name: str) -> dict[str, str | None]:
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        names = list(topics)
        out: dict[str, str | None] = dict.fromkeys(names)
        if not names:
            return out
        responses = await self._admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, {name: None}) for t in names])
        for response in responses:
            for resource in response.resources:
                configs = {c[0]: c[1] for c in resource[4]}
                out[resource[3]] = configs.get(name)
        return out

    async def committed(self, group_id: str, partitions: Sequence[TopicPartition]
                        ) -> dict[TopicPartition, tuple[int, str]]:
        if not partitions:
            return {}
        found = await self._admin.list_consumer_group_offsets(group_id,
                                                              partitions=list(partitions))
        return {tp: (om.offset, om.metadata or "") for tp, om in found.items()
                if om.offset >= 0}


class AIOKafkaClients:
    """``KafkaClients`` of aiokafka: what athomic uses outside tests."""

    def producer(self, **options: Any) -> KafkaProducer:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(**options)  # type: ignore[no-any-return]

    def consumer(self, **options: Any) -> KafkaConsumer:
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(**options)  # type: ignore[no-any-return]

    def admin(self, **options: Any) -> KafkaAdmin:
        return _AIOKafkaAdmin(**options)

    def __reduce__(self) -> Any:
        return (AIOKafkaClients, ())


AIOKAFKA: KafkaClients = AIOKafkaClients()


# --- errors: the one place Kafka's become athomic's ----------------------------------------
@dataclass(frozen=True, slots=True)
class Fault:
    """What a Kafka error means to a caller that may retry: ``kind`` is ``"fenced"`` (a
    newer instance owns the transactional id, or the broker aborted a transaction that ran
    too long: the producer is unusable), ``"transient"`` (try again later: leadership
    moving, a broker away, a quorum short, a timeout) or ``"permanent"`` (this record will
    never be accepted: too large, invalid or unauthorised topic)."""

    kind: str
    name: str
    """The Kafka error's class name (``error.type`` in telemetry)."""


_PERMANENT: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError, RecordListTooLargeError, KafkaInvalidTopicError,
    TopicAuthorizationFailedError, OffsetMetadataTooLargeError,
)
_FENCED: tuple[type[BaseException], ...] = (ProducerFenced, TransactionalIdAuthorizationFailed)


def classify(exc: BaseException) -> Fault:
    """Sort an error raised by a Kafka client (or by our waits on one)."""
    name = type(exc).__name__
    if isinstance(exc, _FENCED):
        return Fault("fenced", name)
    if isinstance(exc, _PERMANENT):
        return Fault("permanent", name)
    if isinstance(exc, AthomicError):
        return Fault("transient" if exc.retriable else "permanent", name)
    # UnknownTopicOrPartition is transient to Kafka (metadata may lag a creation); the
    # republisher bounds how long it keeps trying before it calls the topic missing.
    return Fault("transient", name)


def kafka_error_name(exc: BaseException) -> str:
    """The name telemetry reports as ``error.type``: the Kafka error's own class name when
    the error came from Kafka (directly or as the cause of ours), else ours."""
    cause = exc.__cause__ if isinstance(exc, AthomicError) else exc
    if isinstance(cause, KafkaError):
        return type(cause).__name__
    return type(exc).__name__


def translate(exc: BaseException, *, topic: str | None = None,
              servers: str | None = None) -> AthomicError:
    """A Kafka client error as the athomic error a caller sees (``__cause__`` keeps the
    original). Errors that are already athomic's pass through."""
    if isinstance(exc, AthomicError):
        return exc
    error: AthomicError
    where = f" at {servers}" if servers else ""
    if isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError)):
        error = RecordTooLargeError(f"record for {topic!r} rejected as too large: {exc}",
                                    size=-1, limit=-1)
    elif isinstance(exc, KafkaConnectionError):
        error = MessagingConnectionError(f"cannot reach the Kafka brokers{where}: {exc}")
    elif isinstance(exc, (KafkaTimeoutError, asyncio.TimeoutError, TimeoutError)):
        error = PublishError(f"no acknowledgement for {topic!r} in time: {exc!r}",
                             topic=topic)
    elif isinstance(exc, UnknownTopicOrPartitionError):
        error = PublishError(f"topic {topic!r} does not exist on the brokers", topic=topic)
    elif isinstance(exc, TopicAuthorizationFailedError):
        error = PublishError(f"not authorised to write to {topic!r}", topic=topic)
    elif isinstance(exc, KafkaError):
        error = PublishError(f"publishing to {topic!r} failed: {exc!r}", topic=topic)
    elif isinstance(exc, OSError):
        error = MessagingConnectionError(f"cannot reach the Kafka brokers{where}: {exc}")
    else:
        error = PublishError(f"publishing to {topic!r} failed: {exc!r}", topic=topic)
    error.__cause__ = exc
    return error


def connection_error(exc: BaseException, servers: str) -> MessagingConnectionError:
    """An error met while connecting a client, as MessagingConnectionError."""
    if isinstance(exc, MessagingConnectionError):
        return exc
    error = MessagingConnectionError(f"cannot reach the Kafka brokers at {servers}: "
                                     f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
