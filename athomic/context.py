"""Context carried in Kafka headers: W3C trace context, baggage, execution-context
variables and lineage.

Producer side, ``capture`` runs where ``publish`` is called (a driver, a Ray task, a
``map_batches`` worker), not in the ProducerActor: the caller's context lives in the
caller's process, so the handle captures it before the actor call. Consumer side,
``extract_context`` reads it back from a record's headers and ``message_context``
activates it (OpenTelemetry context and the registered context variables) for the
duration of a ``with`` block. Trace context crosses the headers through one getter/setter
pair (``HEADERS_GETTER`` / ``HEADERS_SETTER``) and the global OpenTelemetry propagator.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .messages import (
    H_CONTEXT_PREFIX,
    H_HOP,
    H_HOST,
    H_MESSAGE_ID,
    H_PRODUCER,
    H_PUBLISHED_AT,
    H_RAY_ACTOR_ID,
    H_RAY_JOB_ID,
    H_RAY_NODE_ID,
    H_RAY_TASK_ID,
    H_TRACEPARENT,
    H_TRACESTATE,
    MessageHeaders,
)


class HeadersGetter(Getter[MessageHeaders]):
    """Reads a propagation field from Kafka headers (the last value, as everywhere in
    athomic)."""

    def get(self, carrier: MessageHeaders, key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value.decode("utf-8", "replace")]

    def keys(self, carrier: MessageHeaders) -> list[str]:
        return list(dict.fromkeys(carrier))


class HeadersSetter(Setter[MessageHeaders]):
    """Writes a propagation field into Kafka headers, replacing any earlier value."""

    def set(self, carrier: MessageHeaders, key: str, value: str) -> None:
        carrier.set(key, value)


HEADERS_GETTER = HeadersGetter()
HEADERS_SETTER = HeadersSetter()
_W3C = TraceContextTextMapPropagator()


def valid_traceparent(value: bytes | str | None) -> bool:
    """Whether ``value`` is a W3C traceparent the OpenTelemetry propagator accepts (right
    shape, version not ``ff``, non-zero trace and span ids)."""
    if value is None:
        return False
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    ctx = _W3C.extract({H_TRACEPARENT: text})
    return trace.get_current_span(ctx).get_span_context().is_valid


def drop_invalid_traceparent(headers: MessageHeaders) -> bool:
    """Remove an invalid ``traceparent`` (and the ``tracestate`` that belongs to it) from
    headers a caller passed; True if one was removed. A bad header must never fail a
    publish: the message carries the caller's own context instead, or a new trace."""
    value = headers.get(H_TRACEPARENT)
    if value is None or valid_traceparent(value):
        return False
    headers.remove(H_TRACEPARENT)
    headers.remove(H_TRACESTATE)
    return True


request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "athomic_request_id", default=None)
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "athomic_correlation_id", default=None)
tenant_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "athomic_tenant_id", default=None)
user_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "athomic_user_id", default=None)

_context_vars: dict[str, contextvars.ContextVar[Any]] = {
    "request_id": request_id,
    "correlation_id": correlation_id,
    "tenant_id": tenant_id,
    "user_id": user_id,
}


def register_context_var(name: str, var: contextvars.ContextVar[Any]) -> None:
    """Carry ``var`` in every message published from this process, as header
    ``athomic-ctx-<name>`` (underscores become dashes)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"context variable name {name!r} must be alphanumeric with _ or -")
    _context_vars[name] = var


def context_header(name: str) -> str:
    return H_CONTEXT_PREFIX + name.replace("_", "-")


class _ProcessLineage:
    """Lineage facts that do not change within a process, looked up once."""

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self._ids: tuple[str | None, str | None] | None = None
        """The job and node ids, looked up at the first message."""
        self._driver = False
        """A driver has no task or actor id, so it needs no runtime context per message."""
        self._constant: dict[tuple[str | None, str | None, str | None],
                             tuple[list[tuple[str, bytes]], int]] = {}
        """The lineage headers of a driver (or a process without Ray), by service name and
        ids."""

    def pairs(self, service_name: str | None) -> tuple[list[tuple[str, bytes]], int]:
        """The lineage headers of a message published now, and their size in bytes; built
        once where they do not change (a driver, or a process without Ray)."""
        job_id, node_id, task_id, actor_id = self.ray_facts()
        if task_id is not None or actor_id is not None:  # a task or an actor method
            return self._build(service_name, job_id, node_id, task_id, actor_id)
        key = (service_name, job_id, node_id)
        built = self._constant.get(key)
        if built is None:
            built = self._constant[key] = self._build(service_name, job_id, node_id, None,
                                                      None)
        return built

    def _build(self, service_name: str | None, *facts: str | None
               ) -> tuple[list[tuple[str, bytes]], int]:
        headers = MessageHeaders()
        if service_name:
            headers.add(H_PRODUCER, service_name)
        headers.add(H_HOST, self.host)
        for key, fact in zip((H_RAY_JOB_ID, H_RAY_NODE_ID, H_RAY_TASK_ID, H_RAY_ACTOR_ID),
                             facts, strict=True):
            if fact:
                headers.add(key, fact)
        pairs = headers.items()
        return pairs, sum(len(k) + len(v) for k, v in pairs)

    def ray_facts(self) -> tuple[str | None, str | None, str | None, str | None]:
        try:
            import ray

            if not ray.is_initialized():
                return None, None, None, None
            if self._ids is None:
                ctx = ray.get_runtime_context()
                self._ids = (ctx.get_job_id(), ctx.get_node_id())
                self._driver = ctx.worker.mode != ray.WORKER_MODE
            job_id, node_id = self._ids
            if self._driver:
                return job_id, node_id, None, None
            ctx = ray.get_runtime_context()
            return job_id, node_id, ctx.get_task_id(), ctx.get_actor_id()
        except Exception:  # lineage is best effort; it must never fail a publish
            return None, None, None, None


_lineage = _ProcessLineage()


def capture(service_name: str | None, lineage: bool = True) -> MessageHeaders:
    """Headers describing the current caller: trace context, baggage, context variables and
    (when ``lineage``) where the message comes from."""
    return MessageHeaders(captured(service_name, lineage)[0])


def captured(service_name: str | None, lineage: bool = True
             ) -> tuple[list[tuple[str, bytes]], int]:
    """``capture`` as header pairs, and the bytes of their keys and values.

    While the caller has no trace context, baggage or context variable set, a driver's
    headers are its lineage alone, which does not change: the same list is returned each
    time (so it must never be changed in place, as a batch's shared list)."""
    dynamic: MessageHeaders | None = None
    current = otel_context.get_current()
    if current:  # an empty context (no span, no baggage) gives a propagator nothing
        dynamic = MessageHeaders()
        propagate.inject(dynamic, context=current, setter=HEADERS_SETTER)
    for name, var in _context_vars.items():
        value = var.get()
        if value is not None:
            if dynamic is None:
                dynamic = MessageHeaders()
            dynamic.add(context_header(name), str(value))
    own, own_size = _lineage.pairs(service_name) if lineage else ([], 0)
    if not dynamic:
        return own, own_size
    pairs = dynamic.items()
    return pairs + own, sum(len(k) + len(v) for k, v in pairs) + own_size


# --- consumer side -------------------------------------------------------------------------
@dataclass(frozen=True)
class Lineage:
    """Where a message comes from, as its lineage headers say (None where absent)."""

    message_id: str | None = None
    producer: str | None = None
    host: str | None = None
    ray_job_id: str | None = None
    ray_node_id: str | None = None
    ray_task_id: str | None = None
    ray_actor_id: str | None = None
    published_at: float | None = None
    """When ``publish`` was called (epoch seconds), kept through delays."""
    hop: int | None = None
    """Delay topics the message passed through (set by the delayed path)."""


@dataclass(frozen=True)
class MessageContext:
    """The context a received message carries, from ``extract_context``."""

    otel_context: Context
    """Trace context and baggage as an OpenTelemetry Context: the parent for a span that
    processes the message (``tracer.start_span(..., context=ctx.otel_context)``)."""
    span_context: SpanContext | None
    """The producer's span (remote); None when the message has no valid traceparent."""
    baggage: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, str] = field(default_factory=dict)
    """Execution-context values by name (``request_id``, ``tenant_id``, registered ones)."""
    lineage: Lineage = field(default_factory=Lineage)

    @property
    def trace_id(self) -> str | None:
        """The trace id as 32 hex digits, or None."""
        return None if self.span_context is None else f"{self.span_context.trace_id:032x}"


def _context_names() -> dict[str, str]:
    return {context_header(name): name for name in _context_vars}


def extract_context(headers: Any) -> MessageContext:
    """Read the trace context, baggage, execution-context values and lineage a received
    message carries. ``headers`` is the record's headers in any form. Never raises on bad
    values: an invalid ``traceparent`` simply yields no span context."""
    hdrs = MessageHeaders.of(headers)
    ctx = propagate.extract(hdrs, getter=HEADERS_GETTER)
    span_context = trace.get_current_span(ctx).get_span_context()
    names = _context_names()
    values: dict[str, str] = {}
    for key, raw in hdrs.items():
        if key.startswith(H_CONTEXT_PREFIX):
            name = names.get(key) or key[len(H_CONTEXT_PREFIX):].replace("-", "_")
            values[name] = raw.decode("utf-8", "replace")
    return MessageContext(
        otel_context=ctx,
        span_context=span_context if span_context.is_valid else None,
        baggage={k: str(v) for k, v in otel_baggage.get_all(ctx).items()},
        values=values,
        lineage=_lineage_of(hdrs))


def _lineage_of(hdrs: MessageHeaders) -> Lineage:
    published_ms = _number(hdrs.get_str(H_PUBLISHED_AT))
    hop = _number(hdrs.get_str(H_HOP))
    return Lineage(
        message_id=hdrs.get_str(H_MESSAGE_ID), producer=hdrs.get_str(H_PRODUCER),
        host=hdrs.get_str(H_HOST), ray_job_id=hdrs.get_str(H_RAY_JOB_ID),
        ray_node_id=hdrs.get_str(H_RAY_NODE_ID), ray_task_id=hdrs.get_str(H_RAY_TASK_ID),
        ray_actor_id=hdrs.get_str(H_RAY_ACTOR_ID),
        published_at=None if published_ms is None else published_ms / 1000.0,
        hop=None if hop is None else int(hop))


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


@contextlib.contextmanager
def message_context(headers: Any) -> Iterator[MessageContext]:
    """Activate a received message's context for the ``with`` block: its trace context
    and baggage become the current OpenTelemetry context, and every registered context
    variable is set to the message's value (None when the message has none). Both are
    restored on exit."""
    ctx = extract_context(headers)
    token = otel_context.attach(ctx.otel_context)
    reset: list[tuple[contextvars.ContextVar[Any], contextvars.Token[Any]]] = []
    try:
        for name, var in _context_vars.items():
            reset.append((var, var.set(ctx.values.get(name))))
        yield ctx
    finally:
        for var, var_token in reversed(reset):
            var.reset(var_token)
        otel_context.detach(token)
