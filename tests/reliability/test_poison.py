"""Poison in the delay topics: malformed and forged envelopes written straight into them
during traffic, with envelope keys configured (``republisher.auth``). Each partition moves
on, the poison lands in the dead-letter topic, nothing else is affected (scenario 10 of
RELIABILITY.md)."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from rig import QUICK, QUICK_DELAYS, Run, assert_bar, drive, now_ms

from athomic import MessagePriority
from athomic.envelope import Envelope, encode, envelope_keys

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]

KEY = os.urandom(32)
AUTH = {"primary": "k1", "keys": {"k1": base64.b64encode(KEY).decode()}}


def _poison(run: Run, round_: int) -> list[tuple[str, bytes | None, bytes, str]]:
    """(kind, value, key, message id) of the records one round injects."""
    now = now_ms()
    key = f"{run.tag}-t0-k0".encode()  # a key the workload uses: its partition carries on

    def envelope(mid: str) -> Envelope:
        return Envelope(topic=run.finals[0], key=key, value=b'{"forged": true}',
                        headers=(("message-id", mid.encode()),), deliver_at_ms=now + 500,
                        hold_until_ms=now + 500, published_ms=now, hop=1,
                        priority=MessagePriority.HIGH, message_id=mid)

    def mid(kind: str) -> str:
        return f"poison-{round_}-{kind}"

    right = envelope_keys({"k1": KEY}, "k1")
    tampered = bytearray(encode(envelope(mid("tampered")), right))
    tampered[12] ^= 0x01  # one bit of deliver_at: the tag no longer matches
    good = encode(envelope(mid("truncated")), right)
    out: list[tuple[str, bytes | None, bytes, str]] = [
        # malformed: not an envelope at all, or a broken one
        ("garbage", b"not an envelope", key, mid("garbage")),
        ("random", os.urandom(200), key, mid("random")),
        ("null-value", None, key, mid("null-value")),
        ("truncated", good[:30], key, mid("truncated")),
        ("unknown-version", b"ATHD\x09" + os.urandom(60), key, mid("unknown-version")),
        ("bad-length", good[:49] + b"\xff" + good[50:60], key, mid("bad-length")),
        # forged: well formed, not authenticated by the ring
        ("wrong-key", encode(envelope(mid("wrong-key")),
                             envelope_keys({"k1": os.urandom(32)}, "k1")), key,
         mid("wrong-key")),
        ("unknown-key-id", encode(envelope(mid("unknown-key-id")),
                                  envelope_keys({"k9": os.urandom(32)}, "k9")), key,
         mid("unknown-key-id")),
        ("unauthenticated", encode(envelope(mid("unauthenticated"))), key,
         mid("unauthenticated")),
        ("tampered", bytes(tampered), key, mid("tampered")),
    ]
    return out


def _inject(run: Run, round_: int) -> list[str]:
    """Write one round into the delay topics (spread over topics and partitions);
    returns each record's message id and ``<topic>/<partition>/<offset>``."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": run.kafka.bootstrap, "acks": "all",
                         "log_level": 0})
    where: list[str] = []

    def report(err: Any, msg: Any) -> None:
        assert err is None, err
        where.append(f"{msg.topic()}/{msg.partition()}/{msg.offset()}")

    topics = list(run.buckets.values())
    records = _poison(run, round_)
    for i, (_, value, key, mid) in enumerate(records):
        producer.produce(topics[i % len(topics)], value=value, key=key,
                         partition=i % 3, headers=[("message-id", mid.encode())],
                         on_delivery=report)
    assert producer.flush(30) == 0
    assert len(where) == len(records)
    return [mid for *_, mid in records] + where


def test_poison_in_the_delay_topics(scenario: Callable[..., Run]) -> None:
    """10. Malformed and forged envelopes injected into the delay topics mid-stream."""
    run = scenario("s10-poison" + ("-quick" if QUICK else ""), auth=AUTH)
    injected: set[str] = set()

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(10 if QUICK else 20)
        began = run.fault("10 malformed/forged records into the delay topics")
        injected.update(_inject(run, 1))
        time.sleep(10 if QUICK else 15)
        run.fault("10 more")
        injected.update(_inject(run, 2))
        return began, now_ms()

    spec = {"duration_s": 30, "delays": QUICK_DELAYS} if QUICK else {}
    figures = drive(run, fault, injected=injected, **spec)
    assert figures["injected_delivered"] == 0, "a forged envelope was delivered"
    assert figures["dlq_injected"] == figures["dlq"] == 20, figures["dlq_errors"]
    assert_bar(figures, dlq=20)
