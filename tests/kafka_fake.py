"""An in-memory Kafka for tests: a ``KafkaClients`` (see ``athomic/_kafka.py``) whose
producers, consumers and admins share one cluster held in this process.

Modelled as the real broker and aiokafka behave (``tests/integration/
test_kafka_fake_contract.py`` runs the same tests on both):

* topics of N partitions, offsets from 0, keyed records placed by murmur2 like Kafka's
  default partitioner, headers, timestamps, ``acks=0`` (futures resolve to None), the
  client's ``max_request_size`` (``send`` raises) and the broker's ``max.message.bytes``
  (the future fails);
* a missing topic: ``send`` waits ``metadata_wait_s`` then raises
  UnknownTopicOrPartitionError (with ``auto_create_topics=True`` a legal name is created);
* transactions: control markers take an offset in each partition a transaction wrote to;
  read_committed sees committed records only and stops at the last stable offset;
  ``send_offsets_to_transaction`` offsets become the group's on commit; epochs per
  transactional id: a newer producer (or ``fence()``) aborts the open transaction and
  the old producer's next broker call raises ProducerFenced; a transaction open longer
  than ``transaction_timeout_ms`` (by ``clock``) is aborted with an epoch bump, so the
  same; metadata over ``offset.metadata.max.bytes`` fails ``send_offsets_to_transaction``
  with aiokafka's KafkaError("Unexpected error during batch delivery") and leaves the
  transaction open; aiokafka's client state machine (AssertionError on an invalid
  transition, e.g. any commit/abort after a fatal error; empty transactions never reach
  the broker); a stopped producer leaves its transaction open until it times out;
* consumers with assigned partitions: positions, seek, pause/resume, max_records,
  auto_offset_reset (also when a position is beyond the end), end offsets (the LSO for
  read_committed), getmany waiting for data up to ``timeout_ms``;
* athomic's admin protocol, with the real adapter's errors.

Not modelled: replication, leaders and acks durability, retention and compaction (the log
start is always 0), group membership, compression, fetch sizes, serializers, idempotent
de-duplication, the delay between EndTxn and the markers a real broker has (here markers
are written at once), sharing across processes (a FakeKafka sent to a Ray actor is a copy).
Transaction timeouts are checked lazily, on the next call into the cluster.

Tests drive faults through ``FakeKafka.faults`` (per client call), ``fence()``,
``broker_down()``/``broker_up()`` and an injectable ``clock`` (e.g. ``ManualClock``).
"""

from __future__ import annotations

import asyncio
import copy
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from aiokafka.errors import (
    ConsumerStoppedError,
    IllegalOperation,
    IllegalStateError,
    InvalidPartitionsError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetMetadataTooLargeError,
    ProducerClosed,
    ProducerFenced,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import (
    ConsumerRecord,
    OffsetAndMetadata,
    OffsetAndTimestamp,
    RecordMetadata,
    TopicPartition,
)
from aiokafka.util import commit_structure_validate

if TYPE_CHECKING:
    from athomic._kafka import TopicSpec

__all__ = ["FakeAdmin", "FakeConsumer", "FakeKafka", "FakeProducer", "Fault", "Faults",
           "LogEntry", "ManualClock"]

READ_COMMITTED = "read_committed"
READ_UNCOMMITTED = "read_uncommitted"
MAX_METADATA_BYTES = 4096  # the broker's offset.metadata.max.bytes
MAX_MESSAGE_BYTES = 1048588  # the broker's message.max.bytes
# Kafka's topic configs and their defaults (names outside this set are refused, as by
# the broker); values are not validated.
TOPIC_CONFIG_DEFAULTS: dict[str, str] = {
    "cleanup.policy": "delete", "compression.type": "producer",
    "compression.gzip.level": "-1", "compression.lz4.level": "9",
    "compression.zstd.level": "3", "delete.retention.ms": "86400000",
    "file.delete.delay.ms": "60000", "flush.messages": "9223372036854775807",
    "flush.ms": "9223372036854775807", "follower.replication.throttled.replicas": "",
    "index.interval.bytes": "4096", "leader.replication.throttled.replicas": "",
    "local.retention.bytes": "-2", "local.retention.ms": "-2",
    "max.compaction.lag.ms": "9223372036854775807", "max.message.bytes": "1048588",
    "message.timestamp.after.max.ms": "3600000",
    "message.timestamp.before.max.ms": "9223372036854775807",
    "message.timestamp.type": "CreateTime", "min.cleanable.dirty.ratio": "0.5",
    "min.compaction.lag.ms": "0", "min.insync.replicas": "1", "preallocate": "false",
    "remote.log.copy.disable": "false", "remote.log.delete.on.disable": "false",
    "remote.storage.enable": "false", "retention.bytes": "-1", "retention.ms": "604800000",
    "segment.bytes": "1073741824", "segment.index.bytes": "10485760",
    "segment.jitter.ms": "0", "segment.ms": "604800000",
    "unclean.leader.election.enable": "false",
}
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_MISSING: Any = object()

PRODUCER_METHODS = ("start", "stop", "flush", "send", "begin_transaction",
                    "commit_transaction", "abort_transaction", "send_offsets_to_transaction",
                    "partitions_for", "send_batch")
CONSUMER_METHODS = ("start", "stop", "assign", "assignment", "seek", "pause", "resume",
                    "paused", "position", "getmany", "beginning_offsets", "end_offsets",
                    "offsets_for_times", "highwater", "last_poll_timestamp")
ADMIN_METHODS = ("start", "close", "broker_count", "partition_counts", "create_topics",
                 "create_partitions", "topic_config", "committed")
SYNC_METHODS = frozenset(f"consumer.{m}" for m in
                         ("assign", "assignment", "seek", "pause", "resume", "paused",
                          "highwater", "last_poll_timestamp"))
METHODS = frozenset([*(f"producer.{m}" for m in PRODUCER_METHODS),
                     *(f"consumer.{m}" for m in CONSUMER_METHODS),
                     *(f"admin.{m}" for m in ADMIN_METHODS)])


class ManualClock:
    """A monotonic clock (seconds) that moves only when told: ``FakeKafka(clock=...)``.
    Expired transactions are aborted on the next call into the cluster (or at once with
    ``FakeKafka.expire_transactions()``, which also wakes waiting consumers)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- fault injection -----------------------------------------------------------------------
@dataclass(eq=False)
class Fault:
    """One injected fault; see ``Faults.add``. ``fired`` counts how often it applied."""

    name: str
    raises: BaseException | type[BaseException] | None = None
    times: int | None = None
    when: Callable[..., bool] | None = None
    hang: bool = False
    delay: float = 0.0
    future_never_resolves: bool = False
    future_raises: BaseException | type[BaseException] | None = None
    fired: int = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.fired < self.times


def _exception(exc: BaseException | type[BaseException]) -> BaseException:
    # a fresh instance per raise, so tracebacks do not pile up (as aiokafka copies)
    return exc() if isinstance(exc, type) else copy.copy(exc)


class Faults:
    """Per-call faults of the fake's clients, by name ``"producer.<method>"``,
    ``"consumer.<method>"`` or ``"admin.<method>"``. The first active matching fault
    applies: ``delay`` (sleep first), then ``hang`` (never return until cancelled), then
    ``raises``; ``future_never_resolves`` / ``future_raises`` are for ``producer.send``,
    whose future then never completes / fails (the record is not written). ``when``
    receives the call's arguments as keywords (``topic=``, ``partitions=``...) plus
    ``client=``. Synchronous consumer methods (assign, seek, pause...) take ``raises``
    only."""

    def __init__(self) -> None:
        self.rules: list[Fault] = []

    def add(self, name: str, *, raises: BaseException | type[BaseException] | None = None,
            times: int | None = None, when: Callable[..., bool] | None = None,
            hang: bool = False, delay: float = 0.0, future_never_resolves: bool = False,
            future_raises: BaseException | type[BaseException] | None = None) -> Fault:
        if name not in METHODS:
            raise ValueError(f"unknown client method {name!r}; one of {sorted(METHODS)}")
        if name in SYNC_METHODS and (hang or delay):
            raise ValueError(f"{name} is synchronous: it can only raise")
        if (future_never_resolves or future_raises is not None) and name not in (
                "producer.send", "producer.send_batch"):
            raise ValueError("future_never_resolves/future_raises apply to producer.send "
                             "and producer.send_batch")
        fault = Fault(name, raises, times, when, hang, delay, future_never_resolves,
                      future_raises)
        self.rules.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        self.rules.remove(fault)

    def clear(self) -> None:
        self.rules.clear()

    def _match(self, name: str, call: dict[str, Any]) -> Fault | None:
        for fault in self.rules:
            if fault.name == name and fault.active and (fault.when is None
                                                        or fault.when(**call)):
                fault.fired += 1
                return fault
        return None

    def fire_sync(self, name: str, call: dict[str, Any]) -> None:
        fault = self._match(name, call)
        if fault is not None and fault.raises is not None:
            raise _exception(fault.raises)

    async def fire(self, name: str, call: dict[str, Any]) -> Fault | None:
        fault = self._match(name, call)
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.hang:
            await asyncio.get_running_loop().create_future()
        if fault.raises is not None:
            raise _exception(fault.raises)
        return fault


# --- the cluster ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Txn:
    """A transaction open on the cluster (from its first partition or offsets)."""

    transactional_id: str
    started: float
    timeout_s: float
    state: str = "open"  # open | committed | aborted
    partitions: set[TopicPartition] = field(default_factory=set)  # markers go here
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)  # for the LSO
    offsets: dict[str, dict[TopicPartition, OffsetAndMetadata]] = field(default_factory=dict)


@dataclass(eq=False)
class LogEntry:
    """One offset of a partition: a record, or a transaction marker (``marker`` is
    ``"COMMIT"`` or ``"ABORT"``)."""

    offset: int
    timestamp: int
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    txn: _Txn | None = None
    marker: str | None = None

    @property
    def transactional(self) -> bool:
        return self.txn is not None

    def visible(self, isolation_level: str) -> bool:
        """Whether a consumer at ``isolation_level`` returns it (below its read limit)."""
        if self.marker is not None:
            return False
        return (isolation_level != READ_COMMITTED or self.txn is None
                or self.txn.state == "committed")

    def record(self, tp: TopicPartition) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(tp.topic, tp.partition, self.offset, self.timestamp, 0,
                              self.key, self.value, None,
                              -1 if self.key is None else len(self.key),
                              -1 if self.value is None else len(self.value), self.headers)


class FakeKafka:
    """One in-memory Kafka cluster and the ``KafkaClients`` factory over it.

    ``auto_create_topics``: a producer's send creates a missing (legally named) topic with
    ``default_partitions``, like ``auto.create.topics.enable``; off: send raises
    UnknownTopicOrPartitionError after ``metadata_wait_s``. ``clock`` (seconds,
    monotonic) times transaction timeouts."""

    def __init__(self, *, brokers: int = 1, auto_create_topics: bool = False,
                 default_partitions: int = 1, metadata_wait_s: float = 0.01,
                 clock: Callable[[], float] = time.monotonic,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_metadata_bytes: int = MAX_METADATA_BYTES) -> None:
        self.brokers = brokers
        self.auto_create_topics = auto_create_topics
        self.default_partitions = default_partitions
        self.metadata_wait_s = metadata_wait_s
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self.faults = Faults()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.clients: list[FakeProducer | FakeConsumer | FakeAdmin] = []
        self.transactions_committed = 0
        self.transactions_aborted = 0
        self.is_down = False
        self._logs: dict[str, list[list[LogEntry]]] = {}
        self._configs: dict[str, dict[str, str]] = {}
        self._group_offsets: dict[str, dict[TopicPartition, OffsetAndMetadata]] = {}
        self._epochs: dict[str, int] = {}
        self._open: dict[str, _Txn] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    # KafkaClients
    def producer(self, **options: Any) -> FakeProducer:
        producer = FakeProducer(self, options)
        self.clients.append(producer)
        return producer

    def consumer(self, **options: Any) -> FakeConsumer:
        consumer = FakeConsumer(self, options)
        self.clients.append(consumer)
        return consumer

    def admin(self, **options: Any) -> FakeAdmin:
        admin = FakeAdmin(self, options)
        self.clients.append(admin)
        return admin

    # --- test controls ---------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1,
                     config: dict[str, str] | None = None) -> None:
        """Create a topic (no error if it exists)."""
        if name not in self._logs:
            self._logs[name] = [[] for _ in range(partitions)]
            self._configs[name] = dict(config or {})
            self._notify()

    def fence(self, transactional_id: str) -> None:
        """What a newer producer with this id does on start: abort its open transaction
        and bump the epoch, so the current producer is fenced."""
        self._init_producer_id(transactional_id)

    def broker_down(self) -> None:
        """From now every client call raises KafkaConnectionError (getmany returns
        nothing after its timeout; stop/close still work)."""
        self.is_down = True

    def broker_up(self) -> None:
        self.is_down = False
        self._notify()

    def expire_transactions(self) -> None:
        """Abort (with an epoch bump) every transaction open longer than its timeout."""
        now = self.clock()
        for txn in list(self._open.values()):
            if now - txn.started > txn.timeout_s:
                self._end_txn(txn, commit=False)
                self._epochs[txn.transactional_id] += 1

    # --- introspection ---------------------------------------------------------------------
    def topics(self) -> dict[str, int]:
        """Partition counts by topic."""
        return {name: len(parts) for name, parts in self._logs.items()}

    def log(self, topic: str, partition: int = 0) -> list[LogEntry]:
        """A partition's log as stored: records and markers."""
        return list(self._logs[topic][partition])

    def records(self, topic: str, partition: int | None = None, *,
                isolation_level: str = READ_COMMITTED) -> list[ConsumerRecord[bytes, bytes]]:
        """What a consumer reading from the start gets now (all partitions in order, or
        one)."""
        self.expire_transactions()
        parts = range(len(self._logs[topic])) if partition is None else [partition]
        out: list[ConsumerRecord[bytes, bytes]] = []
        for p in parts:
            out += self._read(TopicPartition(topic, p), 0, isolation_level, None)[0]
        return out

    def values(self, topic: str, partition: int | None = None, *,
               isolation_level: str = READ_COMMITTED) -> list[bytes | None]:
        return [r.value for r in self.records(topic, partition,
                                              isolation_level=isolation_level)]

    def high_watermark(self, tp: TopicPartition) -> int:
        return len(self._logs[tp.topic][tp.partition])

    def last_stable_offset(self, tp: TopicPartition) -> int:
        self.expire_transactions()
        return self._lso(tp)

    def committed(self, group_id: str) -> dict[TopicPartition, OffsetAndMetadata]:
        """The group's committed offsets."""
        self.expire_transactions()
        return dict(self._group_offsets.get(group_id, {}))

    def open_transactions(self) -> list[str]:
        """Transactional ids with a transaction open on the cluster."""
        self.expire_transactions()
        return list(self._open)

    def epoch(self, transactional_id: str) -> int:
        return self._epochs.get(transactional_id, -1)

    def open_clients(self) -> list[FakeProducer | FakeConsumer | FakeAdmin]:
        """Clients started and not yet stopped/closed."""
        return [c for c in self.clients if c.started and not c.closed]

    # --- internals -------------------------------------------------------------------------
    async def _enter(self, client: Any, name: str, call: dict[str, Any],
                     *, down_ok: bool = False) -> Fault | None:
        """Every client call: log it, apply faults, fail if the broker is down."""
        self.calls.append((name, call))
        fault = await self.faults.fire(name, {**call, "client": client})
        if self.is_down and not down_ok:
            raise KafkaConnectionError(f"fake Kafka is down ({name})")
        self.expire_transactions()
        return fault

    def _enter_sync(self, client: Any, name: str, call: dict[str, Any]) -> None:
        self.calls.append((name, call))
        self.faults.fire_sync(name, {**call, "client": client})

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _changed(self, timeout: float) -> None:
        """Wait until the cluster changes, at most ``timeout`` seconds."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait([waiter], timeout=max(timeout, 0))
        finally:
            self._waiters.discard(waiter)

    def _partition(self, tp: TopicPartition) -> list[LogEntry] | None:
        parts = self._logs.get(tp.topic)
        return parts[tp.partition] if parts is not None and tp.partition < len(parts) else None

    async def _wait_for_topic(self, topic: str) -> int:
        """aiokafka's metadata wait: the topic's partition count, or
        UnknownTopicOrPartitionError once ``metadata_wait_s`` has passed."""
        if topic not in self._logs and self.auto_create_topics and _LEGAL_TOPIC.fullmatch(topic):
            self.create_topic(topic, self.default_partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.metadata_wait_s
        while topic not in self._logs:
            if loop.time() >= deadline:
                raise UnknownTopicOrPartitionError()
            await self._changed(deadline - loop.time())
        return len(self._logs[topic])

    def _lso(self, tp: TopicPartition) -> int:
        firsts = [t.first_offsets[tp] for t in self._open.values() if tp in t.first_offsets]
        return min(firsts, default=self.high_watermark(tp))

    def _end_offset(self, tp: TopicPartition, isolation_level: str) -> int:
        if isolation_level == READ_COMMITTED:
            return self._lso(tp)
        return self.high_watermark(tp)

    def _append(self, tp: TopicPartition, entry: LogEntry) -> LogEntry:
        log = self._logs[tp.topic][tp.partition]
        entry.offset = len(log)
        log.append(entry)
        if entry.txn is not None:
            entry.txn.first_offsets.setdefault(tp, entry.offset)
        self._notify()
        return entry

    def _read(self, tp: TopicPartition, start: int, isolation_level: str,
              max_records: int | None) -> tuple[list[ConsumerRecord[bytes, bytes]], int]:
        """Records from ``start`` up to the read limit, and the next position."""
        log = self._partition(tp)
        if log is None:
            return [], start
        limit = self._end_offset(tp, isolation_level)
        out: list[ConsumerRecord[bytes, bytes]] = []
        for entry in log[start:limit]:
            if entry.visible(isolation_level):
                out.append(entry.record(tp))
                if max_records is not None and len(out) >= max_records:
                    return out, entry.offset + 1
        return out, max(start, limit)

    def _init_producer_id(self, transactional_id: str) -> int:
        txn = self._open.get(transactional_id)
        if txn is not None:
            self._end_txn(txn, commit=False)
        self._epochs[transactional_id] = self._epochs.get(transactional_id, -1) + 1
        return self._epochs[transactional_id]

    def _txn(self, producer: FakeProducer) -> _Txn:
        """The producer's transaction on the cluster, opened by its first partition or
        offsets (when the broker's transaction timeout starts)."""
        tid = producer.transactional_id
        assert tid is not None
        txn = self._open.get(tid)
        if txn is None:
            txn = self._open[tid] = _Txn(tid, self.clock(),
                                         producer.transaction_timeout_ms / 1000)
        return txn

    def _end_txn(self, txn: _Txn, *, commit: bool) -> None:
        del self._open[txn.transactional_id]
        txn.state = "committed" if commit else "aborted"
        now = int(time.time() * 1000)
        for tp in sorted(txn.partitions):
            self._append(tp, LogEntry(-1, now, marker="COMMIT" if commit else "ABORT"))
        if commit:
            for group, offsets in txn.offsets.items():
                self._group_offsets.setdefault(group, {}).update(offsets)
            self.transactions_committed += 1
        else:
            self.transactions_aborted += 1
        self._notify()


# --- clients -------------------------------------------------------------------------------
class _Client:
    kind = ""

    def __init__(self, kafka: FakeKafka, options: dict[str, Any]) -> None:
        self.kafka = kafka
        self.options = options
        self.started = False
        self.closed = False

    def __repr__(self) -> str:
        return f"<Fake{self.kind.title()} {self.options.get('client_id', hex(id(self)))}>"

    async def _enter(self, method: str, down_ok: bool = False, **call: Any) -> Fault | None:
        return await self.kafka._enter(self, f"{self.kind}.{method}", call, down_ok=down_ok)


def _invalid_transition(source: str, target: str) -> AssertionError:
    # aiokafka's TransactionManager asserts its state transitions
    return AssertionError(f"Invalid state transition TransactionState.{source} -> "
                          f"TransactionState.{target}")


class _Appended(NamedTuple):
    offset: int


BATCH_OVERHEAD = 61
"""Bytes of a record batch's header (Kafka's v2 format; aiokafka's size estimate of one
record includes it)."""


@dataclass
class FakeBatch:
    """aiokafka's BatchBuilder, as the fake needs it."""

    max_bytes: int
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int]] = field(
        default_factory=list)
    size: int = 0

    def append(self, *, timestamp: float | None, key: bytes | None, value: bytes | None,
               headers: Sequence[tuple[str, bytes]] = ()) -> Any:
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
        if self.records and self.size + size > self.max_bytes:
            return None
        self.records.append((key, value, list(headers), size))
        self.size += size
        return _Appended(len(self.records) - 1)

    def record_count(self) -> int:
        return len(self.records)


class FakeProducer(_Client):
    """A producer bound to a FakeKafka; transactional with ``transactional_id=``. Its
    ``state`` follows aiokafka's TransactionState names (UNINITIALIZED, READY,
    IN_TRANSACTION, FATAL_ERROR)."""

    kind = "producer"

    def __init__(self, kafka: FakeKafka, options: dict[str, Any]) -> None:
        super().__init__(kafka, options)
        acks = options.get("acks", _MISSING)
        if acks not in (0, 1, -1, "all", _MISSING):
            raise ValueError("Invalid ACKS parameter")
        self.transactional_id: str | None = options.get("transactional_id")
        idempotent = bool(options.get("enable_idempotence")) or self.transactional_id is not None
        if idempotent and acks not in ("all", -1, _MISSING):
            raise ValueError(f"acks={acks} not supported if enable_idempotence=True")
        self.acks = -1 if acks == "all" or (acks is _MISSING and idempotent) else (
            1 if acks is _MISSING else acks)
        self.max_request_size: int = options.get("max_request_size", 1048576)
        self.transaction_timeout_ms: int = options.get("transaction_timeout_ms", 60000)
        self.partitioner: Callable[..., int] | None = options.get("partitioner")
        self.epoch = -1
        self.state = "UNINITIALIZED"
        self._txn_partitions: set[TopicPartition] = set()
        self._txn_offsets = False

    async def start(self) -> None:
        await self._enter("start")
        if self.transactional_id is not None:
            self.epoch = self.kafka._init_producer_id(self.transactional_id)
            self.state = "READY"
        self.started = True

    async def stop(self) -> None:
        """Stops; an open transaction stays open on the cluster (until it times out)."""
        if self.closed:
            return
        self.closed = True
        await self._enter("stop", down_ok=True)

    async def flush(self) -> None:
        await self._enter("flush")

    def _check_open(self) -> None:
        if self.closed:
            raise ProducerClosed()
        assert self.started, "FakeProducer used before start()"

    def _fenced(self) -> bool:
        assert self.transactional_id is not None
        return self.kafka._epochs.get(self.transactional_id) != self.epoch

    def _fatal(self) -> None:
        self.state = "FATAL_ERROR"
        self._txn_partitions.clear()
        self._txn_offsets = False

    def _ensure_transactional(self) -> None:
        if self.transactional_id is None:
            raise IllegalOperation("You need to configure transaction_id to use transactions")

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: list[tuple[str, bytes]] | None = None
                   ) -> asyncio.Future[RecordMetadata]:
        assert not (value is None and key is None), "Need at least one: key or value"
        fault = await self._enter("send", topic=topic, value=value, key=key,
                                  partition=partition, timestamp_ms=timestamp_ms,
                                  headers=headers)
        self._check_open()
        count = await self.kafka._wait_for_topic(topic)
        if self.transactional_id is not None and self.state != "IN_TRANSACTION":
            raise IllegalOperation("Can't send messages while not in transaction")
        headers = list(headers or [])
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(
                f"The message is {size} bytes when serialized which is larger than the "
                "maximum request size you have configured with the max_request_size "
                "configuration")
        tp = TopicPartition(topic, self._choose(topic, partition, key, count))
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        if fault is not None and fault.future_never_resolves:
            return future
        if fault is not None and fault.future_raises is not None:
            future.set_exception(_exception(fault.future_raises))
            return future
        try:
            metadata = self._produce(tp, key, value, tuple(headers), timestamp_ms, size)
        except KafkaError as exc:
            future.set_exception(exc)
        else:
            future.set_result(metadata)
        return future

    def create_batch(self) -> FakeBatch:
        """An empty batch (aiokafka's BatchBuilder): full once ``max_batch_size`` bytes are
        in it (the first record always fits)."""
        return FakeBatch(self.options.get("max_batch_size", 16384))

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int
                         ) -> asyncio.Future[RecordMetadata]:
        fault = await self._enter("send_batch", batch=batch, topic=topic,
                                  partition=partition)
        self._check_open()
        count = await self.kafka._wait_for_topic(topic)
        if self.transactional_id is not None and self.state != "IN_TRANSACTION":
            raise IllegalOperation("Can't send messages while not in transaction")
        assert 0 <= partition < count, "Unrecognized partition"
        tp = TopicPartition(topic, partition)
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        if fault is not None and fault.future_never_resolves:
            return future
        if fault is not None and fault.future_raises is not None:
            future.set_exception(_exception(fault.future_raises))
            return future
        # The broker takes or refuses a batch whole, and judges max.message.bytes against
        # the batch, not against each record.
        limit = int(self.kafka._configs[topic].get("max.message.bytes",
                                                   self.kafka.max_message_bytes))
        if BATCH_OVERHEAD + sum(r[3] - BATCH_OVERHEAD for r in batch.records) > limit:
            future.set_exception(MessageSizeTooLargeError())
            return future
        base = None
        try:
            for key, value, headers, size in batch.records:
                metadata = self._produce(tp, key, value, tuple(headers), None, size)
                if base is None:
                    base = metadata
        except KafkaError as exc:
            future.set_exception(exc)
        else:
            future.set_result(base)
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        """aiokafka's metadata wait for ``topic`` (creating it with auto-create on)."""
        await self._enter("partitions_for", topic=topic)
        self._check_open()
        return set(range(await self.kafka._wait_for_topic(topic)))

    def _choose(self, topic: str, partition: int | None, key: bytes | None,
                count: int) -> int:
        everything = list(range(count))
        if partition is not None:
            assert partition >= 0
            assert partition in everything, "Unrecognized partition"
            return partition
        if self.partitioner is not None:
            return int(self.partitioner(key, everything, everything))
        if key is None:
            return random.choice(everything)
        return int(murmur2(key) & 0x7FFFFFFF) % count

    def _produce(self, tp: TopicPartition, key: bytes | None, value: bytes | None,
                 headers: tuple[tuple[str, bytes], ...], timestamp_ms: int | None,
                 size: int) -> Any:
        kafka = self.kafka
        txn = None
        if self.transactional_id is not None:
            if self._fenced():
                if tp not in self._txn_partitions:  # AddPartitionsToTxn fails: fatal
                    self._fatal()
                raise ProducerFenced()
            txn = kafka._txn(self)
            txn.partitions.add(tp)
            self._txn_partitions.add(tp)
        limit = int(kafka._configs[tp.topic].get("max.message.bytes", kafka.max_message_bytes))
        if size > limit:
            raise MessageSizeTooLargeError()
        stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        if kafka._configs[tp.topic].get("message.timestamp.type") == "LogAppendTime":
            stamp = int(time.time() * 1000)  # the broker's clock, not the producer's
        entry = kafka._append(tp, LogEntry(-1, stamp, key, value, headers, txn))
        if self.acks == 0:
            return None
        return RecordMetadata(tp.topic, tp.partition, tp, entry.offset, stamp, 0, 0)

    async def begin_transaction(self) -> None:
        await self._enter("begin_transaction")
        self._ensure_transactional()
        self._check_open()
        if self.state != "READY":
            raise _invalid_transition(self.state, "IN_TRANSACTION")
        self.state = "IN_TRANSACTION"

    async def send_offsets_to_transaction(
            self, offsets: dict[TopicPartition, OffsetAndMetadata], group_id: str) -> None:
        await self._enter("send_offsets_to_transaction", offsets=offsets, group_id=group_id)
        self._ensure_transactional()
        if self.state != "IN_TRANSACTION":
            raise IllegalOperation("Not in the middle of a transaction")
        if not group_id or not isinstance(group_id, str):
            raise ValueError(group_id)
        formatted = commit_structure_validate(offsets)
        if self._fenced():
            self._fatal()
            raise ProducerFenced()
        txn = self.kafka._txn(self)
        self._txn_offsets = True
        if any(len(om.metadata) > self.kafka.max_metadata_bytes for om in formatted.values()):
            # aiokafka's sender dies on the broker's answer: the producer is unusable and
            # the transaction stays open on the broker until it times out
            self._fatal()
            raise KafkaError("Unexpected error during batch delivery") from (
                OffsetMetadataTooLargeError())
        txn.offsets.setdefault(group_id, {}).update(formatted)

    async def commit_transaction(self) -> None:
        await self._enter("commit_transaction")
        await self._end(commit=True)

    async def abort_transaction(self) -> None:
        await self._enter("abort_transaction")
        await self._end(commit=False)

    async def _end(self, *, commit: bool) -> None:
        self._ensure_transactional()
        if self.state != "IN_TRANSACTION":
            raise _invalid_transition(
                self.state, "COMMITTING_TRANSACTION" if commit else "ABORTING_TRANSACTION")
        if self._txn_partitions or self._txn_offsets:  # an empty one never reaches Kafka
            if self._fenced():
                self._fatal()
                raise ProducerFenced()
            self.kafka._end_txn(self.kafka._open[self.transactional_id or ""], commit=commit)
        self.state = "READY"
        self._txn_partitions.clear()
        self._txn_offsets = False


class FakeConsumer(_Client):
    """A consumer with manually assigned partitions, bound to a FakeKafka."""

    kind = "consumer"

    def __init__(self, kafka: FakeKafka, options: dict[str, Any]) -> None:
        super().__init__(kafka, options)
        self.isolation_level: str = options.get("isolation_level", READ_UNCOMMITTED)
        if self.isolation_level not in (READ_COMMITTED, READ_UNCOMMITTED):
            raise ValueError(f"Incorrect isolation level {self.isolation_level}")
        self.auto_offset_reset: str = options.get("auto_offset_reset", "latest")
        if self.auto_offset_reset not in ("earliest", "latest", "none"):
            raise ValueError(f"Unknown auto_offset_reset {self.auto_offset_reset!r}")
        self.max_poll_records: int | None = options.get("max_poll_records")
        self._positions: dict[TopicPartition, int | None] = {}
        self._paused: set[TopicPartition] = set()
        self._polled: dict[TopicPartition, tuple[int, int]] = {}

    async def start(self) -> None:
        await self._enter("start")
        self.started = True

    async def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self._enter("stop", down_ok=True)

    def _sync(self, method: str, **call: Any) -> None:
        self.kafka._enter_sync(self, f"consumer.{method}", call)

    def _assigned(self, tp: TopicPartition) -> None:
        if tp not in self._positions:
            raise IllegalStateError(f"No current assignment for partition {tp}")

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._sync("assign", partitions=partitions)
        self._positions = dict.fromkeys(partitions)
        self._paused = set()

    def assignment(self) -> set[TopicPartition]:
        self._sync("assignment")
        return frozenset(self._positions)  # type: ignore[return-value]  # as aiokafka

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._sync("seek", partition=partition, offset=offset)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError("Offset must be a positive integer")
        self._assigned(partition)
        self._positions[partition] = offset

    def pause(self, *partitions: TopicPartition) -> None:
        self._sync("pause", partitions=partitions)
        if not all(isinstance(p, TopicPartition) for p in partitions):
            raise TypeError("partitions must be TopicPartition namedtuples")
        for tp in partitions:
            self._assigned(tp)
            self._paused.add(tp)

    def resume(self, *partitions: TopicPartition) -> None:
        self._sync("resume", partitions=partitions)
        if not all(isinstance(p, TopicPartition) for p in partitions):
            raise TypeError("partitions must be TopicPartition namedtuples")
        for tp in partitions:
            self._assigned(tp)
            self._paused.discard(tp)

    def paused(self) -> set[TopicPartition]:
        self._sync("paused")
        return set(self._paused)

    def _position(self, tp: TopicPartition, *, fetching: bool = False) -> int:
        """The position, reset by ``auto_offset_reset`` when unset (or, on a fetch, past
        the end: the broker's OffsetOutOfRange)."""
        position = self._positions[tp]
        if position is None or (fetching and position > self.kafka.high_watermark(tp)):
            if self.auto_offset_reset == "none":
                raise NoOffsetForPartitionError(tp)
            position = 0 if self.auto_offset_reset == "earliest" else (
                self.kafka._end_offset(tp, self.isolation_level))
            self._positions[tp] = position
        return position

    async def position(self, partition: TopicPartition) -> int:
        await self._enter("position", partition=partition)
        if partition not in self._positions:
            raise IllegalStateError(f"Partition {partition} is not assigned")
        if self.kafka._partition(partition) is None:
            raise KafkaTimeoutError(f"no metadata for {partition}")
        return self._position(partition)

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None
                      ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        assert all(isinstance(k, TopicPartition) for k in partitions)
        if self.closed:
            raise ConsumerStoppedError()
        if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
            raise ValueError("`max_records` must be a positive Integer")
        await self._enter("getmany", down_ok=True, partitions=partitions,
                          timeout_ms=timeout_ms, max_records=max_records)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            if not self.kafka.is_down:
                self.kafka.expire_transactions()
                found = self._fetch(partitions, max_records or self.max_poll_records)
                if found:
                    return found
            if loop.time() >= deadline or self.closed:
                return {}
            await self.kafka._changed(deadline - loop.time())

    def _fetch(self, partitions: Sequence[TopicPartition], limit: int | None
               ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp in list(self._positions):
            if tp in self._paused or (partitions and tp not in partitions):
                continue
            if self.kafka._partition(tp) is None:
                continue
            records, self._positions[tp] = self.kafka._read(
                tp, self._position(tp, fetching=True), self.isolation_level, limit)
            # what a fetch response tells about the partition (aiokafka keeps it)
            self._polled[tp] = (int(time.time() * 1000), self.kafka.high_watermark(tp))
            if records:
                out[tp] = records
                if limit is not None:
                    limit -= len(records)
                    if limit == 0:
                        break
        return out

    async def beginning_offsets(self, partitions: list[TopicPartition]
                                ) -> dict[TopicPartition, int]:
        await self._enter("beginning_offsets", partitions=partitions)
        self._known(partitions)
        return dict.fromkeys(partitions, 0)

    async def end_offsets(self, partitions: list[TopicPartition]
                          ) -> dict[TopicPartition, int]:
        await self._enter("end_offsets", partitions=partitions)
        self._known(partitions)
        return {tp: self.kafka._end_offset(tp, self.isolation_level) for tp in partitions}

    def highwater(self, partition: TopicPartition) -> int | None:
        self._sync("highwater", partition=partition)
        polled = self._polled.get(partition)
        return None if polled is None else polled[1]

    def last_poll_timestamp(self, partition: TopicPartition) -> int | None:
        self._sync("last_poll_timestamp", partition=partition)
        polled = self._polled.get(partition)
        return None if polled is None else polled[0]

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]
                                ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """Per partition, the first visible record stamped at or after the time given, or
        None when there is none (as aiokafka)."""
        await self._enter("offsets_for_times", timestamps=timestamps)
        self._known(timestamps)
        out: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, when in timestamps.items():
            found = next((e for e in self.kafka.log(tp.topic, tp.partition)
                          if e.marker is None and e.visible(self.isolation_level)
                          and e.timestamp >= when), None)
            out[tp] = None if found is None else OffsetAndTimestamp(found.offset,
                                                                    found.timestamp)
        return out

    def _known(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if self.kafka._partition(tp) is None:  # aiokafka waits for metadata, then this
                raise KafkaTimeoutError(f"no metadata for {tp}")


class FakeAdmin(_Client):
    """athomic's ``KafkaAdmin`` over a FakeKafka, raising what the aiokafka adapter does."""

    kind = "admin"

    async def start(self) -> None:
        await self._enter("start")
        self.started = True

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self._enter("close", down_ok=True)

    async def broker_count(self) -> int:
        await self._enter("broker_count")
        return self.kafka.brokers

    async def partition_counts(self, topics: Iterable[str]) -> dict[str, int]:
        names = list(topics)
        await self._enter("partition_counts", topics=names)
        counts = self.kafka.topics()
        return {t: counts[t] for t in names if t in counts}

    async def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        await self._enter("create_topics", topics=topics)
        from athomic.errors import ConfigurationError

        for spec in topics:
            error = self._refusal(spec)
            if error is not None:
                code, message = error
                raise ConfigurationError(f"cannot create topic {spec.name!r}: error {code} "
                                         f"{message}")
            self.kafka.create_topic(spec.name, spec.partitions, spec.config)

    def _refusal(self, spec: TopicSpec) -> tuple[int, str] | None:
        """The broker's error code and message for a topic it would not create."""
        if spec.name in self.kafka._logs:
            return None
        if not _LEGAL_TOPIC.fullmatch(spec.name) or spec.name in (".", ".."):
            return 17, f"Topic name is invalid: {spec.name!r}"
        if spec.partitions < 1:
            return 37, "Number of partitions was set to an invalid non-positive value."
        if spec.replication_factor > self.kafka.brokers or spec.replication_factor < 1:
            return 38, (f"Unable to replicate the partition {spec.replication_factor} "
                        f"time(s): only {self.kafka.brokers} broker(s) are registered.")
        unknown = sorted(set(spec.config) - set(TOPIC_CONFIG_DEFAULTS))
        if unknown:
            return 40, f"Unknown topic config name: {unknown[0]}"
        return None

    async def create_partitions(self, topic: str, total: int) -> None:
        await self._enter("create_partitions", topic=topic, total=total)
        parts = self.kafka._logs.get(topic)
        if parts is None:
            raise UnknownTopicOrPartitionError(f"Could not create partitions for {topic}: None")
        if total <= len(parts):
            raise InvalidPartitionsError(
                f"Could not create partitions for {topic}: The topic {topic} currently has "
                f"{len(parts)} partition(s); {total} would not be an increase.")
        parts.extend([] for _ in range(total - len(parts)))
        self.kafka._notify()

    async def topic_config(self, topics: Iterable[str], name: str) -> dict[str, str | None]:
        names = list(topics)
        await self._enter("topic_config", topics=names, name=name)
        out: dict[str, str | None] = {}
        for topic in names:
            config = self.kafka._configs.get(topic)
            out[topic] = None if config is None else config.get(
                name, TOPIC_CONFIG_DEFAULTS.get(name))
        return out

    async def committed(self, group_id: str, partitions: Sequence[TopicPartition]
                        ) -> dict[TopicPartition, tuple[int, str]]:
        await self._enter("committed", group_id=group_id, partitions=partitions)
        found = self.kafka._group_offsets.get(group_id, {})
        return {tp: (found[tp].offset, found[tp].metadata) for tp in partitions if tp in found}
