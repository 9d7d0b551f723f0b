"""Where athomic's own telemetry goes when ``telemetry.exporter`` is not ``"none"``: the
tracer and meter providers it builds per actor process, and the exporters (console, OTLP,
and a JSON-lines file used by tests and debugging).

Precedence follows the OpenTelemetry SDK's: a setting given explicitly wins over the SDK's
environment variable, which wins over athomic's default. "Explicitly" means the field was
set (keyword, ``ATHOMIC_TELEMETRY__...``, TOML), not left at its default: so the default
``lineage.service_name`` ("athomic") never hides ``OTEL_SERVICE_NAME``, nor the default
``otlp_protocol`` ``OTEL_EXPORTER_OTLP_PROTOCOL``. Whatever athomic does not pass (OTLP
headers, timeouts, certificates, the sampler, batch processor limits, ``OTEL_SDK_DISABLED``)
the SDK and the exporter classes read themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .errors import ConfigurationError
from .settings import TelemetrySettings


def otel_environment() -> dict[str, str]:
    """The OpenTelemetry SDK's environment variables (``OTEL_*``) of this process.

    The topology module gives them to every actor it starts
    (``runtime_env={"env_vars": ...}``), so ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_EXPORTER_OTLP_*`` ... set where ``ProducerFactory.create`` runs apply in the
    actors too. This is the one place athomic reads ``os.environ`` outside its settings, on
    purpose: these variables are the SDK's configuration, read by the SDK in each process,
    so they must arrive in the actor as environment variables anyway; copied into the
    settings they would be a second copy nothing reads, and would enter the settings
    fingerprint (an OTLP header token would decide whether two drivers share actors)."""
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}


_PROTOCOLS = ("grpc", "http/protobuf")


def otlp_protocol(settings: TelemetrySettings, signal: str) -> str:
    """The OTLP protocol of ``signal`` (``traces`` or ``metrics``): ``telemetry.otlp_protocol``
    when set, else ``OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL``, else
    ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``http/protobuf``."""
    if "otlp_protocol" in settings.model_fields_set:
        return settings.otlp_protocol
    env = otel_environment()
    for name in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(name, "").strip()
        if value:
            if value not in _PROTOCOLS:
                raise ConfigurationError(
                    f"{name}={value!r}: athomic's otlp exporter speaks grpc or http/protobuf")
            return value
    return settings.otlp_protocol


def check_exporter(settings: TelemetrySettings) -> None:
    """Raise ConfigurationError if the exporter ``settings`` choose cannot be built here."""
    if settings.exporter == "otlp":
        for signal in ("traces", "metrics"):
            _otlp_class(otlp_protocol(settings, signal), signal)


def _otlp_class(protocol: str, signal: str) -> Any:
    kind = "grpc" if protocol == "grpc" else "http"
    package = f"opentelemetry-exporter-otlp-proto-{kind}"
    try:
        if kind == "grpc" and signal == "traces":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter
        if kind == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
            return OTLPMetricExporter
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )
            return HttpSpanExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )
        return HttpMetricExporter
    except ImportError:
        raise ConfigurationError(
            f"telemetry.exporter='otlp' (otlp_protocol={protocol!r}) needs the {package} "
            "package: pip install 'athomic-ray[otlp]'") from None


def _otlp_exporter(settings: TelemetrySettings, signal: str) -> Any:
    protocol = otlp_protocol(settings, signal)
    cls = _otlp_class(protocol, signal)
    endpoint = settings.otlp_endpoint
    if endpoint is None:  # the exporter reads OTEL_EXPORTER_OTLP_[<SIGNAL>_]ENDPOINT itself
        return cls()
    if protocol == "grpc":
        return cls(endpoint=endpoint)
    return cls(endpoint=f"{endpoint.rstrip('/')}/v1/{signal}")


def _exporters(settings: TelemetrySettings) -> tuple[SpanExporter, MetricExporter]:
    if settings.exporter == "console":
        return ConsoleSpanExporter(), ConsoleMetricExporter()
    if settings.exporter == "file":
        assert settings.file_path is not None
        return JsonLinesSpanExporter(settings.file_path), JsonLinesMetricExporter(
            settings.file_path)
    return _otlp_exporter(settings, "traces"), _otlp_exporter(settings, "metrics")


def build_resource(settings: TelemetrySettings, default_service_name: str) -> Resource:
    """The resource of athomic's own providers: the SDK's (its detectors,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``), with ``service.name`` =
    ``telemetry.service_name`` when set, else the SDK's when the environment names one,
    else ``default_service_name`` (``lineage.service_name``)."""
    resource = Resource.create()
    name = settings.service_name
    if name is None:
        # The SDK fills in "unknown_service[:<executable>]" when nothing named the service.
        if not str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            return resource
        name = default_service_name
    return resource.merge(Resource({SERVICE_NAME: name}))


def build_providers(settings: TelemetrySettings, default_service_name: str = "athomic"
                    ) -> tuple[trace.TracerProvider | None, otel_metrics.MeterProvider | None]:
    """athomic's own tracer and meter providers (None for a signal that is off), exporting
    where ``settings`` say; never installed as the global ones."""
    span_exporter, metric_exporter = _exporters(settings)
    resource = build_resource(settings, default_service_name)
    tracer_provider: TracerProvider | None = None
    if settings.traces:
        # sampler, span limits and the batch processor's limits: from OTEL_* (the SDK's)
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider: MeterProvider | None = None
    if settings.metrics:
        interval = None  # OTEL_METRIC_EXPORT_INTERVAL, else the SDK's 60 s
        if "metric_export_interval_s" in settings.model_fields_set:
            interval = settings.metric_export_interval_s * 1000
        reader = PeriodicExportingMetricReader(metric_exporter,
                                               export_interval_millis=interval)
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    return tracer_provider, meter_provider


def _append(path: Path, data: bytes) -> None:
    """Append in one write (O_APPEND): lines from several actor processes do not mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _hex(value: int | None, width: int) -> str | None:
    return None if value is None else f"{value:0{width}x}"


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as the file exporter writes it (a flat JSON object)."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return {
        "signal": "span",
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": _hex(ctx.trace_id, 32),
        "span_id": _hex(ctx.span_id, 16),
        "parent_span_id": _hex(parent.span_id, 16) if parent is not None else None,
        "parent_trace_id": _hex(parent.trace_id, 32) if parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "events": [{"name": e.name,
                    "attributes": {k: _plain(v) for k, v in (e.attributes or {}).items()}}
                   for e in span.events],
        "links": [{"trace_id": _hex(link.context.trace_id, 32),
                   "span_id": _hex(link.context.span_id, 16)} for link in span.links],
        "resource": {k: _plain(v) for k, v in span.resource.attributes.items()},
        "scope": _scope(span.instrumentation_scope),
        "pid": os.getpid(),
    }


def _scope(scope: InstrumentationScope | None) -> dict[str, Any] | None:
    if scope is None:
        return None
    return {"name": scope.name, "version": scope.version, "schema_url": scope.schema_url}


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (``span_record``)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s), separators=(",", ":"), default=str) + "\n"
                       for s in spans)
        try:
            _append(self.path, data.encode())
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class JsonLinesMetricExporter(MetricExporter):
    """Appends each metric data point to a file as one JSON line: name, unit,
    attributes, and the point (cumulative ``value``, or ``count``/``sum``/``min``/``max``/
    ``bucket_counts``/``explicit_bounds`` for a histogram)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        lines = []
        for resource_metrics in metrics_data.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        row: dict[str, Any] = {
                            "signal": "metric", "name": metric.name, "unit": metric.unit,
                            "attributes": {k: _plain(v)
                                           for k, v in (point.attributes or {}).items()},
                            "scope": _scope(scope.scope), "pid": os.getpid()}
                        if isinstance(point, HistogramDataPoint):
                            row.update(count=point.count, sum=point.sum, min=point.min,
                                       max=point.max, bucket_counts=list(point.bucket_counts),
                                       explicit_bounds=list(point.explicit_bounds))
                        elif isinstance(point, NumberDataPoint):
                            row["value"] = point.value
                        lines.append(json.dumps(row, separators=(",", ":"), default=str))
        if lines:
            try:
                _append(self.path, ("\n".join(lines) + "\n").encode())
            except OSError:
                return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass
