"""athomic.testing.TestProducer: the real validation, pipeline and headers, recorded instead
of sent; delivery by due time, cancel and replace as the republisher decides. No Kafka, no
Ray (``.remote()`` is covered in tests/integration/test_testing_mode_vs_real.py)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from athomic import (
    CancelOutcome,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidTopicError,
    MessagePriority,
    MessagingSettings,
    ProducerClosedError,
    ProducerHandle,
    PublishingOutcome,
    RecordTooLargeError,
    SerializationError,
    ValidationError,
    decode_message,
)
from athomic.testing import PublishedMessage, TestProducer

T0 = 1_900_000_000.0  # a fixed "now" for the tests that move the clock
DELAYS = {1: "delay.1s", 10: "delay.10s", 60: "delay.1m"}
KEY = base64.b64encode(bytes(range(32))).decode()


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def producer(clock: Clock) -> Iterator[TestProducer]:
    with TestProducer(MessagingSettings(delay_topics=DELAYS), clock=clock) as p:
        yield p


def values(messages: list[PublishedMessage]) -> list[Any]:
    return [m.value for m in messages]


async def test_a_direct_publish_is_recorded_as_the_record_consumers_read(
        producer: TestProducer) -> None:
    outcome = await producer.publish(topic="user.events.v1", message={"user": 1},
                                     key="user-1", headers={"x-app": "shop"})
    assert outcome is PublishingOutcome.SUCCESS_DIRECT
    assert isinstance(producer, ProducerHandle)  # code typed against the handle accepts it
    (m,) = producer.published
    assert (m.topic, m.key, m.value, m.outcome) == ("user.events.v1", b"user-1", {"user": 1},
                                                   PublishingOutcome.SUCCESS_DIRECT)
    assert m.deliver_at is None and m.priority is MessagePriority.NORMAL
    assert m.published_at == dt.datetime.fromtimestamp(T0, dt.timezone.utc)
    h = m.headers
    assert h["x-app"] == b"shop" and h["message-id"] == m.message_id.encode()
    assert h["athomic-priority"] == b"normal" and h["content-type"] == b"application/json"
    assert h["athomic-published-at"] == str(round(T0 * 1000)).encode()
    assert "athomic-deliver-at" not in h and "athomic-hop" not in h
    assert m.raw == b'{"user":1}'
    assert producer.delivered() == [m]


async def test_the_byte_stages_run_and_decode_back() -> None:
    settings = MessagingSettings(pipeline=[
        {"stage": "serialize", "codec": "orjson"},
        {"stage": "compress", "codec": "zstd", "level": 3, "min_size": 64},
        {"stage": "encrypt", "cipher": "aes-256-gcm", "keys": {"k1": KEY}, "primary": "k1"}])
    event = {"note": "x" * 500, "n": 7}
    with TestProducer(settings) as p:
        await p.publish(topic="secure.v1", message=event, key="k")
        await p.publish(topic="secure.v1", message="short", key="k")
    big, small = p.published
    assert big.value == event and small.value == "short"
    assert big.headers["content-encoding"] == b"zstd, aes-256-gcm"
    assert small.headers["content-encoding"] == b"aes-256-gcm"  # below min_size
    assert big.headers["athomic-encryption"] == b"aes-256-gcm"
    assert big.headers["athomic-key-id"] == b"k1"
    assert big.raw is not None and b"xxxx" not in big.raw  # compressed, then encrypted
    assert decode_message(big.raw, big.headers, settings, topic="secure.v1", key=b"k") == event


async def test_validation_errors_are_the_real_handles_and_nothing_is_recorded(
        producer: TestProducer) -> None:
    with pytest.raises(InvalidTopicError):
        await producer.publish(topic="bad topic!", message=1)
    with pytest.raises(InvalidTopicError, match="athomic's own topics"):
        await producer.publish(topic="delay.10s", message=1)
    with pytest.raises(InvalidDelayError):
        await producer.publish(topic="t", message=1, delay_seconds=-1)
    with pytest.raises(InvalidDelayError, match="timezone-aware"):
        await producer.publish(topic="t", message=1, deliver_at=dt.datetime(2030, 1, 1))
    with pytest.raises(SerializationError):
        await producer.publish(topic="t", message=object())
    with pytest.raises(InvalidHeaderError):
        await producer.publish(topic="t", message=1, priority="urgent")
    with pytest.raises(ValidationError, match="message #1"):
        await producer.publish_batch([{"message": 1}, {"message": 2, "topic": "a b"}],
                                     topic="t")
    assert producer.published == []


async def test_errors_the_actor_raises_are_raised_too() -> None:
    settings = MessagingSettings(producer={"max_request_size": 1024})
    with TestProducer(settings) as p:
        with pytest.raises(RecordTooLargeError, match="max_request_size=1024"):
            await p.publish(topic="t", message="x" * 2000)
        with pytest.raises(NotImplementedError, match="delay_topics"):
            await p.publish(topic="t", message=1, delay_seconds=5)
        with pytest.raises(NotImplementedError):
            await p.cancel(message_id="m-1")
        assert await p.publish(topic="t", message="fits") is PublishingOutcome.SUCCESS_DIRECT
    assert values(p.published) == ["fits"]


async def test_a_delayed_message_is_delivered_at_its_due_time_never_before(
        producer: TestProducer) -> None:
    due = dt.datetime.fromtimestamp(T0 + 90, dt.timezone.utc)
    assert await producer.publish(topic="t", message="later", key="k", deliver_at=due) is \
        PublishingOutcome.SUCCESS_DELAYED
    await producer.publish(topic="t", message="now", key="k")
    later = producer.published[0]
    assert later.deliver_at == due and later.outcome is PublishingOutcome.SUCCESS_DELAYED
    assert later.headers["athomic-deliver-at"] == str(round((T0 + 90) * 1000)).encode()
    assert later.headers["athomic-hop"] == b"4"  # the 60 s bucket, then 10 s three times
    assert later.topic == "t" and later.key == b"k"  # the final record, not the envelope
    assert values(producer.delivered()) == ["now"]
    assert values(producer.delivered(at=T0 + 89.999)) == ["now"]
    assert values(producer.delivered(at=due)) == ["now", "later"]


async def test_delivery_order_is_by_due_time_then_publish_order(
        producer: TestProducer) -> None:
    await producer.publish_batch([
        {"message": "b-30", "key": "b", "delay_seconds": 30},
        {"message": "a-10", "key": "a", "delay_seconds": 10},
        {"message": "a-now", "key": "a"},
        {"message": "a-10-second", "key": "a", "delay_seconds": 10},
        {"message": "b-5", "key": "b", "delay_seconds": 5},
    ], topic="t")
    assert values(producer.delivered(at=T0 + 60)) == [
        "a-now", "b-5", "a-10", "a-10-second", "b-30"]
    assert values(producer.delivered(at=T0 + 10)) == ["a-now", "b-5", "a-10", "a-10-second"]


async def test_replace_keeps_only_the_latest_version_at_its_own_time(
        producer: TestProducer, clock: Clock) -> None:
    await producer.publish(topic="t", message="v1", delay_seconds=100, message_id="r")
    clock.now += 5
    await producer.publish(topic="t", message="v2-earlier", delay_seconds=20, message_id="r")
    await producer.publish(topic="t", message="v1", delay_seconds=100, message_id="s")
    clock.now += 5
    await producer.publish(topic="t", message="v2-later", delay_seconds=200, message_id="s")
    assert values(producer.delivered(at=T0 + 30)) == ["v2-earlier"]
    assert values(producer.delivered(at=T0 + 1000)) == ["v2-earlier", "v2-later"]
    assert len(producer.published) == 4  # every publish was accepted


async def test_a_replacement_after_delivery_is_not_delivered_again(
        producer: TestProducer, clock: Clock) -> None:
    await producer.publish(topic="t", message="first", delay_seconds=10, message_id="once")
    clock.now += 11  # "first" was delivered at T0 + 10
    await producer.publish(topic="t", message="again", delay_seconds=10, message_id="once")
    assert values(producer.delivered(at=T0 + 100)) == ["first"]


async def test_cancel_before_the_due_time_wins_after_it_changes_nothing(
        producer: TestProducer, clock: Clock) -> None:
    await producer.publish(topic="t", message="cancelled", delay_seconds=30, message_id="c1")
    await producer.publish(topic="t", message="too-late", delay_seconds=10, message_id="c2")
    await producer.publish(topic="t", message="restored", delay_seconds=50, message_id="c3")
    clock.now += 20
    assert await producer.cancel(message_id="c1") is CancelOutcome.RECORDED
    assert await producer.cancel(message_id="c2") is CancelOutcome.RECORDED  # delivered at +10
    assert await producer.cancel(message_id="c3") is CancelOutcome.RECORDED
    clock.now += 1
    await producer.publish(topic="t", message="restored", delay_seconds=5, message_id="c3")
    await producer.cancel(message_id="never-published")
    assert producer.cancelled == ["c1", "c2", "c3", "never-published"]
    assert values(producer.delivered(at=T0 + 1000)) == ["too-late", "restored"]


async def test_ids_athomic_chose_and_direct_publishes_are_not_cancelled(
        producer: TestProducer) -> None:
    await producer.publish(topic="t", message="auto-id", delay_seconds=10)
    await producer.publish(topic="t", message="direct", message_id="d")
    for m in producer.published:
        await producer.cancel(message_id=m.message_id)
    assert values(producer.delivered(at=T0 + 100)) == ["direct", "auto-id"]


async def test_a_batch_keeps_its_order_and_priorities(producer: TestProducer) -> None:
    outcomes = await producer.publish_batch(
        [{"message": i, "priority": "high" if i % 3 == 0 else "normal",
          **({"delay_seconds": 5} if i % 4 == 0 else {})} for i in range(12)], topic="t")
    assert outcomes == [PublishingOutcome.SUCCESS_DELAYED if i % 4 == 0
                        else PublishingOutcome.SUCCESS_DIRECT for i in range(12)]
    assert values(producer.published) == list(range(12))
    assert [m.priority for m in producer.published] == [
        MessagePriority.HIGH if i % 3 == 0 else MessagePriority.NORMAL for i in range(12)]
    assert [m.headers["athomic-priority"] for m in producer.published][:2] == [b"high",
                                                                              b"normal"]


async def test_priority_topics_name_the_physical_topic() -> None:
    with TestProducer(MessagingSettings(priority_topics=True)) as p:
        await p.publish(topic="alerts", message=1, priority=MessagePriority.HIGH)
        await p.publish(topic="alerts", message=2, priority=MessagePriority.LOW)
        await p.publish(topic="alerts", message=3)
    assert [m.topic for m in p.delivered()] == ["alerts.high", "alerts.low", "alerts"]
    assert values(p.delivered(topic="alerts.high")) == [1]


async def test_concurrent_publishes_are_all_recorded(producer: TestProducer) -> None:
    await asyncio.gather(*(producer.publish(topic="t", message=i, key=f"k{i % 3}")
                           for i in range(200)))
    assert sorted(values(producer.published)) == list(range(200))
    assert len({m.message_id for m in producer.published}) == 200


def test_clear_close_and_pickling(clock: Clock) -> None:
    p = TestProducer(MessagingSettings(), clock=clock)
    asyncio.run(p.publish(topic="t", message=1))
    assert len(p.published) == 1
    p.clear()
    assert p.published == [] and p.delivered() == []
    with pytest.raises(TypeError, match="cannot be sent to Ray tasks"):
        pickle.dumps(p)
    p.close()
    p.close()  # idempotent
    with pytest.raises(ProducerClosedError):
        asyncio.run(p.publish(topic="t", message=2))
    assert p.published == []


def test_delivered_refuses_a_naive_time(producer: TestProducer) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        producer.delivered(at=dt.datetime(2030, 1, 1))


def test_the_pytest_plugin_gives_a_fresh_producer_per_test(tmp_path: Path) -> None:
    (tmp_path / "test_app.py").write_text(textwrap.dedent("""
        import asyncio

        import pytest

        from athomic import MessagingSettings
        from athomic.testing import TestProducer


        def signup(producer, email):
            asyncio.run(producer.publish(topic="users.v1", message={"email": email},
                                         key=email, delay_seconds=60))


        def test_one(athomic_producer):
            assert isinstance(athomic_producer, TestProducer)
            signup(athomic_producer, "a@b.c")
            assert athomic_producer.delivered() == []
            (event,) = athomic_producer.published
            assert event.value == {"email": "a@b.c"}
            assert [m.value for m in athomic_producer.delivered(at=event.deliver_at)] == [
                {"email": "a@b.c"}]


        def test_two_starts_empty(athomic_producer):
            assert athomic_producer.published == []


        class TestOwnSettings:
            @pytest.fixture
            def athomic_settings(self):
                return MessagingSettings(connection_name="mine")

            def test_overridden(self, athomic_producer):
                assert athomic_producer.connection_name == "mine"
                with pytest.raises(NotImplementedError):
                    signup(athomic_producer, "x@y.z")
        """))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "athomic._pytest_plugin", "-q",
         "-p", "no:cacheprovider", "-W", "error", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout
