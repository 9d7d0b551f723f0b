"""The republish loop of one delay topic: consume, wait until due, republish exactly once.

One ``BucketRepublisher`` serves the partitions of one delay topic assigned to its replica
(partition ``p`` goes to replica ``p % replicas``). It reads with ``read_committed``; a
partition whose next message is not due within the near window is paused until it is (no
busy polling); read messages wait in a due-time heap. When due, a message moves on to a
shorter bucket or to its final topic, in ONE Kafka transaction together with the consumed
offsets, under a transactional id stable per (delay topic, replica): a restarted replica
fences its predecessor, and read_committed consumers see every message exactly once.

The committed offset of a partition is its lowest unpublished offset; messages published
out of offset order above it are named in the commit's metadata (``OffsetTracker``), so a
restart skips them instead of publishing them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError, ProducerFenced

from athomic import envelope
from athomic._kafka import (
    AIOKAFKA,
    KafkaClients,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from athomic.errors import ConfigurationError, MalformedEnvelopeError
from athomic.messages import H_ERROR, H_ERROR_SOURCE, MessageHeaders, MessagePriority
from athomic.settings import MessagingSettings
from athomic.strategies import delay_headers, delivered_record
from athomic.telemetry import RepublishSpan, Telemetry

from .schedule import (
    FINAL,
    MAX_METADATA,
    Cascade,
    DueHeap,
    LatenessStats,
    OffsetTracker,
    next_step,
)
from .topics import ensure_topics, open_admin

log = logging.getLogger("athomic.republisher")

_PRIORITY_RANK = {MessagePriority.HIGH: 0, MessagePriority.NORMAL: 1, MessagePriority.LOW: 2}
CASCADE, DEAD_LETTER = "cascade", "dead_letter"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Held:
    """A message read from the delay topic and not yet republished."""

    tp: TopicPartition
    offset: int
    release_ms: int
    action: str  # CASCADE, FINAL or DEAD_LETTER
    env: envelope.Envelope | None
    cascade: Cascade | None = None
    record: Any = None  # the raw record, kept only for the dead-letter path
    error: str | None = None
    attempts: int = 0

    @property
    def rank(self) -> int:
        return _PRIORITY_RANK[self.env.priority] if self.env else 1


class Fenced(Exception):
    """Raised when a newer instance of this replica took over its transactional id."""


class BucketRepublisher:
    """Republishes the messages of one delay topic (the partitions of one replica)."""

    def __init__(self, settings: MessagingSettings, topic: str, replica: int = 0,
                 replicas: int = 1, *, clients: KafkaClients = AIOKAFKA) -> None:
        by_topic = {t: b for b, t in settings.delay_topics.items()}
        if topic not in by_topic:
            raise ConfigurationError(f"{topic!r} is not one of the delay topics")
        self.settings = settings
        self.clients = clients
        self.topic = topic
        self.bucket_s = by_topic[topic]
        self.replica = replica
        self.replicas = replicas
        self.buckets = sorted(settings.delay_topics)
        rep = settings.republisher
        self.group_id = settings.republisher_group
        self.transactional_id = (f"athomic.{settings.connection_name}.{topic}."
                                 f"{replica}of{replicas}")
        # The smallest bucket also holds messages due sooner than the bucket itself, so it
        # reads its whole length ahead: nothing queues behind a later head there.
        smallest = self.bucket_s == self.buckets[0]
        self.read_ahead_ms = round(1000 * (max(rep.near_window_s, self.bucket_s)
                                           if smallest else rep.near_window_s))
        self.near_window_s = rep.near_window_s
        self.keys = envelope.envelope_keys(settings.pipeline)
        self.heap: DueHeap[Held] = DueHeap()
        self.trackers: dict[TopicPartition, OffsetTracker] = {}
        self.wake_at: dict[TopicPartition, int] = {}
        self.lateness = LatenessStats()
        self.telemetry = Telemetry.from_settings(settings)
        self.counts = {FINAL: 0, CASCADE: 0, DEAD_LETTER: 0, "skipped": 0, "aborted": 0}
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.running = False
        self._stopping = False
        self._backoff_s = 0.1
        self._next_txn_ms = 0

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Ensure topics, fence any predecessor, and resume from the committed progress."""
        settings = self.settings
        partitions = await ensure_topics(settings, settings.delay_topics,
                                         clients=self.clients)
        options = settings.kafka_client_options()
        self.producer = self.clients.producer(
            **options, transactional_id=self.transactional_id, enable_idempotence=True,
            acks="all", linger_ms=0, max_batch_size=settings.producer.max_batch_size,
            max_request_size=settings.producer.max_request_size + 64 * 1024,
            transaction_timeout_ms=settings.republisher.transaction_timeout_ms)
        # Starting the producer fences a previous instance of this replica and completes
        # or aborts its open transaction, so the offsets read next are settled.
        await self.producer.start()
        mine = [TopicPartition(self.topic, p) for p in range(partitions[self.topic])
                if p % self.replicas == self.replica]
        committed = await self._committed(mine)
        self.consumer = self.clients.consumer(
            **options, group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest",
            fetch_max_wait_ms=50, max_partition_fetch_bytes=4 * 1024 * 1024)
        await self.consumer.start()
        self.consumer.assign(mine)
        beginning = await self.consumer.beginning_offsets(mine) if mine else {}
        for tp in mine:
            offset, metadata = committed.get(tp, (-1, ""))
            start = offset if offset >= 0 else beginning[tp]
            self.consumer.seek(tp, start)
            self.trackers[tp] = OffsetTracker.from_commit(start, metadata)
        self.running = True
        log.info("republisher %s replica %d/%d started on partitions %s", self.topic,
                 self.replica, self.replicas, [tp.partition for tp in mine])

    async def _committed(self, tps: list[TopicPartition]) -> dict[TopicPartition,
                                                                   tuple[int, str]]:
        if not tps:
            return {}
        admin = await open_admin(self.settings, self.clients)
        try:
            return await admin.committed(self.group_id, tps)
        finally:
            await admin.close()

    async def close(self) -> None:
        self.running = False
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = self.producer = None
        if len(self.heap):  # dropped here, read again from the committed progress
            self.telemetry.add_delayed_held(-len(self.heap), delay_topic=self.topic)
        self.heap = DueHeap()
        self.trackers.clear()
        self.wake_at.clear()

    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until ``stop()``; raises Fenced when another instance took over."""
        assert self.consumer is not None
        linger = self.settings.republisher.linger_ms
        while not self._stopping:
            now = now_ms()
            if now >= self._next_txn_ms:
                due = self.heap.pop_due(now, self.settings.republisher.max_batch)
                if due:
                    self._next_txn_ms = now + linger
                    await self._republish(due)
                    continue
            self._wake(now)
            active = [tp for tp in self.trackers if tp not in self.consumer.paused()]
            wait_ms = 200
            next_due = self.heap.next_due()
            if next_due is not None:
                wait_ms = min(wait_ms, max(next_due, self._next_txn_ms) - now)
            if self.wake_at:
                wait_ms = min(wait_ms, min(self.wake_at.values()) - now)
            wait_ms = max(wait_ms, 0)
            if not active:
                await asyncio.sleep(wait_ms / 1000)
                continue
            batch = await self.consumer.getmany(*active, timeout_ms=wait_ms,
                                                max_records=self.settings.republisher.max_batch)
            now = now_ms()
            for tp, records in batch.items():
                self._ingest(tp, records, now)

    def _wake(self, now: int) -> None:
        assert self.consumer is not None
        for tp, when in list(self.wake_at.items()):
            if when <= now and len(self.heap) < self.settings.republisher.max_held:
                del self.wake_at[tp]
                self.consumer.resume(tp)

    def _pause(self, tp: TopicPartition, offset: int, wake_ms: int) -> None:
        """Stop reading ``tp`` at ``offset`` (re-read from there once awake)."""
        assert self.consumer is not None
        self.consumer.pause(tp)
        self.consumer.seek(tp, offset)
        self.wake_at[tp] = wake_ms

    def _ingest(self, tp: TopicPartition, records: list[Any], now: int) -> None:
        tracker = self.trackers.get(tp)
        if tracker is None:  # no longer ours
            return
        limit = self.settings.republisher.max_held
        held = len(self.heap)
        try:
            self._read(tp, tracker, records, now, limit)
        finally:
            self.telemetry.add_delayed_held(len(self.heap) - held, delay_topic=self.topic)

    def _read(self, tp: TopicPartition, tracker: OffsetTracker, records: list[Any],
              now: int, limit: int) -> None:
        for record in records:
            if tracker.is_done(record.offset):  # published before a restart: skip
                tracker.read(record.offset, done=True)
                self.counts["skipped"] += 1
                continue
            try:
                env = envelope.decode(record.value, self.keys)
            except MalformedEnvelopeError as exc:
                tracker.read(record.offset)
                self.heap.push(now, Held(tp, record.offset, now, DEAD_LETTER, None,
                                         record=record, error=str(exc)))
                continue
            if env.hold_until_ms > now + self.read_ahead_ms:
                self._pause(tp, record.offset, env.hold_until_ms - self.read_ahead_ms)
                return
            if len(self.heap) >= limit:  # memory bound: read on once the heap drains
                self._pause(tp, record.offset, now + 50)
                return
            tracker.read(record.offset)
            step = next_step(self.buckets, env.hold_until_ms, env.deliver_at_ms,
                             max(now, env.hold_until_ms), self.near_window_s)
            if isinstance(step, Cascade):
                self.heap.push(env.hold_until_ms,
                               Held(tp, record.offset, env.hold_until_ms, CASCADE, env, step))
            else:
                self.heap.push(env.deliver_at_ms,
                               Held(tp, record.offset, env.deliver_at_ms, FINAL, env))

    # --- republishing ----------------------------------------------------------------------
    def _outgoing(self, held: Held, span: RepublishSpan | None = None
                  ) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]:
        env = held.env
        if held.action == DEAD_LETTER or env is None:
            # The record as it was read (an undecodable one byte for byte), so it can be
            # inspected and replayed; the error and where it came from in headers.
            error = [(H_ERROR, (held.error or "unknown error").encode()[:1000]),
                     (H_ERROR_SOURCE, f"{held.tp.topic}/{held.tp.partition}/"
                                      f"{held.offset}".encode())]
            dlq = self.settings.republisher.dead_letter_topic
            if env is None:
                rec = held.record
                return dlq, rec.key, rec.value, [*(rec.headers or ()), *error]
            return dlq, env.key, envelope.encode(env, self.keys), [*delay_headers(env),
                                                                    *error]
        if held.action == CASCADE:
            assert held.cascade is not None
            nxt = env.next_hop(held.cascade.hold_until_ms)
            return (self.settings.delay_topics[held.cascade.bucket], env.key,
                    envelope.encode(nxt, self.keys), delay_headers(nxt))
        record = delivered_record(env)
        headers = record.headers
        if span is not None and span.trace_headers():
            # the republish span continues the caller's trace
            out = MessageHeaders(headers)
            span.inject(out)
            headers = out.to_kafka()
        return record.topic, record.key, record.value, headers

    def _plan_commit(self, due: list[Held]
                     ) -> tuple[list[Held], list[Held], dict[TopicPartition, OffsetAndMetadata]]:
        """What this transaction commits per partition, computed once. Messages that would
        make a commit's metadata too large (a rare, extreme backlog above a long-held
        message) are split off: they wait for the watermark to move."""
        by_tp: dict[TopicPartition, list[int]] = {}
        for h in due:
            by_tp.setdefault(h.tp, []).append(h.offset)
        deferred: set[tuple[TopicPartition, int]] = set()
        offsets = {}
        for tp, offs in by_tp.items():
            tracker = self.trackers[tp]
            offs.sort()
            point = tracker.commit_point(offs)
            if len(point[1]) > MAX_METADATA:
                # the longest prefix (lowest offsets first) that fits, by bisection
                lo, hi = 0, len(offs) - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if len(tracker.commit_point(offs[:mid])[1]) <= MAX_METADATA:
                        lo = mid
                    else:
                        hi = mid - 1
                deferred.update((tp, o) for o in offs[lo:])
                offs = offs[:lo]
                point = tracker.commit_point(offs)
            if offs:
                offsets[tp] = OffsetAndMetadata(*point)
        if not deferred:
            return due, [], offsets
        keep = [h for h in due if (h.tp, h.offset) not in deferred]
        return keep, [h for h in due if (h.tp, h.offset) in deferred], offsets

    async def _republish(self, due: list[Held]) -> None:
        assert self.producer is not None
        due, deferred, offsets = self._plan_commit(due)
        for h in deferred:
            h.release_ms = now_ms() + 100
            self.heap.push(h.release_ms, h)
        if not due:
            return
        # Many due at once: HIGH first, then by due time, keeping each partition's order.
        due.sort(key=lambda h: (h.rank, h.release_ms, h.offset))
        finishing: dict[TopicPartition, list[int]] = {}
        for h in due:
            finishing.setdefault(h.tp, []).append(h.offset)
        producer = self.producer
        failures: dict[int, BaseException] = {}
        spans: dict[int, RepublishSpan] = {}
        futures: list[Any] = []
        try:
            await producer.begin_transaction()
            for i, h in enumerate(due):
                span = None
                if h.action == FINAL and h.env is not None:
                    span = spans[i] = self.telemetry.start_republish(
                        h.env.topic, h.env.headers, message_id=h.env.message_id,
                        key=h.env.key, delay_topic=self.topic, hop=h.env.hop)
                topic, key, value, headers = self._outgoing(h, span)
                try:
                    futures.append(await producer.send(topic, value, key=key,
                                                       headers=headers))
                except KafkaError as exc:  # refused before sending (size, metadata)
                    failures[i] = exc
                    raise
            results = await asyncio.gather(*futures, return_exceptions=True)
            failures = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
            if failures:
                raise next(iter(failures.values()))
            await producer.send_offsets_to_transaction(offsets, self.group_id)
            await producer.commit_transaction()
        except ProducerFenced as exc:
            self._end_spans(spans, exc)
            raise Fenced(str(exc)) from exc
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            self._end_spans(spans, exc)
            await self._abort(due, failures, exc)
            return
        committed = now_ms()
        self._backoff_s = 0.1
        for tp, offs in finishing.items():
            self.trackers[tp].finish(offs)
        self.telemetry.add_delayed_held(-len(due), delay_topic=self.topic)
        for h in due:
            self.counts[h.action] += 1
            if h.action == FINAL and h.env is not None:
                late = (committed - h.env.deliver_at_ms) / 1000
                self.lateness.add(late)
                self.telemetry.record_lateness(late, delay_topic=self.topic,
                                               topic=h.env.topic)
            elif h.action == DEAD_LETTER:
                self.telemetry.record_dlq(
                    source_topic=self.topic,
                    error_type="MalformedEnvelopeError" if h.env is None else "PublishError")
        self._end_spans(spans, None, results)

    @staticmethod
    def _end_spans(spans: dict[int, RepublishSpan], error: BaseException | None,
                   results: list[Any] | None = None) -> None:
        for i, span in spans.items():
            if error is not None:
                span.failed(error)
            elif results is not None:
                span.acked(results[i].partition, results[i].offset)
            span.end()

    async def _abort(self, due: list[Held], failures: dict[int, BaseException],
                     exc: BaseException) -> None:
        """Nothing of the transaction is visible; every message goes back to the heap, to be
        retried with backoff. A message failing for a non-retriable reason goes to the
        dead-letter topic after ``max_attempts``."""
        assert self.producer is not None
        self.counts["aborted"] += 1
        self.telemetry.record_error(exc, operation="republish", topic=self.topic)
        log.warning("republish transaction of %d messages aborted: %r", len(due), exc)
        retry_at = now_ms() + round(self._backoff_s * 1000)
        self._backoff_s = min(self._backoff_s * 2, self.settings.republisher.retry_backoff_max_s)
        for i, h in enumerate(due):
            error = failures.get(i)
            if error is not None and not getattr(error, "retriable", True):
                h.attempts += 1
                if h.attempts >= self.settings.republisher.max_attempts:
                    h.action = DEAD_LETTER
                    h.error = f"not delivered after {h.attempts} attempts: {error!r}"
            h.release_ms = retry_at
            self.heap.push(retry_at, h)
        # If the abort itself fails the producer is unusable: the caller restarts this
        # republisher, which re-reads from the committed progress.
        await self.producer.abort_transaction()

    # --- introspection -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        paused = [tp.partition for tp in self.wake_at]
        return {
            "topic": self.topic, "bucket_s": self.bucket_s, "replica": self.replica,
            "replicas": self.replicas, "running": self.running,
            "partitions": sorted(tp.partition for tp in self.trackers),
            "held": len(self.heap), "paused": sorted(paused),
            "committed": {tp.partition: t.commit_point()[0]
                          for tp, t in self.trackers.items()},
            "republished": dict(self.counts), "lateness": self.lateness.summary(),
        }
