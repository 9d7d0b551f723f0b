"""ProducerActor: its aiokafka producers, the pipeline, and the publishing strategies.

A plain class (testable without Ray); ``athomic.actors.topology`` makes it a Ray actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from athomic._kafka import (
    AIOKAFKA,
    BATCH_FROM,
    Batching,
    KafkaClients,
    KafkaProducer,
    PartitionedProducer,
    acked_all,
    futures_of,
    kafka_error_name,
    send_batched,
    too_large,
    translate,
    wait_quietly,
)
from athomic._process import gc_stats, lower_priority, settle_gc
from athomic.envelope import CANCELLED, SCHEDULED, IdEvent, encode_id_event
from athomic.errors import (
    AthomicError,
    MessagingConnectionError,
    ProducerClosedError,
    PublishError,
    RecordTooLargeError,
)
from athomic.messages import (
    CancelOutcome,
    Outcomes,
    PublishingOutcome,
    PublishRequest,
    validate_message_id,
)
from athomic.pipeline import Encoded, EncodeItem, Pipeline, SegmentObserver
from athomic.settings import MessagingSettings
from athomic.strategies import (
    DelayedPublishStrategy,
    DirectPublishStrategy,
    HeaderMemo,
    OutgoingRecord,
    PublishingStrategy,
    envelope_keys,
    ms_ceil,
    physical_topic,
)
from athomic.telemetry import PublishRecorder, Telemetry

from .stage import StagePool

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _refused_in_batches(sent: list[Any], futures: dict[int, asyncio.Future[Any]]
                        ) -> list[int]:
    """Indices of records refused as too large together with others (one batch)."""
    refused = {key for key, future in futures.items()
               if future.done() and future.exception() is not None
               and too_large(future.exception())}  # type: ignore[arg-type]
    if not refused:
        return []
    members: dict[int, int] = {}
    for item in sent:
        if isinstance(item, tuple) and id(item[0]) in refused:
            members[id(item[0])] = members.get(id(item[0]), 0) + 1
    return [i for i, item in enumerate(sent)
            if isinstance(item, tuple) and members.get(id(item[0]), 0) > 1]


class ProducerActor:
    """Publishes messages to Kafka through idempotent aiokafka producers: one per
    connection (``producer.connections``), partition ``p`` always through the same one.

    Guarantees: ``publish`` returns only after the broker acknowledged the record (acks=all
    by default); a failure raises ``PublishError`` / ``MessagingConnectionError``. Every
    message is encoded and size-checked before any byte is sent, so a bad message in a batch
    leaves the whole batch unsent. Idempotency: the message id is fixed by the caller, so
    a call retried after an actor restart resends the same message (at-least-once, with a
    stable id to deduplicate on).
    """

    def __init__(self, settings: MessagingSettings, lane: str = "normal",
                 index: int = 0, stage_actors: Sequence[Any] | None = None, *,
                 clients: KafkaClients = AIOKAFKA, batch_from: int = BATCH_FROM,
                 nice: int = 0, own_process: bool = False) -> None:
        if nice:  # a bulk lane's actor process: the HIGH lane's actors get the CPU first
            lower_priority(nice)
        self.settings = settings
        self.clients = clients
        self.batch_from = batch_from
        """Calls with this many records or more send them as record batches, one per
        partition (records of different partitions are then not sent in call order)."""
        self.lane = lane
        self.index = index
        self.pipeline = Pipeline.from_settings(settings)
        # Stages placed on actors run on this pool; without one (a plain ProducerActor in
        # a unit test) every stage runs inline.
        self.stage_pool = StagePool(stage_actors) if stage_actors else None
        self.direct = DirectPublishStrategy()
        self._keys = envelope_keys(settings)
        self.delayed = (DelayedPublishStrategy(settings, self._keys)
                        if settings.delay_topics else None)
        self._batching = Batching()
        self._final_topics: set[str] = set()
        """Final topics known to exist (a delayed message's is checked before it waits)."""
        self._producer: KafkaProducer | None = None
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._fingerprint = settings.fingerprint()
        # Spans and metrics live in this process; the trace context came with each request.
        self.telemetry = Telemetry.from_settings(settings)
        self._sent = 0
        self._failed = 0
        if own_process:  # a Ray actor: the process is this actor's alone
            settle_gc()

    # --- lifecycle ---------------------------------------------------------------------
    async def _ensure_started(self) -> KafkaProducer:
        if self._closed:
            raise ProducerClosedError("this producer has been shut down")
        if self._producer is not None:
            return self._producer
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._producer is None:
                self._producer = await self._start_producer()
        return self._producer

    async def _start_producer(self) -> KafkaProducer:
        tuning = self.settings.producer
        producers = [self.clients.producer(
            **self.settings.kafka_client_options(),
            acks=tuning.acks,
            enable_idempotence=tuning.enable_idempotence,
            linger_ms=tuning.linger_ms,
            max_batch_size=tuning.max_batch_size,
            max_request_size=tuning.max_request_size,
            compression_type=tuning.compression_type,
        ) for _ in range(tuning.connections)]
        producer = producers[0] if len(producers) == 1 else PartitionedProducer(producers)
        try:
            await asyncio.wait_for(producer.start(), tuning.connect_timeout_s)
        except BaseException as exc:
            await _quietly_stop(producer)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise MessagingConnectionError(
                f"cannot reach the Kafka brokers at {self.settings.bootstrap_servers} within "
                f"{tuning.connect_timeout_s}s: {type(exc).__name__}: {exc}") from None
        return producer

    async def stop(self) -> None:
        """Flush what is pending, then close the Kafka producer and export the telemetry
        still held. Idempotent."""
        self._closed = True
        producer, self._producer = self._producer, None
        try:
            if producer is not None:
                try:
                    await asyncio.wait_for(
                        producer.flush(), self.settings.producer.delivery_timeout_ms / 1000)
                except asyncio.TimeoutError:
                    pass  # what could not be delivered was already reported as PublishError
                finally:
                    await producer.stop()
        finally:
            await asyncio.to_thread(self.telemetry.shutdown)

    async def flush_telemetry(self) -> None:
        """Export the spans and metrics this actor holds now (with an exporter set)."""
        await asyncio.to_thread(self.telemetry.flush)

    # --- publishing --------------------------------------------------------------------
    def strategy_for(self, request: PublishRequest, now: float) -> PublishingStrategy:
        """Delayed when the caller asked for a due time, even one already past by now (a
        backlog, a call Ray retried): the republisher then releases it at once, and only
        once whatever the copies; direct otherwise."""
        if request.deliver_at is not None:
            if self.delayed is None:
                raise NotImplementedError(
                    "delayed publishing is not configured: set delay_topics")
            return self.delayed
        return self.direct

    def topics(self, requests: Sequence[PublishRequest]) -> list[str]:
        """Each request's physical topic (``<topic>.high`` / ``.low`` with priority
        topics), computed once per call: the pipeline binds to it, the strategies write to
        it, the spans name it."""
        if not self.settings.priority_topics:  # every message to its own topic
            return [r.topic for r in requests]
        return [physical_topic(r.topic, r.priority, True) for r in requests]

    async def prepare(self, requests: Sequence[PublishRequest], topics: Sequence[str], *,
                      observe: SegmentObserver | None = None
                      ) -> list[tuple[OutgoingRecord, PublishingOutcome]]:
        """Encode and check every request; raises before anything is sent.

        The whole batch is encoded in one ``encode_batch`` call (one StageActor call per
        replica when stages are placed on actors), bound to each message's final topic.
        ``observe`` wraps each run of stages (pipeline spans)."""
        limit = self.settings.producer.max_request_size
        if not self.pipeline.stages and all(r.deliver_at is None for r in requests):
            # direct, and no byte stage: each serialised value is its record's value
            records = self.direct.build_all(requests, topics)
            if max(map(OutgoingRecord.size, records), default=0) > limit:
                for i, record in enumerate(records):
                    if record.size() > limit:
                        _too_large(record, limit, i if len(requests) > 1 else None)
            return list(zip(records, itertools.repeat(self.direct.outcome), strict=False))
        encoded: list[Encoded]
        if self.pipeline.stages:
            items = [EncodeItem(r.value, topic, r.key, r.message_id, r.content_type or "")
                     for r, topic in zip(requests, topics, strict=True)]
            encoded = await self.pipeline.encode_batch(items, self.stage_pool,
                                                       observe=observe)
        else:  # no byte stages: the serialised bytes are the record's value
            encoded = [Encoded(r.value, []) for r in requests]
        waiting = {t for r, t in zip(requests, topics, strict=True)
                   if r.deliver_at is not None and t not in self._final_topics}
        if waiting:
            await self._check_final_topics(waiting)
        prepared = []
        now = time.time()
        memo: HeaderMemo = {}
        for i, (request, enc) in enumerate(zip(requests, encoded, strict=True)):
            index = i if len(requests) > 1 else None
            strategy = self.strategy_for(request, now)
            try:
                record = strategy.build(request, enc, topics[i], memo=memo)
            except AthomicError as exc:
                if index is not None:
                    exc.at_index(index)
                raise
            if record.size() > limit:
                _too_large(record, limit, index)
            prepared.append((record, strategy.outcome))
        return prepared

    async def _check_final_topics(self, topics: set[str]) -> None:
        """A delayed message's final topic must exist (or be created, with the brokers'
        auto-create) when it is published, as a direct publish's must: PublishError
        now, not a dead letter later. Known topics are not asked again."""
        producer = await self._ensure_started()
        for topic in sorted(topics):
            try:
                await asyncio.wait_for(producer.partitions_for(topic),
                                       self.settings.producer.delivery_timeout_ms / 1000)
            except Exception as exc:
                raise translate(exc, topic=topic) from None
            self._final_topics.add(topic)

    async def _deliver(self, prepared: list[tuple[OutgoingRecord, PublishingOutcome]],
                       requests: Sequence[PublishRequest], recorder: PublishRecorder
                       ) -> list[Any]:
        """Send every record, then await every acknowledgement within the delivery timeout
        (an idempotent aiokafka producer would otherwise retry a lost quorum forever).
        Returns, per record, its metadata (``partition``, ``offset``) or the exception it
        failed with."""
        producer = await self._ensure_started()
        timeout = self.settings.producer.delivery_timeout_ms / 1000
        start = asyncio.get_running_loop().time()
        records = [record for record, _ in prepared]
        with recorder.sending() as current:
            if len(records) >= self.batch_from:
                sent = await self._send_batches(producer, records, current)
                futures = futures_of(sent)
                await self._await_acks(futures, start, timeout)
                # Kafka applies max.message.bytes to a record batch: records refused with
                # others as one batch too large go again, each alone, so each is judged
                # by its own size.
                again = _refused_in_batches(sent, futures)
                if again:
                    resent = await send_batched(
                        producer, [(records[i].topic, records[i].key, records[i].value,
                                    records[i].headers) for i in again],
                        self._batching, lambda j: current(again[j]), per_batch=1)
                    for i, item in zip(again, resent, strict=True):
                        sent[i] = item
                    futures = futures_of(sent)
            else:
                sent = await self._send_each(producer, records, current)
                futures = futures_of(sent)
        acknowledged = await self._await_acks(futures, start, timeout)
        results = acked_all(sent, None if acknowledged else asyncio.TimeoutError(
            f"not acknowledged within delivery_timeout_ms="
            f"{self.settings.producer.delivery_timeout_ms}"), offsets=recorder.offsets)
        # A delayed message with a caller-chosen id: every republisher learns which
        # publish of the id is the one to deliver (a later one replaces it).
        scheduled = [i for i, (request, result) in enumerate(zip(requests, results,
                                                                   strict=True))
                     if request.version is not None and request.deliver_at is not None
                     and prepared[i][1] is PublishingOutcome.SUCCESS_DELAYED
                     and not isinstance(result, BaseException)
                     ] if any(r.version is not None for r in requests) else ()
        if scheduled:
            now = now_ms()
            events = [(requests[i].message_id,
                       IdEvent(SCHEDULED, now, ms_ceil(requests[i].deliver_at or 0),
                               requests[i].version or b"")) for i in scheduled]
            left = timeout - (asyncio.get_running_loop().time() - start)
            for i, error in zip(scheduled, await self._record_ids(events, left),
                                strict=True):
                if error is not None:
                    results[i] = error
        return results

    @staticmethod
    async def _await_acks(futures: dict[int, asyncio.Future[Any]], start: float,
                          timeout: float) -> bool:
        """Wait for the futures until the delivery timeout; whether all are done."""
        waiting = [f for f in futures.values() if not f.done()]
        if not waiting:
            return True
        # never cancelled: a record still pending at the deadline stays with the
        # producer, which may yet deliver it; only our wait ends.
        remaining = timeout - (asyncio.get_running_loop().time() - start)
        await wait_quietly(waiting, max(remaining, 0.001))
        return all(f.done() for f in waiting)

    @staticmethod
    async def _send_each(producer: KafkaProducer, records: Sequence[OutgoingRecord],
                         current: Callable[[int], None]) -> list[Any]:
        """``send()`` per record: per record, ``(future, None)`` or the error it raised."""
        sent: list[Any] = []
        for i, record in enumerate(records):
            current(i)  # the record's span is current while the client sends it
            try:  # send() waits on its own bounded timeouts (metadata, buffer space)
                sent.append((await producer.send(record.topic, record.value, key=record.key,
                                                 headers=record.headers), None))
            except Exception as exc:  # e.g. metadata timeout for an unknown topic
                sent.append(exc)
        return sent

    async def _send_batches(self, producer: KafkaProducer,
                            records: Sequence[OutgoingRecord],
                            current: Callable[[int], None]) -> list[Any]:
        """The records as one record batch per partition (see ``send_batched``)."""
        return await send_batched(
            producer, [(r.topic, r.key, r.value, r.headers) for r in records],
            self._batching, current)

    async def publish(self, request: PublishRequest | list[Any]) -> PublishingOutcome:
        """Publish one message; returns once the broker acknowledged it. ``request`` is a
        PublishRequest or, as a handle sends it, its ``wire()`` list."""
        requests = [PublishRequest.from_wire(request) if isinstance(request, list)
                    else request]
        topics = self.topics(requests)
        recorder = self.telemetry.publishing(requests, topics, batch=False)
        try:
            prepared = await self.prepare(requests, topics, observe=recorder.observe)
            (result,) = await self._deliver(prepared, requests, recorder)
        except BaseException as exc:
            recorder.abort(exc)
            raise
        if isinstance(result, BaseException):
            self._failed += 1
            error = translate(result, topic=prepared[0][0].topic)
            recorder.done(prepared, [error])
            raise error
        self._sent += 1
        recorder.done(prepared, [result])
        return prepared[0][1]

    async def publish_batch(self, requests: list[PublishRequest]) -> list[PublishingOutcome]:
        """Publish many messages: send all, then await all acknowledgements.

        If some fail, raises PublishError whose ``outcomes`` tells which were acknowledged.
        """
        if not requests:
            return []
        topics = self.topics(requests)
        recorder = self.telemetry.publishing(requests, topics, batch=True)
        try:
            prepared = await self.prepare(requests, topics, observe=recorder.observe)
            results = await self._deliver(prepared, requests, recorder)
        except BaseException as exc:
            recorder.abort(exc)
            raise
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        outcomes: list[PublishingOutcome | None] = [outcome for _, outcome in prepared]
        for i in failed:
            results[i] = translate(results[i], topic=prepared[i][0].topic)
            outcomes[i] = None
        failures = {i: f"{kafka_error_name(results[i])}: {results[i]}" for i in failed}
        self._sent += len(requests) - len(failures)
        if failures:
            self._failed += len(failures)
            recorder.done(prepared, results)
            first = min(failures)
            raise PublishError(
                f"{len(failures)} of {len(requests)} messages were not acknowledged; "
                f"first (#{first}): {results[first]}", topic=prepared[first][0].topic,
                failures=failures, outcomes=outcomes) from None
        recorder.done(prepared, results)
        return Outcomes(outcomes)  # type: ignore[return-value]  # all acknowledged: no None

    async def _record_ids(self, events: list[tuple[str, IdEvent]], timeout: float
                          ) -> list[BaseException | None]:
        """Write events to the ids topic; per event, None once acknowledged, else the
        error."""
        producer = await self._ensure_started()
        topic = self.settings.ids_topic
        futures: list[asyncio.Future[Any] | BaseException] = []
        for message_id, event in events:
            try:
                futures.append(await producer.send(
                    topic, encode_id_event(message_id, event, self._keys),
                    key=message_id.encode()))
            except Exception as exc:
                futures.append(exc)
        waiting = [f for f in futures if not isinstance(f, BaseException)]
        if waiting:
            await wait_quietly(waiting, max(timeout, 0.001))
        out: list[BaseException | None] = []
        for fut in futures:
            if isinstance(fut, BaseException):
                out.append(translate(fut, topic=topic))
            elif not fut.done():
                out.append(PublishError(f"no acknowledgement for {topic!r} in time",
                                        topic=topic))
            else:
                error = fut.exception()
                out.append(None if error is None else translate(error, topic=topic))
        return out

    async def cancel(self, message_id: str) -> CancelOutcome:
        """Record that ``message_id`` must not be delivered; returns once the brokers
        acknowledged it. A delayed message with that id still pending at its due time is
        then never delivered (a copy already delivered stays delivered)."""
        validate_message_id(message_id)
        if not self.settings.delay_topics:
            raise NotImplementedError("cancel needs delayed publishing: set delay_topics")
        timeout = self.settings.producer.delivery_timeout_ms / 1000
        (error,) = await self._record_ids([(message_id, IdEvent(CANCELLED, now_ms()))],
                                          timeout)
        if error is not None:
            raise error
        return CancelOutcome.RECORDED

    # --- introspection -----------------------------------------------------------------
    async def fingerprint(self) -> str:
        return self._fingerprint

    async def stats(self) -> dict[str, Any]:
        import ray

        actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        return {"lane": self.lane, "index": self.index, "sent": self._sent,
                "pid": os.getpid(), "actor_id": actor_id, "niceness": os.nice(0),
                "failed": self._failed, "started": self._producer is not None,
                "time": time.time(), **gc_stats()}


def _too_large(record: OutgoingRecord, limit: int, index: int | None) -> NoReturn:
    """Raise RecordTooLargeError for a record over ``producer.max_request_size``
    (``index``: its position in the call's batch), before anything of the call is sent."""
    size = record.size()
    raise RecordTooLargeError(
        f"record for {record.topic!r} is {size} bytes, over "
        f"producer.max_request_size={limit}", size=size, limit=limit, index=index)


async def _quietly_stop(producer: KafkaProducer) -> None:
    # It already failed to start; a second error here adds nothing.
    with contextlib.suppress(Exception):
        await producer.stop()
