"""ProducerHandle (the caller's side of publishing) and ProducerFactory."""

from __future__ import annotations

import datetime as dt
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import ray

from .context import capture, drop_invalid_traceparent
from .errors import (
    InvalidDelayError,
    InvalidHeaderError,
    SerializationError,
    ValidationError,
)
from .messages import (
    MessagePriority,
    PublishingOutcome,
    PublishRequest,
    as_headers,
    new_message_id,
    new_message_ids,
    validate_topic,
)
from .pipeline import Pipeline
from .settings import MessagingSettings
from .telemetry import check_exporter

T = TypeVar("T")

_PUBLISH_FIELDS = frozenset(
    {"message", "topic", "key", "headers", "delay_seconds", "priority", "deliver_at"})


class RemoteMethod(Generic[T]):
    """``handle.publish.remote(...)`` returns an ObjectRef, as on a Ray actor handle;
    ``await handle.publish(...)`` awaits the result in async code."""

    __slots__ = ("_submit",)

    def __init__(self, submit: Callable[..., Any]) -> None:
        self._submit = submit

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._submit(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[T]:
        ref = self._submit(*args, **kwargs)

        async def wait() -> T:
            return await ref  # type: ignore[no-any-return]

        return wait()


def _to_deliver_at(delay_seconds: Any, deliver_at: Any, now: float) -> float | None:
    """The absolute due time (epoch seconds) of a publish, or None for a direct one."""
    if delay_seconds is not None and deliver_at is not None:
        raise InvalidDelayError("pass delay_seconds or deliver_at, not both")
    if delay_seconds is not None:
        if isinstance(delay_seconds, bool) or not isinstance(delay_seconds, (int, float)):
            raise InvalidDelayError(
                f"delay_seconds must be a number, got {type(delay_seconds).__name__}",
                value=delay_seconds)
        if math.isnan(delay_seconds) or delay_seconds < 0:
            raise InvalidDelayError(f"delay_seconds must be >= 0, got {delay_seconds}",
                                    value=delay_seconds)
        if math.isinf(delay_seconds):
            raise InvalidDelayError("delay_seconds must be finite", value=delay_seconds)
        return now + float(delay_seconds) if delay_seconds > 0 else None
    if deliver_at is not None:
        if isinstance(deliver_at, dt.datetime):
            if deliver_at.tzinfo is None:
                raise InvalidDelayError(
                    "deliver_at must be timezone-aware (e.g. datetime.now(timezone.utc))",
                    value=deliver_at)
            when = deliver_at.timestamp()
        elif isinstance(deliver_at, (int, float)) and not isinstance(deliver_at, bool):
            when = float(deliver_at)
            if not math.isfinite(when):
                raise InvalidDelayError("deliver_at must be finite", value=deliver_at)
        else:
            raise InvalidDelayError(
                f"deliver_at must be an aware datetime or epoch seconds, got "
                f"{type(deliver_at).__name__}", value=deliver_at)
        return when if when > now else None
    return None


def _to_key(key: Any) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode()
    raise ValidationError(f"key must be str, bytes, int or None, got {type(key).__name__}",
                          value=key)


class ProducerHandle:
    """The caller's side of publishing: validates, captures context, routes to actors.

    Routing: each priority has a lane of ProducerActors (HIGH has its own, so it never
    waits behind NORMAL or LOW work); inside a lane the handle picks the less busy of two
    random actors by its own in-flight count (power of two choices), and waits when the
    lane has ``lanes.max_in_flight`` messages unacknowledged. The handle pickles, so it can
    be passed to Ray tasks, actors and ``map_batches``; each copy keeps its own counts.
    """

    def __init__(self, settings: MessagingSettings, lanes: Mapping[str, list[Any]]) -> None:
        self.settings = settings
        self._lanes = {lane: list(actors) for lane, actors in lanes.items()}
        self._setup()

    def _setup(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = {lane: [0] * len(a) for lane, a in self._lanes.items()}
        self._lane_total = dict.fromkeys(self._lanes, 0)
        self._pipeline = Pipeline.from_settings(self.settings, byte_stages=False)
        self._valid_topics: set[str] = set()
        self._service = (self.settings.lineage.service_name
                         if self.settings.lineage.enabled else None)
        self.publish: RemoteMethod[PublishingOutcome] = RemoteMethod(self._publish)
        self.publish_batch: RemoteMethod[list[PublishingOutcome]] = RemoteMethod(
            self._publish_batch)

    def __reduce__(self) -> Any:
        return (ProducerHandle, (self.settings, self._lanes))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self._lanes.items())
        return f"ProducerHandle(connection={self.settings.connection_name!r}, lanes: {sizes})"

    @property
    def connection_name(self) -> str:
        return self.settings.connection_name

    # --- building requests -------------------------------------------------------------
    def _captured(self) -> tuple[list[tuple[str, bytes]], int]:
        """The caller's context as header pairs, and their size in bytes. Taken once per
        ``publish`` or per ``publish_batch`` call: a batch shares one list."""
        pairs = capture(self._service, self.settings.lineage.enabled).items()
        return pairs, sum(len(k) + len(v) for k, v in pairs)

    def _request(self, message: Any = None, topic: Any = None, key: Any = None,
                 headers: Any = None, delay_seconds: Any = None,
                 priority: Any = MessagePriority.NORMAL, deliver_at: Any = None, *,
                 captured: tuple[list[tuple[str, bytes]], int] | None = None,
                 now: float | None = None, message_id: str | None = None
                 ) -> PublishRequest:
        if topic is None:
            raise ValidationError("topic is required", value=None)
        if topic not in self._valid_topics:
            validate_topic(topic)
            if len(self._valid_topics) < 10_000:
                self._valid_topics.add(topic)
        prio = MessagePriority.parse(priority)
        now = time.time() if now is None else now
        due = _to_deliver_at(delay_seconds, deliver_at, now)
        if due is not None:
            if not self.settings.delay_topics:
                raise NotImplementedError(
                    "delayed publishing is not configured: set delay_topics in the "
                    "messaging settings")
            cap = self.settings.max_delay_seconds
            if cap is not None and due - now > cap:
                raise InvalidDelayError(
                    f"delay of {due - now:.0f}s exceeds max_delay_seconds={cap}",
                    value=due - now)
        context, context_size = captured if captured is not None else self._captured()
        merged, size, passed = context, context_size, 0
        if headers:
            caller = as_headers(headers)
            # A caller's invalid traceparent is dropped, never an error: the message then
            # carries the caller's current trace context, or the actor's span starts a trace.
            drop_invalid_traceparent(caller)
            own = {k for k, _ in caller.items()}
            # what the caller passed wins over what was captured
            merged = [h for h in context if h[0] not in own] + caller.items()
            size = sum(len(k) + len(v) for k, v in merged)
            passed = len(caller)
        limits = self.settings.producer
        if len(merged) > limits.max_headers or size > limits.max_header_bytes:
            raise InvalidHeaderError(
                f"headers exceed producer.max_headers={limits.max_headers} / "
                f"producer.max_header_bytes={limits.max_header_bytes}: {len(merged)} "
                f"headers, {size} bytes ({passed} passed in headers=, the rest captured: "
                "trace context, context variables, lineage)", value=len(merged))
        value, content_type, schema = self._pipeline.serialize(message)
        return PublishRequest(topic, value, _to_key(key), merged, content_type, schema,
                              prio, due, message_id or new_message_id(), now)

    # --- routing -----------------------------------------------------------------------
    def _lane(self, priority: MessagePriority) -> str:
        if priority is MessagePriority.HIGH:
            return "high"
        if priority is MessagePriority.LOW and "low" in self._lanes:
            return "low"
        return "normal"

    def _acquire(self, lane: str, count: int) -> int:
        """Reserve ``count`` in-flight slots in ``lane``; returns the chosen actor index."""
        limit = self.settings.lanes.max_in_flight
        with self._cond:
            # A batch larger than the window still goes once the lane is idle.
            while self._lane_total[lane] and self._lane_total[lane] + count > limit:
                self._cond.wait()
            loads = self._in_flight[lane]
            if len(loads) == 1:
                index = 0
            else:
                a, b = random.sample(range(len(loads)), 2)
                index = a if loads[a] <= loads[b] else b
            loads[index] += count
            self._lane_total[lane] += count
            return index

    def _release(self, lane: str, index: int, count: int) -> None:
        with self._cond:
            self._in_flight[lane][index] -= count
            self._lane_total[lane] -= count
            self._cond.notify_all()

    def _submit(self, lane: str, method: str, payload: Any, count: int) -> Any:
        index = self._acquire(lane, count)
        try:
            ref = getattr(self._lanes[lane][index], method).remote(payload)
        except BaseException:
            self._release(lane, index, count)
            raise
        ref.future().add_done_callback(lambda _: self._release(lane, index, count))
        return ref

    def _publish(self, message: Any = None, topic: Any = None, key: Any = None,
                 headers: Any = None, delay_seconds: Any = None,
                 priority: Any = MessagePriority.NORMAL, deliver_at: Any = None) -> Any:
        request = self._request(message, topic, key, headers, delay_seconds, priority,
                                deliver_at)
        return self._submit(self._lane(request.priority), "publish", request, 1)

    def _publish_batch(self, messages: Iterable[Mapping[str, Any]], **defaults: Any) -> Any:
        """Each item is a mapping of ``publish`` arguments; ``defaults`` fill in what an
        item leaves out (e.g. ``publish_batch(items, topic="events")``)."""
        unknown = set(defaults) - _PUBLISH_FIELDS
        if unknown:
            raise ValidationError(f"unknown publish arguments: {sorted(unknown)}")
        requests: list[PublishRequest] = []
        captured = self._captured()
        now = time.time()
        items = list(messages)
        ids = new_message_ids(len(items))
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValidationError(
                    f"batch items must be mappings of publish arguments, got "
                    f"{type(item).__name__}", index=i)
            bad = set(item) - _PUBLISH_FIELDS
            if bad:
                raise ValidationError(f"unknown publish arguments: {sorted(bad)}", index=i)
            try:
                requests.append(self._request(**{**defaults, **item}, captured=captured,
                                              now=now, message_id=ids[i]))
            except (ValidationError, SerializationError) as exc:
                if exc.index is None:
                    exc.index = i
                    exc.args = (f"message #{i}: {exc.args[0]}", *exc.args[1:])
                raise
        by_lane: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_lane.setdefault(self._lane(request.priority), []).append(i)
        if len(by_lane) <= 1:
            lane = next(iter(by_lane), "normal")
            return self._submit(lane, "publish_batch", requests, max(len(requests), 1))
        refs = [self._submit(lane, "publish_batch", [requests[i] for i in idx], len(idx))
                for lane, idx in by_lane.items()]
        return _merge_outcomes.remote(list(by_lane.values()), *refs)


@ray.remote(num_cpus=0)
def _merge_outcomes(order: list[list[int]], *parts: list[PublishingOutcome]
                    ) -> list[PublishingOutcome]:
    """Reassembles a batch that was split over lanes, in the caller's order."""
    out: list[Any] = [None] * sum(len(idx) for idx in order)
    for idx, outcomes in zip(order, parts, strict=False):
        for i, outcome in zip(idx, outcomes, strict=False):
            out[i] = outcome
    return out


class ProducerFactory:
    """Creates producer handles; the actors behind them are shared per connection name."""

    @staticmethod
    def create(settings: MessagingSettings | None = None) -> ProducerHandle:
        """A handle to the producer actors of ``settings.connection_name``, starting them if
        none run yet. Any process in the cluster gets the same actors for the same name.

        With delay topics configured (and ``republisher.enabled``), the DelayBucketActors
        are started too, and this returns once they run: delay topics created, or checked
        (ConfigurationError for one whose retention could lose messages).
        """
        from athomic.actors.topology import apply_producers, apply_republisher

        settings = settings if settings is not None else MessagingSettings()
        # Surface stage and exporter problems (a custom stage that does not import, an OTLP
        # exporter without its package) here as ConfigurationError, not as actors that fail
        # to start.
        Pipeline.from_settings(settings)
        check_exporter(settings.telemetry)
        if settings.delay_topics and settings.republisher.enabled:
            apply_republisher(settings)
        return ProducerHandle(settings, apply_producers(settings))

    @staticmethod
    def shutdown(connection_name: str = "default") -> list[str]:
        """Flush and stop every actor of a connection; returns the names stopped."""
        from athomic.actors.topology import teardown

        return teardown(connection_name)
