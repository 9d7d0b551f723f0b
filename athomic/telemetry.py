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
  exist; per-message spans would cost ~24 µs each, over a quarter of what publishing a
  1 KiB message costs end to end (see docs/observability.md, BENCHMARKS.md).

API for the republisher (DelayBucketActor)::

    telemetry = Telemetry.from_settings(settings)             # once, in the actor
    span = telemetry.start_republish(final_topic, stored_headers, message_id=mid,
                                     key=key, delay_topic=delay_topic, hop=hop)
    span.inject(outgoing_headers)      # traceparent now = this span, in the caller's trace
    ...send; on ack: span.acked(meta.partition, meta.offset); on error: span.failed(exc)
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
import time
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from ._exporters import build_providers
from .context import HEADERS_GETTER, HEADERS_SETTER
from .messages import (
    H_TRACEPARENT,
    H_TRACESTATE,
    MessageHeaders,
    PublishingOutcome,
    PublishRequest,
)
from .pipeline import SegmentObserver
from .settings import MessagingSettings, TelemetrySettings
from .strategies import OutgoingRecord

INSTRUMENTATION = "athomic"

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
"""``messaging.operation.type`` of every span here."""

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

# --- operation names (``messaging.operation.name``) -----------------------------------------
PUBLISH = "publish"
PUBLISH_BATCH = "publish_batch"
REPUBLISH = "republish"

# --- metric names ----------------------------------------------------------------------------
M_SENT = "messaging.client.sent.messages"
M_DURATION = "messaging.client.operation.duration"
M_BATCH_SIZE = "athomic.publish.batch.size"
M_LATENESS = "athomic.delay.lateness"
M_HELD = "athomic.delay.held"
M_DLQ = "athomic.dlq.messages"
M_ERRORS = "athomic.errors"

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
_LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0, 60.0, 300.0)
_BATCH_BUCKETS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                  5000.0, 10000.0)



def error_type(exc: BaseException | str) -> str:
    """The ``error.type`` of an error: athomic's and builtin classes by name, others with
    their module (semconv: the canonical class name, low cardinality)."""
    if isinstance(exc, str):
        return exc
    cls = type(exc)
    if cls.__module__ == "builtins" or cls.__module__.startswith("athomic"):
        return cls.__qualname__
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


def _stale(pairs: list[tuple[str, bytes]]) -> frozenset[str]:
    """W3C fields a new span context did not write: an old ``tracestate`` belongs to the
    old parent and must go with it."""
    return frozenset((H_TRACEPARENT, H_TRACESTATE)).difference(k for k, _ in pairs)


def _key_text(key: bytes | str | None) -> str | None:
    if key is None or isinstance(key, str):
        return key
    return key.decode("utf-8", "backslashreplace")


# --- spans --------------------------------------------------------------------------------
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

    def end(self) -> None:
        if self.span is not None and not self._ended:
            self._ended = True
            self.span.end()


class _SpanGroup:
    __slots__ = ("indices", "span", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.indices: list[int] = []
        self.span: Span = trace.INVALID_SPAN


class PublishRecorder:
    """Spans and metrics of one ``publish`` / ``publish_batch`` call in a ProducerActor.

    Created before the batch is encoded (the spans' context must be in the headers the
    records are built from); ``done`` after the acknowledgements, ``abort`` if the call
    failed before anything was sent."""

    __slots__ = ("_batch", "_groups", "_requests", "_start", "_tel", "observe")

    def __init__(self, tel: Telemetry | None, requests: list[PublishRequest],
                 topics: Sequence[str], batch: bool) -> None:
        self._tel = tel
        self._requests = requests
        self._batch = batch
        self._start = time.perf_counter()
        self._groups: list[_SpanGroup] = []
        self.observe: SegmentObserver | None = None
        if tel is not None and tel.tracer is not None:
            self._groups = tel._open_spans(requests, topics, batch)
            if tel.settings.pipeline_spans and self._groups:
                self.observe = tel._segment_observer(self._groups[0].span)

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
        if tel.metrics:
            tel._record_publish(self._requests, prepared, results, self._batch, seconds)

    def abort(self, exc: BaseException) -> None:
        """The call failed before sending (bad input, pipeline error, no broker)."""
        tel = self._tel
        if tel is None:
            return
        for group in self._groups:
            _fail(group.span, exc)
            group.span.end()
        if tel.metrics:
            op = PUBLISH_BATCH if self._batch else PUBLISH
            kind = error_type(exc)
            tel._errors.add(1, {ERROR_TYPE: kind, MESSAGING_OPERATION_NAME: op})
            tel._duration.record(time.perf_counter() - self._start, {
                MESSAGING_SYSTEM: KAFKA, MESSAGING_OPERATION_NAME: op, ERROR_TYPE: kind})


_OFF = PublishRecorder(None, [], [], False)


# --- the telemetry of one process ---------------------------------------------------------
class Telemetry:
    """Tracer and metric instruments of one process (a ProducerActor, a DelayBucketActor).

    ``tracer_provider`` / ``meter_provider`` override where spans and metrics go (tests
    pass SDK providers with in-memory exporters); otherwise the settings decide."""

    def __init__(self, settings: TelemetrySettings, *, service_name: str = "athomic",
                 servers: Sequence[str] = (), client_id: str | None = None,
                 tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: otel_metrics.MeterProvider | None = None) -> None:
        self.settings = settings
        self._owned: list[Any] = []
        if settings.exporter != "none" and tracer_provider is None and meter_provider is None:
            tracer_provider, meter_provider = build_providers(settings, service_name)
            self._owned = [p for p in (tracer_provider, meter_provider) if p is not None]
        self._static: dict[str, Any] = {MESSAGING_SYSTEM: KAFKA}
        if servers:
            host, _, port = servers[0].rpartition(":")
            self._static[SERVER_ADDRESS] = host
            if port.isdigit():
                self._static[SERVER_PORT] = int(port)
        if client_id:
            self._static[MESSAGING_CLIENT_ID] = client_id
        self.tracer: Tracer | None = None
        self._global_tracing = tracer_provider is None
        if settings.traces:
            provider = tracer_provider or trace.get_tracer_provider()
            self.tracer = provider.get_tracer(INSTRUMENTATION)
        self.metrics = settings.metrics
        meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter(
            INSTRUMENTATION)
        self._sent = meter.create_counter(
            M_SENT, unit="{message}",
            description="Messages athomic attempted to publish, by outcome.")
        self._duration = meter.create_histogram(
            M_DURATION, unit="s",
            description="Duration of a publish call, from the actor receiving it to the "
                        "last acknowledgement.",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS))
        self._batch_size = meter.create_histogram(
            M_BATCH_SIZE, unit="{message}", description="Messages per publish_batch call.",
            explicit_bucket_boundaries_advisory=list(_BATCH_BUCKETS))
        self._lateness = meter.create_histogram(
            M_LATENESS, unit="s",
            description="How late a delayed message was delivered after its deliver_at.",
            explicit_bucket_boundaries_advisory=list(_LATENESS_BUCKETS))
        self._held = meter.create_up_down_counter(
            M_HELD, unit="{message}",
            description="Delayed messages read from a delay topic and not yet delivered.")
        self._dlq = meter.create_counter(
            M_DLQ, unit="{message}", description="Messages written to a dead-letter topic.")
        self._errors = meter.create_counter(
            M_ERRORS, unit="{error}", description="Errors athomic raised or recorded.")

    @classmethod
    def from_settings(cls, settings: MessagingSettings) -> Telemetry:
        """The telemetry ``settings.telemetry`` asks for, in this process.

        Raises ConfigurationError when the chosen exporter cannot be built (e.g. OTLP
        without its package)."""
        tel = settings.telemetry
        return cls(tel, service_name=tel.service_name or settings.lineage.service_name,
                   servers=settings.servers, client_id=settings.client_id)

    # --- producer side ---------------------------------------------------------------------
    def publishing(self, requests: list[PublishRequest], topics: Sequence[str], *,
                   batch: bool) -> PublishRecorder:
        """Open the spans of a publish call and start timing it. ``topics`` names the
        topic each request is published to (its physical topic).

        Rewrites each request's trace headers to the new span's context (replacing the
        requests in ``requests``, which must be the list later published)."""
        if self.tracer is None and not self.metrics:
            return _OFF
        return PublishRecorder(self, requests, topics, batch)

    def _open_spans(self, requests: list[PublishRequest], topics: Sequence[str],
                    batch: bool) -> list[_SpanGroup]:
        assert self.tracer is not None
        fields = sorted(propagate.get_global_textmap().fields)
        groups: dict[tuple[Any, ...], _SpanGroup] = {}
        for i, request in enumerate(requests):
            key = (topics[i], request.priority, *_last(request.headers, fields))
            group = groups.get(key)
            if group is None:
                group = groups[key] = _SpanGroup(topics[i])
            group.indices.append(i)
        for group in groups.values():
            first = requests[group.indices[0]]
            parent = propagate.extract(MessageHeaders(first.headers),
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
                    requests[i] = requests[i]._replace(headers=new)
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

    def _record_publish(self, requests: Sequence[PublishRequest],
                        prepared: Sequence[tuple[OutgoingRecord, PublishingOutcome]],
                        results: Sequence[Any], batch: bool, seconds: float) -> None:
        op = PUBLISH_BATCH if batch else PUBLISH
        counts: dict[tuple[str, str, str, str | None], int] = {}
        for request, (_, outcome), result in zip(requests, prepared, results, strict=True):
            key: tuple[str, str, str, str | None]
            if isinstance(result, BaseException):
                key = (request.topic, FAILED, request.priority.value, error_type(result))
            else:
                key = (request.topic, outcome.value, request.priority.value, None)
            counts[key] = counts.get(key, 0) + 1
        first_error: str | None = None
        for (topic, outcome_name, priority, kind), n in counts.items():
            self.record_sent(n, topic=topic, outcome=outcome_name, priority=priority,
                             operation=op, error=kind)
            if kind is not None:
                first_error = first_error or kind
                self._errors.add(n, {ERROR_TYPE: kind, MESSAGING_OPERATION_NAME: op,
                                     MESSAGING_DESTINATION_NAME: topic})
        attrs: dict[str, Any] = {MESSAGING_SYSTEM: KAFKA, MESSAGING_OPERATION_NAME: op}
        topics = {key[0] for key in counts}
        if len(topics) == 1:
            attrs[MESSAGING_DESTINATION_NAME] = next(iter(topics))
        if first_error is not None:
            attrs[ERROR_TYPE] = first_error
        self._duration.record(seconds, attrs)
        if batch:
            size_attrs = {k: v for k, v in attrs.items() if k != ERROR_TYPE}
            self._batch_size.record(len(requests), size_attrs)

    # --- republisher side ----------------------------------------------------------------
    def start_republish(self, topic: str, headers: Any, *, message_id: str | None = None,
                        key: bytes | str | None = None, delay_topic: str | None = None,
                        hop: int | None = None) -> RepublishSpan:
        """Start the PRODUCER span ``republish <topic>`` of a delayed message being
        delivered to its final ``topic``. Its parent is the trace context in ``headers``
        (the message's stored headers, in any form), so it continues the caller's trace;
        an invalid or missing traceparent starts a new trace. End it with ``end()``."""
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
        return RepublishSpan(self.tracer.start_span(
            f"{REPUBLISH} {topic}", context=parent, kind=SpanKind.PRODUCER, attributes=attrs))

    def _tracing_installed(self) -> bool:
        """False while spans would go nowhere: no provider of ours and no SDK installed in
        this process (the API's default). Checked per call, since an application may
        install its SDK after athomic starts; skipping saves the header parsing a span
        per delayed message would cost."""
        if not self._global_tracing:
            return True
        return not isinstance(trace.get_tracer_provider(),
                              (trace.ProxyTracerProvider, trace.NoOpTracerProvider))

    @contextlib.contextmanager
    def republish_span(self, topic: str, headers: Any, *, message_id: str | None = None,
                       key: bytes | str | None = None, delay_topic: str | None = None,
                       hop: int | None = None) -> Iterator[RepublishSpan]:
        """``start_republish`` as a context manager: an exception escaping the block marks
        the span failed; the span ends on exit."""
        span = self.start_republish(topic, headers, message_id=message_id, key=key,
                                    delay_topic=delay_topic, hop=hop)
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
        attrs: dict[str, Any] = {MESSAGING_SYSTEM: KAFKA, MESSAGING_DESTINATION_NAME: topic,
                                 MESSAGING_OPERATION_NAME: operation, ATHOMIC_OUTCOME: outcome}
        if priority is not None:
            attrs[ATHOMIC_PRIORITY] = priority
        if error is not None:
            attrs[ERROR_TYPE] = error_type(error)
        self._sent.add(count, attrs)

    def record_lateness(self, seconds: float, *, delay_topic: str, topic: str) -> None:
        """How late (seconds, >= 0) a delayed message went out after its ``deliver_at``."""
        if self.metrics:
            self._lateness.record(max(seconds, 0.0), {ATHOMIC_DELAY_TOPIC: delay_topic,
                                                      MESSAGING_DESTINATION_NAME: topic})

    def add_delayed_held(self, delta: int, *, delay_topic: str) -> None:
        """Delayed messages now held for ``delay_topic``: +n when read, -n when released
        (delivered, forwarded to a shorter bucket, or dead-lettered)."""
        if self.metrics:
            self._held.add(delta, {ATHOMIC_DELAY_TOPIC: delay_topic})

    def record_dlq(self, *, source_topic: str, error_type: str, count: int = 1) -> None:
        """``count`` messages from ``source_topic`` written to a dead-letter topic."""
        if self.metrics:
            self._dlq.add(count, {ATHOMIC_SOURCE_TOPIC: source_topic, ERROR_TYPE: error_type})

    def record_error(self, error: BaseException | str, *, operation: str,
                     topic: str | None = None, count: int = 1) -> None:
        """An error of ``operation`` (``publish``, ``republish``, ...), by its type."""
        if not self.metrics:
            return
        attrs: dict[str, Any] = {ERROR_TYPE: error_type(error),
                                 MESSAGING_OPERATION_NAME: operation}
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
