"""The delay envelope codec: round trips, bounds, malformed input, authentication."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from athomic import MalformedEnvelopeError, MessagePriority
from athomic import envelope as E
from athomic.envelope import (
    MAX_HOPS,
    Envelope,
    EnvelopeKeys,
    decode,
    derive_envelope_key,
    encode,
    envelope_keys,
)
from athomic.messages import new_message_id

KEYS = envelope_keys({"k1": os.urandom(32), "k0": os.urandom(32)}, "k1")


def sample(**kw: object) -> Envelope:
    values: dict[str, object] = dict(
        topic="orders.v1", key=b"user-1", value=b"\x00payload\xff",
        headers=(("message-id", b"x"), ("traceparent", b"00-ab-cd-01")),
        deliver_at_ms=1_700_000_005_000, hold_until_ms=1_700_000_004_000,
        published_ms=1_700_000_000_000, hop=1, priority=MessagePriority.HIGH,
        message_id=new_message_id())
    values.update(kw)
    return Envelope(**values)  # type: ignore[arg-type]


def encode_v2(env: Envelope, keys: EnvelopeKeys | None = None) -> bytes:
    """A version-2 envelope, byte for byte as written before version 3."""
    flags = (E._F_NULL_VALUE if env.value is None else 0) | \
        (E._F_NULL_KEY if env.key is None else 0) | (E._F_AUTH if keys else 0) | \
        (E._F_CALLER_ID if env.caller_id else 0)
    mid = E._check_message_id(env.message_id)
    topic = env.topic.encode()
    parts = [
        E._FIXED_V2.pack(E.MAGIC, 2, flags, E._PRIORITY_CODE[env.priority], env.hop,
                         env.deliver_at_ms, env.hold_until_ms, env.published_ms, env.version),
        E._U8.pack(len(mid)), mid,
        E._U16.pack(len(topic)), topic,
    ]
    if env.key is not None:
        parts += [E._U32.pack(len(env.key)), env.key]
    parts.append(E._U16.pack(len(env.headers)))
    for k, v in env.headers:
        kb = k.encode()
        parts += [E._U16.pack(len(kb)), kb, E._U32.pack(len(v)), v]
    if env.value is not None:
        parts += [E._U32.pack(len(env.value)), env.value]
    body = b"".join(parts)
    if keys is None:
        return body
    key_id = keys.primary.encode()
    tag = hmac.new(keys.keys[keys.primary], E.AUTH_LABEL + body, hashlib.sha256).digest()
    return body + bytes([len(key_id)]) + key_id + tag


ENCODERS = [encode, encode_v2]
Encoder = Callable[..., bytes]


@given(st.binary(max_size=300) | st.none(), st.binary(max_size=40) | st.none(),
       st.lists(st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=50)),
                max_size=10),
       st.sampled_from(list(MessagePriority)), st.integers(1, MAX_HOPS),
       st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
               max_size=128), st.binary(min_size=16, max_size=16), st.booleans(),
       st.sampled_from(ENCODERS))
def test_round_trip(value: bytes | None, key: bytes | None,
                    headers: list[tuple[str, bytes]], prio: MessagePriority,
                    hop: int, message_id: str, version: bytes, caller_id: bool,
                    encoder: Encoder) -> None:
    """Version 3 as written, and version 2 as written before it (still read)."""
    env = sample(value=value, key=key, headers=tuple(headers), priority=prio, hop=hop,
                 message_id=message_id, version=version, caller_id=caller_id)
    assert decode(encoder(env)) == env
    assert decode(encoder(env, KEYS), KEYS) == env


def test_version_3_is_written_and_refuses_what_it_cannot_carry() -> None:
    data = encode(sample())
    assert data[:5] == b"ATHD\x03" and data != encode_v2(sample())
    with pytest.raises(MalformedEnvelopeError, match="header name is not text"):
        encode(sample(headers=((b"raw", b"1"),)))
    with pytest.raises(MalformedEnvelopeError, match="headers"):
        encode(sample(headers=(("h", b"1"),) * (E.MAX_HEADERS + 1)))
    with pytest.raises(MalformedEnvelopeError, match="bytes"):
        encode(sample(topic="t" * 0x10000))
    with pytest.raises(MalformedEnvelopeError):
        encode(sample(headers=(("h", "text, not bytes"),)))
    # header values given as other bytes-like objects are written as bytes
    env = decode(encode(sample(headers=(("h", bytearray(b"12")), ("m", memoryview(b"3"))))))
    assert env.headers == (("h", b"12"), ("m", b"3"))


def test_read_gives_the_head_and_the_whole_envelope_only_when_due_soon() -> None:
    """What a republisher reads per record: always the head; the envelope decoded in full
    too when it leaves its delay topic (or is due) by ``full_by_ms``, from either version."""
    import struct

    from athomic.envelope import peek, read

    for env, encoder in itertools.product(
            (sample(), sample(message_id="order-17", caller_id=True, value=None)), ENCODERS):
        for keys in (None, KEYS):
            data = encoder(env, keys)
            soonest = min(env.hold_until_ms, env.deliver_at_ms)
            head, full = read(data, keys, full_by_ms=soonest)
            assert head == peek(data, keys) and full == env
            head, full = read(data, keys, full_by_ms=soonest - 1)
            assert head == peek(data, keys) and full is None
    # version 1 (still read): a one-byte hop
    v1 = struct.pack(">4sBBBBQQQ16s", b"ATHD", 1, 2, 1, 1, 5_000, 4_000, 1_000, b"\x01" * 16)
    v1 += struct.pack(">H", 1) + b"t" + struct.pack(">H", 0) + struct.pack(">I", 1) + b"v"
    head, full = read(v1, full_by_ms=4_000)
    assert (head.hold_until_ms, head.deliver_at_ms) == (4_000, 5_000)
    assert full is not None and full.value == b"v"
    assert read(v1, full_by_ms=3_999)[1] is None
    for junk in (b"", b"ATHD", b"XXXX" + b"\x00" * 60, encode(sample())[:20],
                 b"ATHD\x09" + b"\x00" * 60):
        with pytest.raises(MalformedEnvelopeError):
            read(junk, full_by_ms=0)


def test_next_hop_keeps_everything_but_schedule() -> None:
    env = sample()
    nxt = env.next_hop(1_700_000_005_000)
    assert (nxt.hop, nxt.hold_until_ms) == (2, 1_700_000_005_000)
    assert (nxt.value, nxt.headers, nxt.deliver_at_ms) == (env.value, env.headers,
                                                            env.deliver_at_ms)


@pytest.mark.parametrize("data", [b"", b"ATHD", b"XXXX" + b"\x00" * 60,
                                  b"ATHD\x09" + b"\x00" * 60])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedEnvelopeError):
        decode(data)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_truncation_and_trailing_bytes_are_refused(encoder: Encoder) -> None:
    data = encoder(sample())
    for cut in range(len(data)):
        with pytest.raises(MalformedEnvelopeError):
            decode(data[:cut])
    with pytest.raises(MalformedEnvelopeError, match="trailing"):
        decode(data + b"x")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_authenticated_envelopes_refuse_tampering_and_wrong_keys(encoder: Encoder) -> None:
    data = bytearray(encoder(sample(), KEYS))
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(MalformedEnvelopeError):
            decode(bytes(flipped), KEYS)
    with pytest.raises(MalformedEnvelopeError, match="not authenticated"):
        decode(encode(sample()), KEYS)
    other = envelope_keys({"k1": os.urandom(32)}, "k1")
    with pytest.raises(MalformedEnvelopeError):
        decode(bytes(data), other)
    rotated = EnvelopeKeys("k2", {"k2": os.urandom(32), **KEYS.keys})
    assert decode(bytes(data), rotated) == decode(bytes(data), KEYS)  # old id verifies


def test_envelope_keys_are_derived_never_the_payload_key() -> None:
    raw = os.urandom(32)
    keys = envelope_keys({"k1": raw}, "k1")
    assert keys.keys["k1"] != raw and keys.keys["k1"] == derive_envelope_key(raw)
    assert len(keys.keys["k1"]) == 32


def test_migration_both_ways() -> None:
    """Turning authentication on: envelopes written before (unauthenticated) are accepted
    only when told so. Turning it off: a setup without keys verifies nothing, so the
    authenticated envelopes still waiting are read."""
    plain = encode(sample())
    assert decode(plain, KEYS, accept_unauthenticated=True).topic == "orders.v1"
    signed = encode(sample(), KEYS)
    assert decode(signed).topic == "orders.v1"


def test_hop_and_message_id_bounds() -> None:
    with pytest.raises(MalformedEnvelopeError, match="hop"):
        encode(sample(hop=MAX_HOPS + 1))
    with pytest.raises(MalformedEnvelopeError, match="message id"):
        encode(sample(message_id="x" * 129))
    assert decode(encode(sample(hop=MAX_HOPS))).hop == MAX_HOPS


def test_version_1_envelopes_written_before_an_upgrade_still_decode() -> None:
    """Layout of version 1: 16-byte UUID message id, 1-byte hop, AES-GCM tag under the
    payload key itself."""
    import struct
    import uuid

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    mid = new_message_id()
    raw_key = KEYS.legacy["k1"]
    body = struct.pack(">4sBBBBQQQ16s", b"ATHD", 1, 4, 2, 3, 5000, 4000, 1000,
                       uuid.UUID(mid).bytes)
    body += struct.pack(">H", 6) + b"orders" + struct.pack(">I", 1) + b"k"
    body += struct.pack(">H", 1) + struct.pack(">H", 1) + b"h" + struct.pack(">I", 1) + b"v"
    body += struct.pack(">I", 3) + b"abc"
    nonce = os.urandom(12)
    tag = AESGCM(raw_key).encrypt(nonce, b"", b"athomic-envelope-v1" + body)
    data = body + bytes([2]) + b"k1" + nonce + tag
    env = decode(data, KEYS)
    assert (env.message_id, env.hop, env.topic, env.key, env.value, env.priority) == (
        mid, 3, "orders", b"k", b"abc", MessagePriority.HIGH)
    assert env.headers == (("h", b"v"),)
    tampered = bytearray(data)
    tampered[15] ^= 1
    with pytest.raises(MalformedEnvelopeError):
        decode(bytes(tampered), KEYS)


@given(st.binary(max_size=300) | st.none(), st.binary(max_size=40) | st.none(),
       st.lists(st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=50)),
                max_size=10), st.booleans(), st.sampled_from(ENCODERS))
def test_peek_is_decode_without_headers_and_value(value: bytes | None, key: bytes | None,
                                                  headers: list[tuple[str, bytes]],
                                                  signed: bool, encoder: Encoder) -> None:
    from athomic.envelope import peek

    env = sample(value=value, key=key, headers=tuple(headers))
    data = encoder(env, KEYS if signed else None)
    head = peek(data, KEYS if signed else None)
    assert (head.topic, head.key, head.deliver_at_ms, head.hold_until_ms, head.hop,
            head.priority, head.message_id, head.caller_id) == (
        env.topic, env.key, env.deliver_at_ms, env.hold_until_ms, env.hop, env.priority,
        env.message_id, env.caller_id)
    assert head.version == (env.version if env.caller_id else b"\0" * 16)
    assert head.null_value == (value is None)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_peek_refuses_what_decode_refuses(encoder: Encoder) -> None:
    from athomic.envelope import peek

    data = encoder(sample(), KEYS)
    for cut in range(len(data)):
        with pytest.raises(MalformedEnvelopeError):
            peek(data[:cut], KEYS)
    flipped = bytearray(data)
    flipped[-40] ^= 1
    with pytest.raises(MalformedEnvelopeError):
        peek(bytes(flipped), KEYS)


@given(st.data())
def test_any_corruption_is_refused_as_malformed_or_read_whole(data: st.DataObject) -> None:
    """The parser reads lengths by indexing and relies on reads past the end failing: any
    bytes changed, cut or added give a MalformedEnvelopeError or a whole envelope (one
    whose every field was within the input), never another error."""
    from athomic.envelope import peek

    signed = data.draw(st.booleans())
    encoder = data.draw(st.sampled_from(ENCODERS))
    raw = bytearray(encoder(sample(headers=(("a", b"1"), ("bb", b"22"))),
                            KEYS if signed else None))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    corrupt = bytes(raw[:cut]) + data.draw(st.binary(max_size=8))
    for parse in (decode, peek):
        try:
            env = parse(corrupt)
        except MalformedEnvelopeError:
            continue
        assert env.message_id and env.hop >= 1
