"""The delay envelope: a delayed message as it waits in a delay topic.

Versioned, binary-safe, bounded. Version 3 (written now; integers big-endian)::

    magic      4  b"ATHD"
    version    1  3
    flags      1  bit3 authenticated (HMAC), bit4 the message id was chosen by the caller
    priority   1  0 low, 1 normal, 2 high
    hop        2  delay topics passed so far, this one included (1 on first enqueue)
    deliver_at 8  due time, epoch milliseconds
    hold_until 8  when the message leaves THIS delay topic, epoch milliseconds
    published  8  when the caller published, epoch milliseconds
    version   16  this publish of the message id (a retried call keeps it; publishing
                  the same id again makes a new one)
    body       4+n   a MessagePack array of six: message id (str, ASCII, 1..128 bytes),
                  final (physical) topic (str), key (bin or nil), the final message's
                  header names (array of str) and their values (array of bin, as many;
                  without the due time and hop, stamped when it is delivered),
                  value (bin or nil: the pipeline-encoded payload, relayed unchanged)
    auth       (bit3) 1+n key id, 32 HMAC-SHA256 over everything above, under a key
               derived for envelopes (``derive_envelope_key``), so a tampered due time,
               destination or payload is refused.

The body is MessagePack so that it is packed and unpacked in C (a republisher reads every
envelope once, and again as it leaves): the version-2 body, the same fields each behind a
length, was parsed field by field in Python, its headers most of the time. The fixed part
stays where it was, so the schedule is read without the body.

Version 2 (fields behind lengths: message id 1+n, topic 2+n, key 4+n, headers 2 count then
2+n name, 4+n value, value 4+n; flags bit0 value is null, bit1 key is null) and version 1
(16-byte UUID message id, 1-byte hop, AES-GCM tag under the payload key) are still read, so
envelopes written before an upgrade are delivered.

Times are absolute and fixed at publish; ``hold_until`` is planned from the publish time
(not from when a hop happened), so messages with the same delay take the same path.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import MalformedEnvelopeError
from .messages import MessagePriority

MAGIC = b"ATHD"
VERSION = 3
MAX_HOPS = 0xFFFF
"""Delay topics one message may pass; a delay needing more is refused at publish."""
MAX_HEADERS = 1024
MAX_MESSAGE_ID = 128
AUTH_LABEL = b"athomic-envelope-v1"
_HKDF_INFO = b"athomic envelope authentication v2"

_FIXED_V1 = struct.Struct(">4sBBBBQQQ16s")
_FIXED_V2 = struct.Struct(">4sBBBHQQQ16s")
_FIXED_V3 = struct.Struct(">4sBBBHQQQ16sI")
_FIXED = {1: _FIXED_V1, 2: _FIXED_V2, 3: _FIXED_V3}
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_F_NULL_VALUE, _F_NULL_KEY, _F_AUTH_V1, _F_AUTH, _F_CALLER_ID = 1, 2, 4, 8, 16
_KNOWN_FLAGS = {1: _F_NULL_VALUE | _F_NULL_KEY | _F_AUTH_V1,
                2: _F_NULL_VALUE | _F_NULL_KEY | _F_AUTH | _F_CALLER_ID,
                3: _F_AUTH | _F_CALLER_ID}
_MAX_NAME = 0xFFFF
"""Bytes of a topic or header name (as in version 2, where their lengths took two)."""
_unpackb = msgpack.unpackb
_PRIORITY_CODE = {MessagePriority.LOW: 0, MessagePriority.NORMAL: 1, MessagePriority.HIGH: 2}
_PRIORITY_OF = {v: k for k, v in _PRIORITY_CODE.items()}
_TAG = 32
_NO_VERSION = b"\0" * 16


@dataclass(slots=True, init=False)
class Envelope:
    """A delayed message and its schedule. Not changed once made (not ``frozen``: a
    frozen dataclass takes 2-3x as long to create, and one is made per message read).

    Made as ``Envelope(topic, key, value, headers, ...)``, headers as (name, value) pairs;
    kept as two tuples, the names and the values, as the envelope carries them: a parsed
    envelope builds no pair until its headers are asked for (a republisher holds one per
    message due soon, and the collector walks every object held)."""

    topic: str
    key: bytes | None
    value: bytes | None
    header_names: tuple[str, ...]
    header_values: tuple[bytes, ...]
    deliver_at_ms: int
    hold_until_ms: int
    published_ms: int
    hop: int
    priority: MessagePriority
    message_id: str
    version: bytes
    """Identifies this publish of ``message_id``: copies of one publish (a retried call)
    share it, a new publish of the same id has another."""
    caller_id: bool
    """The message id was chosen by the caller (it can be cancelled and replaced)."""

    def __init__(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: Iterable[tuple[str, bytes]], deliver_at_ms: int,
                 hold_until_ms: int, published_ms: int, hop: int,
                 priority: MessagePriority, message_id: str, version: bytes = _NO_VERSION,
                 caller_id: bool = False) -> None:
        pairs = tuple(headers)
        _fill(self, topic, key, value, tuple(k for k, _ in pairs),
              tuple(v for _, v in pairs), deliver_at_ms, hold_until_ms, published_ms, hop,
              priority, message_id, version, caller_id)

    @property
    def headers(self) -> tuple[tuple[str, bytes], ...]:
        """The final message's headers, (name, value) pairs in order."""
        return tuple(zip(self.header_names, self.header_values, strict=True))

    def moved(self, *, hop: int, hold_until_ms: int) -> Envelope:
        """The same message at another hop and hold time."""
        return _fill(_new_envelope(Envelope), self.topic, self.key, self.value,
                     self.header_names, self.header_values, self.deliver_at_ms,
                     hold_until_ms, self.published_ms, hop, self.priority, self.message_id,
                     self.version, self.caller_id)

    def next_hop(self, hold_until_ms: int) -> Envelope:
        return self.moved(hop=self.hop + 1, hold_until_ms=hold_until_ms)


_new_envelope = object.__new__


def _fill(env: Envelope, topic: str, key: bytes | None, value: bytes | None,
          names: tuple[str, ...], values: tuple[bytes, ...], deliver_at_ms: int,
          hold_until_ms: int, published_ms: int, hop: int, priority: MessagePriority,
          message_id: str, version: bytes, caller_id: bool) -> Envelope:
    env.topic = topic
    env.key = key
    env.value = value
    env.header_names = names
    env.header_values = values
    env.deliver_at_ms = deliver_at_ms
    env.hold_until_ms = hold_until_ms
    env.published_ms = published_ms
    env.hop = hop
    env.priority = priority
    env.message_id = message_id
    env.version = version
    env.caller_id = caller_id
    return env


@dataclass(frozen=True, slots=True)
class EnvelopeKeys:
    """The keys that authenticate envelopes: ``primary`` signs, any id verifies.
    ``keys`` are envelope keys (``derive_envelope_key``); ``legacy`` the raw keys that
    verify version-1 envelopes (AES-GCM under the payload key)."""

    primary: str
    keys: dict[str, bytes]
    legacy: dict[str, bytes] = field(default_factory=dict)


def derive_envelope_key(secret: bytes) -> bytes:
    """The envelope key of a ring key: HKDF-SHA256 with its own label, so envelope
    authentication never shares a key (or a nonce space) with payload encryption."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO
                ).derive(secret)


def envelope_keys(ring: Mapping[str, bytes], primary: str) -> EnvelopeKeys:
    """EnvelopeKeys of a key ring (key id -> raw 32-byte key)."""
    return EnvelopeKeys(primary, {kid: derive_envelope_key(k) for kid, k in ring.items()},
                        dict(ring))


def _check_message_id(message_id: str) -> bytes:
    raw = message_id.encode("ascii", "replace")
    if not 0 < len(raw) <= MAX_MESSAGE_ID:
        raise MalformedEnvelopeError(f"message id of {len(raw)} bytes (1..{MAX_MESSAGE_ID})")
    return raw


def encode(env: Envelope, keys: EnvelopeKeys | None = None) -> bytes:
    if not 0 < env.hop <= MAX_HOPS:
        raise MalformedEnvelopeError(f"hop {env.hop} out of range 1..{MAX_HOPS}")
    if len(env.version) != 16:
        raise MalformedEnvelopeError("envelope version must be 16 bytes")
    names, values = env.header_names, env.header_values
    if len(names) > MAX_HEADERS:
        raise MalformedEnvelopeError(
            f"{len(names)} headers in a delayed message (max {MAX_HEADERS})")
    _check_message_id(env.message_id)
    if names and set(map(type, names)) != {str}:
        raise MalformedEnvelopeError("a header name is not text")
    if values and set(map(type, values)) != {bytes}:
        if any(not isinstance(v, (bytes, bytearray, memoryview)) for v in values):
            raise MalformedEnvelopeError("a header value is not bytes")
        values = tuple(bytes(v) for v in values)
    if len(env.topic) > _MAX_NAME // 4 or (names and max(map(len, names)) > _MAX_NAME // 4):
        for name in (env.topic, *names):  # long enough to check in bytes
            if len(name.encode()) > _MAX_NAME:
                raise MalformedEnvelopeError(f"topic or header name of {len(name.encode())}"
                                             f" bytes (max {_MAX_NAME})")
    try:
        body: bytes = msgpack.packb((env.message_id, env.topic, env.key, names, values,
                                     env.value),
                                    use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedEnvelopeError(f"envelope cannot hold this message: {exc}") from None
    flags = (_F_AUTH if keys else 0) | (_F_CALLER_ID if env.caller_id else 0)
    data = _FIXED_V3.pack(MAGIC, VERSION, flags, _PRIORITY_CODE[env.priority], env.hop,
                          env.deliver_at_ms, env.hold_until_ms, env.published_ms,
                          env.version, len(body)) + body
    if keys is None:
        return data
    key_id = keys.primary.encode()
    tag = hmac.new(keys.keys[keys.primary], AUTH_LABEL + data, hashlib.sha256).digest()
    return data + bytes([len(key_id)]) + key_id + tag


@dataclass(slots=True)
class EnvelopeHead:
    """An envelope's schedule and identity, without its headers and value: what the
    republisher keeps in memory for a message it holds (with the record's bytes, decoded
    in full when the message leaves)."""

    topic: str
    key: bytes | None
    deliver_at_ms: int
    hold_until_ms: int
    published_ms: int
    hop: int
    priority: MessagePriority
    message_id: str
    version: bytes
    caller_id: bool
    null_value: bool


def decode(data: bytes, keys: EnvelopeKeys | None = None, *,
           accept_unauthenticated: bool = False) -> Envelope:
    """Parse an envelope; raises MalformedEnvelopeError for anything off.

    With ``keys``, an authenticated envelope must verify under one of them, and an
    unauthenticated one is refused unless ``accept_unauthenticated`` (while turning
    authentication on). Without keys nothing is verified: such a setup trusts whoever can
    write to its delay topics."""
    env = _parse(data, keys, accept_unauthenticated, full=True)[1]
    assert env is not None
    return env


def peek(data: bytes, keys: EnvelopeKeys | None = None, *,
         accept_unauthenticated: bool = False) -> EnvelopeHead:
    """``decode``, checked just as thoroughly (bounds, authentication, types), but keeping
    only the head: no header or value is kept (a version-2 one is not even copied out)."""
    head = _parse(data, keys, accept_unauthenticated, full=False, head=True)[0]
    assert head is not None
    return head


def read(data: bytes, keys: EnvelopeKeys | None = None, *,
         accept_unauthenticated: bool = False, full_by_ms: int
         ) -> tuple[EnvelopeHead, Envelope | None]:
    """``peek``, and the envelope decoded in full too when it leaves its delay topic or is
    due by ``full_by_ms`` (its schedule read once: what a republisher does per record)."""
    head, env = _parse(data, keys, accept_unauthenticated, full=False, head=True,
                       full_by_ms=full_by_ms)
    assert head is not None
    return head, env


def head(env: Envelope) -> EnvelopeHead:
    """The head ``peek`` gives of ``env``'s bytes (for an envelope decoded in full)."""
    return EnvelopeHead(sys.intern(env.topic), env.key, env.deliver_at_ms, env.hold_until_ms,
                        env.published_ms, env.hop, env.priority, env.message_id,
                        env.version if env.caller_id else _NO_VERSION, env.caller_id,
                        env.value is None)


def _parse(data: bytes, keys: EnvelopeKeys | None, accept_unauthenticated: bool, *,
           full: bool, head: bool = False, full_by_ms: int | None = None
           ) -> tuple[EnvelopeHead | None, Envelope | None]:
    """(the head, with ``head``; the envelope, when ``full`` or due by ``full_by_ms``)."""
    # Run for every message read, and again for most when they leave. The fixed part, the
    # authentication trailer and the result are the same for every version; the body of
    # version 3 is unpacked in C, then each field's type and bound checked (MessagePack's
    # limits bound names, counts and nesting); in versions 1 and 2 lengths are read by
    # indexing, every one checked against what is left before anything is sliced, and a
    # read past the end (IndexError, struct.error) is a truncated envelope.
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray)):
            raise MalformedEnvelopeError("not a delay envelope: too short")
        data = bytes(data)
    buf = data
    size = len(buf)
    if size < _FIXED_V1.size:
        raise MalformedEnvelopeError("not a delay envelope: too short")
    if buf[:4] != MAGIC:
        raise MalformedEnvelopeError("not a delay envelope: bad magic")
    version = buf[4]
    if version not in _KNOWN_FLAGS:
        raise MalformedEnvelopeError(f"unsupported envelope version {version}")
    fixed = _FIXED[version]
    if size < fixed.size:
        raise MalformedEnvelopeError("not a delay envelope: too short")
    fields = fixed.unpack_from(buf)
    _, _, flags, prio, hop, deliver_at, hold_until, published, ident = fields[:9]
    if flags & ~_KNOWN_FLAGS[version]:
        raise MalformedEnvelopeError(f"unknown envelope flags {flags:#x}")
    if prio not in _PRIORITY_OF or hop == 0:
        raise MalformedEnvelopeError("envelope priority or hop out of range")
    if full_by_ms is not None:
        full = min(hold_until, deliver_at) <= full_by_ms
    pos = fixed.size
    if version == 3:
        pos += fields[9]
        if pos > size:
            raise MalformedEnvelopeError("envelope truncated in its body")
        try:
            message_id, topic, key, names, values, value = _unpackb(
                buf[fixed.size:pos], use_list=False, raw=False, max_str_len=_MAX_NAME,
                max_array_len=MAX_HEADERS, max_map_len=0, max_ext_len=0)
        except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
            raise MalformedEnvelopeError(f"envelope body malformed: {exc}") from None
        if not (type(message_id) is str and 0 < len(message_id) <= MAX_MESSAGE_ID
                and message_id.isascii()):
            raise MalformedEnvelopeError(
                "envelope message id is not 1..128 ASCII characters")
        if type(topic) is not str or (key is not None and type(key) is not bytes) or (
                value is not None and type(value) is not bytes):
            raise MalformedEnvelopeError("envelope topic, key or value of the wrong type")
        if type(names) is not tuple or type(values) is not tuple or \
                len(names) != len(values):
            raise MalformedEnvelopeError("envelope headers malformed")
        try:  # the body holds only what MessagePack makes: join takes str / bytes alone
            "".join(names)
            b"".join(values)
        except TypeError:
            raise MalformedEnvelopeError("envelope header of the wrong type") from None
        null_value = value is None
    else:
        message_id, topic, key, names, values, value, pos = _body_v1_v2(
            buf, version, flags, ident, pos, full)
        null_value = flags & _F_NULL_VALUE != 0
    body_end = pos
    auth = flags & (_F_AUTH | _F_AUTH_V1)
    if auth:
        end = pos + 1 + buf[pos] if pos < size else size + 1
        key_id = buf[pos + 1:end].decode("ascii", "replace")
        pos = end + (_TAG if auth == _F_AUTH else 28)
        if pos > size:
            raise MalformedEnvelopeError("envelope truncated in authentication tag")
        tag = buf[end:pos]
    if pos != size:
        raise MalformedEnvelopeError(f"{size - pos} trailing bytes after envelope")
    if keys is not None:
        _authenticate(auth, key_id if auth else "", tag if auth else b"", buf[:body_end],
                      keys, accept_unauthenticated)
    caller_id = flags & _F_CALLER_ID != 0
    priority = _PRIORITY_OF[prio]
    # held by the hundred thousand: one topic string, a version only where it matters
    return (EnvelopeHead(sys.intern(topic), key, deliver_at, hold_until, published, hop,
                         priority, message_id, ident if caller_id else _NO_VERSION,
                         caller_id, null_value) if head else None,
            _fill(_new_envelope(Envelope), topic, key, value, names, values, deliver_at,
                  hold_until, published, hop, priority, message_id, ident, caller_id)
            if full else None)


def _body_v1_v2(buf: bytes, version: int, flags: int, ident: bytes, pos: int, full: bool
                ) -> tuple[str, str, bytes | None, tuple[str, ...], tuple[bytes, ...],
                           bytes | None, int]:
    """The body of a version-1 or version-2 envelope from ``pos``: (message id, topic,
    key, header names, header values and value (empty and None unless ``full``), where
    the body ends)."""
    size = len(buf)
    what = "message id"
    u32 = _U32.unpack_from
    try:
        if version == 1:
            h = ident.hex()  # str(uuid.UUID(bytes=ident)), in a seventh of the time
            message_id = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        else:
            end = pos + 1 + buf[pos]
            if end > size:
                raise MalformedEnvelopeError("envelope truncated in message id")
            if end == pos + 1:
                raise MalformedEnvelopeError("empty message id")
            message_id = buf[pos + 1:end].decode("ascii")
            pos = end
        what = "topic"
        end = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
        if end > size:
            raise MalformedEnvelopeError("envelope truncated in topic")
        topic = buf[pos + 2:end].decode()
        pos = end
        key = None
        if not flags & _F_NULL_KEY:
            what = "key"
            end = pos + 4 + u32(buf, pos)[0]
            if end > size:
                raise MalformedEnvelopeError("envelope truncated in key")
            key = buf[pos + 4:end]
            pos = end
        what = "headers"
        count = buf[pos] << 8 | buf[pos + 1]
        pos += 2
        if count > MAX_HEADERS:
            raise MalformedEnvelopeError(f"envelope has {count} headers (max {MAX_HEADERS})")
        names: list[str] = []
        values: list[bytes] = []
        if full:
            for _ in range(count):
                end = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
                stop = end + 4 + u32(buf, end)[0]
                if stop > size:
                    raise MalformedEnvelopeError(
                        f"envelope truncated in a header: needs {stop - size} more bytes")
                names.append(buf[pos + 2:end].decode())
                values.append(buf[end + 4:stop])
                pos = stop
        else:
            for _ in range(count):  # a position past the end fails the next read
                end = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
                pos = end + 4 + u32(buf, end)[0]
            if pos > size:
                raise MalformedEnvelopeError("envelope truncated in a header")
        value = None
        if not flags & _F_NULL_VALUE:
            what = "value"
            end = pos + 4 + u32(buf, pos)[0]
            if end > size:
                raise MalformedEnvelopeError("envelope truncated in value")
            if full:
                value = buf[pos + 4:end]
            pos = end
    except (IndexError, struct.error):
        raise MalformedEnvelopeError(f"envelope truncated in {what} at byte {pos}") from None
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("envelope id, topic or header key is not text") from None
    return message_id, topic, key, tuple(names), tuple(values), value, pos


def _authenticate(auth: int, key_id: str, tag: bytes, body: bytes, keys: EnvelopeKeys,
                  accept_unauthenticated: bool) -> None:
    if auth:
        _verify(auth, key_id, tag, body, keys)
    elif not accept_unauthenticated:
        raise MalformedEnvelopeError(
            "envelope is not authenticated but envelope keys are set (accept it while "
            "turning authentication on with republisher.accept_unauthenticated)")


def _verify(auth: int, key_id: str, tag: bytes, body: bytes, keys: EnvelopeKeys) -> None:
    if auth == _F_AUTH:
        secret = keys.keys.get(key_id)
        if secret is None:
            raise MalformedEnvelopeError(f"envelope signed with unknown key id {key_id!r}")
        expected = hmac.new(secret, AUTH_LABEL + body, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, tag):
            raise MalformedEnvelopeError("envelope authentication failed (tampered)")
        return
    legacy = keys.legacy.get(key_id)
    if legacy is None:
        raise MalformedEnvelopeError(f"envelope signed with unknown key id {key_id!r}")
    try:
        AESGCM(legacy).decrypt(tag[:12], tag[12:], AUTH_LABEL + body)
    except InvalidTag:
        raise MalformedEnvelopeError("envelope authentication failed (tampered)") from None


# --- the ids topic: what happened to a caller-chosen message id ----------------------------
SCHEDULED, CANCELLED, RELEASED = 1, 2, 3
_ID_MAGIC = b"ATHI"
_ID_FIXED = struct.Struct(">4sBBBQQ16s")
_ID_AUTH_LABEL = b"athomic-ids-v1"
ID_EVENT_KINDS = {SCHEDULED: "scheduled", CANCELLED: "cancelled", RELEASED: "released"}


@dataclass(frozen=True, slots=True)
class IdEvent:
    """One event of a caller-chosen message id, the value of a record keyed by the id in
    the connection's ids topic (compacted).

    Layout: magic ``ATHI``, version 1, kind (1 scheduled, 2 cancelled, 3 released), flags
    (bit0 authenticated), at (epoch ms, when it happened), deliver_at (epoch ms; 0 for a
    cancel), version (16 bytes: which publish of the id; zeros for a cancel), then with
    bit0 the key id (1+n) and an HMAC-SHA256 (32) over the key and everything above, under
    the envelope keys: a cancel cannot be forged without a key."""

    kind: int
    at_ms: int
    deliver_at_ms: int = 0
    version: bytes = b"\0" * 16


def encode_id_event(message_id: str, event: IdEvent, keys: EnvelopeKeys | None = None
                    ) -> bytes:
    body = _ID_FIXED.pack(_ID_MAGIC, 1, event.kind, 1 if keys else 0, event.at_ms,
                          event.deliver_at_ms, event.version)
    if keys is None:
        return body
    key_id = keys.primary.encode()
    tag = hmac.new(keys.keys[keys.primary], _ID_AUTH_LABEL + message_id.encode() + body,
                   hashlib.sha256).digest()
    return body + bytes([len(key_id)]) + key_id + tag


def decode_id_event(message_id: str, data: bytes, keys: EnvelopeKeys | None = None, *,
                    accept_unauthenticated: bool = False) -> IdEvent:
    """Parse an ids-topic record's value; MalformedEnvelopeError for anything off (with
    ``keys``: a missing or wrong tag, unless ``accept_unauthenticated`` for a record
    without one)."""
    if len(data) < _ID_FIXED.size:
        raise MalformedEnvelopeError("not an id event: too short")
    magic, version, kind, flags, at_ms, deliver_at_ms, ver = _ID_FIXED.unpack_from(data)
    if magic != _ID_MAGIC or version != 1 or kind not in ID_EVENT_KINDS or flags & ~1:
        raise MalformedEnvelopeError("not an id event")
    body, rest = data[:_ID_FIXED.size], data[_ID_FIXED.size:]
    if flags & 1:
        if not rest or len(rest) != 1 + rest[0] + _TAG:
            raise MalformedEnvelopeError("id event truncated in its authentication tag")
        key_id = rest[1:1 + rest[0]].decode("ascii", "replace")
        if keys is not None:
            secret = keys.keys.get(key_id)
            expected = secret and hmac.new(
                secret, _ID_AUTH_LABEL + message_id.encode() + body, hashlib.sha256).digest()
            if not expected or not hmac.compare_digest(expected, rest[1 + rest[0]:]):
                raise MalformedEnvelopeError("id event authentication failed")
    else:
        if rest:
            raise MalformedEnvelopeError("trailing bytes after id event")
        if keys is not None and not accept_unauthenticated:
            raise MalformedEnvelopeError("id event not authenticated but keys are set")
    return IdEvent(kind, at_ms, deliver_at_ms, ver)
