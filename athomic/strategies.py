"""Publishing strategies: how a request becomes the Kafka record a ProducerActor sends.

Strategies are pure: they build records and never touch the network, so the actor owns all
I/O and the strategies are unit-tested without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from athomic.pipeline import Encoded
from athomic.settings import MessagingSettings

from .messages import (
    H_MESSAGE_ID,
    H_PRIORITY,
    H_PUBLISHED_AT,
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

    def size(self) -> int:
        """Bytes the record takes on the wire, near enough to compare with a size limit."""
        size = 70  # record and batch overhead in Kafka's v2 format, rounded up
        size += len(self.key or b"") + len(self.value or b"")
        size += sum(len(k) + len(v) + 4 for k, v in self.headers)
        return size


class PublishingStrategy(Protocol):
    outcome: PublishingOutcome

    def build(self, request: PublishRequest, encoded: Encoded) -> OutgoingRecord: ...


def physical_topic(topic: str, priority: MessagePriority, priority_topics: bool) -> str:
    """The topic a message is written to: ``<topic>.high`` / ``<topic>.low`` when physical
    priority topics are on, else ``topic``."""
    if priority_topics and priority is not MessagePriority.NORMAL:
        return f"{topic}.{priority.value}"
    return topic


def final_headers(request: PublishRequest, encoded: Encoded) -> list[tuple[str, bytes]]:
    """The caller's headers, then what athomic owns (id, priority, publish time, pipeline
    description)."""
    headers = request.headers.copy()
    headers.set(H_MESSAGE_ID, request.message_id)
    headers.set(H_PRIORITY, request.priority.value)
    # Epoch milliseconds of the publish call, fixed on the caller's side; kept through
    # delays, so it is the original publish time.
    headers.set(H_PUBLISHED_AT, str(round(request.published_at * 1000)))
    for name in PIPELINE_HEADERS:
        headers.remove(name)
    for key, value in encoded.headers:
        headers.set(key, value)
    return headers.to_kafka()


class DirectPublishStrategy:
    """Publishes a message to its final topic immediately (``SUCCESS_DIRECT``)."""

    outcome = PublishingOutcome.SUCCESS_DIRECT

    def __init__(self, settings: MessagingSettings) -> None:
        self._priority_topics = settings.priority_topics

    def topic_for(self, request: PublishRequest) -> str:
        return physical_topic(request.topic, request.priority, self._priority_topics)

    def build(self, request: PublishRequest, encoded: Encoded) -> OutgoingRecord:
        return OutgoingRecord(self.topic_for(request), request.key, encoded.value,
                              final_headers(request, encoded))
