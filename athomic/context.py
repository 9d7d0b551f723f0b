"""Context captured where ``publish`` is called: W3C trace context, baggage, execution-context
variables and lineage, turned into Kafka headers.

The caller's context lives in the caller's process (a driver, a Ray task, a ``map_batches``
worker), not in the ProducerActor, so the handle captures it before the actor call.
"""

from __future__ import annotations

import contextvars
import socket
from typing import Any

from opentelemetry import propagate

from .messages import (
    H_CONTEXT_PREFIX,
    H_HOST,
    H_PRODUCER,
    H_RAY_ACTOR_ID,
    H_RAY_JOB_ID,
    H_RAY_NODE_ID,
    H_RAY_TASK_ID,
    MessageHeaders,
)

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
        self.job_id: str | None = None
        self.node_id: str | None = None
        self._ray_known = False

    def ray_facts(self) -> tuple[str | None, str | None, str | None, str | None]:
        try:
            import ray

            if not ray.is_initialized():
                return None, None, None, None
            ctx = ray.get_runtime_context()
            if not self._ray_known:
                self.job_id = ctx.get_job_id()
                self.node_id = ctx.get_node_id()
                self._ray_known = True
            if ctx.worker.mode != ray.WORKER_MODE:  # a driver has no task or actor id
                return self.job_id, self.node_id, None, None
            return self.job_id, self.node_id, ctx.get_task_id(), ctx.get_actor_id()
        except Exception:  # lineage is best effort; it must never fail a publish
            return None, None, None, None


_lineage = _ProcessLineage()


def capture(service_name: str | None, lineage: bool = True) -> MessageHeaders:
    """Headers describing the current caller: trace context, baggage, context variables and
    (when ``lineage``) where the message comes from."""
    headers = MessageHeaders()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for key, value in carrier.items():
        headers.add(key, value)
    for name, var in _context_vars.items():
        value = var.get()
        if value is not None:
            headers.add(context_header(name), str(value))
    if lineage:
        if service_name:
            headers.add(H_PRODUCER, service_name)
        job_id, node_id, task_id, actor_id = _lineage.ray_facts()
        headers.add(H_HOST, _lineage.host)
        for key, fact in ((H_RAY_JOB_ID, job_id), (H_RAY_NODE_ID, node_id),
                          (H_RAY_TASK_ID, task_id), (H_RAY_ACTOR_ID, actor_id)):
            if fact:
                headers.add(key, fact)
    return headers
