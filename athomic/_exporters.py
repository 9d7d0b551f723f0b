"""Where athomic's own telemetry goes when ``telemetry.exporter`` is not ``"none"``: the
tracer and meter providers it builds per actor process, and the exporters (console, OTLP,
and a JSON-lines file used by tests and debugging)."""

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
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from .errors import ConfigurationError
from .settings import TelemetrySettings


def check_exporter(settings: TelemetrySettings) -> None:
    """Raise ConfigurationError if the exporter ``settings`` choose cannot be built here."""
    if settings.exporter == "otlp":
        _otlp_classes(settings.otlp_protocol)


def _otlp_classes(protocol: str) -> tuple[Any, Any]:
    kind = "grpc" if protocol == "grpc" else "http"
    package = f"opentelemetry-exporter-otlp-proto-{kind}"
    try:
        if kind == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigurationError(
            f"telemetry.exporter='otlp' (otlp_protocol={protocol!r}) needs the {package} "
            "package: pip install 'athomic-ray[otlp]'") from None
    return OTLPSpanExporter, OTLPMetricExporter


def _exporters(settings: TelemetrySettings) -> tuple[SpanExporter, MetricExporter]:
    if settings.exporter == "console":
        return ConsoleSpanExporter(), ConsoleMetricExporter()
    if settings.exporter == "file":
        assert settings.file_path is not None
        return JsonLinesSpanExporter(settings.file_path), JsonLinesMetricExporter(
            settings.file_path)
    span_cls, metric_cls = _otlp_classes(settings.otlp_protocol)
    endpoint = settings.otlp_endpoint
    if endpoint is None:
        return span_cls(), metric_cls()
    if settings.otlp_protocol == "grpc":
        return span_cls(endpoint=endpoint), metric_cls(endpoint=endpoint)
    base = endpoint.rstrip("/")
    return span_cls(endpoint=f"{base}/v1/traces"), metric_cls(endpoint=f"{base}/v1/metrics")


def build_providers(settings: TelemetrySettings, service_name: str
                     ) -> tuple[trace.TracerProvider | None, otel_metrics.MeterProvider | None]:
    span_exporter, metric_exporter = _exporters(settings)
    resource = Resource.create({"service.name": service_name})
    tracer_provider: TracerProvider | None = None
    if settings.traces:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider: MeterProvider | None = None
    if settings.metrics:
        reader = PeriodicExportingMetricReader(
            metric_exporter,
            export_interval_millis=settings.metric_export_interval_s * 1000)
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
        "pid": os.getpid(),
    }


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
                            "pid": os.getpid()}
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
