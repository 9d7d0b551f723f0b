"""Spans of the ProducerActor's publishing and the republisher helpers, with SDK providers
and in-memory exporters (pure, no broker)."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from athomic import (
    MessageHeaders,
    MessagePriority,
    MessagingSettings,
    PublishError,
    RecordTooLargeError,
    extract_context,
)
from athomic.messages import PublishingOutcome, PublishRequest, new_message_id
from athomic.pipeline import EncodeItem, Pipeline
from athomic.settings import TelemetrySettings
from athomic.strategies import DirectPublishStrategy, OutgoingRecord, physical_topic
from athomic.telemetry import _OFF, RepublishSpan, Telemetry

SETTINGS = MessagingSettings(bootstrap_servers="broker-1:9093,broker-2:9093",
                             client_id="athomic-test", priority_topics=True)
DIRECT = DirectPublishStrategy()


@dataclass
class Meta:
    """What aiokafka's send future resolves to (the fields we read)."""

    partition: int
    offset: int


class Setup:
    def __init__(self, **telemetry: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.caller = self.provider.get_tracer("caller")
        self.telemetry = Telemetry(TelemetrySettings(**telemetry), servers=SETTINGS.servers,
                                   client_id="athomic-test", tracer_provider=self.provider)

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans of athomic (the callers' own excluded), or those named ``name``."""
        return [s for s in self.exporter.get_finished_spans()
                if (name is None and not s.name.startswith("caller")) or s.name == name]


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    yield s
    s.provider.shutdown()


def request(topic: str = "orders", *, key: bytes | None = b"user-1", value: bytes | None = b"{}",
            headers: MessageHeaders | None = None,
            priority: MessagePriority = MessagePriority.NORMAL) -> PublishRequest:
    """A request as it reaches the actor: headers captured on the caller's side, and
    pickled on the way (as Ray does)."""
    from athomic.context import capture

    hdrs = capture("svc")
    if headers is not None:
        hdrs.update(headers)
    req = PublishRequest(topic=topic, value=value, key=key, headers=hdrs.items(),
                         content_type="application/json", schema=None, priority=priority,
                         deliver_at=None, message_id=new_message_id(), published_at=1.0)
    copy: PublishRequest = pickle.loads(pickle.dumps(req))
    return copy


def topics(requests: list[PublishRequest]) -> list[str]:
    """Physical topics, as the ProducerActor computes them."""
    return [physical_topic(r.topic, r.priority, SETTINGS.priority_topics) for r in requests]


def build(requests: list[PublishRequest]) -> list[tuple[OutgoingRecord, PublishingOutcome]]:
    from athomic.pipeline import Encoded

    return [(DIRECT.build(r, Encoded(r.value, []), t), PublishingOutcome.SUCCESS_DIRECT)
            for r, t in zip(requests, topics(requests), strict=True)]


def ids(span: Any) -> tuple[str, str]:
    ctx = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def traceparent_ids(headers: MessageHeaders | list[tuple[str, bytes]]) -> tuple[str, str]:
    value = MessageHeaders(headers).get_str("traceparent")
    assert value is not None
    _, trace_id, span_id, _ = value.split("-")
    return trace_id, span_id


def test_publish_span_is_a_child_of_the_caller_with_semconv_attributes(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller") as caller:
        req = request(key=b"user-1", value=b'{"a":1}', priority=MessagePriority.HIGH)
    reqs = [req]
    recorder = setup.telemetry.publishing(reqs, topics(reqs), batch=False)
    prepared = build(reqs)
    recorder.done(prepared, [Meta(partition=3, offset=41)])
    (span,) = setup.spans("publish orders.high")
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is not None
    assert (f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}") == ids(caller)
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "orders.high",
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "messaging.message.id": req.message_id,
        "messaging.kafka.message.key": "user-1",
        "messaging.message.body.size": 7,
        "messaging.client.id": "athomic-test",
        "server.address": "broker-1",
        "server.port": 9093,
        "athomic.priority": "high",
        "messaging.destination.partition.id": "3",
        "messaging.kafka.offset": 41,
    }
    # the record carries the span's context: same trace as the caller, parent = the span
    assert traceparent_ids(prepared[0][0].headers) == ids(span)


def test_batch_has_one_span_per_topic_and_caller_context(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller-a") as caller_a:
        token = otel_context.attach(baggage.set_baggage("who", "a"))
        a = [request("orders", key=f"k{i}".encode()) for i in range(3)]
        otel_context.detach(token)
    with setup.caller.start_as_current_span("caller-b") as caller_b:
        b = [request("orders"), request("payments")]
    untraced = [request("orders")]
    batch = [a[0], b[0], a[1], b[1], untraced[0], a[2]]
    recorder = setup.telemetry.publishing(batch, topics(batch), batch=True)
    # the groups of one message record their record's own offset: the producer must work
    # it out for each record of a record batch (for none, when no group is of one)
    assert recorder.offsets
    only_a = setup.telemetry.publishing(list(a), topics(a), batch=True)
    assert not only_a.offsets
    only_a.abort(RuntimeError("not sent"))
    setup.exporter.clear()
    prepared = build(batch)
    recorder.done(prepared, [Meta(0, i) for i in range(len(batch))])
    spans = setup.spans()
    assert sorted(s.name for s in spans) == ["publish orders"] * 3 + ["publish payments"]
    by_parent = {(s.parent.span_id if s.parent else None, s.name): s for s in spans}
    span_a = by_parent[(caller_a.get_span_context().span_id, "publish orders")]
    span_b = by_parent[(caller_b.get_span_context().span_id, "publish orders")]
    span_bp = by_parent[(caller_b.get_span_context().span_id, "publish payments")]
    root = by_parent[(None, "publish orders")]
    attrs = dict(span_a.attributes or {})
    assert attrs["messaging.batch.message_count"] == 3
    assert attrs["messaging.destination.partition.id"] == "0"  # all in one partition
    assert "messaging.message.id" not in attrs and "messaging.kafka.offset" not in attrs
    # a group of one message still describes that message (and its offset)
    one = dict(span_bp.attributes or {})
    assert one["messaging.batch.message_count"] == 1
    assert one["messaging.message.id"] == b[1].message_id
    assert one["messaging.kafka.offset"] == 3
    # each record carries its own group's span: the caller's trace id, parent = the span
    expected = [span_a, span_b, span_a, span_bp, root, span_a]
    for (record, _), span in zip(prepared, expected, strict=True):
        assert traceparent_ids(record.headers) == ids(span)
    assert ids(span_a)[0] == ids(caller_a)[0] and ids(span_b)[0] == ids(caller_b)[0]
    # baggage is each message's own, untouched
    assert MessageHeaders(prepared[0][0].headers)["baggage"] == b"who=a"
    assert "baggage" not in MessageHeaders(prepared[1][0].headers)


def test_partitions_differ_so_no_partition_attribute(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        batch = [request() for _ in range(2)]
    recorder = setup.telemetry.publishing(batch, topics(batch), batch=True)
    recorder.done(build(batch), [Meta(0, 1), Meta(1, 1)])
    (span,) = setup.spans()
    assert "messaging.destination.partition.id" not in (span.attributes or {})


def test_unacknowledged_message_fails_its_span(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        batch = [request(), request()]
    recorder = setup.telemetry.publishing(batch, topics(batch), batch=True)
    error = PublishError("no acknowledgement for 'orders' in time", topic="orders")
    recorder.done(build(batch), [Meta(0, 1), error])
    (span,) = setup.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert "PublishError" in (span.status.description or "")
    assert (span.attributes or {})["error.type"] == "PublishError"
    assert [e.name for e in span.events] == ["exception"]


def test_abort_fails_every_span(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        batch = [request("a"), request("b")]
    recorder = setup.telemetry.publishing(batch, topics(batch), batch=True)
    recorder.abort(RecordTooLargeError("too big", size=10, limit=5))
    spans = setup.spans()
    assert len(spans) == 2
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert {(s.attributes or {})["error.type"] for s in spans} == {"RecordTooLargeError"}


def test_invalid_traceparent_reaching_the_actor_starts_a_new_trace(setup: Setup) -> None:
    bad = request(headers=MessageHeaders({"traceparent": "00-zzzz-yyyy-01",
                                          "tracestate": "x=y"}))
    bads = [bad]
    recorder = setup.telemetry.publishing(bads, topics(bads), batch=False)
    prepared = build(bads)
    recorder.done(prepared, [Meta(0, 0)])
    (span,) = setup.spans()
    assert span.parent is None  # a new trace
    assert traceparent_ids(prepared[0][0].headers) == ids(span)  # replaced, now valid
    assert MessageHeaders(prepared[0][0].headers).get("tracestate") is None


def test_without_an_sdk_the_callers_context_passes_through() -> None:
    # exporter "none" + no SDK set up in this process: the global API is a no-op
    telemetry = Telemetry(TelemetrySettings())
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("caller") as span:
        req = request()
    reqs = [req]
    recorder = telemetry.publishing(reqs, topics(reqs), batch=False)
    prepared = build(reqs)
    recorder.done(prepared, [Meta(0, 0)])
    assert traceparent_ids(prepared[0][0].headers) == ids(span)


def test_everything_off_is_a_shared_no_op() -> None:
    telemetry = Telemetry(TelemetrySettings(traces=False, metrics=False))
    req = request()
    before = req.headers.copy()
    recorder = telemetry.publishing([req], [r.topic for r in [req]], batch=False)
    assert recorder is _OFF and recorder.observe is None
    recorder.done(build([req]), [Meta(0, 0)])
    recorder.abort(RuntimeError("x"))
    assert req.headers == before


async def test_pipeline_spans_wrap_each_run_of_stages() -> None:
    setup = Setup(pipeline_spans=True)
    settings = MessagingSettings(pipeline=[
        {"stage": "serialize"},
        {"stage": "compress", "min_size": 0},
        {"stage": "encrypt", "keys": {"k1": "A" * 43 + "="}, "primary": "k1"}])
    pipeline = Pipeline.from_settings(settings)
    with setup.caller.start_as_current_span("caller"):
        batch = [request(value=b'{"x":"' + b"y" * 600 + b'"}') for _ in range(4)]
    recorder = setup.telemetry.publishing(batch, topics(batch), batch=True)
    assert recorder.observe is not None
    items = [EncodeItem(r.value, r.topic, r.key, r.message_id) for r in batch]
    await pipeline.encode_batch(items, observe=recorder.observe)
    recorder.done(build(batch), [Meta(0, i) for i in range(4)])
    (stage_span,) = setup.spans("encode zstd+aes-256-gcm")
    (publish,) = setup.spans("publish orders")
    assert stage_span.kind is SpanKind.INTERNAL
    assert stage_span.parent is not None
    assert stage_span.parent.span_id == publish.get_span_context().span_id
    assert dict(stage_span.attributes or {}) == {
        "athomic.pipeline.stages": ("zstd", "aes-256-gcm"),
        "athomic.pipeline.placement": "inline",
        "messaging.batch.message_count": 4}
    # off by default
    assert Setup().telemetry.publishing(batch, topics(batch), batch=True).observe is None
    asyncio.get_running_loop()  # (an async test: encode_batch is a coroutine)


# --- the republisher's helpers ----------------------------------------------------------------
def stored_headers(setup: Setup) -> tuple[list[tuple[str, bytes]], Any, Any]:
    """Headers as the delayed path stores them: the ProducerActor's span context."""
    with setup.caller.start_as_current_span("caller") as caller:
        req = request("notifications", headers=MessageHeaders({"x-app": "1"}))
    reqs = [req]
    recorder = setup.telemetry.publishing(reqs, topics(reqs), batch=False)
    prepared = build(reqs)
    recorder.done(prepared, [Meta(0, 0)])
    (publish_span,) = setup.spans("publish notifications")
    return prepared[0][0].headers, caller, publish_span


def test_republish_span_continues_the_callers_trace(setup: Setup) -> None:
    stored, caller, publish_span = stored_headers(setup)
    outgoing = MessageHeaders(stored)
    with setup.telemetry.republish_span("notifications", tuple(stored),
                                        message_id="mid-1", key=b"u1",
                                        delay_topic="athomic.delay.10s", hop=2) as span:
        span.inject(outgoing)
        span.acked(partition=1, offset=7)
    (republish,) = setup.spans("republish notifications")
    assert republish.kind is SpanKind.PRODUCER
    assert republish.parent is not None
    assert republish.parent.span_id == publish_span.get_span_context().span_id
    assert ids(republish)[0] == ids(caller)[0]
    assert traceparent_ids(outgoing) == ids(republish)  # the final message: caller's trace
    assert extract_context(outgoing).trace_id == ids(caller)[0]
    assert outgoing["x-app"] == b"1" and len(outgoing.get_all("traceparent")) == 1
    attrs = dict(republish.attributes or {})
    assert attrs["messaging.operation.name"] == "republish"
    assert attrs["messaging.destination.name"] == "notifications"
    assert attrs["athomic.delay.topic"] == "athomic.delay.10s"
    assert attrs["athomic.hop"] == 2 and attrs["messaging.message.id"] == "mid-1"
    assert attrs["messaging.kafka.message.key"] == "u1"
    assert attrs["messaging.destination.partition.id"] == "1"
    assert attrs["messaging.kafka.offset"] == 7


def test_republish_span_records_failures(setup: Setup) -> None:
    stored, _, _ = stored_headers(setup)
    with pytest.raises(PublishError), setup.telemetry.republish_span("n", stored):
        raise PublishError("broker said no", topic="n")
    (span,) = setup.spans("republish n")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "PublishError"
    # manual form: failed() then end(); end() twice is harmless
    manual = setup.telemetry.start_republish("m", stored)
    manual.failed(ValueError("bad envelope"))
    manual.end()
    manual.end()
    (span,) = setup.spans("republish m")
    assert (span.attributes or {})["error.type"] == "ValueError"


def test_republish_with_a_bad_or_no_traceparent_starts_a_new_trace(setup: Setup) -> None:
    for stored in ([("traceparent", b"broken")], []):
        span = setup.telemetry.start_republish("t", stored)
        out = MessageHeaders(stored)
        span.inject(out)
        span.end()
        assert traceparent_ids(out) == ids(span.span)
    assert all(s.parent is None for s in setup.spans("republish t"))


def test_republish_span_is_a_no_op_with_tracing_off(setup: Setup) -> None:
    stored, caller, publish_span = stored_headers(setup)
    off = Telemetry(TelemetrySettings(traces=False))
    out = MessageHeaders(stored)
    with off.republish_span("notifications", stored) as span:
        assert isinstance(span, RepublishSpan) and span.span is None
        span.inject(out)
        span.acked(0, 1)
        assert span.trace_headers() == []
    # the stored context goes out unchanged: still the caller's trace
    assert traceparent_ids(out) == ids(publish_span)
    assert traceparent_ids(out)[0] == ids(caller)[0]


async def test_producer_actor_fails_its_span_when_a_message_is_refused(tmp_path: Any) -> None:
    """The ProducerActor wiring, without a broker: a record over max_request_size is
    refused before sending; its span ends failed and stop() exports it."""
    import json

    from athomic.actors import ProducerActor

    path = tmp_path / "spans.jsonl"
    settings = MessagingSettings(producer={"max_request_size": 1024}, telemetry={
        "exporter": "file", "file_path": str(path), "metrics": False})
    actor = ProducerActor(settings)
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("caller") as parent:
        req = request(value=b"x" * 2000)
    with pytest.raises(RecordTooLargeError):
        await actor.publish(req)
    await actor.stop()
    (span,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert span["name"] == "publish orders" and span["status"] == "ERROR"
    assert span["attributes"]["error.type"] == "RecordTooLargeError"
    assert span["parent_span_id"] == f"{parent.get_span_context().span_id:016x}"
