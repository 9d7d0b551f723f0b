"""The delay envelope: a delayed message as it waits in a delay topic.

Versioned, binary-safe, bounded. Layout (all integers big-endian)::

    magic      4  b"ATHD"
    version    1  1
    flags      1  bit0 value is null, bit1 key is null, bit2 authenticated
    priority   1  0 low, 1 normal, 2 high
    hop        1  delay topics passed so far, this one included (1 on first enqueue)
    deliver_at 8  due time, epoch milliseconds
    hold_until 8  when the message leaves THIS delay topic, epoch milliseconds
    published  8  when the caller published, epoch milliseconds
    message_id 16 UUID bytes
    topic      2+n   final (physical) topic
    key        4+n   absent when null
    headers    2 count, then per header 2+n key, 4+n value: the final message's headers
    value      4+n   absent when null: the pipeline-encoded payload, relayed unchanged
    auth       (bit2) 1+n key id, 12 nonce, 16 tag: AES-256-GCM over everything above with
               no plaintext, under the pipeline's primary encryption key, so a tampered due
               time or destination is refused.

Times are absolute and fixed at publish; ``hold_until`` is planned from the publish time
(not from when a hop happened), so messages with the same delay take the same path.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import MalformedEnvelopeError
from .messages import MessagePriority

MAGIC = b"ATHD"
VERSION = 1
_FIXED = struct.Struct(">4sBBBBQQQ16s")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_F_NULL_VALUE, _F_NULL_KEY, _F_AUTH = 1, 2, 4
_PRIORITY_CODE = {MessagePriority.LOW: 0, MessagePriority.NORMAL: 1, MessagePriority.HIGH: 2}
_PRIORITY_OF = {v: k for k, v in _PRIORITY_CODE.items()}
MAX_HEADERS = 1024
AUTH_LABEL = b"athomic-envelope-v1"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A delayed message and its schedule."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    deliver_at_ms: int
    hold_until_ms: int
    published_ms: int
    hop: int
    priority: MessagePriority
    message_id: str

    def next_hop(self, hold_until_ms: int) -> Envelope:
        return replace(self, hop=self.hop + 1, hold_until_ms=hold_until_ms)


@dataclass(frozen=True, slots=True)
class EnvelopeKeys:
    """The key ring that authenticates envelopes: ``primary`` signs, any id verifies."""

    primary: str
    keys: dict[str, bytes]


def encode(env: Envelope, keys: EnvelopeKeys | None = None) -> bytes:
    flags = (_F_NULL_VALUE if env.value is None else 0) | \
        (_F_NULL_KEY if env.key is None else 0) | (_F_AUTH if keys else 0)
    if not 0 < env.hop < 256:
        raise MalformedEnvelopeError(f"hop {env.hop} out of range 1..255")
    topic = env.topic.encode()
    parts = [
        _FIXED.pack(MAGIC, VERSION, flags, _PRIORITY_CODE[env.priority], env.hop,
                    env.deliver_at_ms, env.hold_until_ms, env.published_ms,
                    uuid.UUID(env.message_id).bytes),
        _U16.pack(len(topic)), topic,
    ]
    if env.key is not None:
        parts += [_U32.pack(len(env.key)), env.key]
    parts.append(_U16.pack(len(env.headers)))
    for k, v in env.headers:
        kb = k.encode()
        parts += [_U16.pack(len(kb)), kb, _U32.pack(len(v)), v]
    if env.value is not None:
        parts += [_U32.pack(len(env.value)), env.value]
    body = b"".join(parts)
    if keys is None:
        return body
    key_id = keys.primary.encode()
    nonce = os.urandom(12)
    tag = AESGCM(keys.keys[keys.primary]).encrypt(nonce, b"", AUTH_LABEL + body)
    return body + bytes([len(key_id)]) + key_id + nonce + tag


def _field(buf: bytes, pos: int, length: struct.Struct, what: str) -> tuple[bytes, int]:
    """A length-prefixed field at ``pos``: its bytes and the position after it. The length
    is checked against what is left before anything is sliced, so a corrupt length can
    neither read past the end nor allocate more than the input."""
    (n,) = length.unpack_from(buf, pos)
    pos += length.size
    if pos + n > len(buf):
        raise MalformedEnvelopeError(
            f"envelope truncated in {what}: needs {n} bytes at {pos}, has {len(buf) - pos}")
    return buf[pos:pos + n], pos + n


def decode(data: bytes, keys: EnvelopeKeys | None = None) -> Envelope:
    """Parse an envelope; raises MalformedEnvelopeError for anything off (and, when ``keys``
    are given, for a missing or wrong authentication tag)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _FIXED.size:
        raise MalformedEnvelopeError("not a delay envelope: too short")
    buf = bytes(data)
    size = len(buf)
    magic, version, flags, prio, hop, deliver_at, hold_until, published, mid = \
        _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MalformedEnvelopeError("not a delay envelope: bad magic")
    if version != VERSION:
        raise MalformedEnvelopeError(f"unsupported envelope version {version}")
    if flags & ~(_F_NULL_VALUE | _F_NULL_KEY | _F_AUTH):
        raise MalformedEnvelopeError(f"unknown envelope flags {flags:#x}")
    if prio not in _PRIORITY_OF or hop == 0:
        raise MalformedEnvelopeError("envelope priority or hop out of range")
    pos = _FIXED.size
    try:
        raw, pos = _field(buf, pos, _U16, "topic")
        topic = raw.decode()
        key = None
        if not flags & _F_NULL_KEY:
            key, pos = _field(buf, pos, _U32, "key")
        (count,) = _U16.unpack_from(buf, pos)
        pos += 2
        if count > MAX_HEADERS:
            raise MalformedEnvelopeError(f"envelope has {count} headers (max {MAX_HEADERS})")
        headers = []
        for _ in range(count):
            raw, pos = _field(buf, pos, _U16, "header key")
            header_value, pos = _field(buf, pos, _U32, "header value")
            headers.append((raw.decode(), header_value))
        value = None
        if not flags & _F_NULL_VALUE:
            value, pos = _field(buf, pos, _U32, "value")
        body_end = pos
        if flags & _F_AUTH:
            raw, pos = _field(buf, pos, _U8, "key id")
            key_id = raw.decode("ascii", "replace")
            if pos + 28 > size:
                raise MalformedEnvelopeError("envelope truncated in authentication tag")
            nonce, tag = buf[pos:pos + 12], buf[pos + 12:pos + 28]
            pos += 28
    except struct.error:
        raise MalformedEnvelopeError(f"envelope truncated at byte {pos}") from None
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("envelope topic or header key is not UTF-8") from None
    if flags & _F_AUTH:
        if keys is None:
            raise MalformedEnvelopeError("envelope is authenticated but no key ring is set")
        secret = keys.keys.get(key_id)
        if secret is None:
            raise MalformedEnvelopeError(f"envelope signed with unknown key id {key_id!r}")
        try:
            AESGCM(secret).decrypt(nonce, tag, AUTH_LABEL + buf[:body_end])
        except InvalidTag:
            raise MalformedEnvelopeError("envelope authentication failed (tampered)") from None
    elif keys is not None:
        raise MalformedEnvelopeError("envelope is not authenticated but a key ring is set")
    if pos != size:
        raise MalformedEnvelopeError(f"{size - pos} trailing bytes after envelope")
    return Envelope(topic=topic, key=key, value=value, headers=tuple(headers),
                    deliver_at_ms=deliver_at, hold_until_ms=hold_until,
                    published_ms=published, hop=hop, priority=_PRIORITY_OF[prio],
                    message_id=str(uuid.UUID(bytes=mid)))


def envelope_keys(pipeline: Sequence[Any]) -> EnvelopeKeys | None:
    """The key ring that authenticates envelopes: the pipeline's encrypt stage, if any."""
    for spec in pipeline:
        if getattr(spec, "stage", None) == "encrypt":
            return EnvelopeKeys(primary=spec.primary, keys=spec.key_ring())
    return None
