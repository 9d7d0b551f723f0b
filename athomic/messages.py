"""Core message types: priority, outcome, headers, wire-format header names, ids.

Pure code with no I/O; the wire-format table in the README lists the same names.
"""

from __future__ import annotations

import enum
import functools
import itertools
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Union

from .errors import InvalidHeaderError, InvalidTopicError


def _pickled_by_name(member: enum.Enum, _protocol: object) -> str:
    """An enum member pickles as a reference to itself (``module`` and
    ``Class.MEMBER``), not as a call of its class with its value. Every ``publish``
    returns a member through Ray, which pickles it in the actor and unpickles it in the
    caller: by name that is a lookup, ~17 to 27 µs less per call (interleaved with a minimal
    actor, three runs). Loads as the member itself, on any pickle protocol."""
    return f"{type(member).__qualname__}.{member.name}"


class MessagePriority(str, enum.Enum):
    """How urgently a message must go out. HIGH has its own producer actors."""

    __reduce_ex__ = _pickled_by_name  # type: ignore[assignment]  # pickle accepts a str

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @classmethod
    def parse(cls, value: MessagePriority | str) -> MessagePriority:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidHeaderError(
                f"unknown priority {value!r}; expected one of low, normal, high",
                value=value) from None


class PublishingOutcome(str, enum.Enum):
    """What ``publish`` did with a message once the broker acknowledged it."""

    __reduce_ex__ = _pickled_by_name  # type: ignore[assignment]  # pickle accepts a str

    SUCCESS_DIRECT = "success_direct"
    """Written to its final topic."""
    SUCCESS_DELAYED = "success_delayed"
    """Written to a delay topic; the republisher delivers it at its due time."""


class CancelOutcome(str, enum.Enum):
    """What ``cancel`` did."""

    __reduce_ex__ = _pickled_by_name  # type: ignore[assignment]  # pickle accepts a str

    RECORDED = "recorded"
    """The cancel is durable: a delayed message with that id still pending at its due time
    is not delivered. (Cancelling an id that was already delivered, or never published,
    changes nothing.)"""


# --- wire format -------------------------------------------------------------------------
# Header keys. Kept stable: the README's "Wire format" table documents each one.
H_MESSAGE_ID = "message-id"
H_CONTENT_TYPE = "content-type"
H_CONTENT_ENCODING = "content-encoding"
H_SCHEMA = "athomic-schema"
H_ENCRYPTION = "athomic-encryption"
"""Cipher of the value (``aes-256-gcm``); present only on encrypted messages."""
H_KEY_ID = "athomic-key-id"
"""Id of the key in the ring that encrypted the value."""
H_BOUND_TOPIC = "athomic-bound-topic"
"""Topic the ciphertext is bound to (part of the associated data)."""
H_BOUND_KEY = "athomic-bound-key"
"""Record key the ciphertext is bound to, raw bytes; absent when the record has no key."""
H_PRIORITY = "athomic-priority"
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"
H_BAGGAGE = "baggage"
H_PRODUCER = "athomic-producer"
H_RAY_JOB_ID = "athomic-ray-job-id"
H_RAY_NODE_ID = "athomic-ray-node-id"
H_RAY_TASK_ID = "athomic-ray-task-id"
H_RAY_ACTOR_ID = "athomic-ray-actor-id"
H_HOST = "athomic-host"
H_PUBLISHED_AT = "athomic-published-at"
H_DELIVER_AT = "athomic-deliver-at"
H_HOP = "athomic-hop"
H_CONTEXT_PREFIX = "athomic-ctx-"
H_ERROR = "athomic-error"
H_ERROR_SOURCE = "athomic-error-source"

PIPELINE_HEADERS = (H_CONTENT_ENCODING, H_ENCRYPTION, H_KEY_ID, H_BOUND_TOPIC, H_BOUND_KEY)
"""Headers only the pipeline writes: a caller's values for them are dropped, so a record
never describes stages that did not run."""

# Kafka's own limits for topic names.
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_TOPIC_MAX = 249

HeaderValue = Union[bytes, str]  # noqa: UP007 (a runtime alias; | needs 3.10 objects)
HeadersLike = Union["MessageHeaders", Mapping[str, HeaderValue | None],
                    Iterable[tuple[str, HeaderValue | None]], None]


def validate_topic(topic: object) -> str:
    """Return ``topic`` if Kafka accepts it as a topic name, else raise InvalidTopicError."""
    if not isinstance(topic, str) or not topic:
        raise InvalidTopicError(f"topic must be a non-empty string, got {topic!r}", value=topic)
    if len(topic) > _TOPIC_MAX:
        raise InvalidTopicError(f"topic name longer than {_TOPIC_MAX} characters", value=topic)
    if topic in (".", "..") or not _TOPIC_RE.match(topic):
        raise InvalidTopicError(
            f"invalid topic name {topic!r}: use only ASCII letters, digits, '.', '_' and '-'",
            value=topic)
    return topic


class MessageHeaders:
    """Ordered Kafka headers: ``(str, bytes)`` pairs with dict-like helpers.

    The one coercion of headers in athomic: ``MessageHeaders(x)`` (a copy) or
    ``MessageHeaders.of(x)`` (no copy when ``x`` already is one) accept a mapping, pairs
    (as aiokafka gives them) or None. ``str`` values are stored UTF-8 encoded; a null value
    (Kafka allows them) reads as empty bytes. Kafka allows repeated keys; ``[key]`` and
    ``get`` return the last value, ``set`` replaces every value of a key, ``add`` appends.
    """

    __slots__ = ("_items",)

    def __init__(self, items: HeadersLike = None) -> None:
        self._items: list[tuple[str, bytes]] = []
        if items is None:
            return
        if isinstance(items, MessageHeaders):
            self._items = list(items._items)
            return
        pairs = items.items() if isinstance(items, Mapping) else items
        append = self._items.append
        check = self._check
        for pair in pairs:
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise InvalidHeaderError(
                    f"headers must be (key, value) pairs, got {pair!r}", value=pair) from None
            # the common case (what Kafka clients return) without the general checks
            append((key, value) if type(value) is bytes and type(key) is str and key
                   else check(key, value))

    @classmethod
    def of(cls, value: HeadersLike) -> MessageHeaders:
        """``value`` itself when it already is MessageHeaders, else a coerced copy."""
        return value if isinstance(value, MessageHeaders) else cls(value)

    @staticmethod
    def _check(key: object, value: object) -> tuple[str, bytes]:
        if not isinstance(key, str) or not key:
            raise InvalidHeaderError(f"header key must be a non-empty str, got {key!r}",
                                     value=key)
        if isinstance(value, str):
            return key, value.encode("utf-8")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return key, bytes(value)
        if value is None:
            return key, b""
        raise InvalidHeaderError(
            f"header {key!r}: value must be bytes or str, got {type(value).__name__}",
            value=key)

    def add(self, key: str, value: HeaderValue) -> None:
        self._items.append(self._check(key, value))

    def set(self, key: str, value: HeaderValue) -> None:
        k, v = self._check(key, value)
        self._items = [(ik, iv) for ik, iv in self._items if ik != k]
        self._items.append((k, v))

    def set_many(self, pairs: Iterable[tuple[str, HeaderValue]],
                 remove: Iterable[str] = ()) -> None:
        """``set`` each pair and drop every key in ``remove``, in one pass."""
        checked = [self._check(k, v) for k, v in pairs]
        drop = frozenset(k for k, _ in checked).union(remove)
        self._items = [kv for kv in self._items if kv[0] not in drop] + checked

    def setdefault(self, key: str, value: HeaderValue) -> None:
        if key not in self:
            self.add(key, value)

    def get(self, key: str, default: bytes | None = None) -> bytes | None:
        for k, v in reversed(self._items):
            if k == key:
                return v
        return default

    def get_str(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key)
        return default if value is None else value.decode("utf-8", "replace")

    def get_all(self, key: str) -> list[bytes]:
        return [v for k, v in self._items if k == key]

    def remove(self, key: str) -> None:
        self._items = [(k, v) for k, v in self._items if k != key]

    def update(self, other: HeadersLike, *, overwrite: bool = True) -> None:
        for key, value in MessageHeaders.of(other).items():
            if overwrite:
                self.set(key, value)
            else:
                self.setdefault(key, value)

    def items(self) -> list[tuple[str, bytes]]:
        return list(self._items)

    def last_values(self) -> dict[str, bytes]:
        """Name -> last value, as Kafka consumers read repeated headers."""
        return dict(self._items)

    def to_kafka(self) -> list[tuple[str, bytes]]:
        """The pairs in the form aiokafka sends."""
        return list(self._items)

    def size(self) -> int:
        """Bytes these headers take in a record (keys and values)."""
        return sum(len(k.encode("utf-8")) + len(v) for k, v in self._items)

    def copy(self) -> MessageHeaders:
        return MessageHeaders(self)

    def __getitem__(self, key: str) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: HeaderValue) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.remove(key)

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MessageHeaders):
            return self._items == other._items
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return f"MessageHeaders({self._items!r})"

    def __getstate__(self) -> list[tuple[str, bytes]]:
        return self._items

    def __setstate__(self, state: list[tuple[str, bytes]]) -> None:
        self._items = state


# --- message ids: UUIDv7 (RFC 9562) --------------------------------------------------------
_uuid_lock = threading.Lock()
_uuid_last_ms = 0
_uuid_seq = 0
_POOL_SIZE = 4096
_uuid_pool = b""
"""Random bytes from ``os.urandom``, taken 10 per id by the calls of a few ids: one
system call per ~400 single publishes instead of two per publish."""
_uuid_pool_at = 0


def _forget_pool() -> None:
    """A forked child must not hand out the random bytes its parent also holds."""
    global _uuid_pool, _uuid_pool_at
    _uuid_pool, _uuid_pool_at = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def new_message_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, then a 12-bit counter seeded at random each
    millisecond (monotonic within a process), then 62 random bits."""
    return new_message_ids(1)[0]


def new_message_ids(count: int) -> list[str]:
    """``count`` UUIDv7 strings in increasing order (one lock; random bytes from a pool
    refilled by ``os.urandom``, or one ``os.urandom`` call for a large count)."""
    global _uuid_last_ms, _uuid_seq, _uuid_pool, _uuid_pool_at
    if count <= 0:
        return []
    need = 10 * count  # per id: 2 bytes to seed a millisecond's counter, 8 for the tail
    runs = []  # (millisecond, first counter value, ids): the counter runs on within one
    with _uuid_lock:
        if need > _POOL_SIZE // 4:
            rand = os.urandom(need)
            at = 0
        else:
            if _uuid_pool_at + need > len(_uuid_pool):
                _uuid_pool, _uuid_pool_at = os.urandom(_POOL_SIZE), 0
            rand, at = _uuid_pool, _uuid_pool_at
            _uuid_pool_at += need
        ms = time.time_ns() // 1_000_000
        if ms > _uuid_last_ms:
            _uuid_last_ms = ms
            seq = int.from_bytes(rand[at:at + 2], "big") & 0x7FF
        else:
            seq = _uuid_seq + 1
        left = count
        while left:
            if seq > 0xFFF:  # counter exhausted: borrow the next millisecond
                _uuid_last_ms += 1
                seq = 0
            n = min(left, 0x1000 - seq)
            runs.append((_uuid_last_ms, seq, n))
            seq += n
            left -= n
        _uuid_seq = seq - 1
    # Formatted from one hex string of the random bytes: per id, 20 hex digits, of which
    # the last 16 are the tail, its first digit carrying the RFC 9562 variant bits (10).
    digits = rand[at:at + need].hex()
    out: list[str] = []
    k = 4
    for ms, first, n in runs:
        head = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
        for seq in range(first, first + n):
            out.append(f"{head}{seq:03x}-{_VARIANT[digits[k]]}{digits[k + 1:k + 4]}-"
                       f"{digits[k + 4:k + 16]}")
            k += 20
    return out


_VARIANT = {f"{d:x}": f"{8 | d & 3:x}" for d in range(16)}
"""A tail's first hex digit with its top two bits set to the RFC 9562 variant (10)."""


_MESSAGE_ID_MAX = 128


def validate_message_id(message_id: object) -> str:
    """Return a caller-chosen message id if usable: 1-128 printable ASCII characters."""
    if not isinstance(message_id, str) or not message_id:
        raise InvalidHeaderError(f"message_id must be a non-empty str, got {message_id!r}",
                                 value=message_id)
    if len(message_id) > _MESSAGE_ID_MAX or not (
            message_id.isascii() and message_id.isprintable()):
        raise InvalidHeaderError(
            f"message_id must be 1-{_MESSAGE_ID_MAX} printable ASCII characters, got "
            f"{message_id[:40]!r}", value=message_id)
    return message_id


def message_id_time(message_id: str) -> float:
    """Unix time (seconds) embedded in a UUIDv7 message id."""
    return (uuid.UUID(message_id).int >> 80) / 1000.0


# --- a publish request, as the handle hands it to a ProducerActor -------------------------
class PublishRequest(NamedTuple):
    """One validated message on its way from a handle to a ProducerActor.

    Built on the caller's side: the payload is serialised there (so the actors never need
    the caller's classes), and the message id, publish time, due time and captured context
    are fixed there, so a retried actor call resends the same message. A plain tuple, cheap
    to pickle by the thousand; ``headers`` may be one list shared by a whole batch.
    """

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    """Captured context and the caller's headers (the caller's win)."""
    content_type: str | None
    schema: str | None
    priority: MessagePriority
    deliver_at: float | None
    message_id: str
    published_at: float
    version: bytes | None = None
    """This publish of a caller-chosen ``message_id`` (16 bytes, fixed on the caller's
    side, so a retried call keeps it); None when athomic chose the id."""

    def wire(self) -> list[Any]:
        """This request as one ``publish`` call sends it to a ProducerActor: a list of
        MessagePack's own types (str, bytes, numbers, None, lists), which Ray serialises
        without pickling, where the tuple, its header tuples and the priority member go
        through Ray's pickler (~6 against ~28 µs here, and as much again in the actor).
        ``from_wire`` gives the request back."""
        return [self.topic, self.value, self.key, [[k, v] for k, v in self.headers],
                self.content_type, self.schema, self.priority.value, self.deliver_at,
                self.message_id, self.published_at, self.version]

    @classmethod
    def from_wire(cls, row: list[Any]) -> PublishRequest:
        (topic, value, key, headers, content_type, schema, priority, deliver_at,
         message_id, published_at, version) = row
        return cls(topic, value, key, [(k, v) for k, v in headers], content_type, schema,
                   MessagePriority(priority), deliver_at, message_id, published_at, version)


def _requests_from_columns(count: int, columns: list[tuple[object, ...]]
                           ) -> list[PublishRequest]:
    return list(map(new_request, zip(
        *(column if len(column) == count else itertools.repeat(column[0], count)
          for column in columns), strict=True)))


new_request = functools.partial(tuple.__new__, PublishRequest)
"""A PublishRequest from a tuple of its fields, all of them, in order: ``tuple.__new__``
itself, with no Python call (and no check) per request, for requests built by the
thousand."""


class PublishRequests(list[PublishRequest]):
    """The requests of one ``publish_batch`` call on their way to an actor.

    Ray pickles an argument that is not a plain list, dict or scalar as one object; a plain
    list of requests would go through its pickler's Python hook once per request. This
    list pickles as its columns instead, a field that is the same in every request (the
    topic, the captured headers, the publish time, ...) once, which is cheaper to pickle
    and to load than a tuple per request (BENCHMARKS.md, Publishing), and arrives as a
    plain list of requests. A field is "the same" by equality: requests with equal header
    lists may arrive sharing one, which nothing changes in place."""

    __slots__ = ()

    def __reduce__(self) -> tuple[object, tuple[int, list[tuple[object, ...]]]]:
        count = len(self)
        return _requests_from_columns, (count, [
            column if column.count(column[0]) != count else column[:1]
            for column in zip(*self, strict=True)])


_OUTCOME_CODES = {outcome: code for code, outcome in enumerate(PublishingOutcome)}
_OUTCOME_OF = [*PublishingOutcome, None]


def _outcomes_from_codes(codes: bytes) -> list[PublishingOutcome | None]:
    return [_OUTCOME_OF[code] for code in codes]


class Outcomes(list[PublishingOutcome | None]):
    """What ``publish_batch`` returns, per message: its PublishingOutcome (None for one
    that failed). Pickles as one byte per message (Ray would otherwise pickle each enum
    member through a Python hook) and arrives as a plain list."""

    __slots__ = ()

    def __reduce__(self) -> tuple[object, tuple[bytes]]:
        none = len(_OUTCOME_OF) - 1
        return _outcomes_from_codes, (bytes(none if o is None else _OUTCOME_CODES[o]
                                            for o in self),)
