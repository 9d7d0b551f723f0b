"""The republish loop of one delay topic: consume, wait until due, republish exactly once.

**Ownership.** Each partition of a delay topic is republished under its own transactional
id, ``athomic.delay.<topic>.<partition>``: the same whatever the connection, the replica
count or the process. Starting a producer with it fences every earlier holder and aborts
its open transaction; only then is the committed progress read. So two republishers never
both publish a partition's messages, whatever the layout (Kafka's exactly-once design
before KIP-447; aiokafka has no group-metadata fencing). Progress lives in one consumer
group shared by every connection, and its commit metadata names the owner (connection,
layout generation, process, time of its last commit). A replica claims the partitions
``p % replicas == replica`` when it starts, picks up partitions added later, and refuses a
partition another connection owns. Fenced later, it claims again only when no newer layout
(nor another live process of its own layout) holds the partition.

**Release.** A partition is read with ``read_committed``; while its head is not due within
the near window it is paused (no busy polling). Read messages wait in the partition's
``HeldStore`` (those due in more than a second compactly: compressed bytes in arena chunks,
their schedule in columns, see republisher/store.py); when due, a message moves on to a
shorter bucket or to its final topic, in one Kafka transaction with the consumed offsets
(per partition, at most every ``linger_ms``). A message reaching its due time in a
bucket its planned path does not end in (a backlog) first moves to its *release bucket*:
every copy of a message (a publish retried by Ray or by its caller) is released from the
same partition, which releases a message id once (``RecentIds``, restored from the
released-ids topic after a restart).

**Failures.** Every wait is bounded (``ack_timeout_s``). A transient failure aborts the
transaction and retries it with jittered backoff, for up to ``retry_window_s`` per
message; a permanent one (record too large, topic missing or invalid, not authorised)
counts an attempt, and after ``max_attempts`` the message goes to the dead-letter topic,
never stalling the partition. A producer that is fenced, timed out or unusable is replaced:
the partition resumes from its committed progress.

The committed offset of a partition is its lowest unpublished offset; messages published
out of offset order above it are named in the commit's metadata (``OffsetTracker``). When
that would not fit, the lowest messages still waiting are written once more to the end of
the partition (one extra hop) so the offset can move on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import random
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from athomic import envelope
from athomic._kafka import (
    AIOKAFKA,
    BATCH_FROM,
    Batching,
    KafkaClients,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
    acked_all,
    classify,
    futures_of,
    kafka_error_name,
    send_batched,
    stop_quietly,
    too_large,
)
from athomic.errors import ConfigurationError, MalformedEnvelopeError
from athomic.messages import H_ERROR, H_ERROR_SOURCE, MessageHeaders, MessagePriority
from athomic.settings import MessagingSettings
from athomic.strategies import delay_headers, delivered_record, envelope_keys, partition_key
from athomic.telemetry import RepublishSpan, Telemetry

from .ids import IdLog
from .schedule import (
    FINAL,
    MAX_METADATA,
    Cascade,
    ClockSkew,
    LatenessStats,
    OffsetTracker,
    Owner,
    RecentIds,
    decode_commit,
    next_step,
    release_bucket,
)
from .store import Frozen, HeldStore
from .topics import ensure_topics, open_admin

log = logging.getLogger("athomic.republisher")

T = TypeVar("T")
_PRIORITY_RANK = {MessagePriority.HIGH: 0, MessagePriority.NORMAL: 1, MessagePriority.LOW: 2}
CASCADE, DEAD_LETTER, RESTAGE = "cascade", "dead_letter", "restage"
CLAIMING, OWNED, RELEASED, REFUSED = "claiming", "owned", "released", "refused"
_MISSING_TOPIC_RECHECK_MS = 2_000
_TOPIC_CHECK_S = 5.0
_IDS_EAGER_MS = 2_000  # the ids topic is read closely from when such a message is read
# until this long after it is due (or after its release last waited for the topic)
_READ_AT_LEAST = 64  # records a fetch asks for at least, per partition (see Partition.read_hint)
_DECODED_WITHIN_MS = 1_000
"""A message read this close to its release keeps its envelope decoded in full until it
leaves (parsed once, not twice); one due later is decoded again when it leaves (not kept
while it waits: memory)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere). The bytes of records read, compressed
    into the store and dropped, and of messages that left, are freed, but glibc keeps
    the pages for later; holding 100,000 messages, that was a third again of what the
    store takes. Trimming gives them back to the system (a few ms)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()
_TRIM_EVERY_S = 1.0
_TRIM_BURST = 5_000
"""Messages read or gone since the last trim that make a burst: a fetch that then finds
nothing ends it, and what it freed is given back at once, not up to a second later
(``malloc_trim`` walks the heap: in steady traffic it stays at once a second)."""


@dataclass(slots=True)
class Held:
    """A message read from the delay topic and not yet republished."""

    offset: int
    release_ms: int
    action: str  # CASCADE, FINAL, DEAD_LETTER or RESTAGE
    env: envelope.EnvelopeHead | None
    """The envelope's schedule and identity (None: it could not be decoded)."""
    cascade: Cascade | None = None
    record: Any = None  # the raw record, kept only for the dead-letter path
    error: str | None = None
    spill: bool = False
    """Written once more to the end of the partition, not yet due (see _plan_commit)."""
    data: bytes = b""
    """The envelope as read (its headers and value are decoded when it leaves, unless
    ``decoded`` already holds them)."""
    decoded: envelope.Envelope | None = None
    """The envelope decoded in full, when it leaves now or soon (read within
    ``_DECODED_WITHIN_MS`` of its release, or out of the cold store to leave now)."""


@dataclass(slots=True)
class Failing:
    """How a message has failed so far (kept across a partition's restarts)."""

    attempts: int = 0
    """Permanent failures (each one an attempt)."""
    since_ms: int | None = None
    """First transient failure not followed by a success."""
    last: str = ""
    dead_letter_refused: int = 0
    """Times the dead-letter topic itself refused the message for good (too large)."""


class Fenced(Exception):
    """Raised when a newer holder took over a partition's transactional id."""


class _Unusable(Exception):
    """The partition's producer can no longer be trusted (timed out, fatal state)."""


class _Refused(Exception):
    """Records of a transaction refused before the commit; carries who failed how."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__(f"{len(failures)} record(s) refused")
        self.failures = failures


class Partition:
    """One delay-topic partition a replica is responsible for: its transactional producer,
    its progress, and the messages read from it and not yet republished."""

    def __init__(self, tp: TopicPartition, dedupe_window_ms: int,
                 buckets: Sequence[float] = ()) -> None:
        self.tp = tp
        self.buckets = tuple(buckets)
        self.transactional_id = f"athomic.delay.{tp.topic}.{tp.partition}"
        self.state = RELEASED
        self.note = "not claimed yet"
        self.producer: KafkaProducer | None = None
        self.tracker: OffsetTracker | None = None
        self.store = self.new_store()
        self.wake_at: int | None = None
        self.read_hint = 0
        """Records to ask a fetch for (0: as many as ``max_batch``). A paused partition is
        woken when its head is near; it reads on until the next record not near and pauses
        again, and the client decodes every record a fetch returns: asking for thousands
        to use a dozen blocked the event loop for up to 300 ms per wake (the transactions
        waited behind it). So it asks for twice what it used last time it paused, and four
        times as many while it uses all it gets."""
        self.next_txn_ms = 0
        self.retry_at = 0
        self.backoff_s = 0.1
        self.task: asyncio.Task[None] | None = None
        self.fenced = False
        """Claimed and lost before: claim again only where no one else holds it."""
        self.yielded = False
        """Left to another holder (another connection's, a newer layout's)."""
        self.last_commit_ms = 0
        self.recent = RecentIds(dedupe_window_ms)
        self.failing: dict[int, Failing] = {}
        self.batching = Batching()
        self.solo_until = 0
        """Until then (ms), every record goes in a batch of its own: a batch was too large
        for its topic (Kafka applies ``max.message.bytes`` to a batch), and only alone is
        a record judged by its own size."""
        self.waiting_by_key: dict[bytes, set[tuple[int, int]]] = {}
        """Key -> (due time, offset) of its messages that were due and did not go (a
        failed attempt, a missing topic, an aborted transaction): the later messages of
        the key wait behind them."""
        self.copies: dict[bytes, dict[str, tuple[tuple[int, int], int]]] = {}
        """Key -> message id -> ((due time, offset), give up at ms) of its messages sent
        back into this partition (a hop into the same bucket, a restage) and not read
        back yet: a copy lands at the end of the partition, after later messages of its
        key, so those wait until it is read (or, should it never come, until the time
        it had to come by)."""

    def new_store(self) -> HeldStore[Held]:
        """An empty store for the messages read from this partition."""
        return HeldStore(self._thaw)

    def freeze(self, held: Held, data: bytes) -> None:
        """Keep a message just read and not due soon compactly, until it leaves."""
        assert held.env is not None and held.action in (FINAL, CASCADE)
        cascade = held.cascade
        self.store.freeze(
            held.release_ms, held.offset, data,
            tag=0 if cascade is None else self.buckets.index(cascade.bucket) + 1,
            hold_ms=0 if cascade is None else cascade.hold_until_ms,
            restage=held.env.hop < envelope.MAX_HOPS)

    def _thaw(self, frozen: Frozen) -> Held:
        cascade = None if frozen.tag == 0 else Cascade(self.buckets[frozen.tag - 1],
                                                       frozen.hold_ms)
        action = FINAL if cascade is None else CASCADE
        try:
            full = envelope.decode(frozen.data)  # verified when it was read
        except MalformedEnvelopeError:  # read, not decodable in full: dead-lettered later
            return Held(frozen.offset, frozen.due_ms, action, envelope.peek(frozen.data),
                        cascade, data=frozen.data)
        return Held(frozen.offset, frozen.due_ms, action, envelope.head(full), cascade,
                    data=frozen.data, decoded=full)


class BucketRepublisher:
    """Republishes the messages of one delay topic (the partitions of one replica)."""

    def __init__(self, settings: MessagingSettings, topic: str, replica: int = 0,
                 replicas: int = 1, *, generation: int = 0,
                 clients: KafkaClients = AIOKAFKA) -> None:
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
        self.rep = rep
        self.group_id = settings.republisher_group
        self.owner = Owner(settings.connection_name, generation, secrets.token_hex(4), 0)
        # The smallest bucket also holds messages due sooner than the bucket itself, so it
        # reads its whole length ahead: nothing queues behind a later head there.
        smallest = self.bucket_s == self.buckets[0]
        self.read_ahead_ms = round(1000 * (max(rep.near_window_s, self.bucket_s)
                                           if smallest else rep.near_window_s))
        self.near_window_s = rep.near_window_s
        # A copy sent back into this bucket is read back once its hold is near (at most a
        # bucket away) and its transaction committed (bounded waits); past this, it is
        # taken as lost and the later messages of its key no longer wait for it.
        self._copy_within_ms = round(1000 * (self.bucket_s + 3 * rep.ack_timeout_s)) + \
            10_000 + self.read_ahead_ms
        self.keys = envelope_keys(settings)
        # held compactly when read this long before due (never: a bound no wait reaches)
        self._cold_after_ms = 2**62 if rep.compact_after_s is None else \
            round(rep.compact_after_s * 1000)
        self.ids = IdLog(settings, clients, self.keys)
        self.parts: dict[TopicPartition, Partition] = {}
        self.held = 0
        self.lateness = LatenessStats()
        self.skew = ClockSkew()
        self.skew_known = False
        self._stamped_topics: frozenset[str] = frozenset()
        self.telemetry = Telemetry.from_settings(settings)
        self.counts = {FINAL: 0, CASCADE: 0, DEAD_LETTER: 0, RESTAGE: 0, "skipped": 0,
                       "duplicate": 0, "cancelled": 0, "replaced": 0, "aborted": 0,
                       "fenced": 0, "restarted": 0}
        self.consumer: KafkaConsumer | None = None
        self.released_partitions = 1
        self.running = False
        self.heartbeat = time.monotonic()
        self._stopping = False
        self._woken = asyncio.Event()
        self._next_refresh = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._topic_checked: dict[str, tuple[bool, int]] = {}
        self._skew_warned = 0.0
        self._churn = 0  # messages read or gone since memory was last given back
        self._trimmed = 0.0

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Ensure the topics, then claim this replica's partitions."""
        settings = self.settings
        counts = await ensure_topics(settings, settings.delay_topics, clients=self.clients)
        self.released_partitions = counts[settings.released_topic]
        await self.ids.start(counts[settings.ids_topic])
        admin = await open_admin(settings, self.clients)
        try:
            stamps = await admin.topic_config(
                [*settings.delay_topics.values(), settings.released_topic],
                "message.timestamp.type")
        finally:
            await admin.close()
        # Topics stamped with the brokers' clock (athomic creates them so): what this
        # republisher measures its own clock against.
        self._stamped_topics = frozenset(t for t, v in stamps.items() if v == "LogAppendTime")
        self.skew_known = self.topic in self._stamped_topics
        self.consumer = self.clients.consumer(
            **settings.kafka_client_options(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest",
            fetch_max_wait_ms=50, max_partition_fetch_bytes=4 * 1024 * 1024)
        await self.consumer.start()
        self._adopt(counts[self.topic])
        self._next_refresh = time.monotonic() + self.rep.partition_refresh_s
        self.running = True
        if self.parts:
            log.info("republisher %s replica %d/%d started on partitions %s", self.topic,
                     self.replica, self.replicas, sorted(tp.partition for tp in self.parts))
        else:  # more replicas than partitions: stands by, takes partitions added later
            log.warning("republisher %s replica %d/%d owns no partition (the topic has %d):"
                        " add partitions to use it", self.topic, self.replica,
                        self.replicas, counts[self.topic])

    def _adopt(self, partition_count: int) -> None:
        """Take on the partitions of this replica that are new (the topic grew)."""
        mine = [TopicPartition(self.topic, p) for p in range(partition_count)
                if p % self.replicas == self.replica]
        new = [tp for tp in mine if tp not in self.parts]
        if not new:
            return
        window = round(self.rep.dedupe_window_s * 1000)
        for tp in new:
            self.parts[tp] = Partition(tp, window, self.buckets)
        assert self.consumer is not None
        # assign() resets positions: put back those of partitions already running
        self.consumer.assign(list(self.parts))
        for tp, part in self.parts.items():
            if part.state == OWNED and part.tracker is not None:
                self.consumer.seek(tp, part.tracker.position)
                if part.wake_at is not None:
                    self.consumer.pause(tp)
            else:
                self.consumer.pause(tp)
        if len(self.parts) > len(new):
            log.info("republisher %s picked up partitions %s", self.topic,
                     [tp.partition for tp in new])

    async def close(self) -> None:
        self.running = False
        for part in self.parts.values():
            if part.task is not None and not part.task.done():
                part.task.cancel()
                with contextlib.suppress(BaseException):
                    await part.task
            await self._drop(part)
        if self.consumer is not None:
            await stop_quietly(self.consumer, self.rep.ack_timeout_s)
        self.consumer = None
        self.parts.clear()
        await self.ids.stop()

    def stop(self) -> None:
        self._stopping = True
        self._woken.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until ``stop()``."""
        assert self.consumer is not None
        fetch: asyncio.Task[dict[TopicPartition, list[Any]]] | None = None
        try:
            while not self._stopping:
                self.heartbeat = time.monotonic()
                if self.heartbeat >= self._next_refresh and (
                        self._refreshing is None or self._refreshing.done()):
                    # in a task of its own: the brokers' answer must not hold up releases
                    self._next_refresh = self.heartbeat + self.rep.partition_refresh_s
                    self._refreshing = asyncio.ensure_future(self._refresh())
                now = now_ms()
                self._schedule(now)
                self._wake(now)
                self._trim()
                wait_ms = self._wait_ms(now)
                active = [tp for tp, part in self.parts.items()
                          if part.state == OWNED and part.wake_at is None]
                if fetch is None and active:
                    ask = sum(self.parts[tp].read_hint or self.rep.max_batch for tp in active)
                    fetch = asyncio.ensure_future(self.consumer.getmany(
                        *active, timeout_ms=wait_ms, max_records=min(ask, self.rep.max_batch)))
                self._woken.clear()
                woken = asyncio.ensure_future(self._woken.wait())
                waiting: set[asyncio.Future[Any]] = {woken}
                if fetch is not None:
                    waiting.add(fetch)
                done, _ = await asyncio.wait(waiting, timeout=wait_ms / 1000,
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if fetch is not None and fetch in done:
                    batch, fetch = fetch.result(), None
                    received = now_ms()
                    for tp, records in batch.items():
                        self._ingest(tp, records, received)
                        self._churn += len(records)
                    if not batch and self._churn >= _TRIM_BURST:
                        self._trim(burst=True)
        finally:
            for task in (fetch, self._refreshing):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            self._refreshing = None

    def _trim(self, *, burst: bool = False) -> None:
        """Give freed memory back to the system, at most every ``_TRIM_EVERY_S`` while
        messages come and go, or at once when a burst of them ended (``_TRIM_BURST``)."""
        if _TRIM is None or not self._churn or \
                (not burst and self.heartbeat - self._trimmed < _TRIM_EVERY_S):
            return
        self._churn = 0
        self._trimmed = self.heartbeat
        _TRIM(0)

    def _wait_ms(self, now: int) -> int:
        wait = 200
        for part in self.parts.values():
            if part.task is not None:
                continue
            if part.state == OWNED:
                due = part.store.next_due()
                if due is not None:
                    wait = min(wait, max(due, part.next_txn_ms) - now)
                if part.wake_at is not None:
                    wait = min(wait, part.wake_at - now)
            elif part.state in (RELEASED, REFUSED):
                wait = min(wait, part.retry_at - now)
        return max(wait, 0)

    def _schedule(self, now: int) -> None:
        """Start what is due: claims, transactions, lease renewals (one task per
        partition at a time)."""
        lease_ms = self.rep.partition_refresh_s * 1000
        for part in self.parts.values():
            if part.task is not None:
                if not part.task.done():
                    continue
                part.task = None
            if part.state in (RELEASED, REFUSED):
                if now >= part.retry_at and not self._stopping:
                    part.task = asyncio.ensure_future(self._guard(part, self._claim(part),
                                                                  claim=True))
            elif part.state == OWNED:
                due = part.store.next_due()
                if due is not None and due <= now and now >= part.next_txn_ms:
                    part.task = asyncio.ensure_future(self._guard(part, self._transact(part)))
                elif now - part.last_commit_ms >= lease_ms:
                    part.task = asyncio.ensure_future(self._guard(part, self._renew(part)))

    async def _guard(self, part: Partition, work: Awaitable[None], *,
                     claim: bool = False) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if claim:  # the brokers away, a coordinator moving: try again later
                log.warning("republisher %s partition %d: claim failed (%s: %s); retrying",
                            self.topic, part.tp.partition, type(exc).__name__, exc)
            else:  # unforeseen: start the partition over from its committed progress
                log.exception("republisher %s partition %d failed", self.topic,
                              part.tp.partition)
            await self._reset(part, f"{'claim ' if claim else ''}failed: {exc!r}",
                              retry=True)
        finally:
            self._woken.set()

    async def _refresh(self) -> None:
        """Partitions added to the topic are picked up here (run beside the loop, which
        schedules it every ``partition_refresh_s``)."""
        try:
            admin = await self._bounded(open_admin(self.settings, self.clients))
            try:
                count = await self._bounded(admin.partition_counts([self.topic]))
            finally:
                await admin.close()
        except Exception as exc:
            log.warning("republisher %s cannot read its partitions: %r", self.topic, exc)
            return
        if self.topic in count and self.consumer is not None and not self._stopping:
            self._adopt(count[self.topic])
            self._woken.set()

    def _wake(self, now: int) -> None:
        assert self.consumer is not None
        if self.held >= self.rep.max_held:
            return
        for tp, part in self.parts.items():
            if part.state == OWNED and part.wake_at is not None and part.wake_at <= now:
                part.wake_at = None
                self.consumer.resume(tp)

    def _pause(self, part: Partition, offset: int, wake_ms: int) -> None:
        """Stop reading ``part`` at ``offset`` (read again from there once awake)."""
        assert self.consumer is not None
        self.consumer.pause(part.tp)
        self.consumer.seek(part.tp, offset)
        part.wake_at = wake_ms

    async def _bounded(self, work: Awaitable[T]) -> T:
        return await asyncio.wait_for(work, self.rep.ack_timeout_s)

    # --- reading -------------------------------------------------------------------------
    def _ingest(self, tp: TopicPartition, records: list[Any], now: int) -> None:
        part = self.parts.get(tp)
        if part is None or part.state != OWNED or part.wake_at is not None or \
                part.tracker is None:  # being dropped (_reset awaits its producer's stop)
            return  # no longer read from here; its position is set again when it is
        before = self.held
        try:
            self._read(part, part.tracker, records, now)
        finally:
            self.telemetry.add_delayed_held(self.held - before, delay_topic=self.topic)

    def _read(self, part: Partition, tracker: OffsetTracker, records: list[Any],
              now: int) -> None:
        bound_ms = round(self.bucket_s * 1000) + self.read_ahead_ms + 2000 + \
            self.rep.max_clock_skew_ms
        hint = part.read_hint or self.rep.max_batch
        if len(records) >= hint:  # used all it got: ask for more next time
            part.read_hint = min(4 * hint, self.rep.max_batch)
        skew = self.skew if self.skew_known else None
        keys, unsigned = self.keys, self.rep.accept_unauthenticated
        soon = now + _DECODED_WITHIN_MS
        for i, record in enumerate(records):
            if skew is not None and record.timestamp > 0:
                skew.consumed(now, record.timestamp)
            if record.offset < tracker.position:
                continue  # read already (a fetch that crossed a seek)
            if tracker.is_done(record.offset):  # published before a restart: skip
                tracker.read(record.offset, done=True)
                self.counts["skipped"] += 1
                continue
            try:
                # In full too when it leaves soon (it would be parsed again then), else
                # only its head (what waits is not copied out of the record).
                env, full = envelope.read(record.value, keys,
                                          accept_unauthenticated=unsigned, full_by_ms=soon)
                if env.hold_until_ms > now + bound_ms:
                    # Nothing written into a bucket waits longer than the bucket: a
                    # larger hold would pause the partition for nothing (or forever).
                    raise MalformedEnvelopeError(
                        f"hold_until {env.hold_until_ms} is beyond what bucket "
                        f"{self.bucket_s:g}s allows (now {now})")
            except MalformedEnvelopeError as exc:
                tracker.read(record.offset)
                self._push(part, Held(record.offset, now, DEAD_LETTER, None, record=record,
                                      error=str(exc)))
                continue
            if env.hold_until_ms > now + self.read_ahead_ms:
                self._pause(part, record.offset, env.hold_until_ms - self.read_ahead_ms)
                part.read_hint = max(2 * i, _READ_AT_LEAST)
                return
            if self.held >= self.rep.max_held:  # memory bound: read on once it drains
                self._pause(part, record.offset, now + 50)
                return
            tracker.read(record.offset)
            if part.copies and env.key is not None:
                self._copy_back(part, env.key, env.message_id, record.offset)
            held = self._plan(record.offset, env, now)
            if env.caller_id:  # its release waits for the ids topic: read it closely
                self.ids.want(held.release_ms + _IDS_EAGER_MS)
            if held.release_ms - now > self._cold_after_ms:
                part.freeze(held, record.value)
                self.held += 1
            else:
                held.data = record.value
                self._push(part, held)
                if full is not None and held.release_ms - now <= _DECODED_WITHIN_MS:
                    held.decoded = full  # leaves within a transaction or two: kept

    def _plan(self, offset: int, env: envelope.EnvelopeHead, now: int) -> Held:
        """What becomes of a message read now: forwarded to a shorter bucket at its hold
        time, or released to its final topic at its due time."""
        if now >= env.deliver_at_ms:
            # Late (a backlog): released only from its release bucket, at once.
            target = release_bucket(self.buckets, env.published_ms, env.deliver_at_ms,
                                    self.near_window_s)
            if target == self.bucket_s:
                return Held(offset, env.deliver_at_ms, FINAL, env)
            return Held(offset, now, CASCADE, env, Cascade(target, now))
        step = next_step(self.buckets, env.hold_until_ms, env.deliver_at_ms,
                         max(now, env.hold_until_ms), self.near_window_s)
        if isinstance(step, Cascade):
            return Held(offset, env.hold_until_ms, CASCADE, env, step)
        return Held(offset, env.deliver_at_ms, FINAL, env)

    def _push(self, part: Partition, held: Held) -> None:
        held.decoded = None  # decoded again if it leaves: not kept while it waits
        part.store.push(held.release_ms, held)
        self.held += 1

    # --- claiming ------------------------------------------------------------------------
    async def _committed(self, tp: TopicPartition) -> tuple[int, str]:
        """The committed (offset, metadata) of ``tp``; -1 when there is none (read once
        from the group of versions that kept one per connection)."""
        admin = await open_admin(self.settings, self.clients)
        try:
            found = await self._bounded(admin.committed(self.group_id, [tp]))
            if tp not in found and self.rep.group_id is None:
                found = await self._bounded(
                    admin.committed(self.settings.legacy_republisher_group, [tp]))
        finally:
            await admin.close()
        return found.get(tp, (-1, ""))

    def _may_claim(self, part: Partition, holder: Owner | None, now: int) -> str | None:
        """Why not to claim ``part`` now (None: claim it)."""
        if holder is None or holder.instance == self.owner.instance:
            return None
        if holder.connection != self.owner.connection:
            return (f"owned by connection {holder.connection!r}: a delay topic serves one "
                    "connection")
        fresh = now - holder.lease_ms < 3 * self.rep.partition_refresh_s * 1000
        if part.fenced and fresh and holder.generation >= self.owner.generation:
            return ("held by a newer layout" if holder.generation > self.owner.generation
                    else "held by another process of this layout")
        return None

    async def _claim(self, part: Partition) -> None:
        assert self.consumer is not None
        part.state = CLAIMING
        tp = part.tp
        offset, metadata = await self._committed(tp)
        _, holder_text = decode_commit(max(offset, 0), metadata)
        holder = Owner.parse(holder_text)
        why = self._may_claim(part, holder, now_ms())
        if why is not None:
            part.state = REFUSED if "connection" in why else RELEASED
            part.note = why
            part.yielded = True
            part.retry_at = now_ms() + round(self.rep.partition_refresh_s * 1000)
            log.info("republisher %s partition %d: not claimed, %s", self.topic,
                     tp.partition, why)
            return
        producer = self.clients.producer(
            **{**self.settings.kafka_client_options(),
               "retry_backoff_ms": self.rep.txn_retry_backoff_ms},
            transactional_id=part.transactional_id,
            enable_idempotence=True, acks="all", linger_ms=0,
            max_batch_size=self.settings.producer.max_batch_size,
            max_request_size=self.settings.producer.max_request_size + 64 * 1024,
            transaction_timeout_ms=self.rep.transaction_timeout_ms)
        try:
            # Fences every earlier holder and settles its open transaction ...
            await self._bounded(producer.start())
            # ... so what is committed now is final.
            offset, metadata = await self._committed(tp)
            if offset < 0:
                offset = (await self._bounded(self.consumer.beginning_offsets([tp])))[tp]
            _, holder_text = decode_commit(offset, metadata)
            holder = Owner.parse(holder_text)
            if holder is not None and holder.connection != self.owner.connection:
                raise ConfigurationError(f"owned by connection {holder.connection!r}")
            owner = self.owner.renewed(now_ms())
            tracker = OffsetTracker.from_commit(offset, metadata, str(owner))
            # Say so at once: a republisher fenced earlier reads this and stands back.
            await self._bounded(producer.begin_transaction())
            await self._bounded(producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(*tracker.commit_point())}, self.group_id))
            await self._bounded(producer.commit_transaction())
            await self._restore_released(part)
        except BaseException:
            await _quietly_stop(producer)
            raise
        part.producer, part.tracker = producer, tracker
        part.store = part.new_store()
        part.wake_at = None
        part.state, part.note = OWNED, ""
        part.yielded = False
        part.backoff_s = 0.1
        part.last_commit_ms = now_ms()
        self.consumer.seek(tp, tracker.position)
        self.consumer.resume(tp)
        log.info("republisher %s partition %d claimed at offset %d", self.topic,
                 tp.partition, tracker.position)

    def _marker_partition(self, tp: TopicPartition) -> int:
        return zlib.crc32(self._marker_key(tp)) % self.released_partitions

    @staticmethod
    def _marker_key(tp: TopicPartition) -> bytes:
        return f"{tp.topic}/{tp.partition}".encode()

    async def _restore_released(self, part: Partition) -> None:
        """Ids this partition released within the dedupe window, as recorded in the
        released-ids topic (written in the same transactions as the releases)."""
        window = round(self.rep.dedupe_window_s * 1000)
        if window <= 0:
            return
        mtp = TopicPartition(self.settings.released_topic, self._marker_partition(part.tp))
        key = self._marker_key(part.tp)
        # A short fetch wait: the reader stops at the end it looked up, it never waits for
        # more.
        reader = self.clients.consumer(
            **self.settings.kafka_client_options(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest",
            fetch_max_wait_ms=20)
        try:
            # inside: a start that fails or is cancelled (the claim cut short) may have
            # opened connections already, which the stop below closes
            await self._bounded(reader.start())
            reader.assign([mtp])
            # Not fetched until it is positioned: the broker answers one request of a
            # connection at a time, and a fetch at the end of the partition waits there for
            # its whole wait (500 ms with the client's default), the lookups queued behind.
            reader.pause(mtp)
            end = (await self._bounded(reader.end_offsets([mtp])))[mtp]
            found = (await self._bounded(reader.offsets_for_times({mtp: now_ms() - window})
                                         ))[mtp]
            start = end if found is None else found[0]
            reader.seek(mtp, start)
            reader.resume(mtp)
            deadline = time.monotonic() + self.rep.ack_timeout_s
            now = now_ms()
            while start < end:
                if time.monotonic() > deadline:
                    raise TimeoutError("reading the released-ids topic took too long")
                batch = await reader.getmany(mtp, timeout_ms=200, max_records=10_000)
                for record in batch.get(mtp, ()):
                    if record.key == key and record.value:
                        for mid in record.value.split(b"\n"):
                            part.recent.add(mid.decode("ascii", "replace"), now)
                start = await self._bounded(reader.position(mtp))
        finally:
            await stop_quietly(reader, self.rep.ack_timeout_s)

    async def _renew(self, part: Partition) -> None:
        """An idle partition's lease: commit the same progress, owner and time."""
        assert part.producer is not None and part.tracker is not None
        part.tracker.owner = str(self.owner.renewed(now_ms()))
        began = time.monotonic()
        try:
            await self._bounded(part.producer.begin_transaction())
            await self._bounded(part.producer.send_offsets_to_transaction(
                {part.tp: OffsetAndMetadata(*part.tracker.commit_point())}, self.group_id))
            await self._bounded(part.producer.commit_transaction())
        except Exception as exc:
            await self._failed(part, exc, [], began)
            return
        part.last_commit_ms = now_ms()

    # --- republishing --------------------------------------------------------------------
    async def _transact(self, part: Partition) -> None:
        assert part.tracker is not None
        now = now_ms()
        due = part.store.pop_due(now, self.rep.max_batch)
        self.held -= len(due)
        if not due:
            return
        part.next_txn_ms = now + self.rep.linger_ms
        send, skip, later = await self._select(part, due, now)
        for h in later:
            self._push(part, h)
        if not send and not skip:
            return
        offsets, spilled, deferred = self._plan_commit(part, send, skip)
        for h in deferred:
            h.release_ms = now + 100
            self._push(part, h)
        if deferred:
            out = {id(h) for h in deferred}
            send = [h for h in send if id(h) not in out]
            skip = [h for h in skip if id(h) not in out]
        send += spilled
        if not send and not skip:
            return
        await self._run(part, send, skip, offsets, now)

    async def _select(self, part: Partition, due: list[Held], now: int
                      ) -> tuple[list[Held], list[Held], list[Held]]:
        """Order a due batch and sort it into (send, skip as already released, put back).

        Many due at once: HIGH first, then by due time, keeping each partition's order;
        but a message goes to its final topic only after every message of its key due
        before it (or due with it and read before it) has gone: one that cannot go now (its
        topic missing, its transaction aborted) holds back the later ones of its key."""
        for h in due:
            env = h.env
            if h.action == CASCADE and env is not None and now >= env.deliver_at_ms:
                # due while still on its way: straight to where it is released
                target = release_bucket(self.buckets, env.published_ms, env.deliver_at_ms,
                                        self.near_window_s)
                if target == self.bucket_s:
                    h.action, h.cascade = FINAL, None
                else:
                    h.cascade = Cascade(target, now)
        due.sort(key=_due_order)
        # Per key, due order (then offset) wins over priority: among the final records of
        # a key, and among its forwarded ones (a hop lands after the key's earlier ones).
        first: dict[bytes, int] = {}
        repeated: dict[bytes, list[int]] = {}  # keys of several messages: their slots
        for i, h in enumerate(due):
            env = h.env
            if env is not None and env.key is not None and h.action in (FINAL, CASCADE):
                at = first.setdefault(env.key, i)
                if at != i:
                    repeated.setdefault(env.key, [at]).append(i)
        for slots in repeated.values():
            ordered = sorted((due[i] for i in slots), key=_key_order)
            for i, h in zip(slots, ordered, strict=True):
                due[i] = h
        # per key: the earliest message sent back into this partition in this batch (a hop
        # into this bucket): later ones of its key wait for its copy
        back: dict[bytes, tuple[int, int]] = {}
        for h in due:
            if h.action == CASCADE and h.cascade is not None and h.env is not None and \
                    h.env.key is not None and h.cascade.bucket == self.bucket_s:
                order = _key_order(h)
                back[h.env.key] = min(order, back.get(h.env.key, order))
        send: list[Held] = []
        skip: list[Held] = []
        later: list[Held] = []
        going: dict[bytes, set[tuple[int, int]]] = {}  # per key: what goes now
        # ``going`` is read only against ``part.waiting_by_key`` entries from before this
        # batch (the ones it adds are of messages that do not go): kept only when any are
        track_going = bool(part.waiting_by_key)
        seen: set[str] = set()
        recent = part.recent
        for h in due:
            env = h.env
            if h.action == CASCADE and env is not None and env.caller_id:
                why = self.ids.verdict(env.message_id, env.version)
                if why is not None:  # no need to carry it further
                    h.error = why
                    skip.append(h)
                    continue
            if h.action != FINAL or env is None:
                send.append(h)
                continue
            if env.caller_id and self.ids.synced_through() < env.deliver_at_ms:
                # not released before the ids topic is read up to its end as of the due
                # time: a cancel or replacement acknowledged before then wins
                self.ids.want(now + _IDS_EAGER_MS)
                h.release_ms = now + 10
                later.append(h)
                continue
            key = env.key
            if key is not None:
                mine = _key_order(h)
                waiting = part.waiting_by_key.get(key)
                if (waiting and any(e < mine and e not in going.get(key, ())
                                    for e in waiting)) or back.get(key, mine) < mine or (
                        key in part.copies and self._copy_ahead(part, key, mine, now)):
                    h.release_ms = now + 50  # behind an earlier message of its key
                    later.append(h)
                    self._track(part, h)
                    continue
            why = self.ids.verdict(env.message_id, env.version) if env.caller_id else None
            if why is not None:
                h.error = why  # cancelled, replaced by a newer publish, or released
                skip.append(h)
            elif env.message_id in recent or env.message_id in seen:
                h.error = "duplicate"
                skip.append(h)  # released before: a retried publish's second copy
            elif not (self._topic_known(env.topic) or
                      await self._topic_exists(part, env.topic)):
                failing = part.failing.setdefault(h.offset, Failing())
                failing.attempts += 1
                failing.last = f"final topic {env.topic!r} does not exist"
                if failing.attempts < self.rep.max_attempts:
                    h.release_ms = now + self._backoff_ms(failing.attempts)
                    later.append(h)
                    self._track(part, h)
                    continue
                self._dead(h, f"not delivered after {failing.attempts} attempts: "
                              f"{failing.last}")
                send.append(h)
            else:
                seen.add(env.message_id)
                send.append(h)
            if key is not None and track_going:
                going.setdefault(key, set()).add(_key_order(h))
        return send, skip, later

    def _track(self, part: Partition, h: Held) -> None:
        """A message due that did not go: later ones of its key wait behind it."""
        if h.action == FINAL and h.env is not None and h.env.key is not None:
            part.waiting_by_key.setdefault(h.env.key, set()).add(_key_order(h))

    def _untrack(self, part: Partition, h: Held) -> None:
        if h.env is not None and h.env.key is not None:
            waiting = part.waiting_by_key.get(h.env.key)
            if waiting is not None:
                waiting.discard(_key_order(h))
                if not waiting:
                    del part.waiting_by_key[h.env.key]

    @staticmethod
    def _copy_back(part: Partition, key: bytes, message_id: str, offset: int | None
                   ) -> None:
        """A message's copy was read back at ``offset`` (None: none will come)."""
        mine = part.copies.get(key)
        if mine is None or message_id not in mine:
            return
        if offset is not None and offset <= mine[message_id][0][1]:
            return  # the original, read again: its copy is still to come
        del mine[message_id]
        if not mine:
            del part.copies[key]

    @staticmethod
    def _copy_ahead(part: Partition, key: bytes, mine: tuple[int, int], now: int) -> bool:
        """Whether a copy of an earlier message of ``key`` is still to be read back."""
        copies = part.copies[key]
        for message_id, (order, until) in list(copies.items()):
            if until <= now:  # never came (a lost write): stop holding its key back
                del copies[message_id]
            elif order < mine:
                return True
        if not copies:
            del part.copies[key]
        return False

    def _topic_known(self, topic: str) -> bool | None:
        """Whether a final topic exists, as known without asking the brokers (None: ask,
        ``_topic_exists``): known ones are not asked again, missing ones at most every two
        seconds."""
        known = self._topic_checked.get(topic)
        if known is not None and (known[0] or
                                  now_ms() - known[1] < _MISSING_TOPIC_RECHECK_MS):
            return known[0]
        return None

    async def _topic_exists(self, part: Partition, topic: str) -> bool:
        """Whether a final topic exists (or, with the brokers' auto-create, now does)."""
        known = self._topic_known(topic)
        if known is not None:
            return known
        now = now_ms()
        assert part.producer is not None
        try:
            await asyncio.wait_for(part.producer.partitions_for(topic), _TOPIC_CHECK_S)
            exists = True
        except Exception:
            exists = False
        self._topic_checked[topic] = (exists, now)
        return exists

    def _backoff_ms(self, attempts: int) -> int:
        base = min(0.1 * 2.0 ** attempts, self.rep.retry_backoff_max_s)
        return round(1000 * base * random.uniform(0.5, 1.0))

    @staticmethod
    def _dead(h: Held, error: str) -> None:
        h.action = DEAD_LETTER
        h.error = error

    def _plan_commit(self, part: Partition, send: list[Held], skip: list[Held]
                     ) -> tuple[dict[TopicPartition, OffsetAndMetadata], list[Held],
                                list[Held]]:
        """The offsets this transaction commits, and what it takes to fit them in Kafka's
        metadata limit: messages still waiting moved to the end of the partition
        (``RESTAGE``, lowest offsets first), else the highest due ones deferred."""
        tracker = part.tracker
        assert tracker is not None
        tracker.owner = str(self.owner.renewed(now_ms()))
        finishing = sorted(h.offset for h in send + skip)
        point = tracker.commit_point(finishing)
        if len(point[1]) <= MAX_METADATA:
            return {part.tp: OffsetAndMetadata(*point)}, [], []
        waiting = part.store.restageable(
            lambda h: h.env is not None and h.env.hop < envelope.MAX_HOPS)

        def fits(spill: int) -> bool:
            return len(tracker.commit_point(finishing + waiting[:spill])[1]) <= MAX_METADATA

        if waiting and fits(len(waiting)):
            lo, hi = 1, len(waiting)
            while lo < hi:
                mid = (lo + hi) // 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid + 1
            spilled = part.store.take(waiting[:lo])
            self.held -= len(spilled)
            for h in spilled:
                h.spill = True
            point = tracker.commit_point(finishing + [h.offset for h in spilled])
            return {part.tp: OffsetAndMetadata(*point)}, spilled, []
        # Nothing waiting helps: defer the highest due offsets (the longest prefix fits).
        lo, hi = 0, len(finishing) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tracker.commit_point(finishing[:mid])[1]) <= MAX_METADATA:
                lo = mid
            else:
                hi = mid - 1
        cut = set(finishing[lo:])
        deferred = [h for h in send + skip if h.offset in cut]
        point = tracker.commit_point(finishing[:lo])
        return {part.tp: OffsetAndMetadata(*point)}, [], deferred

    def _outgoing(self, part: Partition, h: Held, span: RepublishSpan | None,
                  full: envelope.Envelope | None
                  ) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """The record ``h`` leaves as; ``full`` is its envelope decoded (not needed for a
        dead letter, which goes as it was read)."""
        env = h.env
        if h.action == DEAD_LETTER or env is None:
            # The record as it was read (an undecodable one byte for byte), so it can be
            # inspected and replayed; the error and where it came from in headers.
            error = [(H_ERROR, (h.error or "unknown error").encode()[:1000]),
                     (H_ERROR_SOURCE, f"{part.tp.topic}/{part.tp.partition}/"
                                      f"{h.offset}".encode())]
            dlq = self.rep.dead_letter_topic
            if env is None:
                rec = h.record
                return dlq, rec.key, rec.value, [*(rec.headers or ()), *error]
            value: bytes | None = h.data
            if part.failing.get(h.offset, Failing()).dead_letter_refused:
                # Even the dead-letter topic refused it (too large): keep the error and
                # where the message still is, drop the bytes.
                value = None
                error[0] = (H_ERROR, error[0][1] + b" (value too large for the dead-letter "
                                                   b"topic: see the source offset)")
            return dlq, partition_key(env), value, [*delay_headers(env), *error]
        assert full is not None
        if h.spill or h.action == CASCADE:
            if h.spill:  # the same bucket and hold, at the end of the partition
                topic, hold = self.topic, env.hold_until_ms
            else:
                assert h.cascade is not None
                topic = self.settings.delay_topics[h.cascade.bucket]
                hold = h.cascade.hold_until_ms
            nxt = full.next_hop(hold)
            return topic, partition_key(nxt), envelope.encode(nxt, self.keys), \
                delay_headers(nxt)
        record = delivered_record(full)
        headers = record.headers
        if span is not None and span.trace_headers():
            # the republish span continues the caller's trace
            out = MessageHeaders(headers)
            span.inject(out)
            headers = out.to_kafka()
        return record.topic, record.key, record.value, headers

    async def _run(self, part: Partition, send: list[Held], skip: list[Held],
                   offsets: dict[TopicPartition, OffsetAndMetadata], now: int) -> None:
        """One transaction: the records, a released-id marker per final record, the
        offsets; or, on failure, every message back in the store (or the partition
        restarted from its committed progress)."""
        producer = part.producer
        assert producer is not None and part.tracker is not None
        spans: dict[int, RepublishSpan] = {}
        records = []
        traced = self.telemetry.tracing()
        for i, h in enumerate(send):
            span = None
            full = None
            try:
                if h.env is not None and h.action != DEAD_LETTER:
                    # verified when it was read
                    full = h.decoded if h.decoded is not None else envelope.decode(h.data)
                if traced and h.action == FINAL and full is not None:
                    span = spans[i] = self.telemetry.start_republish(
                        full.topic, full.headers, message_id=full.message_id,
                        key=full.key, delay_topic=self.topic, hop=full.hop,
                        tombstone=full.value is None)
                records.append(self._outgoing(part, h, span, full))
            except MalformedEnvelopeError as exc:  # e.g. one hop too many after a change
                self._dead(h, str(exc))
                records.append(self._outgoing(part, h, None, None))
        marker_topic = self.settings.released_topic
        began = time.monotonic()
        sent_ms = now_ms()
        # With the records, the transaction writes the ids it releases (one record per up
        # to _MARKER_BYTES of ids, read back after a restart) and, for a message with a
        # caller-chosen id, an ids event (so every republisher learns it was released).
        released: list[bytes] = []
        for h in send:
            env = h.env
            if h.action != FINAL or env is None or h.spill:
                continue
            released.append(env.message_id.encode())
            if env.caller_id:
                event = envelope.IdEvent(envelope.RELEASED, sent_ms, env.deliver_at_ms,
                                         env.version)
                records.append((self.settings.ids_topic,
                                env.message_id.encode(),
                                envelope.encode_id_event(env.message_id, event, self.keys),
                                []))
        markers = _marker_values(released)
        for h in send:
            env = h.env
            if env is not None and env.key is not None and (h.spill or (
                    h.action == CASCADE and h.cascade is not None
                    and h.cascade.bucket == self.bucket_s)):
                # comes back at the end of this partition: later ones of its key wait
                part.copies.setdefault(env.key, {})[env.message_id] = (
                    _key_order(h), sent_ms + self._copy_within_ms)
        sent: list[Any] = []
        try:
            await self._bounded(producer.begin_transaction())
            sent = await self._bounded(self._hand_over(part, producer, records, spans,
                                                       markers, sent_ms))
            # one future per record batch (shared by its records), observed once
            futures = [_observed(f) for f in futures_of(sent).values()]
            failed = [x for x in sent if isinstance(x, BaseException)]
            if failed:  # refused before sending (size, metadata): nothing is committed
                raise _Refused({i: x for i, x in enumerate(sent[:len(send)])
                                if isinstance(x, BaseException)}) from failed[0]
            # The offsets join the transaction while the records are acknowledged (two
            # round trips to the coordinators that would otherwise follow the acks).
            adding = _observed(asyncio.ensure_future(
                producer.send_offsets_to_transaction(offsets, self.group_id)))
            try:
                await self._bounded(asyncio.gather(*futures, return_exceptions=True))
                results = acked_all(sent, offsets=bool(spans))  # offsets: for spans
                refused = self._refused(part, sent, results[:len(send)])
                if refused or any(isinstance(r, BaseException) for r in results):
                    raise _Refused(refused) from next(r for r in results
                                                     if isinstance(r, BaseException))
                await self._bounded(asyncio.shield(adding))
            finally:
                adding.cancel()  # ours only: a failed transaction is aborted below
            await self._bounded(producer.commit_transaction())
        except asyncio.CancelledError:
            self._end_spans(spans, asyncio.CancelledError())
            raise
        except Exception as exc:
            self._end_spans(spans, exc)
            await self._failed(part, exc, send + skip, began)
            return
        committed = now_ms()
        self._committed_ok(part, send, skip, offsets, committed)
        self._end_spans(spans, None, results)
        topics = [r[0] for r in records] + [marker_topic] * len(markers)
        for topic, meta in zip(topics, results, strict=True):
            if topic in self._stamped_topics and meta.timestamp > 0:
                self.skew.produced(sent_ms, committed, meta.timestamp)
        self._check_skew()

    async def _hand_over(self, part: Partition, producer: KafkaProducer,
                         records: list[Any], spans: dict[int, RepublishSpan],
                         markers: list[bytes], sent_ms: int) -> list[Any]:
        """Give the client a transaction's records, then its released-id markers: per record
        ``(future, None)``, or the error it was refused with before sending (and nothing after
        it). Nothing here waits unless the client's buffer is full, so the client sees every
        record before it sends any and adds all their partitions to the transaction in one
        request. (Handed over behind a bounded wait each, the first records went out first,
        and each partition that came later took one more round trip to the coordinator
        before its records could be sent: transactions took half as long again.)"""
        sent: list[Any] = []
        try:
            solo = part.solo_until > sent_ms
            if solo or len(records) >= BATCH_FROM:  # one record batch per partition
                sent = await send_batched(producer, records, part.batching,
                                          per_batch=1 if solo else None)
            else:
                for i, (topic, key, value, headers) in enumerate(records):
                    span = spans.get(i)
                    try:
                        # the republish span is current while the client sends the record
                        with span.current() if span is not None else \
                                contextlib.nullcontext():
                            sent.append((await producer.send(topic, value, key=key,
                                                             headers=headers), None))
                    except Exception as exc:  # refused before sending (size, metadata)
                        sent.append(exc)
                        break
            if any(isinstance(x, BaseException) for x in sent):
                return sent  # refused before sending: the transaction is aborted, no markers
            marker = TopicPartition(self.settings.released_topic,
                                    self._marker_partition(part.tp))
            key = self._marker_key(part.tp)
            for value in markers:
                sent.append((await producer.send(marker.topic, value, key=key,
                                                 partition=marker.partition), None))
        except BaseException:  # e.g. cancelled (fenced, stopping): the transaction is lost
            for future in futures_of(sent).values():
                _observed(future)  # and so are its records' failures, not logged
            raise
        return sent

    @staticmethod
    def _refused(part: Partition, sent: list[Any], results: list[Any]
                 ) -> dict[int, BaseException]:
        """The messages whose records failed, each to blame for its failure; except a
        record refused with others as one batch too large for its topic: the partition
        then sends every record alone for a while, and the retry finds the one at fault."""
        if not any(isinstance(r, BaseException) for r in results):
            return {}
        members: dict[int, int] = {}
        for x in sent:
            if isinstance(x, tuple):
                members[id(x[0])] = members.get(id(x[0]), 0) + 1
        refused: dict[int, BaseException] = {}
        for i, r in enumerate(results):
            if not isinstance(r, BaseException):
                continue
            x = sent[i]
            if isinstance(x, tuple) and members[id(x[0])] > 1 and too_large(r):
                part.solo_until = now_ms() + 60_000
                continue
            refused[i] = r
        return refused

    def _committed_ok(self, part: Partition, send: list[Held], skip: list[Held],
                      offsets: dict[TopicPartition, OffsetAndMetadata], committed: int
                      ) -> None:
        assert part.tracker is not None
        part.tracker.finish(h.offset for h in send + skip)
        self._churn += len(send) + len(skip)
        part.last_commit_ms = committed
        part.backoff_s = 0.1
        self.telemetry.add_delayed_held(-(len(send) + len(skip)), delay_topic=self.topic)
        for h in skip:
            self.counts[h.error if h.error in ("cancelled", "replaced") else "duplicate"] += 1
        if part.failing or part.waiting_by_key:
            for h in send + skip:
                part.failing.pop(h.offset, None)
                self._untrack(part, h)
        if part.copies:
            for h in skip:  # not carried on: no copy comes back
                if h.env is not None and h.env.key is not None:
                    self._copy_back(part, h.env.key, h.env.message_id, None)
        counts, recent, lateness = self.counts, part.recent, self.lateness
        # per message below: skipped while its points would go nowhere (no SDK, no mirror)
        metrics = self.telemetry.metering()
        for h in send:
            if h.spill:
                counts[RESTAGE] += 1
                continue
            counts[h.action] += 1
            env = h.env
            if h.action == FINAL and env is not None:
                recent.add(env.message_id, committed)
                late = (committed - env.deliver_at_ms) / 1000
                lateness.add(late)
                if metrics:
                    self.telemetry.record_lateness(late, delay_topic=self.topic,
                                                   topic=env.topic)
            elif h.action == DEAD_LETTER:
                self.telemetry.record_dlq(
                    source_topic=self.topic,
                    error_type="MalformedEnvelopeError" if env is None else "PublishError")

    async def _failed(self, part: Partition, exc: BaseException, held: list[Held],
                      began: float) -> None:
        """A transaction did not commit: nothing of it is visible. Retry it, or restart
        the partition from its committed progress, or stand back (fenced)."""
        self.counts["aborted"] += 1
        self.telemetry.record_error(kafka_error_name(exc), operation="republish",
                                    topic=self.topic)
        cause = exc.__cause__ if isinstance(exc, _Refused) and exc.__cause__ else exc
        kind = classify(cause).kind if not isinstance(cause, asyncio.TimeoutError) else (
            "unusable")
        if isinstance(cause, (AssertionError, _Unusable)) or type(cause).__name__ in (
                "IllegalOperation", "ProducerClosed"):
            kind = "unusable"
        if kind == "fenced":
            timed_out = (time.monotonic() - began) * 1000 >= \
                0.9 * self.rep.transaction_timeout_ms
            if timed_out:
                kind = "unusable"
            else:
                self.counts["fenced"] += 1
                log.warning("republisher %s partition %d fenced by a newer holder",
                            self.topic, part.tp.partition)
                await self._reset(part, "fenced by a newer holder", retry=False)
                return
        if kind == "unusable":
            log.warning("republisher %s partition %d: transaction of %d given up (%r); "
                        "resuming from the committed progress", self.topic,
                        part.tp.partition, len(held), exc)
            await self._reset(part, f"restarted after {type(cause).__name__}", retry=True)
            return
        log.warning("republisher %s partition %d: transaction of %d aborted: %r",
                    self.topic, part.tp.partition, len(held), cause)
        try:
            assert part.producer is not None
            await self._bounded(part.producer.abort_transaction())
        except Exception as abort_exc:
            await self._reset(part, f"abort failed: {abort_exc!r}", retry=True)
            return
        now = now_ms()
        refused = exc.failures if isinstance(exc, _Refused) else {}
        part.backoff_s = min(part.backoff_s * 2, self.rep.retry_backoff_max_s)
        retry_at = now + round(1000 * part.backoff_s * random.uniform(0.5, 1.0))
        for i, h in enumerate(held):
            if h.spill:  # not due: waits again where it was
                h.spill = False
                self._push(part, h)
                continue
            failing = part.failing.setdefault(h.offset, Failing())
            error = refused.get(i)
            blamed = error is not None and classify(error).kind == "permanent"
            if error is not None and blamed and h.action == DEAD_LETTER:
                failing.dead_letter_refused += 1
            elif error is not None and blamed:
                failing.attempts += 1
                failing.last = f"{kafka_error_name(error)}: {error}"
                if failing.attempts >= self.rep.max_attempts and h.action != DEAD_LETTER:
                    self._dead(h, f"not delivered after {failing.attempts} attempts: "
                                  f"{failing.last}")
            else:
                if failing.since_ms is None:
                    failing.since_ms = now
                failing.last = f"{kafka_error_name(cause)}: {cause}"
                if now - failing.since_ms > self.rep.retry_window_s * 1000 and \
                        h.action != DEAD_LETTER:
                    self._dead(h, f"failing for {self.rep.retry_window_s:g}s: "
                                  f"{failing.last}")
            # The message at fault waits its backoff (and the later ones of its key with
            # it); the others go again soon.
            h.release_ms = retry_at if blamed or not refused else now + 50
            self._push(part, h)
            self._track(part, h)

    async def _reset(self, part: Partition, note: str, *, retry: bool) -> None:
        """Drop the partition's producer and held messages; claim it again (now, or once
        its holder may be gone)."""
        await self._drop(part)
        part.state = RELEASED
        part.note = note
        part.yielded = False
        # From now on this partition is claimed again only if no one else holds it: a
        # failure here may well be another holder's doing.
        part.fenced = True
        self.counts["restarted"] += 1
        delay = part.backoff_s if retry else self.rep.partition_refresh_s
        part.backoff_s = min(max(part.backoff_s, 0.1) * 2, self.rep.retry_backoff_max_s)
        part.retry_at = now_ms() + round(1000 * delay * random.uniform(0.5, 1.0))

    async def _drop(self, part: Partition) -> None:
        # Not read from here any more (records fetched meanwhile are ignored), even while
        # the producer below stops; the caller says what the partition is now.
        part.state = RELEASED
        if len(part.store):  # dropped here, read again from the committed progress
            self.held -= len(part.store)
            self.telemetry.add_delayed_held(-len(part.store), delay_topic=self.topic)
        part.store = part.new_store()
        part.waiting_by_key.clear()
        part.copies.clear()
        part.tracker = None
        part.wake_at = None
        if self.consumer is not None and part.tp in self.parts:
            with contextlib.suppress(Exception):
                self.consumer.pause(part.tp)
        producer, part.producer = part.producer, None
        if producer is not None:
            await _quietly_stop(producer, self.rep.ack_timeout_s)

    @staticmethod
    def _end_spans(spans: dict[int, RepublishSpan], error: BaseException | None,
                   results: list[Any] | None = None) -> None:
        for i, span in spans.items():
            if error is not None:
                span.failed(error)
            elif results is not None and results[i] is not None:
                span.acked(results[i].partition, results[i].offset)
            span.end()

    def _check_skew(self) -> None:
        skew = self.skew.estimate()
        if skew is None:
            return
        self.telemetry.record_clock_skew(skew / 1000, delay_topic=self.topic)
        if abs(skew) <= self.rep.max_clock_skew_ms:
            return
        if time.monotonic() - self._skew_warned > 60:
            self._skew_warned = time.monotonic()
            log.warning("republisher %s: this host's clock is %+.0f ms off the brokers' "
                        "(republisher.max_clock_skew_ms=%d): messages may be released "
                        "early or late by that much; synchronise the clocks (NTP)",
                        self.topic, -skew, self.rep.max_clock_skew_ms)

    # --- introspection -------------------------------------------------------------------
    def ready(self) -> bool:
        """Every partition of this replica claimed, refused or standing back (none: a
        replica beyond the partition count is ready, standing by)."""
        return self.running and all(
            p.state == OWNED or p.yielded for p in self.parts.values())

    def refused(self) -> list[str]:
        return [f"{p.tp.partition}: {p.note}" for p in self.parts.values()
                if p.state == REFUSED]

    def stats(self) -> dict[str, Any]:
        skew = self.skew.estimate() if self.skew_known else None
        partitions = {
            tp.partition: {
                "state": p.state, "note": p.note, "held": len(p.store),
                "held_cold": p.store.cold, "held_bytes": p.store.nbytes(),
                "paused": p.wake_at is not None,
                "committed": p.tracker.watermark() if p.tracker else None,
                "position": p.tracker.position if p.tracker else None,
                "failing": len(p.failing), "released_ids": len(p.recent)}
            for tp, p in sorted(self.parts.items(), key=lambda kv: kv[0].partition)}
        return {
            "topic": self.topic, "bucket_s": self.bucket_s, "replica": self.replica,
            "replicas": self.replicas, "running": self.running,
            "generation": self.owner.generation, "instance": self.owner.instance,
            "partitions": sorted(p for p, v in partitions.items() if v["state"] == OWNED),
            "partition_states": partitions,
            "held": self.held,
            "held_bytes": sum(v["held_bytes"] for v in partitions.values()),
            "paused": sorted(p for p, v in partitions.items() if v["paused"]),
            "committed": {p: v["committed"] for p, v in partitions.items()
                          if v["committed"] is not None},
            "republished": dict(self.counts), "lateness": self.lateness.summary(),
            "clock_skew_ms": skew,
            "heartbeat_age_s": round(time.monotonic() - self.heartbeat, 3),
        }


_MARKER_BYTES = 64 * 1024


def _marker_values(ids: list[bytes]) -> list[bytes]:
    """The released ids as records of the released-ids topic: newline-separated (an id
    is printable ASCII), up to about _MARKER_BYTES each."""
    values: list[bytes] = []
    start, size = 0, 0
    for i, mid in enumerate(ids):
        if size and size + len(mid) + 1 > _MARKER_BYTES:
            values.append(b"\n".join(ids[start:i]))
            start, size = i, 0
        size += len(mid) + 1
    if start < len(ids):
        values.append(b"\n".join(ids[start:]))
    return values


def _due_order(h: Held) -> tuple[int, int, int]:
    """The order a due batch goes in: HIGH first, then by due time, then offset."""
    env = h.env
    return (_PRIORITY_RANK[env.priority] if env is not None else 1, h.release_ms, h.offset)


def _key_order(h: Held) -> tuple[int, int]:
    assert h.env is not None
    return (h.env.deliver_at_ms, h.offset)


def _observed(future: asyncio.Future[T]) -> asyncio.Future[T]:
    """A send's future whose failure is handled as the transaction's (or not at all, when
    an earlier record already failed it): never logged as "exception never retrieved"."""
    future.add_done_callback(_retrieve)
    return future


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _quietly_stop(producer: KafkaProducer, timeout_s: float = 10.0) -> None:
    # Stopping does not abort an open transaction: the next holder's start does.
    await stop_quietly(producer, timeout_s)
