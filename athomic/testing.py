"""A test mode for code that publishes: ``TestProducer`` records instead of sending.

::

    from athomic.testing import TestProducer

    producer = TestProducer(settings)                 # no Kafka, no athomic actors
    ray.get(producer.publish.remote(topic="orders", message={"id": 1}, key="o-1"))
    await producer.publish(topic="reminders", message=m, delay_seconds=3600,
                           message_id="r-1")
    producer.published          # what was accepted, in order
    producer.delivered(at=datetime.now(timezone.utc) + timedelta(hours=2))

What runs is the real code: a ``TestProducer`` *is* a ``ProducerHandle`` (validation,
serialisation, context capture, message ids and due times on the caller's side) whose one
``ProducerActor`` runs in this process, on an event loop of its own as a Ray actor would,
with a recording ``KafkaClients`` in place of Kafka (byte stages, headers, strategies, size
checks, the delay envelope). A delayed message is read back from its envelope and turned
into the final record the republisher would write, so ``.published`` shows the records
consumers would read. ``delivered`` then applies the republisher's rules for due times,
cancel and replace, without waiting.

``await producer.publish(...)`` needs no Ray at all. ``producer.publish.remote(...)``
returns an ObjectRef, as the real handle does, so it needs Ray: a local one starts on first
use, as with any Ray call (or call ``ray.init()`` once in your test session). A call that
fails raises where the real one raises: validation at the call, the actor's errors (such as
``RecordTooLargeError``) from ``ray.get`` or ``await``.

A TestProducer records in the process that made it: it does not pickle, so it cannot be
passed to Ray tasks or actors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

import ray

from ._handle import ProducerHandle
from ._kafka import (
    KafkaAdmin,
    KafkaConsumer,
    KafkaProducer,
    NoTransactions,
    RecordMetadata,
    TopicPartition,
)
from .actors.producer import ProducerActor
from .envelope import decode as decode_envelope
from .errors import ProducerClosedError
from .messages import (
    MessageHeaders,
    MessagePriority,
    PublishingOutcome,
    PublishRequest,
)
from .pipeline import decode_record
from .republisher.schedule import plan
from .settings import MessagingSettings
from .strategies import OutgoingRecord, delivered_record, envelope_keys

__all__ = ["PublishedMessage", "TestProducer"]

Clock = Callable[[], float]
When = dt.datetime | float | int


@dataclass(frozen=True, slots=True)
class PublishedMessage:
    """One accepted message, as consumers of its final topic would read it."""

    topic: str
    """The topic the final record is written to (``<topic>.high`` / ``.low`` with
    ``priority_topics``)."""
    key: bytes | None
    """The record key, as consumers read it (a ``str`` key is UTF-8 encoded)."""
    value: Any
    """The payload decoded back through ``decode_record``: a JSON payload as dicts and
    lists, text as ``str``, bytes as ``bytes``."""
    headers: MessageHeaders
    """The final record's headers: yours, the captured context, and athomic's own."""
    message_id: str
    priority: MessagePriority
    deliver_at: dt.datetime | None
    """When a delayed message is due (aware, UTC, to the millisecond as on the wire);
    None for a direct one."""
    published_at: dt.datetime
    """When ``publish`` was called (aware, UTC)."""
    outcome: PublishingOutcome
    raw: bytes | None
    """The record value as written: after the byte stages (compression, encryption)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    message: PublishedMessage
    published: float
    due: float
    """When it reaches its final topic if nothing stops it (epoch seconds)."""
    scheduled: bool
    """Delayed with a caller-chosen id: subject to cancel, replace and once-per-id."""


@dataclass(frozen=True, slots=True)
class _Cancel:
    seq: int
    message_id: str
    at: float


class _Appended(NamedTuple):
    offset: int


class _Batch:
    """A record batch of the recorder (aiokafka's BatchBuilder, never full)."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None, Any]] = []

    def append(self, *, timestamp: float | None, key: bytes | None, value: bytes | None,
               headers: Any = ()) -> _Appended:
        self.records.append((key, value, headers))
        return _Appended(len(self.records) - 1)


class _Recorder(NoTransactions):
    """A Kafka producer (the ``KafkaProducer`` protocol) that keeps what it is sent and
    acknowledges it at once."""

    no_transactions = "the test mode records publishes; it has no transactions"

    def __init__(self) -> None:
        self.sent: list[OutgoingRecord] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: list[tuple[str, bytes]] | None = None
                   ) -> asyncio.Future[RecordMetadata]:
        offset = len(self.sent)
        self.sent.append(OutgoingRecord(topic, key, value, list(headers or ())))
        stamp = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        ack: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        ack.set_result(RecordMetadata(topic, 0, TopicPartition(topic, 0), offset, stamp, 0, 0))
        return ack

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}  # one partition: records are kept in the order they were published

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int
                         ) -> asyncio.Future[RecordMetadata]:
        base = len(self.sent)
        self.sent.extend(OutgoingRecord(topic, key, value, list(headers or ()))
                         for key, value, headers in batch.records)
        ack: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        ack.set_result(RecordMetadata(topic, partition, TopicPartition(topic, partition),
                                      base, time.time_ns() // 1_000_000, 0, 0))
        return ack


class _RecordingClients:
    """``KafkaClients`` whose producer is the recorder; there is nothing to consume."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def producer(self, **options: Any) -> KafkaProducer:
        return self.recorder

    def consumer(self, **options: Any) -> KafkaConsumer:
        raise NotImplementedError("the test mode records publishes; it has no consumer")

    def admin(self, **options: Any) -> KafkaAdmin:
        raise NotImplementedError("the test mode records publishes; it has no admin client")


class _ActorLoop:
    """An event loop in a daemon thread, where the in-process ProducerActor runs (a Ray
    actor has its own loop too): calls from threads and from any event loop meet there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="athomic-test-producer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not threading.current_thread():
            self._thread.join(10)


@ray.remote(num_cpus=0, max_retries=0)
def _failed(error: BaseException) -> None:
    """Raises ``error`` so that ``ray.get`` raises it as it would an actor's error."""
    raise error


async def _value(result: Any) -> Any:
    return result


def _epoch(when: When) -> float:
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            raise ValueError("at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return when.timestamp()
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ValueError(f"at must be an aware datetime or epoch seconds, got {when!r}")
    return float(when)


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


class TestProducer(ProducerHandle):
    """A ``ProducerHandle`` that records instead of sending: for users' unit tests.

    ``settings`` are those of the code under test (default: ``MessagingSettings()``); the
    same settings give the same records, headers and errors as the real handle:
    ``InvalidTopicError``, ``InvalidDelayError``, ``SerializationError``,
    ``RecordTooLargeError``, ``NotImplementedError`` for a delay without ``delay_topics``.
    ``clock`` (epoch seconds; default ``time.time``) fixes publish and cancel times, so a
    test can place a cancel before or after a due time without sleeping.

    Use it as a context manager, or call ``close()``, to stop its event loop thread.
    """

    __test__ = False  # a library class, not a pytest test class

    def __init__(self, settings: MessagingSettings | None = None, *,
                 clock: Clock | None = None) -> None:
        settings = settings if settings is not None else MessagingSettings()
        self._recorder = _Recorder()
        # One send per record, so the recorder sees a call's records in call order.
        self._actor = ProducerActor(settings, clients=_RecordingClients(self._recorder),
                                    batch_from=sys.maxsize)
        self._clock = clock
        self._keys = envelope_keys(settings)
        self._delay_topics = frozenset(settings.delay_topics.values())
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._cancels: list[_Cancel] = []
        self._seq = 0
        self._closed = False
        self._calls: asyncio.Lock | None = None
        self._loop = _ActorLoop()
        self._finalizer = weakref.finalize(self, self._loop.stop)
        super().__init__(settings, {"normal": [self._actor]})

    def __reduce__(self) -> Any:
        raise TypeError("a TestProducer records in the process that made it and cannot be "
                        "sent to Ray tasks or actors; test such code with the real handle")

    def __repr__(self) -> str:
        return (f"TestProducer(connection={self.settings.connection_name!r}, "
                f"published={len(self._entries)})")

    def __enter__(self) -> TestProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the in-process actor and its event loop thread. Idempotent; what was
        recorded stays readable."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.submit(self._actor.stop()).result(30)
        finally:
            self._finalizer()

    # --- what was published ----------------------------------------------------------------
    @property
    def published(self) -> list[PublishedMessage]:
        """Every accepted message, in the order it was accepted."""
        with self._lock:
            return [e.message for e in self._entries]

    @property
    def cancelled(self) -> list[str]:
        """The message ids passed to ``cancel``, in order."""
        with self._lock:
            return [c.message_id for c in self._cancels]

    def delivered(self, at: When | None = None, *, topic: str | None = None
                  ) -> list[PublishedMessage]:
        """What reaches final topics by ``at`` (an aware datetime or epoch seconds;
        default: now), in the order it would be delivered: by due time, then in publish
        order (so a key keeps its order).

        A direct message is delivered when published, a delayed one at its ``deliver_at``.
        For a delayed message with a caller-chosen ``message_id``, as the republisher
        decides: a cancel, or a publish with the same id, made before its due time means it
        is not delivered (a replacement is delivered at its own time); one made after has no
        effect; and an id is delivered once. A direct publish is delivered whatever its id.
        ``topic`` keeps only that final topic's messages.
        """
        until = self._now() if at is None else _epoch(at)
        with self._lock:
            entries, cancels = list(self._entries), list(self._cancels)
        out = [e for e in entries if not e.scheduled and e.due <= until]
        out += _released(entries, cancels, until)
        out.sort(key=lambda e: (e.due, e.seq))
        return [e.message for e in out if topic is None or e.message.topic == topic]

    def clear(self) -> None:
        """Forget what was published and cancelled (the settings and clock stay)."""
        with self._lock:
            self._entries.clear()
            self._cancels.clear()

    # --- the handle's hooks ----------------------------------------------------------------
    def _now(self) -> float:
        return time.time() if self._clock is None else self._clock()

    def _lane(self, priority: MessagePriority) -> str:
        # One in-process actor serves every priority: there is no queue to jump here, and a
        # batch then stays one call (the real handle merges split batches in a Ray task).
        return "normal"

    def _request(self, *args: Any, now: float | None = None, **kwargs: Any
                 ) -> PublishRequest:
        if self._clock is not None:
            now = self._clock()
        return super()._request(*args, now=now, **kwargs)

    def _submit(self, loop: asyncio.AbstractEventLoop | None, lane: str, method: str,
                payload: Any, count: int) -> Any:
        if self._closed:
            raise ProducerClosedError("this TestProducer has been closed")
        at = self._now()
        future = self._loop.submit(self._call(method, payload, at))
        if loop is None:
            try:
                return ray.put(future.result())
            except Exception as exc:
                return _failed.remote(exc)

        async def submitted() -> Any:
            return _value(await asyncio.wrap_future(future))

        return submitted()

    async def _call(self, method: str, payload: Any, at: float) -> Any:
        """Runs on the actor's loop, one call at a time, so the records a call sent are
        the ones between its start and its end."""
        if self._calls is None:
            self._calls = asyncio.Lock()
        async with self._calls:
            sent = self._recorder.sent
            start = len(sent)
            try:
                result = await getattr(self._actor, method)(payload)
                if method == "cancel":
                    self._record_cancel(payload, at)
                else:
                    requests = [payload] if method == "publish" else payload
                    outcomes = [result] if method == "publish" else result
                    self._record(requests, outcomes, sent[start:])
                return result
            finally:
                del sent[start:]

    def _record(self, requests: Sequence[PublishRequest],
                outcomes: Sequence[PublishingOutcome], sent: Iterable[OutgoingRecord]
                ) -> None:
        ids_topic = self.settings.ids_topic
        records = [r for r in sent if r.topic != ids_topic]
        entries = [self._entry(request, outcome, record) for request, outcome, record
                   in zip(requests, outcomes, records, strict=True)]
        with self._lock:
            for entry in entries:
                self._entries.append(dataclasses.replace(entry, seq=self._seq))
                self._seq += 1

    def _entry(self, request: PublishRequest, outcome: PublishingOutcome,
               record: OutgoingRecord) -> _Entry:
        due, deliver_at, scheduled = request.published_at, None, False
        if record.topic in self._delay_topics:
            # What the republisher does with it: read the envelope, write the final record
            # (with the hop count of the planned path through the buckets).
            env = decode_envelope(record.value or b"", self._keys)
            hops = plan(self._buckets, env.published_ms, env.deliver_at_ms,
                        self.settings.republisher.near_window_s).hops
            record = delivered_record(env.moved(hop=hops, hold_until_ms=env.hold_until_ms))
            due, scheduled = env.deliver_at_ms / 1000, env.caller_id
            deliver_at = _utc(due)
        message = PublishedMessage(
            topic=record.topic, key=record.key, value=decode_record(record, self.settings),
            headers=MessageHeaders(record.headers), message_id=request.message_id,
            priority=request.priority, deliver_at=deliver_at,
            published_at=_utc(request.published_at), outcome=outcome, raw=record.value)
        return _Entry(0, message, request.published_at, due, scheduled)

    def _record_cancel(self, message_id: str, at: float) -> None:
        with self._lock:
            self._cancels.append(_Cancel(self._seq, message_id, at))
            self._seq += 1


def _released(entries: list[_Entry], cancels: list[_Cancel], until: float) -> list[_Entry]:
    """The delayed messages with caller-chosen ids delivered by ``until``: at its due time,
    a version is released when it is still the latest publish of its id, was not cancelled
    since, and no version of the id was released before (the republisher's verdict, with
    what happened before the due time)."""
    versions: dict[str, list[_Entry]] = {}
    for e in entries:
        if e.scheduled:
            versions.setdefault(e.message.message_id, []).append(e)
    out = []
    for message_id, publishes in versions.items():
        stops = [c for c in cancels if c.message_id == message_id]
        for version in sorted(publishes, key=lambda e: (e.due, e.seq)):
            if version.due > until:
                break
            before = [p for p in publishes if p.published < version.due]
            if before[-1] is not version:
                continue  # replaced before it was due
            if any(c.seq > version.seq and c.at < version.due for c in stops):
                continue  # cancelled before it was due
            out.append(version)
            break  # an id is released once
    return out
