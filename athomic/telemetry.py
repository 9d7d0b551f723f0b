"""OpenTelemetry instrumentation of athomic: semantic-convention attribute names, spans at
the Kafka send edge, and the metric instruments (where they are exported: ``_exporters``).

One ``Telemetry`` per actor process, built from ``MessagingSettings.telemetry``
(``Telemetry.from_settings``). With ``exporter="none"`` it instruments through the global
OpenTelemetry API (whatever SDK the process set up; a no-op costing next to nothing when
there is none); with ``console``, ``otlp`` or ``file`` it builds its own tracer and meter
providers, never installed globally, flushed by ``flush`` and ``shutdown``.

Spans (kind PRODUCER, name ``publish <topic>``, parent = the caller's context carried in
the request's headers). The span's own context replaces ``traceparent``/``tracestate`` in
the message (the semconv "creation context"), so the record stays in the caller's trace:

- ``publish``: one span per message, with message id, key, body size, and the partition
  and offset once the broker acknowledged it.
- ``publish_batch``: one span per destination topic and caller context (in practice, one
  per batch) with ``messaging.batch.message_count``; its context is injected into every
  message of the group. Semantic conventions allow this when no per-message "create" spans
  exist; per-message spans would cost ~28 µs each, a third of what publishing a
  1 KiB message costs end to end (see docs/observability.md, BENCHMARKS.md).

Every span and metric follows the OpenTelemetry semantic conventions ``SEMCONV_VERSION``
(messaging, Kafka, ``error.type``, ``server.*``); the tracer and meter carry athomic's
version and that version's ``SCHEMA_URL``. While athomic hands records to the Kafka client,
the record's span is the current one (``PublishRecorder.sending``, ``RepublishSpan.current``)
so instrumentation below athomic, such as OpenTelemetry's aiokafka instrumentation, nests
in the caller's trace instead of starting its own.

API for the republisher (DelayBucketActor)::

    telemetry = Telemetry.from_settings(settings)             # once, in the actor
    span = telemetry.start_republish(final_topic, stored_headers, message_id=mid,
                                     key=key, delay_topic=delay_topic, hop=hop)
    span.inject(outgoing_headers)      # traceparent now = this span, in the caller's trace
    with span.current():               # instrumentation of the send nests under the span
        ...send
    on ack: span.acked(meta.partition, meta.offset); on error: span.failed(exc)
    span.end()                         # or: with telemetry.republish_span(...) as span:
    telemetry.record_lateness(late_s, delay_topic=delay_topic, topic=final_topic)
    telemetry.add_delayed_held(+1, delay_topic=delay_topic)   # -1 when released
    telemetry.record_dlq(source_topic=delay_topic, error_type="MalformedEnvelopeError")
    telemetry.record_error(exc, operation="republish", topic=final_topic)
    telemetry.record_sent(n, topic=final_topic, outcome="success_direct",
                          operation="republish")
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import Token
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import Attributes

from ._exporters import build_providers
from ._kafka import kafka_error_name
from .context import HEADERS_GETTER, HEADERS_SETTER
from .messages import (
    H_TRACEPARENT,
    H_TRACESTATE,
    MessageHeaders,
    MessagePriority,
    PublishingOutcome,
    PublishRequest,
)
from .pipeline import SegmentObserver
from .settings import MessagingSettings, TelemetrySettings
from .strategies import OutgoingRecord

INSTRUMENTATION = "athomic"
"""The instrumentation scope of athomic's tracer and meter."""


def _installed_version() -> str:
    # athomic.__version__, read from the distribution: importing the package's __init__
    # from here would be a cycle (it imports the layers above this one).
    try:
        return importlib.metadata.version("athomic-ray")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


INSTRUMENTATION_VERSION = _installed_version()
SEMCONV_VERSION = "1.44.0"
"""The OpenTelemetry semantic conventions the attributes below follow."""
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

# --- semantic-convention attribute names (OpenTelemetry messaging, error, server) ---------
# Spelled out here: the semconv package keeps messaging in its private ``_incubating``
# module, whose names move between releases.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_DESTINATION_PARTITION_ID = "messaging.destination.partition.id"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_MESSAGE_BODY_SIZE = "messaging.message.body.size"
MESSAGING_BATCH_MESSAGE_COUNT = "messaging.batch.message_count"
MESSAGING_CLIENT_ID = "messaging.client.id"
MESSAGING_KAFKA_MESSAGE_KEY = "messaging.kafka.message.key"
MESSAGING_KAFKA_MESSAGE_TOMBSTONE = "messaging.kafka.message.tombstone"
MESSAGING_KAFKA_OFFSET = "messaging.kafka.offset"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
KAFKA = "kafka"
SEND = "send"
"""``messaging.operation.type`` of every span here and of the duration metric."""

# --- athomic's own attribute names ----------------------------------------------------------
ATHOMIC_PRIORITY = "athomic.priority"
ATHOMIC_OUTCOME = "athomic.outcome"
ATHOMIC_DELAY_TOPIC = "athomic.delay.topic"
ATHOMIC_SOURCE_TOPIC = "athomic.source.topic"
ATHOMIC_HOP = "athomic.hop"
ATHOMIC_PIPELINE_STAGES = "athomic.pipeline.stages"
ATHOMIC_PIPELINE_PLACEMENT = "athomic.pipeline.placement"
FAILED = "failed"
"""``athomic.outcome`` of a message that was not acknowledged."""

# --- operation names (``messaging.operation.name``), the same on spans and metrics ---------
PUBLISH = "publish"
"""``publish`` and ``publish_batch`` of a ProducerActor: one Kafka operation, one name."""
REPUBLISH = "republish"

# --- metric names ----------------------------------------------------------------------------
M_SENT = "messaging.client.sent.messages"
M_DURATION = "messaging.client.operation.duration"
M_BATCH_SIZE = "athomic.publish.batch.size"
M_LATENESS = "athomic.delay.lateness"
M_HELD = "athomic.delay.held"
M_SKEW = "athomic.delay.clock_skew"
M_DLQ = "athomic.dlq.messages"
M_ERRORS = "athomic.errors"

# The semantic conventions' advisory duration buckets (5 ms ... 10 s) plus 1 ms and 2.5 ms
# (a local broker acknowledges within them) and 30 s, 60 s (delivery timeouts are longer).
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
_LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0, 60.0, 300.0)
_BATCH_BUCKETS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                  5000.0, 10000.0)


def error_type(exc: BaseException | str) -> str:
    """The ``error.type`` of an error (semconv: a low-cardinality class name).

    The Kafka error's own class name when the error came from Kafka, directly or as the
    ``__cause__`` of the athomic error it was translated into (``KafkaTimeoutError``,
    ``NotEnoughReplicasError``, ``MessageSizeTooLargeError``, ...: what went wrong, where
    ``PublishError`` would only say that something did); else athomic's and builtin classes
    by name (``RecordTooLargeError``, ``SerializationError``, ``TimeoutError``), others with
    their module (``json.decoder.JSONDecodeError``). A string is taken as it is."""
    if isinstance(exc, str):
        return exc
    name = kafka_error_name(exc)
    cls = type(exc)
    if name != cls.__name__ or cls.__module__.startswith(("builtins", "athomic", "aiokafka")):
        return name
    return f"{cls.__module__}.{cls.__qualname__}"


def _fail(span: Span, exc: BaseException) -> None:
    if not span.is_recording():
        return
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute(ERROR_TYPE, error_type(exc))
    span.record_exception(exc)


def _last(headers: list[tuple[str, bytes]], keys: list[str]) -> tuple[bytes | None, ...]:
    """The last value of each of ``keys`` in ``headers`` (None where absent)."""
    found = {k: v for k, v in headers if k in keys}  # later pairs win
    return tuple(map(found.get, keys))


_HEADERS = PublishRequest._fields.index("headers")


def _stale(pairs: list[tuple[str, bytes]]) -> frozenset[str]:
    """W3C fields a new span context did not write: an old ``tracestate`` belongs to the
    old parent and must go with it."""
    return frozenset((H_TRACEPARENT, H_TRACESTATE)).difference(k for k, _ in pairs)


def _key_text(key: bytes | str | None) -> str | None:
    if key is None or isinstance(key, str):
        return key
    return key.decode("utf-8", "backslashreplace")


# --- spans --------------------------------------------------------------------------------
_RECHECK_S = 0.5
"""While no OpenTelemetry SDK is installed, how often to look again for one."""

class RepublishSpan:
    """The PRODUCER span of one republished message (``Telemetry.start_republish``).

    A no-op object when tracing is off: ``inject`` then leaves the headers alone, so the
    stored trace context (the delayed publish's span) still goes out."""

    __slots__ = ("_ended", "span")

    def __init__(self, span: Span | None) -> None:
        self.span = span
        self._ended = False

    def trace_headers(self) -> list[tuple[str, bytes]]:
        """This span's trace context as header pairs (``traceparent``, ``tracestate``)."""
        if self.span is None or not self.span.get_span_context().is_valid:
            return []
        carrier = MessageHeaders()
        propagate.inject(carrier, context=trace.set_span_in_context(self.span, Context()),
                         setter=HEADERS_SETTER)
        return carrier.items()

    def inject(self, headers: MessageHeaders) -> None:
        """Replace the trace context in ``headers`` with this span's."""
        pairs = self.trace_headers()
        if pairs:
            headers.set_many(pairs, _stale(pairs))

    def acked(self, partition: int, offset: int) -> None:
        """Record where the broker stored the message."""
        if self.span is not None and self.span.is_recording():
            self.span.set_attribute(MESSAGING_DESTINATION_PARTITION_ID, str(partition))
            self.span.set_attribute(MESSAGING_KAFKA_OFFSET, offset)

    def failed(self, exc: BaseException) -> None:
        """Mark the span failed (status ERROR, ``error.type``, exception event)."""
        if self.span is not None:
            _fail(self.span, exc)

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This span is the current one inside the block: wrap the Kafka client's ``send``
        in it, so instrumentation of the client (OpenTelemetry's aiokafka instrumentation
        injects its own ``traceparent``) nests under this span, in the caller's trace.
        Changes nothing when there is no span."""
        if self.span is None or not self.span.get_span_context().is_valid:
            yield
            return
        token = otel_context.attach(trace.set_span_in_context(self.span, Context()))
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self) -> None:
        if self.span is not None and not self._ended:
            self._ended = True
            self.span.end()


class _SpanGroup:
    __slots__ = ("indices", "parent", "span", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.indices: list[int] = []
        self.span: Span = trace.INVALID_SPAN
        self.parent: Context = Context()

    def send_context(self) -> Context:
        """The context to make current while this group's records are handed to the Kafka
        client: the span whose context the records carry (athomic's when it records, else
        the caller's), and nothing else (baggage is each record's own, already in it)."""
        span = self.span if self.span.is_recording() else trace.get_current_span(self.parent)
        return trace.set_span_in_context(span, Context())


_FIELDS: list[Any] = [None, frozenset()]
"""The global propagator last seen, and the header names it reads."""


def _propagation_fields() -> frozenset[str]:
    """The header names the global propagator reads (``traceparent``, ``baggage``, ...),
    computed again only when the global propagator is replaced."""
    textmap = propagate.get_global_textmap()
    if _FIELDS[0] is not textmap:
        _FIELDS[:] = [textmap, frozenset(textmap.fields)]
    return _FIELDS[1]  # type: ignore[no-any-return]


def _ignore(index: int) -> None:
    pass


class PublishRecorder:
    """Spans and metrics of one ``publish`` / ``publish_batch`` call in a ProducerActor.

    Created before the batch is encoded (the spans' context must be in the headers the
    records are built from); ``done`` after the acknowledgements, ``abort`` if the call
    failed before anything was sent."""

    __slots__ = ("_batch", "_groups", "_metrics", "_requests", "_start", "_tel", "_topics",
                 "observe")

    def __init__(self, tel: Telemetry | None, requests: list[PublishRequest],
                 topics: Sequence[str], batch: bool, *, tracing: bool = True,
                 metrics: bool = True) -> None:
        self._tel = tel
        self._requests = requests
        self._topics = topics
        self._batch = batch
        self._metrics = metrics and tel is not None and tel.metrics
        self._start = time.perf_counter()
        self._groups: list[_SpanGroup] = []
        self.observe: SegmentObserver | None = None
        if tel is not None and tel.tracer is not None and tracing:
            self._groups = tel._open_spans(requests, topics, batch)
            if tel.settings.pipeline_spans and self._groups:
                self.observe = tel._segment_observer(self._groups[0].span)

    @property
    def offsets(self) -> bool:
        """Whether ``done`` needs each record's own offset: a span of one message records
        it; a batch's span and the metrics do not."""
        return any(len(group.indices) == 1 for group in self._groups)

    @contextlib.contextmanager
    def sending(self) -> Iterator[Callable[[int], None]]:
        """Wrap the loop that hands the records to the Kafka client; call the function it
        gives with each record's index before sending that record::

            with recorder.sending() as current:
                for i, record in enumerate(records):
                    current(i)
                    await producer.send(...)

        Record ``i``'s span (the one its ``traceparent`` names) is then the current span
        while it is sent, so instrumentation of the client nests in the caller's trace:
        OpenTelemetry's aiokafka instrumentation, which wraps ``send`` and appends its own
        ``traceparent``, would otherwise start a new trace there. The context switches only
        when the group changes (once per call in practice); the caller's is back on exit."""
        groups = self._groups
        if not groups:
            if not self._requests:
                yield _ignore
                return
            # No span of athomic's here: the caller's context (of the first message; a
            # batch has one in practice) is the current one instead; a message carrying
            # none (no trace context, no baggage) leaves the current context as it is.
            headers = self._requests[0].headers
            fields = _propagation_fields()
            if not any(name in fields for name, _ in headers):
                yield _ignore
                return
            callers = otel_context.attach(propagate.extract(
                MessageHeaders(headers), getter=HEADERS_GETTER))
            try:
                yield _ignore
            finally:
                otel_context.detach(callers)
            return
        if len(groups) == 1:
            only = otel_context.attach(groups[0].send_context())
            try:
                yield _ignore
            finally:
                otel_context.detach(only)
            return
        owner = [0] * len(self._requests)
        for n, group in enumerate(groups):
            for i in group.indices:
                owner[i] = n
        contexts: list[Context | None] = [None] * len(groups)
        active = -1
        token: Token[Context] | None = None

        def current(index: int) -> None:
            nonlocal active, token
            n = owner[index]
            if n != active:
                if token is not None:
                    otel_context.detach(token)
                ctx = contexts[n]
                if ctx is None:
                    ctx = contexts[n] = groups[n].send_context()
                token = otel_context.attach(ctx)
                active = n

        try:
            yield current
        finally:
            if token is not None:
                otel_context.detach(token)

    def done(self, prepared: Sequence[tuple[OutgoingRecord, PublishingOutcome]],
             results: Sequence[Any]) -> None:
        """``results``: per message, the broker's record metadata (``partition``,
        ``offset``) or the (translated) error it failed with."""
        tel = self._tel
        if tel is None:
            return
        seconds = time.perf_counter() - self._start
        for group in self._groups:
            span = group.span
            if span.is_recording():
                idx = group.indices
                errors = [results[i] for i in idx if isinstance(results[i], BaseException)]
                if len(idx) == 1:
                    if not errors:
                        meta = results[idx[0]]
                        span.set_attribute(MESSAGING_DESTINATION_PARTITION_ID,
                                           str(meta.partition))
                        span.set_attribute(MESSAGING_KAFKA_OFFSET, meta.offset)
                else:
                    parts = {results[i].partition for i in idx
                             if not isinstance(results[i], BaseException)}
                    if len(parts) == 1:
                        span.set_attribute(MESSAGING_DESTINATION_PARTITION_ID,
                                           str(parts.pop()))
                record_topic = prepared[idx[0]][0].topic
                if record_topic != group.topic:  # delayed: written to a delay topic first
                    span.set_attribute(ATHOMIC_DELAY_TOPIC, record_topic)
                if errors:
                    _fail(span, errors[0])
            span.end()
        if self._metrics:
            tel._record_publish(self._requests, self._topics, prepared, results, self._batch,
                                seconds)

    def abort(self, exc: BaseException) -> None:
        """The call failed before sending (bad input, pipeline error, no broker)."""
        tel = self._tel
        if tel is None:
            return
        for group in self._groups:
            _fail(group.span, exc)
            group.span.end()
        if self._metrics:
            kind = error_type(exc)
            topics = set(self._topics)
            topic = topics.pop() if len(topics) == 1 else None
            tel.record_error(kind, operation=PUBLISH, topic=topic)
            tel._record_duration(time.perf_counter() - self._start, topic, kind)


_OFF = PublishRecorder(None, [], [], False)


# --- metrics: descriptions, and the bridge to Ray's metrics ------------------------------------
_DESCRIPTIONS = {
    M_SENT: "Messages athomic attempted to publish, by outcome.",
    M_DURATION: "Duration of a publish call, from the actor receiving it to the last "
                "acknowledgement.",
    M_BATCH_SIZE: "Messages per publish_batch call.",
    M_LATENESS: "How late a delayed message was delivered after its deliver_at.",
    M_HELD: "Delayed messages read from a delay topic and not yet delivered.",
    M_SKEW: "How far the brokers' clock is ahead of this republisher's (negative: "
            "behind), as measured against broker timestamps.",
    M_DLQ: "Messages written to a dead-letter topic.",
    M_ERRORS: "Errors athomic raised or recorded.",
}
_CONN_KEYS = (MESSAGING_SYSTEM, SERVER_ADDRESS, SERVER_PORT)
METRIC_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    M_SENT: (*_CONN_KEYS, MESSAGING_OPERATION_NAME, MESSAGING_DESTINATION_NAME,
             ATHOMIC_OUTCOME, ATHOMIC_PRIORITY, ERROR_TYPE),
    M_DURATION: (*_CONN_KEYS, MESSAGING_OPERATION_NAME, MESSAGING_OPERATION_TYPE,
                 MESSAGING_DESTINATION_NAME, ERROR_TYPE),
    M_BATCH_SIZE: (*_CONN_KEYS, MESSAGING_OPERATION_NAME, MESSAGING_OPERATION_TYPE,
                   MESSAGING_DESTINATION_NAME),
    M_LATENESS: (*_CONN_KEYS, ATHOMIC_DELAY_TOPIC, MESSAGING_DESTINATION_NAME),
    M_HELD: (*_CONN_KEYS, ATHOMIC_DELAY_TOPIC),
    M_SKEW: (*_CONN_KEYS, ATHOMIC_DELAY_TOPIC),
    M_DLQ: (*_CONN_KEYS, ATHOMIC_SOURCE_TOPIC, ERROR_TYPE),
    M_ERRORS: (*_CONN_KEYS, ERROR_TYPE, MESSAGING_OPERATION_NAME, MESSAGING_DESTINATION_NAME),
}
"""Every attribute a metric's points may carry (which ones a point has: docs)."""


def ray_name(name: str) -> str:
    """A metric or attribute name as Ray (Prometheus) accepts it: ``.`` becomes ``_``."""
    return name.replace(".", "_")


class _Adder(Protocol):
    def add(self, amount: int | float, attributes: Attributes = None) -> None: ...


class _Recorder(Protocol):
    def record(self, amount: int | float, attributes: Attributes = None) -> None: ...


class _Setter(Protocol):
    def set(self, amount: int | float, attributes: Attributes = None) -> None: ...


class RayMetricsAPI(Protocol):
    """What the Ray bridge uses of ``ray.util.metrics``."""

    @property
    def Counter(self) -> Callable[..., Any]: ...

    @property
    def Histogram(self) -> Callable[..., Any]: ...

    @property
    def Gauge(self) -> Callable[..., Any]: ...


def _ray_api() -> RayMetricsAPI:
    import ray.util.metrics  # only with the bridge on: importing ray is slow

    return ray.util.metrics


def _ray_metric(factory: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """The Ray metric mirroring athomic's metric ``name``. Ray wants every declared tag on
    every point: an attribute a point lacks is an empty string there."""
    keys = tuple(map(ray_name, METRIC_ATTRIBUTES[name]))
    metric = factory(ray_name(name), description=_DESCRIPTIONS[name], tag_keys=keys, **kwargs)
    return metric.set_default_tags(dict.fromkeys(keys, ""))


class _RayMirror:
    """An OpenTelemetry instrument whose points also go to a Ray metric."""

    __slots__ = ("_keys", "_otel", "_ray")

    def __init__(self, otel: Any, ray_metric: Any, name: str) -> None:
        self._otel = otel
        self._ray = ray_metric
        self._keys = {k: ray_name(k) for k in METRIC_ATTRIBUTES[name]}

    def _tags(self, attributes: Attributes) -> dict[str, str]:
        keys = self._keys
        return {keys[k]: str(v) for k, v in (attributes or {}).items() if k in keys}


class _RayCounter(_RayMirror):
    __slots__ = ()

    def add(self, amount: int | float, attributes: Attributes = None) -> None:
        self._otel.add(amount, attributes)
        if amount > 0:
            self._ray.inc(amount, self._tags(attributes))


class _RayHistogram(_RayMirror):
    __slots__ = ()

    def record(self, amount: int | float, attributes: Attributes = None) -> None:
        self._otel.record(amount, attributes)
        self._ray.observe(amount, self._tags(attributes))


class _RayGauge(_RayMirror):
    __slots__ = ()

    def set(self, amount: int | float, attributes: Attributes = None) -> None:
        self._otel.set(amount, attributes)
        self._ray.set(amount, self._tags(attributes))


class _RayUpDownCounter(_RayMirror):
    """Ray has no up-down counter: a gauge set to this process's running total per set
    of attributes."""

    __slots__ = ("_totals",)

    def __init__(self, otel: Any, ray_metric: Any, name: str) -> None:
        super().__init__(otel, ray_metric, name)
        self._totals: dict[tuple[tuple[str, str], ...], int | float] = {}

    def add(self, amount: int | float, attributes: Attributes = None) -> None:
        self._otel.add(amount, attributes)
        tags = self._tags(attributes)
        key = tuple(sorted(tags.items()))
        total = self._totals[key] = self._totals.get(key, 0) + amount
        self._ray.set(total, tags)


# --- the telemetry of one process ---------------------------------------------------------
class Telemetry:
    """Tracer and metric instruments of one process (a ProducerActor, a DelayBucketActor).

    ``tracer_provider`` / ``meter_provider`` override where spans and metrics go (tests
    pass SDK providers with in-memory exporters); otherwise the settings decide.
    ``default_service_name``: ``service.name`` of athomic's own providers when neither
    ``telemetry.service_name`` nor the SDK's environment names the service.
    ``ray_metrics``: also record every metric point in Ray's metrics (``ray.util.metrics``,
    or an object with its ``Counter``, ``Histogram`` and ``Gauge``), exported by Ray's own
    Prometheus endpoint and shown in its dashboard."""

    def __init__(self, settings: TelemetrySettings, *, default_service_name: str = "athomic",
                 servers: Sequence[str] = (), client_id: str | None = None,
                 tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: otel_metrics.MeterProvider | None = None,
                 ray_metrics: bool | RayMetricsAPI = False) -> None:
        self.settings = settings
        self._owned: list[Any] = []
        if settings.exporter != "none" and tracer_provider is None and meter_provider is None:
            tracer_provider, meter_provider = build_providers(settings, default_service_name)
            self._owned = [p for p in (tracer_provider, meter_provider) if p is not None]
        # Attributes of the connection: on every span (with the client id) and every
        # metric point, so one cluster's telemetry can be told from another's.
        self._conn: dict[str, Any] = {MESSAGING_SYSTEM: KAFKA}
        if servers:
            host, _, port = servers[0].strip().rpartition(":")
            if not host:  # no port given
                host, port = port, ""
            self._conn[SERVER_ADDRESS] = host.strip("[]")  # an IPv6 literal, unbracketed
            if port.isdigit():
                self._conn[SERVER_PORT] = int(port)
        self._static = dict(self._conn)
        if client_id:
            self._static[MESSAGING_CLIENT_ID] = client_id
        self.tracer: Tracer | None = None
        self._global_tracing = tracer_provider is None
        self._global_metrics = meter_provider is None and ray_metrics is False
        self._sdk_tracing = self._sdk_metrics = False
        self._tracing_checked = self._metrics_checked = 0.0
        if settings.traces:
            provider = tracer_provider or trace.get_tracer_provider()
            self.tracer = provider.get_tracer(INSTRUMENTATION, INSTRUMENTATION_VERSION,
                                              schema_url=SCHEMA_URL)
        self.metrics = settings.metrics
        meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter(
            INSTRUMENTATION, INSTRUMENTATION_VERSION, schema_url=SCHEMA_URL)
        self._sent: _Adder = meter.create_counter(
            M_SENT, unit="{message}", description=_DESCRIPTIONS[M_SENT])
        self._duration: _Recorder = meter.create_histogram(
            M_DURATION, unit="s", description=_DESCRIPTIONS[M_DURATION],
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS))
        self._batch_size: _Recorder = meter.create_histogram(
            M_BATCH_SIZE, unit="{message}", description=_DESCRIPTIONS[M_BATCH_SIZE],
            explicit_bucket_boundaries_advisory=list(_BATCH_BUCKETS))
        self._lateness: _Recorder = meter.create_histogram(
            M_LATENESS, unit="s", description=_DESCRIPTIONS[M_LATENESS],
            explicit_bucket_boundaries_advisory=list(_LATENESS_BUCKETS))
        self._held: _Adder = meter.create_up_down_counter(
            M_HELD, unit="{message}", description=_DESCRIPTIONS[M_HELD])
        self._skew: _Setter = meter.create_gauge(
            M_SKEW, unit="s", description=_DESCRIPTIONS[M_SKEW])
        self._dlq: _Adder = meter.create_counter(
            M_DLQ, unit="{message}", description=_DESCRIPTIONS[M_DLQ])
        self._errors: _Adder = meter.create_counter(
            M_ERRORS, unit="{error}", description=_DESCRIPTIONS[M_ERRORS])
        if self.metrics and ray_metrics is not False:
            self._mirror_to_ray(_ray_api() if ray_metrics is True else ray_metrics)

    def _mirror_to_ray(self, api: RayMetricsAPI) -> None:
        def histogram(name: str, boundaries: Sequence[float]) -> Any:
            return _ray_metric(api.Histogram, name, boundaries=list(boundaries))

        self._sent = _RayCounter(self._sent, _ray_metric(api.Counter, M_SENT), M_SENT)
        self._duration = _RayHistogram(
            self._duration, histogram(M_DURATION, _DURATION_BUCKETS), M_DURATION)
        self._batch_size = _RayHistogram(
            self._batch_size, histogram(M_BATCH_SIZE, _BATCH_BUCKETS), M_BATCH_SIZE)
        self._lateness = _RayHistogram(
            self._lateness, histogram(M_LATENESS, _LATENESS_BUCKETS), M_LATENESS)
        self._held = _RayUpDownCounter(self._held, _ray_metric(api.Gauge, M_HELD), M_HELD)
        self._skew = _RayGauge(self._skew, _ray_metric(api.Gauge, M_SKEW), M_SKEW)
        self._dlq = _RayCounter(self._dlq, _ray_metric(api.Counter, M_DLQ), M_DLQ)
        self._errors = _RayCounter(self._errors, _ray_metric(api.Counter, M_ERRORS), M_ERRORS)

    @classmethod
    def from_settings(cls, settings: MessagingSettings) -> Telemetry:
        """The telemetry ``settings.telemetry`` asks for, in this process.

        Raises ConfigurationError when the chosen exporter cannot be built (e.g. OTLP
        without its package)."""
        tel = settings.telemetry
        return cls(tel, default_service_name=settings.lineage.service_name,
                   servers=settings.servers, client_id=settings.client_id,
                   # TelemetrySettings.ray_metrics (opt-in) where the settings have it
                   ray_metrics=tel.ray_metrics)

    # --- producer side ---------------------------------------------------------------------
    def publishing(self, requests: list[PublishRequest], topics: Sequence[str], *,
                   batch: bool) -> PublishRecorder:
        """Open the spans of a publish call and start timing it. ``topics`` names the
        topic each request is published to (its physical topic).

        Rewrites each request's trace headers to the new span's context (replacing the
        requests in ``requests``, which must be the list later published)."""
        if self.tracer is None and not self.metrics:
            return _OFF
        tracing, metrics = self.tracing(), self.metering()
        if not tracing and not metrics:
            # Nowhere for spans or points to go: skip their work (~16 µs a call here).
            return PublishRecorder(None, requests, topics, batch)
        return PublishRecorder(self, requests, topics, batch, tracing=tracing,
                               metrics=metrics)

    def _open_spans(self, requests: list[PublishRequest], topics: Sequence[str],
                    batch: bool) -> list[_SpanGroup]:
        assert self.tracer is not None
        fields = sorted(propagate.get_global_textmap().fields)
        groups: dict[tuple[Any, ...], _SpanGroup] = {}
        # a batch's requests share one header list: its trace fields are read once (the
        # requests hold the lists, so an id is not reused during the call)
        lasts: dict[int, tuple[bytes | None, ...]] = {}
        for i, request in enumerate(requests):
            seen = lasts.get(id(request.headers))
            if seen is None:
                seen = lasts[id(request.headers)] = _last(request.headers, fields)
            key = (topics[i], request.priority, *seen)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _SpanGroup(topics[i])
            group.indices.append(i)
        for group in groups.values():
            first = requests[group.indices[0]]
            parent = group.parent = propagate.extract(MessageHeaders(first.headers),
                                                      getter=HEADERS_GETTER)
            attrs = dict(self._static)
            attrs[MESSAGING_DESTINATION_NAME] = group.topic
            attrs[MESSAGING_OPERATION_NAME] = PUBLISH
            attrs[MESSAGING_OPERATION_TYPE] = SEND
            attrs[ATHOMIC_PRIORITY] = first.priority.value
            if batch:
                attrs[MESSAGING_BATCH_MESSAGE_COUNT] = len(group.indices)
            if len(group.indices) == 1:
                attrs[MESSAGING_MESSAGE_ID] = first.message_id
                if first.key is not None:
                    attrs[MESSAGING_KAFKA_MESSAGE_KEY] = _key_text(first.key)
                if first.value is None:
                    attrs[MESSAGING_KAFKA_MESSAGE_TOMBSTONE] = True
                else:
                    attrs[MESSAGING_MESSAGE_BODY_SIZE] = len(first.value)
            span = self.tracer.start_span(f"{PUBLISH} {group.topic}", context=parent,
                                          kind=SpanKind.PRODUCER, attributes=attrs)
            group.span = span
            if span.is_recording():
                # Only the trace fields: baggage stays each message's own.
                carrier = MessageHeaders()
                propagate.inject(carrier, context=trace.set_span_in_context(span, Context()),
                                 setter=HEADERS_SETTER)
                pairs = carrier.items()
                keys = _stale(pairs).union(k for k, _ in pairs)
                # A batch's requests share one header list: rewrite each list once.
                rewritten: dict[int, list[tuple[str, bytes]]] = {}
                for i in group.indices:
                    old = requests[i].headers
                    new = rewritten.get(id(old))
                    if new is None:
                        new = rewritten[id(old)] = [h for h in old if h[0] not in keys] + pairs
                    current = requests[i]  # _make: half of what _replace costs
                    requests[i] = PublishRequest._make(
                        (*current[:_HEADERS], new, *current[_HEADERS + 1:]))
        return list(groups.values())

    def _segment_observer(self, parent: Span) -> SegmentObserver:
        tracer = self.tracer
        assert tracer is not None
        ctx = trace.set_span_in_context(parent, Context())

        @contextlib.contextmanager
        def observe(placement: str, stages: Sequence[str], count: int) -> Iterator[None]:
            span = tracer.start_span(f"encode {'+'.join(stages)}", context=ctx,
                                     kind=SpanKind.INTERNAL, attributes={
                                         ATHOMIC_PIPELINE_STAGES: list(stages),
                                         ATHOMIC_PIPELINE_PLACEMENT: placement,
                                         MESSAGING_BATCH_MESSAGE_COUNT: count})
            try:
                yield
            except BaseException as exc:
                _fail(span, exc)
                raise
            finally:
                span.end()

        return observe

    def _record_publish(self, requests: Sequence[PublishRequest], topics: Sequence[str],
                        prepared: Sequence[tuple[OutgoingRecord, PublishingOutcome]],
                        results: Sequence[Any], batch: bool, seconds: float) -> None:
        # counted by the members themselves (no outcome: failed, with its error type);
        # their names are read once per distinct key
        tally: dict[tuple[str, PublishingOutcome | None, MessagePriority, str | None], int] = {}
        for request, topic, (_, outcome), result in zip(requests, topics, prepared, results,
                                                        strict=True):
            key = ((topic, None, request.priority, error_type(result))
                   if isinstance(result, BaseException)
                   else (topic, outcome, request.priority, None))
            tally[key] = tally.get(key, 0) + 1
        counts = {(topic, FAILED if outcome is None else outcome.value, priority.value, kind): n
                  for (topic, outcome, priority, kind), n in tally.items()}
        first_error: str | None = None
        for (topic, outcome_name, priority, kind), n in counts.items():
            self.record_sent(n, topic=topic, outcome=outcome_name, priority=priority,
                             operation=PUBLISH, error=kind)
            if kind is not None:
                first_error = first_error or kind
                self.record_error(kind, operation=PUBLISH, topic=topic, count=n)
        distinct = {key[0] for key in counts}
        one_topic = next(iter(distinct)) if len(distinct) == 1 else None
        self._record_duration(seconds, one_topic, first_error)
        if batch:
            attrs = self._operation_attrs(one_topic)
            self._batch_size.record(len(requests), attrs)

    def _operation_attrs(self, topic: str | None) -> dict[str, Any]:
        attrs = dict(self._conn)
        attrs[MESSAGING_OPERATION_NAME] = PUBLISH
        attrs[MESSAGING_OPERATION_TYPE] = SEND
        if topic is not None:
            attrs[MESSAGING_DESTINATION_NAME] = topic
        return attrs

    def _record_duration(self, seconds: float, topic: str | None, error: str | None) -> None:
        """``messaging.client.operation.duration`` of a publish call; ``topic`` when the
        call published to one topic only (a multi-topic batch has no single destination)."""
        attrs = self._operation_attrs(topic)
        if error is not None:
            attrs[ERROR_TYPE] = error
        self._duration.record(seconds, attrs)

    # --- republisher side ----------------------------------------------------------------
    def start_republish(self, topic: str, headers: Any, *, message_id: str | None = None,
                        key: bytes | str | None = None, delay_topic: str | None = None,
                        hop: int | None = None, tombstone: bool = False) -> RepublishSpan:
        """Start the PRODUCER span ``republish <topic>`` of a delayed message being
        delivered to its final ``topic``. Its parent is the trace context in ``headers``
        (the message's stored headers, in any form), so it continues the caller's trace;
        an invalid or missing traceparent starts a new trace. ``tombstone``: the message's
        value is null. End it with ``end()``."""
        if self.tracer is None or not self._tracing_installed():
            return RepublishSpan(None)
        parent = propagate.extract(MessageHeaders.of(headers), getter=HEADERS_GETTER)
        attrs = dict(self._static)
        attrs[MESSAGING_DESTINATION_NAME] = topic
        attrs[MESSAGING_OPERATION_NAME] = REPUBLISH
        attrs[MESSAGING_OPERATION_TYPE] = SEND
        if message_id is not None:
            attrs[MESSAGING_MESSAGE_ID] = message_id
        if key is not None:
            attrs[MESSAGING_KAFKA_MESSAGE_KEY] = _key_text(key)
        if delay_topic is not None:
            attrs[ATHOMIC_DELAY_TOPIC] = delay_topic
        if hop is not None:
            attrs[ATHOMIC_HOP] = hop
        if tombstone:
            attrs[MESSAGING_KAFKA_MESSAGE_TOMBSTONE] = True
        return RepublishSpan(self.tracer.start_span(
            f"{REPUBLISH} {topic}", context=parent, kind=SpanKind.PRODUCER, attributes=attrs))

    def _metrics_installed(self) -> bool:
        """False while metric points would go nowhere: no provider of ours, no Ray
        mirror, and no SDK installed in this process. Checked as tracing is."""
        if not self._global_metrics:
            return True
        if self._sdk_metrics:
            return True
        now = time.monotonic()
        if now < self._metrics_checked:
            return False
        self._metrics_checked = now + _RECHECK_S
        self._sdk_metrics = type(otel_metrics.get_meter_provider()).__name__ not in (
            "_ProxyMeterProvider", "NoOpMeterProvider")
        return self._sdk_metrics

    def tracing(self) -> bool:
        """Whether spans made now would go anywhere (checked once per batch of work: the
        check reads the environment)."""
        return self.tracer is not None and self._tracing_installed()

    def metering(self) -> bool:
        """Whether metric points recorded now would go anywhere (checked once per batch of
        work, as ``tracing``)."""
        return self.metrics and self._metrics_installed()

    def _tracing_installed(self) -> bool:
        """False while spans would go nowhere: no provider of ours and no SDK installed in
        this process (the API's default). Checked per call, since an application may
        install its SDK after athomic starts; skipping saves the header parsing a span
        per delayed message would cost."""
        if not self._global_tracing:
            return True
        if self._sdk_tracing:  # a global provider, once set, stays
            return True
        now = time.monotonic()
        if now < self._tracing_checked:
            return False
        # The check reads the environment (~1 µs): at most every _RECHECK_S while none.
        self._tracing_checked = now + _RECHECK_S
        self._sdk_tracing = not isinstance(
            trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
        return self._sdk_tracing

    @contextlib.contextmanager
    def republish_span(self, topic: str, headers: Any, *, message_id: str | None = None,
                       key: bytes | str | None = None, delay_topic: str | None = None,
                       hop: int | None = None, tombstone: bool = False
                       ) -> Iterator[RepublishSpan]:
        """``start_republish`` as a context manager: an exception escaping the block marks
        the span failed; the span ends on exit."""
        span = self.start_republish(topic, headers, message_id=message_id, key=key,
                                    delay_topic=delay_topic, hop=hop, tombstone=tombstone)
        try:
            yield span
        except BaseException as exc:
            span.failed(exc)
            raise
        finally:
            span.end()

    # --- metric recorders ----------------------------------------------------------------
    def record_sent(self, count: int, *, topic: str, outcome: str,
                    priority: str | None = None, operation: str = PUBLISH,
                    error: BaseException | str | None = None) -> None:
        """``count`` messages attempted to ``topic`` with ``outcome``
        (``success_direct``, ``success_delayed`` or ``failed``, then with ``error``)."""
        if not self.metrics:
            return
        attrs = dict(self._conn)
        attrs[MESSAGING_OPERATION_NAME] = operation
        attrs[MESSAGING_DESTINATION_NAME] = topic
        attrs[ATHOMIC_OUTCOME] = outcome
        if priority is not None:
            attrs[ATHOMIC_PRIORITY] = priority
        if error is not None:
            attrs[ERROR_TYPE] = error_type(error)
        self._sent.add(count, attrs)

    def record_lateness(self, seconds: float, *, delay_topic: str, topic: str) -> None:
        """How late (seconds, >= 0) a delayed message went out after its ``deliver_at``."""
        if self.metrics:
            attrs = dict(self._conn)
            attrs[ATHOMIC_DELAY_TOPIC] = delay_topic
            attrs[MESSAGING_DESTINATION_NAME] = topic
            self._lateness.record(max(seconds, 0.0), attrs)

    def add_delayed_held(self, delta: int, *, delay_topic: str) -> None:
        """Delayed messages now held for ``delay_topic``: +n when read, -n when released
        (delivered, forwarded to a shorter bucket, or dead-lettered)."""
        if self.metrics:
            attrs = dict(self._conn)
            attrs[ATHOMIC_DELAY_TOPIC] = delay_topic
            self._held.add(delta, attrs)

    def record_clock_skew(self, seconds: float, *, delay_topic: str) -> None:
        """The republisher's latest estimate of broker clock - its own clock."""
        if self.metrics:
            attrs = dict(self._conn)
            attrs[ATHOMIC_DELAY_TOPIC] = delay_topic
            self._skew.set(seconds, attrs)

    def record_dlq(self, *, source_topic: str, error_type: str, count: int = 1) -> None:
        """``count`` messages from ``source_topic`` written to a dead-letter topic."""
        if self.metrics:
            attrs = dict(self._conn)
            attrs[ATHOMIC_SOURCE_TOPIC] = source_topic
            attrs[ERROR_TYPE] = error_type
            self._dlq.add(count, attrs)

    def record_error(self, error: BaseException | str, *, operation: str,
                     topic: str | None = None, count: int = 1) -> None:
        """An error of ``operation`` (``publish``, ``republish``, ...), by its type."""
        if not self.metrics:
            return
        attrs = dict(self._conn)
        attrs[ERROR_TYPE] = error_type(error)
        attrs[MESSAGING_OPERATION_NAME] = operation
        if topic is not None:
            attrs[MESSAGING_DESTINATION_NAME] = topic
        self._errors.add(count, attrs)

    # --- lifecycle ---------------------------------------------------------------------------
    def flush(self, timeout_ms: int = 30_000) -> None:
        """Export what athomic's own providers hold (no-op with ``exporter="none"``)."""
        for provider in self._owned:
            provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and close athomic's own providers. Idempotent."""
        owned, self._owned = self._owned, []
        for provider in owned:
            provider.shutdown()
