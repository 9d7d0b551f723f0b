"""The ids topic, read: what happened last to each caller-chosen message id.

ProducerActors record ``scheduled`` (with the publish's version) after a delayed message
with a caller-chosen id is written, and ``cancelled`` on ``cancel``; republishers record
``released`` in the transaction that releases one. Every republisher reads the whole topic
(``read_committed``) into memory and, before releasing such a message, waits until it has
read the topic up to its end as of the message's due time: so a cancel or a replacing
publish acknowledged before the due time always wins. Entries expire after the horizon the
settings give (the topic itself is compacted and deletes them after the same time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from athomic import envelope
from athomic._kafka import KafkaClients, KafkaConsumer, TopicPartition, stop_quietly
from athomic.errors import MalformedEnvelopeError
from athomic.settings import MessagingSettings

log = logging.getLogger("athomic.republisher")

CANCELLED, REPLACED, RELEASED = "cancelled", "replaced", "released"

IDLE_POLL_S = 0.5
"""While no message with a caller-chosen id waits, the topic is read this often: a fetch
every 20 ms that finds nothing, in every republisher, costs them and the brokers CPU that
delayed delivery needs (at 2,000 msg/s on 2 cores it raised lateness p99 by about 80 ms)."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class IdState:
    """What is known of one message id."""

    scheduled: bytes | None = None
    """Version of its latest publish."""
    cancelled: bool = False
    """Cancelled after its latest publish."""
    released_ms: int | None = None
    """When a version of it was released."""
    expires_ms: int = 0


class IdLog:
    """The ids topic, read continuously by one republisher."""

    def __init__(self, settings: MessagingSettings, clients: KafkaClients,
                 keys: envelope.EnvelopeKeys | None) -> None:
        self.settings = settings
        self.clients = clients
        self.keys = keys
        self.topic = settings.ids_topic
        rep = settings.republisher
        self.horizon_ms = round((rep.cancel_horizon_s + rep.retention_margin_s) * 1000)
        self.margin_ms = rep.id_sync_margin_ms
        self.ids: dict[str, IdState] = {}
        self.refused = 0
        self._consumer: KafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._seen: dict[TopicPartition, list[tuple[int, int]]] = {}
        self._synced: dict[TopicPartition, int] = {}
        self._next_expiry = 0
        self._eager_until = 0
        self._wanted = asyncio.Event()

    async def start(self, partitions: int) -> None:
        self._partitions = [TopicPartition(self.topic, p) for p in range(partitions)]
        consumer = self.clients.consumer(
            **self.settings.kafka_client_options(), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest",
            fetch_max_wait_ms=20)
        # kept before it starts: a start that fails may have opened connections, which
        # stop() (the republisher's close) then closes
        self._consumer = consumer
        await consumer.start()
        consumer.assign(self._partitions)
        starts = await consumer.beginning_offsets(self._partitions)
        for tp in self._partitions:
            consumer.seek(tp, starts[tp])
            self._seen[tp] = []
            self._synced[tp] = 0
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._consumer is not None:
            await stop_quietly(self._consumer, 10.0)
        self._task = self._consumer = None

    def want(self, until_ms: int) -> None:
        """Read the topic continuously until ``until_ms`` (local ms): a message with a
        caller-chosen id will wait for ``synced_through`` to pass its due time."""
        if until_ms > self._eager_until:
            self._eager_until = until_ms
            self._wanted.set()

    async def _idle(self, consumer: KafkaConsumer) -> None:
        """Nothing wants the topic read now: wait ``IDLE_POLL_S`` (its partitions paused,
        so no fetch goes out), or until ``want`` is called."""
        if now_ms() < self._eager_until:
            return
        self._wanted.clear()
        consumer.pause(*self._partitions)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), IDLE_POLL_S)
        finally:
            consumer.resume(*self._partitions)

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            await self._idle(consumer)
            try:
                batch = await consumer.getmany(*self._partitions, timeout_ms=50,
                                               max_records=10_000)
                for records in batch.values():
                    for record in records:
                        self._apply(record)
                await self._note_progress(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the brokers away: keep trying, nothing is synced
                log.warning("reading %s failed: %r", self.topic, exc)
                await asyncio.sleep(0.5)
            now = now_ms()
            if now >= self._next_expiry:
                self._expire(now)
                self._next_expiry = now + 10_000

    async def _note_progress(self, consumer: KafkaConsumer) -> None:
        """A poll stamped at ``t`` saw high watermark ``hw``: once our position reaches
        ``hw``, everything written before ``t`` (a round trip's worth earlier) is read."""
        for tp in self._partitions:
            stamp = consumer.last_poll_timestamp(tp)
            high = consumer.highwater(tp)
            seen = self._seen[tp]
            if stamp is None or high is None or (seen and seen[-1][0] >= stamp):
                continue
            seen.append((stamp, high))
            position = await consumer.position(tp)
            while seen and seen[0][1] <= position:
                self._synced[tp] = max(self._synced[tp], seen.pop(0)[0])
            del seen[:-64]  # bounded: only the latest observations matter

    def _apply(self, record: Any) -> None:
        if record.key is None:
            return
        message_id = record.key.decode("ascii", "replace")
        if record.value is None:  # a tombstone: forgotten
            self.ids.pop(message_id, None)
            return
        try:
            event = envelope.decode_id_event(
                message_id, record.value, self.keys,
                accept_unauthenticated=self.settings.republisher.accept_unauthenticated)
        except MalformedEnvelopeError as exc:
            self.refused += 1  # forged, or from a setup with other keys: ignored
            log.warning("ignoring %s record for %r at %d/%d: %s", self.topic, message_id,
                        record.partition, record.offset, exc)
            return
        state = self.ids.setdefault(message_id, IdState())
        if event.kind == envelope.SCHEDULED:
            state.scheduled, state.cancelled = event.version, False
        elif event.kind == envelope.CANCELLED:
            state.cancelled = True
        else:
            state.released_ms = event.at_ms
        state.expires_ms = max(state.expires_ms, event.at_ms, event.deliver_at_ms) + \
            self.horizon_ms

    def _expire(self, now: int) -> None:
        for message_id in [m for m, s in self.ids.items() if s.expires_ms < now]:
            del self.ids[message_id]

    def synced_through(self) -> int:
        """Everything written to the ids topic before this time (local ms) has been read."""
        if not self._synced:
            return 0
        return min(self._synced.values()) - self.margin_ms

    def verdict(self, message_id: str, version: bytes) -> str | None:
        """Why a message with this id and version must not be released (None: release
        it)."""
        state = self.ids.get(message_id)
        if state is None:
            return None
        if state.scheduled is not None and state.scheduled != version:
            return REPLACED
        if state.released_ms is not None:
            return RELEASED  # another copy of it, or a retry after it was delivered
        if state.cancelled:
            return CANCELLED
        return None

    def stats(self) -> dict[str, Any]:
        now = now_ms()
        synced = self.synced_through()
        return {"ids": len(self.ids), "refused": self.refused,
                "behind_ms": max(now - synced, 0) if synced else None}


async def record_cancel(settings: MessagingSettings, message_id: str,
                        clients: KafkaClients) -> None:
    """Record a cancel in the ids topic from outside Ray (``athomic cancel``); returns
    once the brokers acknowledged it, as ``ProducerHandle.cancel`` does."""
    from athomic.messages import validate_message_id
    from athomic.strategies import envelope_keys

    validate_message_id(message_id)
    producer = clients.producer(**settings.kafka_client_options(), acks="all",
                                enable_idempotence=True)
    try:
        await asyncio.wait_for(producer.start(), settings.producer.connect_timeout_s)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        from athomic._kafka import connection_error

        raise connection_error(exc, settings.bootstrap_servers) from None
    try:
        event = envelope.IdEvent(envelope.CANCELLED, now_ms())
        value = envelope.encode_id_event(message_id, event, envelope_keys(settings))
        future = await producer.send(settings.ids_topic, value, key=message_id.encode())
        await asyncio.wait_for(future, settings.producer.delivery_timeout_ms / 1000)
    except Exception as exc:
        from athomic._kafka import translate

        raise translate(exc, topic=settings.ids_topic) from None
    finally:
        await producer.stop()
