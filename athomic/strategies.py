"""Publishing strategies: how a request becomes the Kafka record a ProducerActor sends.

Strategies are pure: they build records and never touch the network, so the actor owns all
I/O and the strategies are unit-tested without a broker. This module is also the one place
that decides a final record's headers (``final_headers`` at publish, ``delivered_record``
when the republisher releases a delayed message) and a message's physical topic.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from athomic.pipeline import Encoded
from athomic.republisher.schedule import first_hop, release_bucket
from athomic.settings import MessagingSettings

from . import envelope
from .messages import (
    H_CONTENT_TYPE,
    H_DELIVER_AT,
    H_HOP,
    H_MESSAGE_ID,
    H_PRIORITY,
    H_PUBLISHED_AT,
    H_SCHEMA,
    PIPELINE_HEADERS,
    MessagePriority,
    PublishingOutcome,
    PublishRequest,
)


@dataclass(slots=True)
class OutgoingRecord:
    """A record ready for the Kafka producer."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    header_bytes: int | None = None
    """The headers' keys and values in bytes, when the builder already counted them."""

    def size(self) -> int:
        """Bytes the record takes on the wire, near enough to compare with a size limit."""
        size = 70  # record and batch overhead in Kafka's v2 format, rounded up
        size += len(self.key or b"") + len(self.value or b"")
        if self.header_bytes is None:
            return size + sum(len(k) + len(v) + 4 for k, v in self.headers)
        return size + self.header_bytes + 4 * len(self.headers)


class PublishingStrategy(Protocol):
    outcome: PublishingOutcome

    def build(self, request: PublishRequest, encoded: Encoded, topic: str, *,
              memo: HeaderMemo | None = None) -> OutgoingRecord:
        """The record for ``request``, whose byte stages produced ``encoded``, to be
        delivered to ``topic`` (its physical topic); ``memo``: one dict per call, shared
        by its requests' builds."""


def physical_topic(topic: str, priority: MessagePriority, priority_topics: bool) -> str:
    """The topic a message is written to: ``<topic>.high`` / ``<topic>.low`` when physical
    priority topics are on, else ``topic``."""
    if priority_topics and priority is not MessagePriority.NORMAL:
        return f"{topic}.{priority.value}"
    return topic


_OWNED = frozenset({H_MESSAGE_ID, H_PRIORITY, H_PUBLISHED_AT, H_CONTENT_TYPE, H_SCHEMA,
                    H_DELIVER_AT, H_HOP, *PIPELINE_HEADERS})


def final_headers(request: PublishRequest, encoded: Encoded, *, due: bool = True
                  ) -> list[tuple[str, bytes]]:
    """The caller's (and captured) headers, then what athomic owns: message id, priority,
    publish time, content type and schema, the pipeline's description of the value, and
    for a delayed message its due time (unless not ``due``: an envelope leaves it to the
    republisher, which stamps it on delivery). A caller's value for an owned header is
    dropped, so a record never misdescribes itself."""
    return _final_headers(request, encoded, due=due)[0]


HeaderMemo = dict[tuple[int, float, str | None, str | None, MessagePriority],
                  tuple[list[tuple[str, bytes]], list[tuple[str, bytes]],
                        list[tuple[str, bytes]], int]]
"""What the requests of one call share, worked out once (``_final_headers``): by headers
list (its ``id``), publish time, content type, schema and priority, the list itself (held,
so its id is not reused while the memo lives), the headers before the message id (the
entries athomic does not own) and after it (priority, publish time, content type,
schema), and the bytes of all of them and of the message id's key."""


def _final_headers(request: PublishRequest, encoded: Encoded, *, due: bool = True,
                   memo: HeaderMemo | None = None) -> tuple[list[tuple[str, bytes]], int]:
    """``final_headers``, and the bytes of their keys and values (counted as they are
    added, not summed again when the record's size is checked). ``memo``: one dict per
    call; the requests of a batch share their headers list (what the handle captured),
    publish time, content type, schema and priority, so everything but the message id
    (and the pipeline's and due-time headers) is filtered and encoded once."""
    key = (id(request.headers), request.published_at, request.content_type, request.schema,
           request.priority)
    shared = None if memo is None else memo.get(key)
    if shared is None:
        kept = [h for h in request.headers if h[0] not in _OWNED]
        # Epoch milliseconds of the publish call, fixed on the caller's side; kept
        # through delays, so it is the original publish time.
        after = [(H_PRIORITY, _PRIORITY_BYTES[request.priority]),
                 (H_PUBLISHED_AT, str(round(request.published_at * 1000)).encode())]
        if request.content_type is not None:
            after.append((H_CONTENT_TYPE, request.content_type.encode()))
        if request.schema is not None:
            after.append((H_SCHEMA, request.schema.encode()))
        shared = (request.headers, kept, after,
                  len(H_MESSAGE_ID) + sum(len(k) + len(v) for k, v in (*kept, *after)))
        if memo is not None:
            memo[key] = shared
    _, kept, after, size = shared
    message_id = request.message_id.encode()
    headers = [*kept, (H_MESSAGE_ID, message_id), *after]
    size += len(message_id)
    if encoded.headers:
        headers.extend(encoded.headers)
        size += sum(len(k) + len(v) for k, v in encoded.headers)
    if due and request.deliver_at is not None:
        due_ms = str(ms_ceil(request.deliver_at)).encode()
        headers.append((H_DELIVER_AT, due_ms))
        size += len(H_DELIVER_AT) + len(due_ms)
    return headers, size


_PRIORITY_BYTES = {p: p.value.encode() for p in MessagePriority}


_RESTAMPED = frozenset({H_DELIVER_AT, H_HOP})


def delivered_record(env: envelope.Envelope) -> OutgoingRecord:
    """The final record of a delayed message the republisher releases: the record a direct
    publish would have written, with its due time and the delay topics it passed."""
    names = env.header_names
    # as many names as values (the envelope's own invariant): zip's strict check costs
    # more than the pairs
    headers = list(zip(names, env.header_values))  # noqa: B905
    if not _RESTAMPED.isdisjoint(names):  # an earlier athomic carried them in the envelope
        headers = [h for h in headers if h[0] not in _RESTAMPED]
    headers.append((H_DELIVER_AT, str(env.deliver_at_ms).encode()))
    headers.append((H_HOP, str(env.hop).encode()))
    return OutgoingRecord(env.topic, env.key, env.value, headers)


class DirectPublishStrategy:
    """Publishes a message to its final topic immediately (``SUCCESS_DIRECT``)."""

    outcome = PublishingOutcome.SUCCESS_DIRECT

    def build(self, request: PublishRequest, encoded: Encoded, topic: str, *,
              memo: HeaderMemo | None = None) -> OutgoingRecord:
        # A delayed message already due when it reached the producer goes out now, its
        # headers still saying when it was due.
        headers, size = _final_headers(request, encoded, memo=memo)
        return OutgoingRecord(topic, request.key, encoded.value, headers, size)

    @staticmethod
    def build_all(requests: Sequence[PublishRequest], topics: Sequence[str]
                  ) -> list[OutgoingRecord]:
        """``build`` for each request of a call whose values pass no byte stage (each
        serialised value is its record's value): the same records, in one loop, what the
        requests share worked out once (``HeaderMemo``)."""
        memo: HeaderMemo = {}
        return [OutgoingRecord(topic, request.key, request.value,
                               *_final_headers(request, _UNENCODED, memo=memo))
                for request, topic in zip(requests, topics, strict=True)]


_UNENCODED = Encoded(None, [])
"""What a value that passed no byte stage adds to its record's headers: nothing."""


def ms_ceil(seconds: float) -> int:
    return math.ceil(seconds * 1000)


class DelayedPublishStrategy:
    """Publishes a message to a delay topic, wrapped in an envelope (``SUCCESS_DELAYED``).

    The bucket is the largest not longer than the delay (the smallest when the delay is
    shorter than every bucket); the republisher moves the message on from there and
    delivers it to its final topic at its due time, never before. The envelope holds the
    final record as a direct publish would have sent it, but for its due time and hop,
    which the republisher stamps on it when it delivers it.

    A message already due when it reaches the producer (a backlog, or a call Ray retried
    after an actor died) goes straight to its *release bucket*, the bucket its planned path
    ends in, due at once: every copy of a message is released by the same republisher, which
    releases a message id once.
    """

    outcome = PublishingOutcome.SUCCESS_DELAYED

    def __init__(self, settings: MessagingSettings,
                 keys: envelope.EnvelopeKeys | None = None) -> None:
        self._topics = dict(settings.delay_topics)
        self._buckets = sorted(self._topics)
        self._near_s = settings.republisher.near_window_s
        self._keys = keys

    def build(self, request: PublishRequest, encoded: Encoded, topic: str,
              now: float | None = None, *, memo: HeaderMemo | None = None
              ) -> OutgoingRecord:
        if request.deliver_at is None:
            raise ValueError("a delayed publish needs a due time")
        deliver_at_ms = ms_ceil(request.deliver_at)  # rounding up: never early
        published_ms = int(request.published_at * 1000)
        now_ms = int((time.time() if now is None else now) * 1000)
        if deliver_at_ms > now_ms:
            bucket, hold_until_ms = first_hop(self._buckets, published_ms, deliver_at_ms)
        else:
            bucket = release_bucket(self._buckets, published_ms, deliver_at_ms,
                                    self._near_s)
            hold_until_ms = now_ms
        version = request.version or _auto_version(request.message_id)
        env = envelope.Envelope(
            topic=topic, key=request.key, value=encoded.value,
            # the due time and hop are stamped when the message is delivered: not carried
            headers=_final_headers(request, encoded, due=False, memo=memo)[0],
            deliver_at_ms=deliver_at_ms,
            hold_until_ms=hold_until_ms, published_ms=published_ms, hop=1,
            priority=request.priority, message_id=request.message_id, version=version,
            caller_id=request.version is not None)
        return OutgoingRecord(self._topics[bucket], partition_key(env),
                              envelope.encode(env, self._keys), delay_headers(env))


def envelope_keys(settings: MessagingSettings) -> envelope.EnvelopeKeys | None:
    """The keys authenticating a connection's envelopes (None: not authenticated)."""
    ring = settings.envelope_ring()
    return None if ring is None else envelope.envelope_keys(*ring)


def _auto_version(message_id: str) -> bytes:
    """The version of a message whose id athomic chose: the id itself (a UUID), so every
    copy of one publish has the same."""
    try:
        return uuid.UUID(message_id).bytes
    except ValueError:
        return hashlib.sha256(message_id.encode()).digest()[:16]


def partition_key(env: envelope.Envelope | envelope.EnvelopeHead) -> bytes:
    """The key a record waiting in a delay topic is written with: the message's own key
    (so one key's messages share partitions and keep their order), else its id (so copies
    of one message share them)."""
    return env.key if env.key is not None else env.message_id.encode()


def delay_headers(env: envelope.Envelope | envelope.EnvelopeHead
                  ) -> list[tuple[str, bytes]]:
    """Headers of a record waiting in a delay topic, for operators (kcat, lag tools); the
    republisher reads only the envelope."""
    return [(H_MESSAGE_ID, env.message_id.encode()),
            (H_DELIVER_AT, str(env.deliver_at_ms).encode()),
            (H_HOP, str(env.hop).encode()),
            (H_PRIORITY, env.priority.value.encode())]
