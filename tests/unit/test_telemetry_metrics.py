"""Metrics, settings and exporters of athomic.telemetry (no broker; the OTLP test talks to
a local HTTP server standing in for a collector)."""

from __future__ import annotations

import asyncio
import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import NoOpMeterProvider
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


CONN = {"messaging.system": "kafka", "server.address": "broker-1", "server.port": 9093}
"""The connection's attributes: on every metric point."""


def telemetry(reader: InMemoryMetricReader, **settings: Any) -> Telemetry:
    return Telemetry(TelemetrySettings(**settings), servers=["broker-1:9093", "broker-2:9093"],
                     client_id="not-on-metrics",
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
        return tuple(sorted({**CONN, "messaging.operation.name": "publish", **attrs}.items()))

    # publish and publish_batch are one operation: ``publish``, as on the spans
    assert sent == {
        key(**{"messaging.destination.name": "orders", "athomic.outcome": "success_direct",
               "athomic.priority": "normal"}): 2,
        key(**{"messaging.destination.name": "orders", "athomic.outcome": "failed",
               "athomic.priority": "normal", "error.type": "PublishError"}): 1,
        key(**{"messaging.destination.name": "orders", "athomic.outcome": "success_direct",
               "athomic.priority": "high"}): 1,
        key(**{"messaging.destination.name": "payments", "athomic.outcome": "success_delayed",
               "athomic.priority": "normal"}): 1,
    }
    durations = {a.get("error.type"): (a, p)
                 for a, p in got["messaging.client.operation.duration"]}
    batch_attrs, batch_point = durations["PublishError"]
    assert batch_attrs == {**CONN, "messaging.operation.name": "publish",
                           "messaging.operation.type": "send",
                           "error.type": "PublishError"}  # two topics: no destination
    assert batch_point.count == 1 and 0 <= batch_point.sum < 5
    assert durations[None][0] == {**CONN, "messaging.operation.name": "publish",
                                  "messaging.operation.type": "send",
                                  "messaging.destination.name": "orders"}
    assert 0.001 in batch_point.explicit_bounds  # semconv buckets and finer, in seconds
    (size_attrs, size_point), = got["athomic.publish.batch.size"]
    assert size_point.count == 1 and size_point.sum == 4
    assert size_attrs == {**CONN, "messaging.operation.name": "publish",
                          "messaging.operation.type": "send"}
    (err_attrs, err_point), = got["athomic.errors"]
    assert err_attrs == {**CONN, "error.type": "PublishError", "messaging.operation.name":
                         "publish", "messaging.destination.name": "orders"}
    assert err_point.value == 1


def test_abort_counts_the_error(reader: InMemoryMetricReader) -> None:
    tel = telemetry(reader)
    tel.publishing([request("t")], [r.topic for r in [request("t")]], batch=False).abort(
        SerializationError("cannot serialise"))
    got = points(reader)
    assert [(a, p.value) for a, p in got["athomic.errors"]] == [
        ({**CONN, "error.type": "SerializationError", "messaging.operation.name": "publish",
          "messaging.destination.name": "t"}, 1)]
    assert "messaging.client.sent.messages" not in got  # nothing was attempted
    (attrs, _), = got["messaging.client.operation.duration"]
    assert attrs == {**CONN, "messaging.operation.name": "publish",
                     "messaging.operation.type": "send", "messaging.destination.name": "t",
                     "error.type": "SerializationError"}


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
    assert attrs == {**CONN, "athomic.delay.topic": "athomic.delay.10s",
                     "messaging.destination.name": "notifications"}
    assert late.count == 2 and late.sum == pytest.approx(0.012)  # never negative
    assert late.min == 0.0 and late.max == pytest.approx(0.012)
    (attrs, held), = got["athomic.delay.held"]
    assert attrs == {**CONN, "athomic.delay.topic": "athomic.delay.10s"} and held.value == 2
    (attrs, dlq), = got["athomic.dlq.messages"]
    assert attrs == {**CONN, "athomic.source.topic": "athomic.delay.10s",
                     "error.type": "MalformedEnvelopeError"} and dlq.value == 1
    errors = {a["error.type"]: (a, p.value) for a, p in got["athomic.errors"]}
    assert errors["MalformedEnvelopeError"] == (
        {**CONN, "error.type": "MalformedEnvelopeError", "messaging.operation.name":
         "republish", "messaging.destination.name": "athomic.delay.10s"}, 1)
    assert errors["TimeoutError"] == (
        {**CONN, "error.type": "TimeoutError", "messaging.operation.name": "republish"}, 1)
    (attrs, n), = got["messaging.client.sent.messages"]
    assert attrs == {**CONN, "messaging.operation.name": "republish",
                     "messaging.destination.name": "notifications",
                     "athomic.outcome": "success_direct"} and n.value == 2


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
    from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, NotEnoughReplicasError

    from athomic._kafka import translate

    assert tm.error_type(PublishError("x")) == "PublishError"
    assert tm.error_type(TimeoutError()) == "TimeoutError"
    assert tm.error_type(json.JSONDecodeError("x", "", 0)) == "json.decoder.JSONDecodeError"
    assert tm.error_type("KAFKA_STORAGE_ERROR") == "KAFKA_STORAGE_ERROR"
    # a Kafka error: its own name, raw or as the cause of the athomic error it became
    for kafka in (KafkaTimeoutError(), NotEnoughReplicasError(), MessageSizeTooLargeError()):
        translated = translate(kafka, topic="t")
        assert type(translated).__module__.startswith("athomic")
        assert tm.error_type(translated) == tm.error_type(kafka) == type(kafka).__name__
    # ours, translated from something that is not Kafka's: ours
    assert tm.error_type(translate(asyncio.TimeoutError(), topic="t")) == "PublishError"
    assert tm.error_type(translate(OSError("refused"))) == "MessagingConnectionError"


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
    from opentelemetry.semconv.schemas import Schemas

    assert tm.M_SENT == mm.MESSAGING_CLIENT_SENT_MESSAGES
    assert tm.M_DURATION == mm.MESSAGING_CLIENT_OPERATION_DURATION
    assert Schemas.V1_44_0.value == tm.SCHEMA_URL
    assert tm.SCHEMA_URL.endswith("/" + tm.SEMCONV_VERSION)


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
    assert span["scope"] == {"name": "athomic", "version": tm.INSTRUMENTATION_VERSION,
                             "schema_url": tm.SCHEMA_URL}
    names = {x["name"] for x in lines if x["signal"] == "metric"}
    assert {"messaging.client.sent.messages", "messaging.client.operation.duration",
            "athomic.delay.lateness"} <= names
    late = next(x for x in lines if x.get("name") == "athomic.delay.lateness")
    assert late["count"] == 1 and late["sum"] == 0.5
    assert late["attributes"] == {"messaging.system": "kafka", "server.address": "b",
                                  "server.port": 9092, "athomic.delay.topic": "d",
                                  "messaging.destination.name": "orders"}
    assert late["scope"] == span["scope"]


def test_console_exporter_builds_its_own_providers() -> None:
    tel = Telemetry.from_settings(MessagingSettings(telemetry={"exporter": "console",
                                                               "metrics": False}))
    assert tel.tracer is not None and len(tel._owned) == 1
    tel.shutdown()


class Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, int]] = []
    hosts: list[tuple[str, str, int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"] or 0))
        Collector.received.append((self.path, len(body)))
        Collector.hosts.append((self.path, *self.server.server_address[:2]))
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


@pytest.mark.parametrize("explicit", [False, True])
def test_otlp_endpoint_from_the_environment_unless_set(explicit: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With no ``otlp_endpoint`` the exporter reads OTEL_EXPORTER_OTLP_ENDPOINT itself; a
    setting given wins over it."""
    servers = [http.server.HTTPServer(("127.0.0.1", 0), Collector) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    env_port, setting_port = (s.server_port for s in servers)
    Collector.received, Collector.hosts = [], []
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{env_port}")
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
        telemetry: dict[str, Any] = {"exporter": "otlp"}
        if explicit:
            telemetry["otlp_endpoint"] = f"http://127.0.0.1:{setting_port}"
        tel = Telemetry.from_settings(MessagingSettings(telemetry=telemetry))
        tel.start_republish("t", []).end()
        tel.record_dlq(source_topic="d", error_type="X")
        tel.shutdown()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert {p for p, size in Collector.received if size > 0} == {"/v1/traces", "/v1/metrics"}
    ports = {port for _, _, port in Collector.hosts}
    assert ports == {setting_port if explicit else env_port}


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


def test_metering_says_whether_points_go_anywhere(reader: InMemoryMetricReader,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The republisher records a lateness point per message only while ``metering()``: a
    provider of its own (or an SDK installed, or the Ray mirror) takes them; with none,
    the API's default would drop each after building its attributes."""
    assert telemetry(reader).metering()
    assert not telemetry(reader, metrics=False).metering()
    monkeypatch.setattr(otel_metrics, "get_meter_provider", NoOpMeterProvider)
    bare = Telemetry(TelemetrySettings(), servers=["broker-1:9093"])
    assert bare.metrics and not bare.metering()
