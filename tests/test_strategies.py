"""Strategies are pure: request + encoded payload -> the record to send."""

from __future__ import annotations

from athomic import DirectPublishStrategy, MessageHeaders, MessagePriority, MessagingSettings
from athomic.messages import PublishRequest
from athomic.pipeline import Encoded
from athomic.strategies import physical_topic


def request(priority: MessagePriority = MessagePriority.NORMAL) -> PublishRequest:
    return PublishRequest(topic="orders", value=b"{}", key=b"k",
                          headers=[("message-id", b"spoofed"), ("x", b"1")],
                          content_type="application/json", schema=None, priority=priority,
                          deliver_at=None, message_id="id-1", published_at=1.0)


def test_physical_priority_topics() -> None:
    assert physical_topic("t", MessagePriority.HIGH, False) == "t"
    assert physical_topic("t", MessagePriority.HIGH, True) == "t.high"
    assert physical_topic("t", MessagePriority.LOW, True) == "t.low"
    assert physical_topic("t", MessagePriority.NORMAL, True) == "t"


def test_direct_record_owns_id_priority_and_pipeline_headers() -> None:
    strategy = DirectPublishStrategy(MessagingSettings(priority_topics=True))
    record = strategy.build(request(MessagePriority.HIGH),
                            Encoded(b"zz", [("content-encoding", b"zstd")]))
    assert record.topic == "orders.high"
    assert (record.key, record.value) == (b"k", b"zz")
    h = MessageHeaders(record.headers)
    assert h["message-id"] == b"id-1"  # a caller cannot spoof the id
    assert h["athomic-priority"] == b"high"
    assert h["content-encoding"] == b"zstd" and h["x"] == b"1"
    assert record.size() > len(b"zz") + len(b"k")
