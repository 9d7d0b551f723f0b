"""athomic's telemetry against the OpenTelemetry conventions and the SDK's environment: the
exact attribute set of every span and metric point, the instrumentation scope, resource and
exporter precedence (explicit setting > ``OTEL_*`` > athomic's default), the ``OTEL_*``
variables forwarded to the actors, nesting under instrumentation of the Kafka client (as
OpenTelemetry's aiokafka instrumentation does it), and the bridge to Ray's metrics. Pure:
no broker, no Ray cluster."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import NotEnoughReplicasError
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import athomic
from athomic import (
    ConfigurationError,
    MessageHeaders,
    MessagePriority,
    MessagingSettings,
    RecordTooLargeError,
    extract_context,
)
from athomic import telemetry as tm
from athomic._exporters import build_resource, check_exporter, otel_environment, otlp_protocol
from athomic._kafka import translate
from athomic.context import capture
from athomic.messages import PublishingOutcome, PublishRequest, new_message_id
from athomic.pipeline import Encoded
from athomic.settings import TelemetrySettings
from athomic.strategies import DirectPublishStrategy, OutgoingRecord
from athomic.telemetry import Telemetry

DIRECT = DirectPublishStrategy()
SERVERS = ["broker-1:9093", "broker-2:9093"]
CONN = {"messaging.system": "kafka", "server.address": "broker-1", "server.port": 9093}
SPAN_CONN = {**CONN, "messaging.client.id": "svc-1"}


@dataclass
class Meta:
    partition: int
    offset: int


class Setup:
    """athomic's Telemetry with in-memory span and metric exporters, and a caller tracer."""

    def __init__(self, **telemetry: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.caller = self.provider.get_tracer("caller")
        self.telemetry = Telemetry(TelemetrySettings(**telemetry), servers=SERVERS,
                                   client_id="svc-1", tracer_provider=self.provider,
                                   meter_provider=self.meters)

    def spans(self) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans()
                if s.instrumentation_scope is not None
                and s.instrumentation_scope.name == "athomic"]

    def points(self) -> list[tuple[str, dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [(m.name, dict(p.attributes or {}), p)
                for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics for p in m.data.data_points]

    def close(self) -> None:
        self.provider.shutdown()
        self.meters.shutdown()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    yield s
    s.close()


def request(topic: str = "orders", *, key: bytes | None = b"user-1",
            value: bytes | None = b"{}") -> PublishRequest:
    return PublishRequest(topic=topic, value=value, key=key, headers=capture("svc").items(),
                          content_type="application/json", schema=None,
                          priority=MessagePriority.NORMAL, deliver_at=None,
                          message_id=new_message_id(), published_at=1.0)


def build(requests: list[PublishRequest], record_topic: str | None = None
          ) -> list[tuple[OutgoingRecord, PublishingOutcome]]:
    out = []
    for r in requests:
        record = DIRECT.build(r, Encoded(r.value, []), r.topic)
        if record_topic is not None:  # as the delayed strategy: written to a delay topic
            record.topic = record_topic
        out.append((record, PublishingOutcome.SUCCESS_DIRECT if record_topic is None
                    else PublishingOutcome.SUCCESS_DELAYED))
    return out


def publish(setup: Setup, requests: list[PublishRequest], results: list[Any], *,
            batch: bool, record_topic: str | None = None) -> None:
    recorder = setup.telemetry.publishing(requests, [r.topic for r in requests], batch=batch)
    recorder.done(build(requests, record_topic), results)


# --- spans: the exact attribute sets -----------------------------------------------------------
def test_publish_span_attribute_sets(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        keyed, tombstone, failed, delayed = (request(), request(key=None, value=None),
                                             request(), request("later"))
    publish(setup, [keyed], [Meta(2, 40)], batch=False)
    publish(setup, [tombstone], [Meta(0, 7)], batch=False)
    error = translate(NotEnoughReplicasError(), topic="orders")
    publish(setup, [failed], [error], batch=False)
    publish(setup, [delayed], [Meta(1, 3)], batch=False, record_topic="athomic.delay.10s")
    spans = setup.spans()
    assert [s.name for s in spans] == ["publish orders"] * 3 + ["publish later"]
    assert all(s.kind is SpanKind.PRODUCER for s in spans)
    common = {**SPAN_CONN, "messaging.operation.name": "publish",
              "messaging.operation.type": "send", "athomic.priority": "normal"}
    assert dict(spans[0].attributes or {}) == {
        **common, "messaging.destination.name": "orders",
        "messaging.message.id": keyed.message_id, "messaging.kafka.message.key": "user-1",
        "messaging.message.body.size": 2, "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 40}
    assert dict(spans[1].attributes or {}) == {
        **common, "messaging.destination.name": "orders",
        "messaging.message.id": tombstone.message_id,
        "messaging.kafka.message.tombstone": True,
        "messaging.destination.partition.id": "0", "messaging.kafka.offset": 7}
    assert dict(spans[2].attributes or {}) == {
        **common, "messaging.destination.name": "orders",
        "messaging.message.id": failed.message_id, "messaging.kafka.message.key": "user-1",
        "messaging.message.body.size": 2,
        "error.type": "NotEnoughReplicasError"}  # Kafka's name, not PublishError
    assert dict(spans[3].attributes or {}) == {
        **common, "messaging.destination.name": "later",
        "messaging.message.id": delayed.message_id, "messaging.kafka.message.key": "user-1",
        "messaging.message.body.size": 2, "athomic.delay.topic": "athomic.delay.10s",
        "messaging.destination.partition.id": "1", "messaging.kafka.offset": 3}


def test_batch_span_attribute_sets(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        batch = [request(), request(), request("payments")]
    publish(setup, batch, [Meta(0, 1), Meta(0, 2), Meta(4, 9)], batch=True)
    by_name = {s.name: dict(s.attributes or {}) for s in setup.spans()}
    common = {**SPAN_CONN, "messaging.operation.name": "publish",
              "messaging.operation.type": "send", "athomic.priority": "normal"}
    assert by_name["publish orders"] == {
        **common, "messaging.destination.name": "orders", "messaging.batch.message_count": 2,
        "messaging.destination.partition.id": "0"}
    assert by_name["publish payments"] == {  # a group of one still describes its message
        **common, "messaging.destination.name": "payments",
        "messaging.batch.message_count": 1, "messaging.message.id": batch[2].message_id,
        "messaging.kafka.message.key": "user-1", "messaging.message.body.size": 2,
        "messaging.destination.partition.id": "4", "messaging.kafka.offset": 9}


def test_republish_span_attribute_sets(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        stored = capture("svc").items()
    with setup.telemetry.republish_span("notifications", stored, message_id="m-1", key=b"k",
                                        delay_topic="athomic.delay.10s", hop=2) as span:
        span.acked(3, 8)
    tomb = setup.telemetry.start_republish("notifications", stored, message_id="m-2",
                                           delay_topic="athomic.delay.10s", hop=1,
                                           tombstone=True)
    tomb.failed(translate(NotEnoughReplicasError(), topic="notifications"))
    tomb.end()
    ok, failed = setup.spans()
    common = {**SPAN_CONN, "messaging.operation.name": "republish",
              "messaging.operation.type": "send", "messaging.destination.name": "notifications",
              "athomic.delay.topic": "athomic.delay.10s"}
    assert ok.name == failed.name == "republish notifications"
    assert dict(ok.attributes or {}) == {
        **common, "messaging.message.id": "m-1", "messaging.kafka.message.key": "k",
        "athomic.hop": 2, "messaging.destination.partition.id": "3",
        "messaging.kafka.offset": 8}
    assert dict(failed.attributes or {}) == {
        **common, "messaging.message.id": "m-2", "athomic.hop": 1,
        "messaging.kafka.message.tombstone": True, "error.type": "NotEnoughReplicasError"}


def test_every_span_and_metric_attribute_is_a_convention_or_athomics_own(setup: Setup) -> None:
    from opentelemetry.semconv._incubating.attributes import messaging_attributes as m
    from opentelemetry.semconv.attributes import error_attributes, server_attributes

    known = {getattr(mod, name) for mod in (m, error_attributes, server_attributes)
             for name in dir(mod) if name.isupper() and isinstance(getattr(mod, name), str)}
    with setup.caller.start_as_current_span("caller"):
        batch = [request(), request(key=None, value=None)]
    publish(setup, batch[:1], [Meta(0, 1)], batch=False)
    publish(setup, batch, [Meta(0, 1), translate(NotEnoughReplicasError())], batch=True)
    setup.telemetry.record_lateness(1.0, delay_topic="d", topic="orders")
    setup.telemetry.add_delayed_held(1, delay_topic="d")
    setup.telemetry.record_dlq(source_topic="d", error_type="X")
    keys = {k for s in setup.spans() for k in (s.attributes or {})}
    keys |= {k for _, attrs, _ in setup.points() for k in attrs}
    assert {k for k in keys if not k.startswith("athomic.")} <= known
    for name, attrs, _ in setup.points():
        assert set(attrs) <= set(tm.METRIC_ATTRIBUTES[name])


# --- metrics: the exact attribute sets ---------------------------------------------------------
def test_metric_attribute_sets(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        single, batch = [request()], [request(), request(), request("payments")]
    publish(setup, single, [Meta(0, 1)], batch=False)
    error = translate(NotEnoughReplicasError(), topic="orders")
    publish(setup, batch, [Meta(0, 2), error, Meta(1, 1)], batch=True)
    aborted = [request("orders")]
    setup.telemetry.publishing(aborted, ["orders"], batch=False).abort(
        RecordTooLargeError("too big", size=2, limit=1))
    got: dict[str, list[dict[str, Any]]] = {}
    for name, attrs, _ in setup.points():
        got.setdefault(name, []).append(attrs)
    op = {**CONN, "messaging.operation.name": "publish"}
    sent = {**op, "athomic.priority": "normal"}
    assert sorted(got["messaging.client.sent.messages"], key=repr) == sorted([
        {**sent, "messaging.destination.name": "orders", "athomic.outcome": "success_direct"},
        {**sent, "messaging.destination.name": "orders", "athomic.outcome": "failed",
         "error.type": "NotEnoughReplicasError"},
        {**sent, "messaging.destination.name": "payments",
         "athomic.outcome": "success_direct"},
    ], key=repr)
    timed = {**op, "messaging.operation.type": "send"}
    assert sorted(got["messaging.client.operation.duration"], key=repr) == sorted([
        {**timed, "messaging.destination.name": "orders"},  # the single publish
        {**timed, "error.type": "NotEnoughReplicasError"},  # two topics: no destination
        {**timed, "messaging.destination.name": "orders", "error.type": "RecordTooLargeError"},
    ], key=repr)
    assert got["athomic.publish.batch.size"] == [timed]
    assert sorted(got["athomic.errors"], key=repr) == sorted([
        {**op, "messaging.destination.name": "orders", "error.type": "NotEnoughReplicasError"},
        {**op, "messaging.destination.name": "orders", "error.type": "RecordTooLargeError"},
    ], key=repr)


def test_republisher_metric_attribute_sets(setup: Setup) -> None:
    tel = setup.telemetry
    tel.record_sent(1, topic="n", outcome="success_direct", operation="republish")
    tel.record_error(translate(NotEnoughReplicasError()), operation="republish", topic="n")
    tel.record_lateness(0.1, delay_topic="d", topic="n")
    tel.add_delayed_held(2, delay_topic="d")
    tel.record_clock_skew(-0.004, delay_topic="d")
    tel.record_dlq(source_topic="d", error_type="MalformedEnvelopeError")
    got = {name: attrs for name, attrs, _ in setup.points()}
    assert got == {
        "messaging.client.sent.messages": {**CONN, "messaging.operation.name": "republish",
                                           "messaging.destination.name": "n",
                                           "athomic.outcome": "success_direct"},
        "athomic.errors": {**CONN, "messaging.operation.name": "republish",
                           "messaging.destination.name": "n",
                           "error.type": "NotEnoughReplicasError"},
        "athomic.delay.lateness": {**CONN, "athomic.delay.topic": "d",
                                   "messaging.destination.name": "n"},
        "athomic.delay.held": {**CONN, "athomic.delay.topic": "d"},
        "athomic.delay.clock_skew": {**CONN, "athomic.delay.topic": "d"},
        "athomic.dlq.messages": {**CONN, "athomic.source.topic": "d",
                                 "error.type": "MalformedEnvelopeError"},
    }


def test_duration_buckets_include_the_conventions(setup: Setup) -> None:
    publish(setup, [request()], [Meta(0, 1)], batch=False)
    (point,) = [p for name, _, p in setup.points()
                if name == "messaging.client.operation.duration"]
    semconv = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
    assert set(semconv) <= set(point.explicit_bounds)


@pytest.mark.parametrize("servers, expected", [
    (["[::1]:9092"], {"server.address": "::1", "server.port": 9092}),
    (["kafka"], {"server.address": "kafka"}),
    ([], {}),
])
def test_server_attributes(servers: list[str], expected: dict[str, Any]) -> None:
    tel = Telemetry(TelemetrySettings(traces=False, metrics=False), servers=servers)
    assert tel._conn == {"messaging.system": "kafka", **expected}


# --- the instrumentation scope -----------------------------------------------------------------
def test_tracer_and_meter_carry_version_and_schema_url(setup: Setup) -> None:
    assert athomic.__version__ == tm.INSTRUMENTATION_VERSION
    publish(setup, [request()], [Meta(0, 1)], batch=False)
    (span,) = setup.spans()
    scope = span.instrumentation_scope
    assert scope is not None
    assert (scope.name, scope.version, scope.schema_url) == (
        "athomic", athomic.__version__, "https://opentelemetry.io/schemas/1.44.0")
    data = setup.reader.get_metrics_data()
    assert data is not None
    scopes = {(sm.scope.name, sm.scope.version, sm.scope.schema_url)
              for rm in data.resource_metrics for sm in rm.scope_metrics}
    assert scopes == {("athomic", athomic.__version__, tm.SCHEMA_URL)}


# --- the resource: explicit setting > OTEL_* > athomic's default -------------------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* variable of the machine running the tests."""
    for name in list(otel_environment()):
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("env, service_name, lineage, expected", [
    ({}, None, "athomic", "athomic"),
    ({}, None, "billing", "billing"),
    ({"OTEL_SERVICE_NAME": "orders-svc"}, None, "athomic", "orders-svc"),
    # lineage.service_name is only athomic's fallback: the environment still wins
    ({"OTEL_SERVICE_NAME": "orders-svc"}, None, "billing", "orders-svc"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}, None, "athomic", "from-attrs"),
    ({"OTEL_SERVICE_NAME": "orders-svc",  # the SDK's own order: OTEL_SERVICE_NAME first
      "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}, None, "athomic", "orders-svc"),
    ({"OTEL_SERVICE_NAME": "orders-svc"}, "explicit", "athomic", "explicit"),
])
def test_service_name_precedence(clean_env: pytest.MonkeyPatch, env: dict[str, str],
                                 service_name: str | None, lineage: str,
                                 expected: str) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    settings = MessagingSettings(lineage={"service_name": lineage},
                                 telemetry={"service_name": service_name})
    resource = build_resource(settings.telemetry, settings.lineage.service_name)
    assert resource.attributes["service.name"] == expected


def test_other_resource_attributes_come_from_the_environment(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("OTEL_SERVICE_NAME", "orders-svc")
    clean_env.setenv("OTEL_RESOURCE_ATTRIBUTES",
                     "deployment.environment.name=prod,service.namespace=shop")
    path = tmp_path / "t.jsonl"
    tel = Telemetry.from_settings(MessagingSettings(telemetry={
        "exporter": "file", "file_path": str(path), "metrics": False}))
    tel.start_republish("t", []).end()
    tel.shutdown()
    (span,) = [json.loads(line) for line in path.read_text().splitlines()]
    resource = span["resource"]
    assert resource["service.name"] == "orders-svc"
    assert resource["deployment.environment.name"] == "prod"
    assert resource["service.namespace"] == "shop"
    assert resource["telemetry.sdk.name"] == "opentelemetry"


# --- OTEL_* for the actors, and the OTLP exporter's variables ----------------------------------
def test_otel_environment_is_the_otel_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_SERVICE_NAME", "orders-svc")
    clean_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=secret")
    clean_env.setenv("ATHOMIC_TELEMETRY__EXPORTER", "otlp")
    clean_env.setenv("NOT_OTEL_SERVICE_NAME", "x")
    env = otel_environment()
    assert env == {"OTEL_SERVICE_NAME": "orders-svc",
                   "OTEL_EXPORTER_OTLP_HEADERS": "api-key=secret"}
    env["OTEL_SERVICE_NAME"] = "changed"  # a copy: the caller may pass it on as it likes
    assert otel_environment()["OTEL_SERVICE_NAME"] == "orders-svc"
    # what the topology passes to Ray: a dict of str -> str that pickles
    assert pickle.loads(pickle.dumps({"env_vars": env}))["env_vars"] == env


@pytest.mark.parametrize("env, setting, expected", [
    ({}, None, {"traces": "http/protobuf", "metrics": "http/protobuf"}),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None, {"traces": "grpc", "metrics": "grpc"}),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}, None,
     {"traces": "grpc", "metrics": "http/protobuf"}),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf",
     {"traces": "http/protobuf", "metrics": "http/protobuf"}),  # explicit wins
])
def test_otlp_protocol_precedence(clean_env: pytest.MonkeyPatch, env: dict[str, str],
                                  setting: str | None, expected: dict[str, str]) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    telemetry: dict[str, Any] = {"exporter": "otlp"}
    if setting is not None:
        telemetry["otlp_protocol"] = setting
    settings = MessagingSettings(telemetry=telemetry).telemetry
    assert {s: otlp_protocol(settings, s) for s in ("traces", "metrics")} == expected


def test_an_otlp_protocol_athomic_cannot_speak_is_a_configuration_error(
        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ConfigurationError, match=r"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="
                                                 r"'http/json'.*grpc or http/protobuf"):
        check_exporter(MessagingSettings(telemetry={"exporter": "otlp"}).telemetry)


def metric_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [x for x in map(json.loads, path.read_text().splitlines())
            if x["signal"] == "metric"]


def test_metric_export_interval_precedence(clean_env: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    clean_env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "50")  # milliseconds
    from_env, explicit = tmp_path / "env.jsonl", tmp_path / "explicit.jsonl"
    tels = [Telemetry.from_settings(MessagingSettings(telemetry={
        "exporter": "file", "file_path": str(path), "traces": False, **extra}))
        for path, extra in ((from_env, {}), (explicit, {"metric_export_interval_s": 3600}))]
    try:
        for tel in tels:
            tel.record_dlq(source_topic="d", error_type="X")
        deadline = time.monotonic() + 10
        while not metric_lines(from_env) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric_lines(from_env)  # exported by the SDK's reader on its own, at 50 ms
        assert not metric_lines(explicit)  # the setting given wins: 1 h
    finally:
        for tel in tels:
            tel.shutdown()


# --- instrumentation of the Kafka client nests in the caller's trace ---------------------------
class _AppendSetter(Setter[list[tuple[str, bytes]]]):
    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        carrier.append((key, value.encode()))


class ContribLikeInstrumentation:
    """What OpenTelemetry's aiokafka instrumentation does around ``AIOKafkaProducer.send``:
    a PRODUCER span ``send <topic>``, child of the *current* context, its context appended
    to the record's header list (a second ``traceparent``)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer("opentelemetry.instrumentation.aiokafka")

    def send(self, record: OutgoingRecord) -> None:
        with self.tracer.start_as_current_span(f"send {record.topic}",
                                               kind=SpanKind.PRODUCER) as span:
            propagate.inject(record.headers, context=trace.set_span_in_context(span),
                             setter=_AppendSetter())


def traceparents(record: OutgoingRecord) -> list[tuple[str, str]]:
    values = [v.decode().split("-") for k, v in record.headers if k == "traceparent"]
    return [(trace_id, span_id) for _, trace_id, span_id, _ in values]


def ids(span: Any) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def deliver(setup: Setup, requests: list[PublishRequest], contrib: ContribLikeInstrumentation,
            *, nest: bool = True) -> list[tuple[OutgoingRecord, PublishingOutcome]]:
    """What the ProducerActor does: open the spans, build the records, send each one (here
    through the contrib-like wrapper), then the acknowledgements."""
    recorder = setup.telemetry.publishing(requests, [r.topic for r in requests],
                                          batch=len(requests) > 1)
    prepared = build(requests)
    if nest:
        with recorder.sending() as current:
            for i, (record, _) in enumerate(prepared):
                current(i)
                contrib.send(record)
    else:
        for record, _ in prepared:
            contrib.send(record)
    recorder.done(prepared, [Meta(0, i) for i in range(len(prepared))])
    return prepared


@pytest.mark.parametrize("shape", ["single", "one group", "groups"])
def test_the_aiokafka_instrumentation_nests_under_athomics_span(setup: Setup,
                                                                shape: str) -> None:
    contrib = ContribLikeInstrumentation(setup.provider)
    with setup.caller.start_as_current_span("caller-a") as caller_a:
        a = [request(), request("payments"), request()]
    with setup.caller.start_as_current_span("caller-b") as caller_b:
        b = [request()]
    batch, callers = {
        "single": ([a[0]], [caller_a]),
        "one group": ([a[0], a[2]], [caller_a, caller_a]),
        "groups": ([a[0], b[0], a[1]], [caller_a, caller_b, caller_a]),
    }[shape]
    prepared = deliver(setup, batch, contrib)
    assert trace.get_current_span() is trace.INVALID_SPAN  # the context is restored
    sends = {ids(s)[1]: s for s in setup.exporter.get_finished_spans()
             if s.name.startswith("send ")}
    publishes = {ids(s)[1]: s for s in setup.spans()}
    for (record, _), caller in zip(prepared, callers, strict=True):
        ours, theirs = traceparents(record)  # athomic's first, the instrumentation's last
        assert ours[0] == theirs[0] == ids(caller)[0]  # one trace: the caller's
        parent = sends[theirs[1]].parent
        assert parent is not None and f"{parent.span_id:016x}" == ours[1]
        assert ours[1] in publishes
        # a consumer reading the last traceparent (athomic's helpers, Java's) joins it too
        assert extract_context(MessageHeaders(record.headers)).trace_id == ids(caller)[0]


def test_without_nesting_the_instrumentation_starts_another_trace(setup: Setup) -> None:
    """Why ``sending`` exists: the wrapper's span has no parent in the actor."""
    contrib = ContribLikeInstrumentation(setup.provider)
    with setup.caller.start_as_current_span("caller") as caller:
        reqs = [request()]
    ((record, _),) = deliver(setup, reqs, contrib, nest=False)
    ours, theirs = traceparents(record)
    assert ours[0] == ids(caller)[0] and theirs[0] != ids(caller)[0]
    assert extract_context(MessageHeaders(record.headers)).trace_id != ids(caller)[0]


def test_nesting_under_the_callers_span_when_athomic_does_not_record() -> None:
    """No SDK where athomic's spans would go (``exporter="none"``, none installed): the
    records keep the caller's context, and the instrumentation nests under that."""
    sdk = Setup()
    try:
        sdk.telemetry = Telemetry(TelemetrySettings(metrics=False))  # the global API: no SDK
        contrib = ContribLikeInstrumentation(sdk.provider)
        with sdk.caller.start_as_current_span("caller") as caller:
            reqs = [request(), request()]
        prepared = deliver(sdk, reqs, contrib)
        for record, _ in prepared:
            ours, theirs = traceparents(record)
            assert ours == ids(caller)  # the caller's, unchanged
            assert theirs[0] == ids(caller)[0]
    finally:
        sdk.close()


def test_a_message_without_context_leaves_the_current_one_while_sending() -> None:
    """No SDK, and a message that carries no trace context and no baggage (its caller had
    none): ``sending`` extracts nothing and attaches nothing, so what is current in the
    actor stays current (an empty context was attached instead before)."""
    sdk = Setup()
    try:
        sdk.telemetry = Telemetry(TelemetrySettings(metrics=False))  # the global API: no SDK
        reqs = [request()]  # captured outside any span
        assert not {"traceparent", "tracestate", "baggage"} & {k for k, _ in reqs[0].headers}
        recorder = sdk.telemetry.publishing(reqs, ["orders"], batch=False)
        with sdk.caller.start_as_current_span("actor's own") as own:
            with recorder.sending() as current:
                current(0)
                assert trace.get_current_span() is own
            assert trace.get_current_span() is own
        # a message that does carry its caller's context still gets it while it is sent
        with sdk.caller.start_as_current_span("caller") as caller:
            reqs = [request()]
        recorder = sdk.telemetry.publishing(reqs, ["orders"], batch=False)
        with sdk.caller.start_as_current_span("actor's own"), recorder.sending():
            assert ids(trace.get_current_span()) == ids(caller)
    finally:
        sdk.close()


def test_sending_restores_the_context_on_an_error(setup: Setup) -> None:
    with setup.caller.start_as_current_span("caller"):
        reqs = [request("a"), request("b")]
    recorder = setup.telemetry.publishing(reqs, ["a", "b"], batch=True)
    with pytest.raises(RuntimeError), recorder.sending() as current:
        current(0)
        current(1)
        assert trace.get_current_span().get_span_context().is_valid
        raise RuntimeError("send failed")
    assert trace.get_current_span() is trace.INVALID_SPAN
    recorder.abort(RuntimeError("send failed"))


def test_off_sending_is_a_no_op() -> None:
    off = Telemetry(TelemetrySettings(traces=False, metrics=False))
    recorder = off.publishing([request()], ["orders"], batch=False)
    with recorder.sending() as current:
        current(0)
        assert trace.get_current_span() is trace.INVALID_SPAN


def test_republish_span_current_nests_the_instrumentation(setup: Setup) -> None:
    contrib = ContribLikeInstrumentation(setup.provider)
    with setup.caller.start_as_current_span("caller") as caller:
        stored = capture("svc").items()
    span = setup.telemetry.start_republish("notifications", stored)
    headers = MessageHeaders(stored)
    span.inject(headers)
    record = OutgoingRecord("notifications", None, b"{}", headers.to_kafka())
    with span.current():
        contrib.send(record)
    span.end()
    assert trace.get_current_span() is trace.INVALID_SPAN
    ours, theirs = traceparents(record)
    assert ours == ids(span.span) and theirs[0] == ids(caller)[0]
    # no span (tracing off): nothing changes
    with tm.RepublishSpan(None).current():
        assert trace.get_current_span() is trace.INVALID_SPAN


# --- the bridge to Ray's metrics ---------------------------------------------------------------
class FakeRayMetric:
    def __init__(self, kind: str, name: str, description: str = "",
                 boundaries: list[float] | None = None,
                 tag_keys: tuple[str, ...] = ()) -> None:
        self.kind, self.name, self.tag_keys, self.boundaries = kind, name, tag_keys, boundaries
        self.defaults: dict[str, str] = {}
        self.calls: list[tuple[float, dict[str, str]]] = []

    def set_default_tags(self, tags: dict[str, str]) -> FakeRayMetric:
        assert set(tags) <= set(self.tag_keys)
        self.defaults = tags
        return self

    def _record(self, value: float, tags: dict[str, str]) -> None:
        final = {**self.defaults, **tags}
        assert set(final) == set(self.tag_keys), "Ray wants every declared tag"
        assert all(isinstance(v, str) for v in final.values())
        self.calls.append((value, final))

    inc = observe = set = _record


class FakeRayMetrics:
    """``ray.util.metrics`` at our boundary: records what athomic gives it."""

    def __init__(self) -> None:
        self.made: dict[str, FakeRayMetric] = {}

    def _make(self, kind: str, name: str, **kwargs: Any) -> FakeRayMetric:
        metric = self.made[name] = FakeRayMetric(kind, name, **kwargs)
        return metric

    def Counter(self, name: str, **kwargs: Any) -> FakeRayMetric:
        return self._make("counter", name, **kwargs)

    def Histogram(self, name: str, **kwargs: Any) -> FakeRayMetric:
        return self._make("histogram", name, **kwargs)

    def Gauge(self, name: str, **kwargs: Any) -> FakeRayMetric:
        return self._make("gauge", name, **kwargs)


def test_ray_metrics_mirror_every_point() -> None:
    ray_api = FakeRayMetrics()
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    tel = Telemetry(TelemetrySettings(traces=False), servers=SERVERS, meter_provider=meters,
                    ray_metrics=ray_api)
    reqs = [request(), request()]
    recorder = tel.publishing(reqs, ["orders", "orders"], batch=True)
    recorder.done(build(reqs), [Meta(0, 1), translate(NotEnoughReplicasError())])
    tel.add_delayed_held(3, delay_topic="d")
    tel.add_delayed_held(-1, delay_topic="d")
    tel.record_lateness(0.2, delay_topic="d", topic="orders")
    tel.record_clock_skew(0.5, delay_topic="d")
    tel.record_dlq(source_topic="d", error_type="X")
    made = ray_api.made
    assert {name: m.kind for name, m in made.items()} == {
        "messaging_client_sent_messages": "counter",
        "messaging_client_operation_duration": "histogram",
        "athomic_publish_batch_size": "histogram", "athomic_delay_lateness": "histogram",
        "athomic_delay_held": "gauge", "athomic_delay_clock_skew": "gauge",
        "athomic_dlq_messages": "counter", "athomic_errors": "counter"}
    conn = {"messaging_system": "kafka", "server_address": "broker-1", "server_port": "9093"}
    sent = made["messaging_client_sent_messages"].calls
    assert sorted(sent, key=repr) == sorted([
        (1, {**conn, "messaging_operation_name": "publish",
             "messaging_destination_name": "orders", "athomic_outcome": "success_direct",
             "athomic_priority": "normal", "error_type": ""}),
        (1, {**conn, "messaging_operation_name": "publish",
             "messaging_destination_name": "orders", "athomic_outcome": "failed",
             "athomic_priority": "normal", "error_type": "NotEnoughReplicasError"}),
    ], key=repr)
    ((seconds, tags),) = made["messaging_client_operation_duration"].calls
    assert tags["messaging_operation_type"] == "send" and 0 <= seconds < 5
    assert made["messaging_client_operation_duration"].boundaries == list(
        tm._DURATION_BUCKETS)
    assert [v for v, _ in made["athomic_delay_held"].calls] == [3, 2]  # running total
    assert made["athomic_delay_clock_skew"].calls == [
        (0.5, {**conn, "athomic_delay_topic": "d"})]
    assert made["athomic_publish_batch_size"].calls[0][0] == 2
    # and the OpenTelemetry instruments still got every point
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert {"messaging.client.sent.messages", "athomic.delay.held"} <= names
    meters.shutdown()


def test_ray_metrics_off_by_default_and_with_metrics_off() -> None:
    ray_api = FakeRayMetrics()
    Telemetry(TelemetrySettings(metrics=False), ray_metrics=ray_api)
    assert ray_api.made == {}
    tel = Telemetry(TelemetrySettings())
    assert not isinstance(tel._sent, tm._RayMirror)


def test_ray_metrics_with_ray_itself_needs_no_cluster() -> None:
    for _ in range(2):  # two in one process (a worker may run more than one actor)
        tel = Telemetry(TelemetrySettings(traces=False), servers=SERVERS, ray_metrics=True)
        tel.record_sent(1, topic="t", outcome="success_direct", priority="normal")
        tel.add_delayed_held(1, delay_topic="d")
        tel.record_lateness(0.5, delay_topic="d", topic="t")
        assert isinstance(tel._sent, tm._RayMirror)
