"""Context propagation and telemetry end to end: real Kafka, real local Ray.

The ProducerActors export their spans and metrics with ``exporter="file"`` (JSON lines
appended in the actors' own processes); ``ProducerFactory.shutdown`` flushes them.
"""

from __future__ import annotations

import contextvars
import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import read_records
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

from athomic import (
    ProducerFactory,
    PublishingOutcome,
    extract_context,
    message_context,
    register_context_var,
)
from athomic import context as ctx_mod
from athomic.context import correlation_id, request_id, tenant_id, user_id

pytestmark = pytest.mark.integration


def file_settings(settings_factory: Any, path: Path, **telemetry: Any) -> Any:
    return settings_factory(telemetry={"exporter": "file", "file_path": str(path),
                                       "metric_export_interval_s": 3600, **telemetry})


def exported(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return ([x for x in lines if x["signal"] == "span"],
            [x for x in lines if x["signal"] == "metric"])


def tp(record: Any) -> tuple[str, str]:
    """(trace id, span id) of a record's traceparent."""
    value = dict(record.headers)["traceparent"].decode()
    version, trace_id, span_id, _ = value.split("-")
    assert version == "00"
    return trace_id, span_id


def hexids(span: Any) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


async def test_records_and_actor_spans_form_the_callers_trace(
        settings_factory: Any, kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    settings = file_settings(settings_factory, path)
    producer = ProducerFactory.create(settings)
    tracer = TracerProvider().get_tracer("caller")
    with tracer.start_as_current_span("caller") as caller:
        single = producer.publish.remote(topic=topic, message={"n": 0}, key="user-1")
        batch = producer.publish_batch.remote(
            [{"message": {"n": i}, "key": f"k{i}"} for i in range(1, 6)], topic=topic)
        assert ray.get(single) is PublishingOutcome.SUCCESS_DIRECT
        assert ray.get(batch) == [PublishingOutcome.SUCCESS_DIRECT] * 5
    trace_id, caller_span = hexids(caller)

    records = await read_records(kafka_bootstrap, topic, 6)
    assert len(records) == 6
    assert {tp(r)[0] for r in records} == {trace_id}  # the caller's trace id, every one
    assert {extract_context(r.headers).trace_id for r in records} == {trace_id}

    ProducerFactory.shutdown(settings.connection_name)  # flushes the actors' exporters
    spans, metrics = exported(path)
    publish = [s for s in spans if s["name"] == f"publish {topic}"]
    assert len(publish) == 2
    one = next(s for s in publish if "messaging.batch.message_count" not in s["attributes"])
    many = next(s for s in publish if "messaging.batch.message_count" in s["attributes"])
    for span in publish:
        assert span["kind"] == "PRODUCER" and span["status"] == "UNSET"
        assert (span["trace_id"], span["parent_span_id"]) == (trace_id, caller_span)
        assert span["resource"]["service.name"] == "athomic"
    # the single message: its record's traceparent points at this span, which knows
    # where the broker put it
    (first,) = [r for r in records if r.key == b"user-1"]
    assert tp(first) == (trace_id, one["span_id"])
    assert one["attributes"] == {
        **one["attributes"],
        "messaging.system": "kafka", "messaging.destination.name": topic,
        "messaging.operation.name": "publish", "messaging.operation.type": "send",
        "messaging.message.id": dict(first.headers)["message-id"].decode(),
        "messaging.kafka.message.key": "user-1",
        "messaging.destination.partition.id": str(first.partition),
        "messaging.kafka.offset": first.offset,
        "athomic.priority": "normal"}
    assert many["attributes"]["messaging.batch.message_count"] == 5
    assert {tp(r)[1] for r in records if r.key != b"user-1"} == {many["span_id"]}

    sent = {(m["attributes"]["messaging.operation.name"], m["attributes"]["athomic.outcome"],
             m["attributes"]["athomic.priority"]): m["value"]
            for m in metrics if m["name"] == "messaging.client.sent.messages"
            and m["attributes"]["messaging.destination.name"] == topic}
    assert sent == {("publish", "success_direct", "normal"): 6}
    durations = [m for m in metrics if m["name"] == "messaging.client.operation.duration"]
    assert sum(m["count"] for m in durations) == 2
    (size,) = [m for m in metrics if m["name"] == "athomic.publish.batch.size"]
    assert (size["count"], size["sum"]) == (1, 5)


async def test_trace_and_context_from_inside_a_ray_task(
        settings_factory: Any, kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    settings = file_settings(settings_factory, path)
    producer = ProducerFactory.create(settings)

    @ray.remote
    def task(handle: Any, topic: str) -> tuple[str, str]:
        from opentelemetry.sdk.trace import TracerProvider

        from athomic.context import request_id

        tracer = TracerProvider().get_tracer("task")
        with tracer.start_as_current_span("task-work") as span:
            token = request_id.set("req-from-task")
            try:
                outcome = ray.get(handle.publish.remote(topic=topic, message={"t": 1}))
            finally:
                request_id.reset(token)
        assert outcome is PublishingOutcome.SUCCESS_DIRECT
        ctx = span.get_span_context()
        return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"

    trace_id, task_span = ray.get(task.remote(producer, topic))
    (record,) = await read_records(kafka_bootstrap, topic, 1)
    assert tp(record)[0] == trace_id
    with message_context(record.headers) as ctx:
        assert request_id.get() == "req-from-task"
        assert ctx.lineage.ray_task_id and ctx.lineage.ray_job_id and ctx.lineage.host
    ProducerFactory.shutdown(settings.connection_name)
    spans, _ = exported(path)
    (span,) = [s for s in spans if s["name"] == f"publish {topic}"]
    assert (span["trace_id"], span["parent_span_id"]) == (trace_id, task_span)
    assert tp(record) == (trace_id, span["span_id"])


async def test_execution_context_round_trips_through_the_consumer_helper(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    producer = ProducerFactory.create(settings_factory())  # exporter "none": global API
    order_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
        "it_order_id", default=None)
    register_context_var("order_id", order_id)
    try:
        tracer = TracerProvider().get_tracer("caller")
        values = ((request_id, "req-1"), (correlation_id, "corr-1"), (tenant_id, "acme"),
                  (user_id, "u-7"), (order_id, "o-42"))
        with tracer.start_as_current_span("caller") as caller:
            token = otel_context.attach(baggage.set_baggage("plan", "gold"))
            tokens = [(var, var.set(value)) for var, value in values]
            try:
                await producer.publish(topic=topic, message={"a": 1},
                                       headers={"athomic-ctx-tenant-id": "explicit"})
            finally:
                for var, tok in reversed(tokens):
                    var.reset(tok)
                otel_context.detach(token)
        (record,) = await read_records(kafka_bootstrap, topic, 1)
        assert request_id.get() is None
        with message_context(record.headers) as ctx:
            assert (request_id.get(), correlation_id.get(), tenant_id.get(), user_id.get(),
                    order_id.get()) == ("req-1", "corr-1", "explicit", "u-7", "o-42")
            assert baggage.get_baggage("plan") == "gold"
            assert ctx.trace_id == hexids(caller)[0]  # no SDK in the actor: passed through
            assert ctx.lineage.producer == "athomic"
            assert ctx.lineage.published_at is not None
            assert abs(ctx.lineage.published_at - time.time()) < 60
        assert (request_id.get(), order_id.get()) == (None, None)
    finally:
        ctx_mod._context_vars.pop("order_id", None)


async def test_invalid_traceparent_is_ignored_and_starts_a_new_trace(
        settings_factory: Any, kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    settings = file_settings(settings_factory, path, metrics=False)
    producer = ProducerFactory.create(settings)
    bad = {"traceparent": "00-not-a-trace-01", "tracestate": "vendor=1"}
    assert await producer.publish(topic=topic, message=1, key="a", headers=bad) is \
        PublishingOutcome.SUCCESS_DIRECT
    assert await producer.publish_batch([{"message": 2, "key": "b", "headers": bad}],
                                        topic=topic) == [PublishingOutcome.SUCCESS_DIRECT]
    records = await read_records(kafka_bootstrap, topic, 2)
    ProducerFactory.shutdown(settings.connection_name)
    spans, _ = exported(path)
    assert len(spans) == 2
    for record in records:
        headers = dict(record.headers)
        assert "tracestate" not in headers
        trace_id, span_id = tp(record)  # valid again: the actor's new span
        (span,) = [s for s in spans if s["span_id"] == span_id]
        assert span["trace_id"] == trace_id and span["parent_span_id"] is None
    assert len({tp(r)[0] for r in records}) == 2  # two new traces


async def test_delayed_message_keeps_the_callers_trace_through_the_republisher(
        settings_factory: Any, kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    import uuid

    path = tmp_path / "telemetry.jsonl"
    tag = uuid.uuid4().hex[:8]
    delay_topics = {1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s"}
    settings = settings_factory(
        # a small near window: the message takes two hops (2 s, then 1 s) before delivery
        delay_topics=delay_topics, republisher={"partitions": 1, "near_window_s": 0.5},
        telemetry={"exporter": "file", "file_path": str(path),
                   "metric_export_interval_s": 3600})
    producer = ProducerFactory.create(settings)
    tracer = TracerProvider().get_tracer("caller")
    with tracer.start_as_current_span("caller") as caller:
        assert ray.get(producer.publish.remote(topic=topic, message={"later": 1}, key="u1",
                                               delay_seconds=3.5)) \
            is PublishingOutcome.SUCCESS_DELAYED
    trace_id, caller_span = hexids(caller)
    (record,) = await read_records(kafka_bootstrap, topic, 1, timeout=30)
    assert tp(record)[0] == trace_id  # the final record is in the caller's trace
    assert extract_context(record.headers).lineage.hop == 2

    ProducerFactory.shutdown(settings.connection_name)  # flushes every actor's exporter
    spans, metrics = exported(path)
    (publish,) = [s for s in spans if s["name"] == f"publish {topic}"]
    (republish,) = [s for s in spans if s["name"] == f"republish {topic}"]
    assert (publish["trace_id"], publish["parent_span_id"]) == (trace_id, caller_span)
    assert (republish["trace_id"], republish["parent_span_id"]) == \
        (trace_id, publish["span_id"])
    assert republish["kind"] == "PRODUCER"
    assert tp(record)[1] == republish["span_id"]
    assert republish["attributes"]["messaging.destination.partition.id"] == \
        str(record.partition)
    assert republish["attributes"]["messaging.kafka.offset"] == record.offset
    late = [m for m in metrics if m["name"] == "athomic.delay.lateness"
            and m["attributes"].get("messaging.destination.name") == topic]
    assert sum(m["count"] for m in late) == 1
    held = [m for m in metrics if m["name"] == "athomic.delay.held"]
    assert held and sum(m["value"] for m in held) == 0  # read, then released
