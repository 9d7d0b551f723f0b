"""Metrics, settings and exporters of athomic.telemetry (no broker; the OTLP test talks to
a local HTTP server standing in for a collector)."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from athomic import (
    ConfigurationError,
    MalformedEnvelopeError,
    MessagePriority,
    MessagingSettings,
    PublishError,
    SerializationError,
)
from athomic import telemetry as tm
from athomic._exporters import check_exporter
from athomic.messages import PublishingOutcome, PublishRequest, new_message_id
from athomic.pipeline import Encoded
from athomic.settings import TelemetrySettings
from athomic.strategies import DirectPublishStrategy
from athomic.telemetry import Telemetry

DIRECT = DirectPublishStrategy()


class Meta:
    partition = 0
    offset = 1


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.provider = provider  # type: ignore[attr-defined]
    yield reader
    provider.shutdown()


def telemetry(reader: InMemoryMetricReader, **settings: Any) -> Telemetry:
    return Telemetry(TelemetrySettings(**settings),
                     meter_provider=reader.provider)  # type: ignore[attr-defined]


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Metric name -> [(attributes, point)]."""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    out.setdefault(metric.name, []).append((dict(p.attributes or {}), p))
    return out


def request(topic: str, priority: MessagePriority = MessagePriority.NORMAL) -> PublishRequest:

    return PublishRequest(topic=topic, value=b"{}", key=None, headers=[],
                          content_type="application/json", schema=None, priority=priority,
                          deliver_at=None, message_id=new_message_id(), published_at=1.0)


def test_publish_metrics_by_topic_outcome_priority(reader: InMemoryMetricReader) -> None:
    tel = telemetry(reader)
    batch = [request("orders"), request("orders"), request("orders", MessagePriority.HIGH),
             request("payments")]
    recorder = tel.publishing(batch, [r.topic for r in batch], batch=True)
    prepared = [(DIRECT.build(r, Encoded(r.value, []), r.topic), PublishingOutcome.SUCCESS_DIRECT)
                for r in batch]
    prepared[3] = (prepared[3][0], PublishingOutcome.SUCCESS_DELAYED)
    failure = PublishError("not acknowledged", topic="orders")
    recorder.done(prepared, [Meta(), failure, Meta(), Meta()])
    single = [request("orders")]
    tel.publishing(single, [r.topic for r in single], batch=False).done(
        [(DIRECT.build(single[0], Encoded(b"{}", []), single[0].topic),
          PublishingOutcome.SUCCESS_DIRECT)],
        [Meta()])

    got = points(reader)
    sent = {tuple(sorted(a.items())): p.value for a, p in got["messaging.client.sent.messages"]}

    def key(**attrs: Any) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted({"messaging.system": "kafka", **attrs}.items()))

    assert sent == {
        key(**{"messaging.destination.name": "orders", "messaging.operation.name":
               "publish_batch", "athomic.outcome": "success_direct",
               "athomic.priority": "normal"}): 1,
        key(**{"messaging.destination.name": "orders", "messaging.operation.name":
               "publish_batch", "athomic.outcome": "failed", "athomic.priority": "normal",
               "error.type": "PublishError"}): 1,
        key(**{"messaging.destination.name": "orders", "messaging.operation.name":
               "publish_batch", "athomic.outcome": "success_direct",
               "athomic.priority": "high"}): 1,
        key(**{"messaging.destination.name": "payments", "messaging.operation.name":
               "publish_batch", "athomic.outcome": "success_delayed",
               "athomic.priority": "normal"}): 1,
        key(**{"messaging.destination.name": "orders", "messaging.operation.name": "publish",
               "athomic.outcome": "success_direct", "athomic.priority": "normal"}): 1,
    }
    durations = {a["messaging.operation.name"]: (a, p)
                 for a, p in got["messaging.client.operation.duration"]}
    batch_attrs, batch_point = durations["publish_batch"]
    assert batch_attrs == {"messaging.system": "kafka", "messaging.operation.name":
                           "publish_batch", "error.type": "PublishError"}  # two topics
    assert batch_point.count == 1 and 0 <= batch_point.sum < 5
    assert durations["publish"][0]["messaging.destination.name"] == "orders"
    assert 0.001 in batch_point.explicit_bounds  # semconv-like buckets, in seconds
    (size_attrs, size_point), = got["athomic.publish.batch.size"]
    assert size_point.count == 1 and size_point.sum == 4
    assert size_attrs == {"messaging.system": "kafka",
                          "messaging.operation.name": "publish_batch"}
    (err_attrs, err_point), = got["athomic.errors"]
    assert err_attrs == {"error.type": "PublishError", "messaging.operation.name":
                         "publish_batch", "messaging.destination.name": "orders"}
    assert err_point.value == 1


def test_abort_counts_the_error(reader: InMemoryMetricReader) -> None:
    tel = telemetry(reader)
    tel.publishing([request("t")], [r.topic for r in [request("t")]], batch=False).abort(
        SerializationError("cannot serialise"))
    got = points(reader)
    assert [(a, p.value) for a, p in got["athomic.errors"]] == [
        ({"error.type": "SerializationError", "messaging.operation.name": "publish"}, 1)]
    assert "messaging.client.sent.messages" not in got  # nothing was attempted
    (attrs, _), = got["messaging.client.operation.duration"]
    assert attrs["error.type"] == "SerializationError"


def test_republisher_recorders(reader: InMemoryMetricReader) -> None:
    tel = telemetry(reader)
    tel.record_lateness(0.012, delay_topic="athomic.delay.10s", topic="notifications")
    tel.record_lateness(-0.5, delay_topic="athomic.delay.10s", topic="notifications")
    tel.add_delayed_held(3, delay_topic="athomic.delay.10s")
    tel.add_delayed_held(-1, delay_topic="athomic.delay.10s")
    tel.record_dlq(source_topic="athomic.delay.10s", error_type="MalformedEnvelopeError")
    tel.record_error(MalformedEnvelopeError("bad magic"), operation="republish",
                     topic="athomic.delay.10s")
    tel.record_error(TimeoutError("x"), operation="republish")
    tel.record_sent(2, topic="notifications", outcome="success_direct",
                    operation="republish")
    got = points(reader)
    (attrs, late), = got["athomic.delay.lateness"]
    assert attrs == {"athomic.delay.topic": "athomic.delay.10s",
                     "messaging.destination.name": "notifications"}
    assert late.count == 2 and late.sum == pytest.approx(0.012)  # never negative
    assert late.min == 0.0 and late.max == pytest.approx(0.012)
    (attrs, held), = got["athomic.delay.held"]
    assert attrs == {"athomic.delay.topic": "athomic.delay.10s"} and held.value == 2
    (attrs, dlq), = got["athomic.dlq.messages"]
    assert attrs == {"athomic.source.topic": "athomic.delay.10s",
                     "error.type": "MalformedEnvelopeError"} and dlq.value == 1
    errors = {a["error.type"]: (a, p.value) for a, p in got["athomic.errors"]}
    assert errors["MalformedEnvelopeError"] == (
        {"error.type": "MalformedEnvelopeError", "messaging.operation.name": "republish",
         "messaging.destination.name": "athomic.delay.10s"}, 1)
    assert errors["TimeoutError"][1] == 1
    (attrs, n), = got["messaging.client.sent.messages"]
    assert attrs["messaging.operation.name"] == "republish" and n.value == 2


def test_metrics_off_records_nothing(reader: InMemoryMetricReader) -> None:
    tel = telemetry(reader, metrics=False)
    tel.record_lateness(1, delay_topic="d", topic="t")
    tel.add_delayed_held(1, delay_topic="d")
    tel.record_dlq(source_topic="d", error_type="X")
    tel.record_error("X", operation="republish")
    tel.record_sent(1, topic="t", outcome="success_direct")
    rec = tel.publishing([request("t")], [r.topic for r in [request("t")]], batch=False)
    rec.done([(DIRECT.build(request("t"), Encoded(b"{}", []), request("t").topic),
               PublishingOutcome.SUCCESS_DIRECT)], [Meta()])
    assert reader.get_metrics_data() is None or not points(reader)


def test_error_type_names() -> None:
    assert tm.error_type(PublishError("x")) == "PublishError"
    assert tm.error_type(TimeoutError()) == "TimeoutError"
    assert tm.error_type(json.JSONDecodeError("x", "", 0)) == "json.decoder.JSONDecodeError"
    assert tm.error_type("KAFKA_STORAGE_ERROR") == "KAFKA_STORAGE_ERROR"


def test_attribute_names_match_the_semantic_conventions_package() -> None:
    from opentelemetry.semconv._incubating.attributes import messaging_attributes as m
    from opentelemetry.semconv.attributes import error_attributes, server_attributes

    assert tm.MESSAGING_SYSTEM == m.MESSAGING_SYSTEM
    assert tm.MESSAGING_DESTINATION_NAME == m.MESSAGING_DESTINATION_NAME
    assert tm.MESSAGING_DESTINATION_PARTITION_ID == m.MESSAGING_DESTINATION_PARTITION_ID
    assert tm.MESSAGING_OPERATION_NAME == m.MESSAGING_OPERATION_NAME
    assert tm.MESSAGING_OPERATION_TYPE == m.MESSAGING_OPERATION_TYPE
    assert tm.MESSAGING_MESSAGE_ID == m.MESSAGING_MESSAGE_ID
    assert tm.MESSAGING_MESSAGE_BODY_SIZE == m.MESSAGING_MESSAGE_BODY_SIZE
    assert tm.MESSAGING_BATCH_MESSAGE_COUNT == m.MESSAGING_BATCH_MESSAGE_COUNT
    assert tm.MESSAGING_CLIENT_ID == m.MESSAGING_CLIENT_ID
    assert tm.MESSAGING_KAFKA_MESSAGE_KEY == m.MESSAGING_KAFKA_MESSAGE_KEY
    assert tm.MESSAGING_KAFKA_MESSAGE_TOMBSTONE == m.MESSAGING_KAFKA_MESSAGE_TOMBSTONE
    assert tm.MESSAGING_KAFKA_OFFSET == m.MESSAGING_KAFKA_OFFSET
    assert m.MessagingSystemValues.KAFKA.value == tm.KAFKA
    assert m.MessagingOperationTypeValues.SEND.value == tm.SEND
    assert tm.ERROR_TYPE == error_attributes.ERROR_TYPE
    assert (tm.SERVER_ADDRESS, tm.SERVER_PORT) == (server_attributes.SERVER_ADDRESS,
                                                   server_attributes.SERVER_PORT)
    from opentelemetry.semconv._incubating.metrics import messaging_metrics as mm

    assert tm.M_SENT == mm.MESSAGING_CLIENT_SENT_MESSAGES
    assert tm.M_DURATION == mm.MESSAGING_CLIENT_OPERATION_DURATION


# --- settings and exporters -------------------------------------------------------------------
def test_settings_defaults_and_validation() -> None:
    s = MessagingSettings()
    t = s.telemetry
    assert (t.traces, t.metrics, t.exporter, t.pipeline_spans) == (True, True, "none", False)
    with pytest.raises(ConfigurationError, match="file_path"):
        MessagingSettings(telemetry={"exporter": "file"})
    with pytest.raises(ConfigurationError, match=r"telemetry\.exporter"):
        MessagingSettings(telemetry={"exporter": "jaeger"})
    other = MessagingSettings(telemetry={"traces": False})
    assert other.fingerprint() != s.fingerprint()  # different actors


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATHOMIC_TELEMETRY__EXPORTER", "console")
    monkeypatch.setenv("ATHOMIC_TELEMETRY__PIPELINE_SPANS", "true")
    t = MessagingSettings().telemetry
    assert t.exporter == "console" and t.pipeline_spans


def test_file_exporter_writes_spans_and_metrics(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "telemetry.jsonl"
    settings = MessagingSettings(bootstrap_servers="b:9092", telemetry={
        "exporter": "file", "file_path": str(path), "service_name": "orders-svc"})
    tel = Telemetry.from_settings(settings)
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("caller") as parent:
        from athomic.context import capture

        headers = capture("svc")
    req = PublishRequest(topic="orders", value=b"{}", key=b"k", headers=headers.items(),
                         content_type="application/json", schema=None,
                         priority=MessagePriority.NORMAL, deliver_at=None,
                         message_id=new_message_id(), published_at=1.0)
    reqs = [req]
    recorder = tel.publishing(reqs, [r.topic for r in reqs], batch=False)
    recorder.done(
        [(DIRECT.build(reqs[0], Encoded(b"{}", []), reqs[0].topic),
          PublishingOutcome.SUCCESS_DIRECT)],
        [Meta()])
    tel.record_lateness(0.5, delay_topic="d", topic="orders")
    tel.flush()
    tel.shutdown()
    tel.shutdown()  # idempotent
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    (span,) = [x for x in lines if x["signal"] == "span"]
    assert span["name"] == "publish orders" and span["kind"] == "PRODUCER"
    assert span["parent_span_id"] == f"{parent.get_span_context().span_id:016x}"
    assert span["trace_id"] == f"{parent.get_span_context().trace_id:032x}"
    assert span["attributes"]["messaging.kafka.offset"] == 1
    assert span["resource"]["service.name"] == "orders-svc"
    names = {x["name"] for x in lines if x["signal"] == "metric"}
    assert {"messaging.client.sent.messages", "messaging.client.operation.duration",
            "athomic.delay.lateness"} <= names
    late = next(x for x in lines if x.get("name") == "athomic.delay.lateness")
    assert late["count"] == 1 and late["sum"] == 0.5
    assert late["attributes"] == {"athomic.delay.topic": "d",
                                  "messaging.destination.name": "orders"}


def test_console_exporter_builds_its_own_providers() -> None:
    tel = Telemetry.from_settings(MessagingSettings(telemetry={"exporter": "console",
                                                               "metrics": False}))
    assert tel.tracer is not None and len(tel._owned) == 1
    tel.shutdown()


class Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"] or 0))
        Collector.received.append((self.path, len(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_otlp_exporter_sends_to_a_collector_when_installed() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = MessagingSettings(telemetry={
            "exporter": "otlp", "otlp_protocol": "http/protobuf",
            "otlp_endpoint": f"http://127.0.0.1:{server.server_port}/"})
        check_exporter(settings.telemetry)
        tel = Telemetry.from_settings(settings)
        span = tel.start_republish("t", [])
        span.end()
        tel.record_dlq(source_topic="d", error_type="X")
        tel.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    paths = {p for p, size in Collector.received if size > 0}
    assert paths == {"/v1/traces", "/v1/metrics"}


@pytest.mark.parametrize("protocol, module", [
    ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
    ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
])
def test_otlp_without_its_package_is_a_configuration_error(
        protocol: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    settings = MessagingSettings(telemetry={"exporter": "otlp", "otlp_protocol": protocol})
    with pytest.raises(ConfigurationError, match=r"needs the opentelemetry-exporter-otlp-"
                                                 r"proto-\w+ package: pip install"):
        check_exporter(settings.telemetry)
    with pytest.raises(ConfigurationError, match="athomic-ray\\[otlp\\]"):
        Telemetry.from_settings(settings)
    check_exporter(MessagingSettings().telemetry)  # the default needs nothing
