"""Context on the caller's side and back on the consumer's: capture, invalid traceparent,
header caps, extract_context / message_context (pure, no broker)."""

from __future__ import annotations

import concurrent.futures
import contextvars
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from athomic import (
    InvalidHeaderError,
    MessageHeaders,
    MessagingSettings,
    extract_context,
    message_context,
    register_context_var,
)
from athomic import context as ctx_mod
from athomic._handle import ProducerHandle
from athomic.context import capture, captured, correlation_id, request_id, tenant_id, user_id
from athomic.messages import PublishRequest
from athomic.pipeline import Encoded
from athomic.strategies import DirectPublishStrategy, final_headers

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def tracer() -> Iterator[trace.Tracer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    yield provider.get_tracer("test")
    provider.shutdown()


class FakeRef:
    def future(self) -> concurrent.futures.Future[Any]:
        return concurrent.futures.Future()


class FakeMethod:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def remote(self, payload: Any) -> FakeRef:
        # one publish crosses as its MessagePack list (PublishRequest.wire)
        self.log.append(PublishRequest.from_wire(payload) if type(payload) is list
                        else payload)
        return FakeRef()


class FakeActor:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.publish = FakeMethod(self.calls)
        self.publish_batch = FakeMethod(self.calls)

    def _get_local_state(self) -> None:
        return None  # not known: as for an actor not called yet


def handle(**settings: Any) -> tuple[ProducerHandle, FakeActor]:
    actor = FakeActor()
    return ProducerHandle(MessagingSettings(**settings),
                          {"high": [actor], "normal": [actor]}), actor


def sent(actor: FakeActor) -> PublishRequest:
    """The last request the handle sent, its headers as MessageHeaders to read them."""
    request = actor.calls[-1]
    assert isinstance(request, PublishRequest)
    return request._replace(headers=MessageHeaders(request.headers))


def trace_id_of(traceparent: bytes | None) -> str:
    assert traceparent is not None
    return traceparent.decode().split("-")[1]


def test_capture_injects_whatever_the_current_context_holds() -> None:
    """Nothing current: no propagation headers (the propagators are not asked); baggage
    alone: the baggage, and no traceparent."""
    assert not otel_context.get_current()
    empty = capture("svc")
    assert "traceparent" not in empty and "baggage" not in empty
    assert empty["athomic-producer"] == b"svc"
    token = otel_context.attach(baggage.set_baggage("k", "v"))
    try:
        only = capture("svc")
    finally:
        otel_context.detach(token)
    assert only["baggage"] == b"k=v" and "traceparent" not in only


def test_a_drivers_lineage_headers_are_built_once_and_never_changed() -> None:
    """Nothing set in the caller: the same list each time (its lineage alone); a context
    variable: a new list, the variable first, the lineage after, sizes counted."""
    first, size = captured("svc")
    again, _ = captured("svc")
    assert again is first
    assert dict(first)["athomic-producer"] == b"svc"
    assert size == sum(len(k) + len(v) for k, v in first)
    kept = list(first)
    token = request_id.set("req-9")
    try:
        with_var, var_size = captured("svc")
    finally:
        request_id.reset(token)
    assert with_var[0] == ("athomic-ctx-request-id", b"req-9") and with_var[1:] == kept
    assert var_size == sum(len(k) + len(v) for k, v in with_var)
    assert captured("other")[0] is not first  # built per service name
    assert captured("svc", lineage=False) == ([], 0)
    # publishing, with headers of the caller's or without, leaves the shared list as it was
    h, actor = handle(lineage={"service_name": "svc"})
    h.publish.remote(topic="t", message=1)
    h.publish.remote(topic="t", message=2, headers={"athomic-host": "mine", "x": "1"})
    h.publish_batch.remote([{"message": 3}], topic="t")
    assert actor.calls[0].headers == first
    assert first == kept and captured("svc")[0] is first


def test_capture_takes_span_baggage_and_context_vars(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("caller") as span:
        token = otel_context.attach(baggage.set_baggage("tenant.tier", "gold"))
        rid, tid = request_id.set("req-1"), tenant_id.set("acme")
        try:
            headers = capture("svc")
        finally:
            request_id.reset(rid)
            tenant_id.reset(tid)
            otel_context.detach(token)
    sc = span.get_span_context()
    assert headers["traceparent"].decode() == (
        f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}")
    assert headers["baggage"] == b"tenant.tier=gold"
    assert headers["athomic-ctx-request-id"] == b"req-1"
    assert headers["athomic-ctx-tenant-id"] == b"acme"
    assert "athomic-ctx-user-id" not in headers  # unset variables are not sent
    assert headers["athomic-producer"] == b"svc" and headers["athomic-host"]


def test_no_current_span_means_no_trace_headers() -> None:
    headers = capture("svc")
    assert "traceparent" not in headers and "tracestate" not in headers


def test_explicit_valid_traceparent_wins_over_captured(tracer: trace.Tracer) -> None:
    h, actor = handle()
    with tracer.start_as_current_span("caller"):
        h.publish.remote(topic="t", message=1,
                         headers={"traceparent": VALID, "tracestate": "k=v"})
    request = sent(actor)
    assert request.headers["traceparent"] == VALID.encode()
    assert request.headers["tracestate"] == b"k=v"


@pytest.mark.parametrize("bad", [
    "garbage",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
    "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",   # short trace id
    "",
])
def test_invalid_explicit_traceparent_is_dropped_never_an_error(
        bad: str, tracer: trace.Tracer) -> None:
    h, actor = handle()
    # Without a current span: no trace context at all (the actor's span starts a trace).
    h.publish.remote(topic="t", message=1, headers={"traceparent": bad, "tracestate": "a=b"})
    request = sent(actor)
    assert "traceparent" not in request.headers and "tracestate" not in request.headers
    # With one: the caller's own context is carried instead.
    with tracer.start_as_current_span("caller") as span:
        h.publish.remote(topic="t", message=1, headers={"traceparent": bad})
    request = sent(actor)
    assert trace_id_of(request.headers.get("traceparent")) == \
        f"{span.get_span_context().trace_id:032x}"


def test_header_cap_applies_to_captured_plus_caller(tracer: trace.Tracer) -> None:
    h, actor = handle(producer={"max_headers": 8, "max_header_bytes": 2048})
    # 5 caller headers alone are within the cap; with traceparent, producer, host and a
    # context variable they are not.
    five = {f"x-{i}": "v" for i in range(5)}
    token = request_id.set("r-1")
    try:
        with tracer.start_as_current_span("caller"), pytest.raises(
                InvalidHeaderError, match=r"max_headers=8.*5 passed in headers="):
            h.publish.remote(topic="t", message=1, headers=five)
    finally:
        request_id.reset(token)
    # bytes: one caller header under the byte cap, pushed over it by what is captured
    big = {"x-big": "v" * (2048 - 100)}
    with tracer.start_as_current_span("caller"), pytest.raises(
            InvalidHeaderError, match="max_header_bytes=2048"):
        h.publish.remote(topic="t", message=1, headers=big)
    # the same headers without the captured ones fit
    h2, actor2 = handle(producer={"max_headers": 8, "max_header_bytes": 2048},
                        lineage={"enabled": False})
    h2.publish.remote(topic="t", message=1, headers=dict(list(five.items())[:4]))
    assert len(sent(actor2).headers) == 4
    assert not actor.calls


def test_batch_item_over_the_cap_names_its_index() -> None:
    h, actor = handle(producer={"max_headers": 6})
    items = [{"topic": "t", "message": 1},
             {"topic": "t", "message": 2, "headers": {f"x{i}": "v" for i in range(6)}}]
    with pytest.raises(InvalidHeaderError, match="message #1"):
        h.publish_batch.remote(items)
    assert not actor.calls


def test_published_at_header_is_the_callers_publish_time() -> None:
    h, actor = handle()
    before = time.time()
    h.publish.remote(topic="t", message=1)
    request = actor.calls[-1]
    record = DirectPublishStrategy().build(request, Encoded(b"1", []), request.topic)
    value = MessageHeaders(record.headers)["athomic-published-at"]
    assert int(value) == round(request.published_at * 1000)
    assert before - 1 <= int(value) / 1000 <= time.time() + 1


def headers_from_a_producer(tracer: trace.Tracer) -> tuple[list[tuple[str, bytes]], str]:
    """Record headers as a consumer receives them (pairs), from a traced caller."""
    h, actor = handle(lineage={"service_name": "orders-svc"})
    with tracer.start_as_current_span("caller") as span:
        token = otel_context.attach(baggage.set_baggage("k", "v"))
        tokens = [(v, v.set(x)) for v, x in ((request_id, "req-9"), (correlation_id, "c-1"),
                                             (tenant_id, "t-1"), (user_id, "u-1"))]
        try:
            h.publish.remote(topic="t", message={"a": 1})
        finally:
            for var, tok in reversed(tokens):
                var.reset(tok)
            otel_context.detach(token)
    request = actor.calls[-1]
    pairs = final_headers(request, Encoded(request.value, []))
    return [*pairs, ("athomic-hop", b"2")], f"{span.get_span_context().trace_id:032x}"


def test_extract_context_reads_everything_back(tracer: trace.Tracer) -> None:
    pairs, trace_id = headers_from_a_producer(tracer)
    ctx = extract_context(tuple(pairs))  # aiokafka gives a tuple of pairs
    assert ctx.trace_id == trace_id
    assert ctx.span_context is not None and ctx.span_context.is_remote
    assert dict(ctx.baggage) == {"k": "v"}
    assert dict(ctx.values) == {"request_id": "req-9", "correlation_id": "c-1",
                                "tenant_id": "t-1", "user_id": "u-1"}
    lineage = ctx.lineage
    assert lineage.producer == "orders-svc" and lineage.host
    assert lineage.message_id and lineage.published_at is not None
    assert abs(lineage.published_at - time.time()) < 60
    assert lineage.hop == 2
    assert extract_context(MessageHeaders(pairs)).trace_id == trace_id
    assert extract_context(dict(pairs)).trace_id == trace_id


def test_extract_context_tolerates_bad_and_missing_values() -> None:
    ctx = extract_context([("traceparent", b"nonsense"), ("athomic-published-at", b"x"),
                           ("athomic-hop", None), ("athomic-ctx-request-id", "r")])
    assert ctx.span_context is None and ctx.trace_id is None
    assert ctx.lineage.published_at is None and ctx.lineage.hop is None
    assert dict(ctx.values) == {"request_id": "r"}
    assert extract_context(None).values == {}


def test_message_context_activates_and_restores(tracer: trace.Tracer) -> None:
    pairs, trace_id = headers_from_a_producer(tracer)
    outer = user_id.set("outer-user")
    try:
        with message_context(pairs) as ctx:
            assert request_id.get() == "req-9" and tenant_id.get() == "t-1"
            assert user_id.get() == "u-1"
            assert f"{trace.get_current_span().get_span_context().trace_id:032x}" == trace_id
            assert baggage.get_baggage("k") == "v"
            with tracer.start_as_current_span("process") as child:
                assert f"{child.get_span_context().trace_id:032x}" == trace_id
            assert ctx.trace_id == trace_id
        assert request_id.get() is None and user_id.get() == "outer-user"
        assert not trace.get_current_span().get_span_context().is_valid
        # a message without a value clears the variable for the block
        with message_context([("athomic-ctx-request-id", b"only")]):
            assert request_id.get() == "only" and user_id.get() is None
        assert user_id.get() == "outer-user"
    finally:
        user_id.reset(outer)


def test_message_context_restores_on_error(tracer: trace.Tracer) -> None:
    pairs, _ = headers_from_a_producer(tracer)
    with pytest.raises(RuntimeError), message_context(pairs):
        raise RuntimeError("handler failed")
    assert request_id.get() is None


def test_registered_context_var_round_trips(tracer: trace.Tracer) -> None:
    order_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
        "test_order_id", default=None)
    register_context_var("order_id", order_id)
    try:
        h, actor = handle()
        token = order_id.set("o-42")
        try:
            h.publish.remote(topic="t", message=1)
        finally:
            order_id.reset(token)
        request = sent(actor)
        assert request.headers["athomic-ctx-order-id"] == b"o-42"
        assert extract_context(request.headers).values["order_id"] == "o-42"
        with message_context(request.headers):
            assert order_id.get() == "o-42"
        assert order_id.get() is None
    finally:
        ctx_mod._context_vars.pop("order_id", None)
    # an unregistered consumer still sees the value, by its header's name
    assert extract_context([("athomic-ctx-order-id", b"o-1")]).values == {"order_id": "o-1"}
    with pytest.raises(ValueError):
        register_context_var("bad name!", order_id)
