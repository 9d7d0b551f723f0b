"""ProducerHandle (the caller's side of publishing) and ProducerFactory."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import ray

from ._exporters import check_exporter
from .actors.topology import (
    NAMESPACE,
    apply_producers,
    apply_republisher,
    producer_actor_name,
    teardown,
)
from .context import captured, drop_invalid_traceparent
from .envelope import MAX_HOPS
from .errors import (
    AthomicError,
    BackpressureTimeoutError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidTopicError,
    PublishError,
    SerializationError,
    ValidationError,
)
from .messages import (
    CancelOutcome,
    MessageHeaders,
    MessagePriority,
    PublishingOutcome,
    PublishRequest,
    PublishRequests,
    new_message_id,
    new_message_ids,
    new_request,
    validate_message_id,
    validate_topic,
)
from .pipeline import Pipeline
from .pipeline.serialize import JSON
from .republisher.schedule import plan
from .settings import MessagingSettings

T = TypeVar("T")

_PUBLISH_FIELDS = frozenset(
    {"message", "topic", "key", "headers", "delay_seconds", "priority", "deliver_at",
     "message_id"})
_PLAIN_FIELDS = frozenset({"message", "topic", "key", "priority"})
"""A batch item of only these fields has no headers, delay or id of its own to check."""
_UNPARSED = object()
"""A batch's default priority that is not a member yet (no item's priority is this)."""
_IMPLAUSIBLE_S = 100 * 366 * 86_400.0
"""A delay this long is a mistake (epoch milliseconds passed as seconds, a unit slip)."""


class RemoteMethod(Generic[T]):
    """``handle.publish.remote(...)`` returns an ObjectRef, as on a Ray actor handle
    (waiting in the calling thread while the lane is full); ``await handle.publish(...)``
    awaits the result in async code, and waits for room without blocking the event
    loop."""

    __slots__ = ("_submit",)

    def __init__(self, submit: Callable[..., Any]) -> None:
        self._submit = submit

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._submit(None, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[T]:
        async def call() -> T:
            ref = await self._submit(asyncio.get_running_loop(), *args, **kwargs)
            return await ref  # type: ignore[no-any-return]

        return call()


_SWEEP_FROM = 32
"""Calls a lane keeps on record before it asks Ray which of them finished; after that,
twice as many as were still running (so a lane with many calls in flight asks in
proportion)."""

_DEAD = 4
"""``ActorTableData.DEAD``: the state Ray's core worker holds for an actor that is gone
for good (killed, or replaced by ``athomic up``)."""


def _is_dead(actor: Any) -> bool:
    """Whether Ray's core worker holds ``actor`` as gone for good (it learns from the GCS
    shortly after a kill). ``ActorHandle._get_local_state`` is Ray's own, there since Ray
    2.0; a handle without it is never taken for dead."""
    local_state = getattr(actor, "_get_local_state", None)
    return local_state is not None and local_state() == _DEAD


def _finished(refs: list[Any]) -> list[Any]:
    """Those of ``refs`` that completed, however they ended: asked of Ray's core worker,
    without fetching or deserialising a value."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    return list(ready)


class Window:
    """The in-flight window of one lane: unacknowledged messages per actor and in all.

    ``take`` reserves room (waiting while the lane is full, at most ``timeout_s``) and
    picks the less loaded of two random actors (power of two choices); ``sent`` records
    the call that holds it. Room comes back lazily: the calls on record are asked about
    together (``finished``: one ``ray.wait`` that fetches nothing) once enough have piled
    up, or when the lane looks full. Only a caller that must wait for room puts a
    completion callback on the calls still running (``arm``), which gives their room back
    from Ray's thread and wakes it, threads and event loops alike. A callback on every
    call would have Ray deserialise each result a second time, on its own thread, just as
    the caller wakes for it (BENCHMARKS.md, *Publishing*).
    """

    def __init__(self, actors: int, limit: int, timeout_s: float,
                 finished: Callable[[list[Any]], list[Any]] = _finished) -> None:
        self.loads = [0] * actors
        self.total = 0
        self.limit = limit
        self.timeout_s = timeout_s
        self.finished = finished
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._calls: dict[int, tuple[Any, int, int]] = {}
        """Calls holding room, by token: (ObjectRef, actor index, messages)."""
        self._unarmed: set[int] = set()
        """Tokens of the calls without a completion callback."""
        self._tokens = itertools.count()
        self._sweep_at = _SWEEP_FROM
        self._waiting = 0

    def _try_take(self, count: int) -> int | None:
        # A batch larger than the whole window still goes once the lane is idle.
        if self.total and self.total + count > self.limit:
            return None
        loads = self.loads
        if len(loads) == 1:
            index = 0
        else:
            a, b = random.sample(range(len(loads)), 2)
            index = a if loads[a] <= loads[b] else b
        loads[index] += count
        self.total += count
        return index

    def _timeout(self, lane: str) -> BackpressureTimeoutError:
        return BackpressureTimeoutError(
            f"lane {lane!r} kept lanes.max_in_flight={self.limit} messages unacknowledged "
            f"for lanes.acquire_timeout_s={self.timeout_s}; nothing was sent")

    def _claim(self, count: int, wait: Callable[[], None]) -> int | None:
        """Room for ``count`` now (the index of the actor it is on), else None once ``wait``
        has run, under the lock, at a moment every call holding room carries a callback
        (so whichever finishes first wakes the wait ``wait`` registers)."""
        while True:
            with self._cond:
                index = self._try_take(count)
                if index is not None:
                    return index
            if self._sweep():
                continue
            with self._cond:
                index = self._try_take(count)
                if index is not None:
                    return index
                if not self._unarmed:
                    wait()
                    return None
            self.arm()

    def take(self, count: int, lane: str) -> int:
        deadline = time.monotonic() + self.timeout_s

        def wait() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(lane)
            self._waiting += 1
            try:
                self._cond.wait(left)
            finally:
                self._waiting -= 1

        while True:
            index = self._claim(count, wait)
            if index is not None:
                return index

    async def take_async(self, count: int, lane: str,
                         loop: asyncio.AbstractEventLoop) -> int:
        deadline = time.monotonic() + self.timeout_s
        while True:
            waiter: asyncio.Future[None] | None = None

            def wait() -> None:  # a future only for a caller that must wait
                nonlocal waiter
                waiter = loop.create_future()
                # the list of now: _wake_waiters swaps it
                self._async_waiters.append((loop, waiter))

            index = self._claim(count, wait)
            if index is not None:
                return index
            assert waiter is not None
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise self._timeout(lane)
                try:
                    await asyncio.wait_for(waiter, left)
                except asyncio.TimeoutError:
                    raise self._timeout(lane) from None
            finally:
                with self._cond:
                    if (loop, waiter) in self._async_waiters:
                        self._async_waiters.remove((loop, waiter))

    def sent(self, ref: Any, index: int, count: int) -> None:
        """Record the call ``ref`` that holds ``count`` of actor ``index``'s room."""
        with self._cond:
            token = next(self._tokens)
            self._calls[token] = (ref, index, count)
            self._unarmed.add(token)
            waited_on = self._waiting or self._async_waiters
            sweep = len(self._calls) >= self._sweep_at
        if waited_on:  # a caller waits for room: this call must wake it too
            self.arm()
        elif sweep:
            self._sweep()

    def arm(self) -> None:
        """Put a completion callback on every call on record without one."""
        with self._cond:
            tokens, self._unarmed = self._unarmed, set()
            refs = [self._calls[token][0] for token in tokens]
        for token, ref in zip(tokens, refs, strict=True):
            _when_done(ref, functools.partial(self._release, token))

    def _sweep(self) -> bool:
        """Give back the room of the calls without a callback that have finished; whether
        there were any."""
        with self._cond:
            tokens = list(self._unarmed)
            refs = [self._calls[token][0] for token in tokens]
        if not refs:
            return False
        done = set(self.finished(refs))
        given = False
        with self._cond:
            for token, ref in zip(tokens, refs, strict=True):
                if ref in done:
                    given = self._release_locked(token) or given
            self._sweep_at = max(_SWEEP_FROM, 2 * len(self._calls))
        if given:
            self._wake_waiters()
        return given

    def _release(self, token: int, _result: Any = None) -> None:
        with self._cond:
            released = self._release_locked(token)
        if released:
            self._wake_waiters()

    def _release_locked(self, token: int) -> bool:
        entry = self._calls.pop(token, None)
        if entry is None:  # given back already (by a sweep, or its callback)
            return False
        self._unarmed.discard(token)
        _, index, count = entry
        self.loads[index] -= count
        self.total -= count
        return True

    def give(self, index: int, count: int) -> None:
        """Give back room that no call holds (the call could not be made)."""
        with self._cond:
            self.loads[index] -= count
            self.total -= count
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        with self._cond:
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)


def _when_done(ref: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(result)`` (on some Ray thread) once ``ref`` completes, however it
    ends (``result`` is then the error it ended with).

    ``ObjectRef._on_completed`` is what ``ObjectRef.future()`` is built on; called directly
    it costs next to nothing, where ``future()`` took ~40 % of a single publish round trip
    (BENCHMARKS.md). Without it (another Ray), ``future()``."""
    on_completed = getattr(ref, "_on_completed", None)
    if on_completed is not None:
        on_completed(callback)
    else:
        ref.future().add_done_callback(lambda future: callback(future.exception()))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        self._reserved = self.settings.reserved_topics()
        self._buckets = sorted(self.settings.delay_topics)
        lanes = self.settings.lanes
        self._windows = {lane: Window(len(actors), lanes.max_in_flight,
                                      lanes.acquire_timeout_s)
                         for lane, actors in self._lanes.items()}
        self._pipeline = Pipeline.from_settings(self.settings, byte_stages=False)
        self._valid_topics: set[str] = set()
        self._lineage = self.settings.lineage.enabled
        self._service = (self.settings.lineage.service_name
                         if self.settings.lineage.enabled else None)
        self.publish: RemoteMethod[PublishingOutcome] = RemoteMethod(self._publish)
        self.publish_batch: RemoteMethod[list[PublishingOutcome]] = RemoteMethod(
            self._publish_batch)
        self.cancel: RemoteMethod[CancelOutcome] = RemoteMethod(self._cancel)

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
        return captured(self._service, self._lineage)

    def _check_topic(self, topic: Any) -> None:
        if topic is None:
            raise ValidationError("topic is required", value=None)
        if topic in self._valid_topics:
            return
        validate_topic(topic)
        if topic in self._reserved:
            raise InvalidTopicError(
                f"{topic!r} is one of athomic's own topics (a delay topic, the dead-letter "
                "topic or the released-ids topic), not a final topic", value=topic)
        if len(self._valid_topics) < 10_000:
            self._valid_topics.add(topic)

    def _check_delay(self, due: float, now: float, caller_id: bool = False) -> None:
        if not self.settings.delay_topics:
            raise NotImplementedError(
                "delayed publishing is not configured: set delay_topics in the "
                "messaging settings")
        delay = due - now
        cap = self.settings.max_delay_seconds
        if cap is not None and delay > cap:
            raise InvalidDelayError(f"delay of {delay:.0f}s exceeds max_delay_seconds={cap}",
                                    value=delay)
        if delay > _IMPLAUSIBLE_S:
            raise InvalidDelayError(
                f"a delay of {delay:.3g}s (deliver_at {due:.6g}) is not plausible: "
                "deliver_at is epoch seconds, not milliseconds", value=delay)
        horizon = self.settings.republisher.cancel_horizon_s
        if caller_id and delay > horizon:
            raise InvalidDelayError(
                f"a delay of {delay:.0f}s with a message_id is longer than "
                f"republisher.cancel_horizon_s={horizon:g} (how long an id is remembered, "
                "so it can be cancelled or replaced)", value=delay)
        hops = plan(self._buckets, int(now * 1000), math.ceil(due * 1000),
                    self.settings.republisher.near_window_s).hops
        if hops > MAX_HOPS:
            raise InvalidDelayError(
                f"a delay of {delay:.0f}s takes {hops} hops through the delay buckets "
                f"(longest {self._buckets[-1]:g}s); a message carries at most {MAX_HOPS}: "
                "add a longer bucket to delay_topics", value=delay)

    def _request(self, message: Any = None, topic: Any = None, key: Any = None,
                 headers: Any = None, delay_seconds: Any = None,
                 priority: Any = MessagePriority.NORMAL, deliver_at: Any = None,
                 message_id: Any = None, *,
                 captured: tuple[list[tuple[str, bytes]], int] | None = None,
                 now: float | None = None, auto_id: str | None = None
                 ) -> PublishRequest:
        self._check_topic(topic)
        prio = MessagePriority.parse(priority)
        version = None
        if message_id is not None:
            message_id = validate_message_id(message_id)
            version = uuid.UUID(new_message_id()).bytes
        now = time.time() if now is None else now
        due = _to_deliver_at(delay_seconds, deliver_at, now)
        if due is not None:
            self._check_delay(due, now, caller_id=version is not None)
        context, context_size = captured if captured is not None else self._captured()
        merged, size, passed = context, context_size, 0
        if headers:
            caller = MessageHeaders(headers)
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
                              prio, due, message_id or auto_id or new_message_id(), now,
                              version)

    # --- routing -----------------------------------------------------------------------
    def _lane(self, priority: MessagePriority) -> str:
        if priority is MessagePriority.HIGH:
            return "high"
        if priority is MessagePriority.LOW and "low" in self._lanes:
            return "low"
        return "normal"

    def _submit(self, loop: asyncio.AbstractEventLoop | None, lane: str, method: str,
                payload: Any, count: int) -> Any:
        """Reserve room in ``lane`` and call ``method`` on an actor of it: the ObjectRef,
        or (with an event loop) an awaitable of it that waits for room without blocking
        the loop."""
        window = self._windows[lane]
        if loop is None:
            return self._send(lane, window.take(count, lane), method, payload, count)

        async def when_room() -> Any:
            index = await window.take_async(count, lane, loop)
            return self._send(lane, index, method, payload, count)

        return when_room()

    def _send(self, lane: str, index: int, method: str, payload: Any, count: int) -> Any:
        window = self._windows[lane]
        actor = self._lanes[lane][index]
        if _is_dead(actor):  # replaced (athomic up) or removed: find it by name again
            actor = self._find_again(lane, index)
        if type(payload) is PublishRequest:  # one publish: as MessagePack, not pickled
            payload = payload.wire()
        try:
            ref = getattr(actor, method).remote(payload)
        except BaseException:
            window.give(index, count)
            raise
        window.sent(ref, index, count)
        return ref

    def _find_again(self, lane: str, index: int) -> Any:
        name = producer_actor_name(self.settings.connection_name, lane, index)
        # not there (yet): the call goes to the old handle and fails as it did
        with contextlib.suppress(ValueError):
            self._lanes[lane][index] = ray.get_actor(name, namespace=NAMESPACE)
        return self._lanes[lane][index]

    def _publish(self, loop: asyncio.AbstractEventLoop | None, message: Any = None,
                 topic: Any = None, key: Any = None, headers: Any = None,
                 delay_seconds: Any = None, priority: Any = MessagePriority.NORMAL,
                 deliver_at: Any = None, message_id: Any = None) -> Any:
        request = self._request(message, topic, key, headers, delay_seconds, priority,
                                deliver_at, message_id)
        return self._submit(loop, self._lane(request.priority), "publish", request, 1)

    def _cancel(self, loop: asyncio.AbstractEventLoop | None, message_id: Any = None) -> Any:
        """``cancel.remote(message_id=...)``: through the HIGH lane, so a cancel never
        waits behind bulk publishing."""
        message_id = validate_message_id(message_id)
        if not self.settings.delay_topics:
            raise NotImplementedError("cancel needs delayed publishing: set delay_topics")
        return self._submit(loop, "high", "cancel", message_id, 1)

    def _publish_batch(self, loop: asyncio.AbstractEventLoop | None,
                       messages: Iterable[Mapping[str, Any]], **defaults: Any) -> Any:
        """Each item is a mapping of ``publish`` arguments; ``defaults`` fill in what an
        item leaves out (e.g. ``publish_batch(items, topic="events")``)."""
        unknown = set(defaults) - _PUBLISH_FIELDS
        if unknown:
            raise ValidationError(f"unknown publish arguments: {sorted(unknown)}")
        requests = PublishRequests()
        captured = self._captured()
        now = time.time()
        items = list(messages)
        ids = new_message_ids(len(items))
        build = self._request
        context, context_size = captured
        limits = self.settings.producer
        # Items of a topic, a message, a key and a priority (the common batch) are built
        # here, with no call per item to ``_request``: the same checks, in the same order,
        # the same errors. Everything else (headers, delays, ids) takes ``_request``.
        plain = (_PLAIN_FIELDS.issuperset(defaults) and len(context) <= limits.max_headers
                 and context_size <= limits.max_header_bytes)
        d_topic, d_key = defaults.get("topic"), defaults.get("key")
        d_message = defaults.get("message")
        d_priority = defaults.get("priority", MessagePriority.NORMAL)
        valid, serialize, parse = self._valid_topics, self._pipeline.serialize, \
            MessagePriority.parse
        # a dict message (the common item) goes straight to the serializer's JSON
        json_of = self._pipeline.serializer.json_of_plain()
        # a default already a member is taken as it is; any other value an item gives (or
        # a default given by name) is parsed
        default_priority: object = d_priority if type(d_priority) is MessagePriority \
            else _UNPARSED
        add = requests.append
        for i, item in enumerate(items):
            if type(item) is not dict and not isinstance(item, Mapping):
                raise ValidationError(
                    f"batch items must be mappings of publish arguments, got "
                    f"{type(item).__name__}", index=i)
            try:
                if plain and _PLAIN_FIELDS.issuperset(item):
                    topic = item.get("topic", d_topic)
                    if topic not in valid:
                        self._check_topic(topic)
                    priority = item.get("priority", d_priority)
                    if priority is not default_priority:
                        priority = parse(priority)
                    message = item.get("message", d_message)
                    value: bytes | None
                    content_type: str | None
                    schema: str | None
                    if json_of is not None and type(message) is dict:
                        value, content_type, schema = json_of(message), JSON, None
                    else:
                        value, content_type, schema = serialize(message)
                    key = item.get("key", d_key)
                    add(new_request((
                        topic, value, key.encode() if type(key) is str else _to_key(key),
                        context, content_type, schema, priority, None, ids[i], now,
                        None)))
                    continue
                if not _PUBLISH_FIELDS.issuperset(item):
                    bad = set(item) - _PUBLISH_FIELDS
                    raise ValidationError(f"unknown publish arguments: {sorted(bad)}",
                                          index=i)
                add(build(**({**defaults, **item} if defaults else item), captured=captured,
                          now=now, auto_id=ids[i]))
            except (ValidationError, SerializationError) as exc:
                raise exc.at_index(i) from None
        lanes = {self._lane(priority) for priority in {r.priority for r in requests}}
        if len(lanes) <= 1:
            lane = next(iter(lanes), "normal")
            return self._submit(loop, lane, "publish_batch", requests, max(len(requests), 1))
        # HIGH must not wait behind the NORMAL part: each lane gets its own call, and a
        # task puts the outcomes back in the caller's order.
        by_lane: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_lane.setdefault(self._lane(request.priority), []).append(i)
        parts = [(lane, idx, PublishRequests(requests[i] for i in idx))
                 for lane, idx in by_lane.items()]
        order = [idx for _, idx, _ in parts]
        if loop is None:
            refs = [self._submit(None, lane, "publish_batch", part, len(part))
                    for lane, _, part in parts]
            return _merge_lanes.remote(order, refs)

        async def submit_all() -> Any:
            refs = [await self._submit(loop, lane, "publish_batch", part, len(part))
                    for lane, _, part in parts]
            return _merge_lanes.remote(order, refs)

        return submit_all()


@ray.remote(num_cpus=0)
def _merge_lanes(order: list[list[int]], refs: list[Any]) -> list[PublishingOutcome]:
    """Reassembles a batch that was split over lanes, in the caller's order. A failure is
    reported against the caller's indices, with the outcomes of every lane (what was
    acknowledged stays known)."""
    return merge_lane_results(order, [_settle(ref) for ref in refs])


def _settle(ref: Any) -> list[PublishingOutcome] | BaseException:
    try:
        return ray.get(ref)  # type: ignore[no-any-return]
    except ray.exceptions.RayTaskError as exc:
        # the actor's own error (a PublishError, a RecordTooLargeError), unwrapped
        return exc.cause if isinstance(exc.cause, BaseException) else exc
    except Exception as exc:
        return exc


def merge_lane_results(order: list[list[int]],
                       parts: list[list[PublishingOutcome] | BaseException]
                       ) -> list[PublishingOutcome]:
    """Outcomes of each lane's sub-batch (or the error it raised) -> the caller's list.

    Raises PublishError indexed by the caller's positions when any lane failed, with the
    outcome of every acknowledged message; when no lane sent anything (each raised a
    ValidationError before sending), the first lane's error, re-indexed."""
    outcomes: list[Any] = [None] * sum(len(idx) for idx in order)
    failures: dict[int, str] = {}
    first_error: BaseException | None = None
    all_refused = True
    for idx, part in zip(order, parts, strict=True):
        if not isinstance(part, BaseException):
            all_refused = False
            for i, outcome in zip(idx, part, strict=True):
                outcomes[i] = outcome
            continue
        sub_failures = getattr(part, "failures", None)
        if isinstance(part, PublishError) and sub_failures:
            all_refused = False
            for j, outcome in enumerate(part.outcomes or ()):
                outcomes[idx[j]] = outcome
            for j, why in sub_failures.items():
                failures[idx[j]] = why
        else:
            if not isinstance(part, ValidationError):
                all_refused = False
            if isinstance(part, AthomicError):
                if part.index is not None:
                    part.at_index(idx[part.index], replace=True)
                elif len(idx) == 1:
                    part.at_index(idx[0])
            for i in idx:
                failures[i] = f"{type(part).__name__}: {part}"
        first_error = first_error or part
    if first_error is None:
        return outcomes
    if all_refused:
        raise first_error
    first = min(failures)
    raise PublishError(
        f"{len(failures)} of {len(outcomes)} messages were not acknowledged; first "
        f"(#{first}): {failures[first]}", failures=failures, outcomes=outcomes)


class ProducerFactory:
    """Creates producer handles; the actors behind them are shared per connection name."""

    @staticmethod
    def create(settings: MessagingSettings | None = None) -> ProducerHandle:
        """A handle to the producer actors of ``settings.connection_name``, starting them if
        none run yet. Any process in the cluster gets the same actors for the same name.

        With delay topics configured (and ``republisher.enabled``), the DelayBucketActors
        are started too, and this returns once they run: delay topics created, or checked
        (ConfigurationError for one whose retention could lose messages), or raises
        MessagingConnectionError as soon as the brokers are found unreachable.

        Actors already running for the connection with other settings (another file, or
        the file changed since ``athomic up``) raise ConfigurationError naming ``athomic
        up``, which reconciles them to the file (docs/topology.md).
        """
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
        return teardown(connection_name)
