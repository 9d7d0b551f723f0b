"""The delay envelope codec: round trips, bounds, malformed input, authentication."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from athomic import MalformedEnvelopeError, MessagePriority
from athomic.envelope import Envelope, EnvelopeKeys, decode, encode
from athomic.messages import new_message_id

KEYS = EnvelopeKeys("k1", {"k1": os.urandom(32), "k0": os.urandom(32)})


def sample(**kw: object) -> Envelope:
    values: dict[str, object] = dict(
        topic="orders.v1", key=b"user-1", value=b"\x00payload\xff",
        headers=(("message-id", b"x"), ("traceparent", b"00-ab-cd-01")),
        deliver_at_ms=1_700_000_005_000, hold_until_ms=1_700_000_004_000,
        published_ms=1_700_000_000_000, hop=1, priority=MessagePriority.HIGH,
        message_id=new_message_id())
    values.update(kw)
    return Envelope(**values)  # type: ignore[arg-type]


@given(st.binary(max_size=300) | st.none(), st.binary(max_size=40) | st.none(),
       st.lists(st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=50)),
                max_size=10),
       st.sampled_from(list(MessagePriority)), st.integers(1, 255))
def test_round_trip(value: bytes | None, key: bytes | None,
                    headers: list[tuple[str, bytes]], prio: MessagePriority,
                    hop: int) -> None:
    env = sample(value=value, key=key, headers=tuple(headers), priority=prio, hop=hop)
    assert decode(encode(env)) == env
    assert decode(encode(env, KEYS), KEYS) == env


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


def test_every_truncation_and_trailing_bytes_are_refused() -> None:
    data = encode(sample())
    for cut in range(len(data)):
        with pytest.raises(MalformedEnvelopeError):
            decode(data[:cut])
    with pytest.raises(MalformedEnvelopeError, match="trailing"):
        decode(data + b"x")


def test_authenticated_envelopes_refuse_tampering_and_wrong_keys() -> None:
    data = bytearray(encode(sample(), KEYS))
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        with pytest.raises(MalformedEnvelopeError):
            decode(bytes(flipped), KEYS)
    with pytest.raises(MalformedEnvelopeError, match="no key ring"):
        decode(bytes(data))
    with pytest.raises(MalformedEnvelopeError, match="not authenticated"):
        decode(encode(sample()), KEYS)
    other = EnvelopeKeys("k1", {"k1": os.urandom(32)})
    with pytest.raises(MalformedEnvelopeError):
        decode(bytes(data), other)
    rotated = EnvelopeKeys("k2", {"k2": os.urandom(32), **KEYS.keys})
    assert decode(bytes(data), rotated) == decode(bytes(data), KEYS)  # old id verifies
