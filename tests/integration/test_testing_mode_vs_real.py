"""The test mode tells the truth: one scenario (direct, delayed, replaced and cancelled
messages) through ``TestProducer`` and through the real system (Kafka, Ray, the actors and
the republisher) gives the same records: topic, key, decoded value, headers, and the order
of each key. Errors surface in the same place (at the call, or from ``ray.get``)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
import ray
from helpers import read_timed

from athomic import (
    CancelOutcome,
    InvalidDelayError,
    InvalidTopicError,
    MessagePriority,
    ProducerFactory,
    PublishingOutcome,
    RecordTooLargeError,
    SerializationError,
    decode_record,
)
from athomic.testing import TestProducer

pytestmark = pytest.mark.integration

Row = tuple[str, bytes | None, Any, tuple[tuple[str, bytes], ...]]

# Headers whose values differ between two runs of the same scenario (ids athomic chose,
# times); their names are still compared.
VOLATILE = {"athomic-published-at", "athomic-deliver-at", "athomic-ray-task-id"}


def scenario(p: Any, topic: str) -> list[Any]:
    """Publish the scenario through ``p`` (a real handle or a TestProducer) with
    ``.remote()`` and ``ray.get``; returns the outcomes."""
    out = list(ray.get(p.publish_batch.remote(
        [{"message": {"n": i, "key": k}, "key": k, "headers": {"x-n": str(i)}}
         for i, k in enumerate(["a", "b", "c", "a", "b", "c"])]
        + [{"message": "alert", "key": "h", "priority": MessagePriority.HIGH}],
        topic=topic)))
    now = dt.datetime.now(dt.timezone.utc)
    out.append(ray.get(p.publish.remote(topic=topic, message={"late": "a"}, key="a",
                                        delay_seconds=1.5, headers={"x-kind": "delayed"})))
    out.append(ray.get(p.publish.remote(topic=topic, message={"late": "b"}, key="b",
                                        deliver_at=now + dt.timedelta(seconds=2.0))))
    out.append(ray.get(p.publish.remote(topic=topic, message=b"\x00late-c", key="c",
                                        delay_seconds=2.5, priority="high")))
    out.append(ray.get(p.publish.remote(topic=topic, message="a-last", key="a")))
    # replaced: earlier, and later, with new payloads
    out.append(ray.get(p.publish.remote(topic=topic, message="d-v1", key="d",
                                        delay_seconds=3.0, message_id="r-early")))
    out.append(ray.get(p.publish.remote(topic=topic, message="d-v2", key="d",
                                        delay_seconds=1.2, message_id="r-early",
                                        headers={"x-version": "2"})))
    out.append(ray.get(p.publish.remote(topic=topic, message="e-v1", key="e",
                                        delay_seconds=1.0, message_id="r-late")))
    out.append(ray.get(p.publish.remote(topic=topic, message="e-v2", key="e",
                                        delay_seconds=2.8, message_id="r-late")))
    # cancelled; and a direct message with the same key
    out.append(ray.get(p.publish.remote(topic=topic, message="f-cancelled", key="f",
                                        delay_seconds=2.0, message_id="c-1")))
    out.append(ray.get(p.cancel.remote(message_id="c-1")))
    out.append(ray.get(p.publish.remote(topic=topic, message="f-direct", key="f")))
    return out


def row(topic: str, key: bytes | None, value: Any, headers: Any) -> Row:
    pairs = tuple((k, b"" if k in VOLATILE or (k == "message-id" and len(v) == 36) else v)
                  for k, v in headers)  # ids athomic chose (UUIDv7) differ; callers' do not
    return topic, key, value, pairs


def by_key(rows: list[Row]) -> dict[bytes | None, list[Any]]:
    out: dict[bytes | None, list[Any]] = defaultdict(list)
    for topic, key, value, _ in rows:
        out[key].append((topic, value))
    return dict(out)


async def test_the_same_scenario_gives_the_same_records(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = settings_factory(delay_topics={1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s"})
    real = ProducerFactory.create(settings)
    expected_outcomes = ([PublishingOutcome.SUCCESS_DIRECT] * 7
                         + [PublishingOutcome.SUCCESS_DELAYED] * 3
                         + [PublishingOutcome.SUCCESS_DIRECT]
                         + [PublishingOutcome.SUCCESS_DELAYED] * 5
                         + [CancelOutcome.RECORDED, PublishingOutcome.SUCCESS_DIRECT])

    start = time.time()
    assert scenario(real, topic) == expected_outcomes
    # everything due (the latest original due time is 3 s), then 2 s more for anything
    # cancelled or replaced that would wrongly arrive
    received = await read_timed(kafka_bootstrap, topic, 14, timeout=60, extra_wait=2.0)
    assert time.time() - start > 3.0
    real_rows = [row(r.topic, r.key, decode_record(r, settings), r.headers)
                 for r, _ in received]

    with TestProducer(settings) as test:
        assert scenario(test, topic) == expected_outcomes
        test_rows = [row(m.topic, m.key, m.value, m.headers.to_kafka())
                     for m in test.delivered(at=time.time() + 60)]
        assert len(test.published) == 17  # every publish, replaced and cancelled included

    assert len(real_rows) == len(test_rows) == 14
    assert sorted(real_rows, key=repr) == sorted(test_rows, key=repr)
    assert by_key(real_rows) == by_key(test_rows)
    assert by_key(test_rows)[b"a"] == [
        (topic, {"n": 0, "key": "a"}), (topic, {"n": 3, "key": "a"}), (topic, "a-last"),
        (topic, {"late": "a"})]
    assert by_key(test_rows)[b"d"] == [(topic, "d-v2")]
    assert by_key(test_rows)[b"e"] == [(topic, "e-v2")]
    assert by_key(test_rows)[b"f"] == [(topic, "f-direct")]
    ids = {dict(h)["message-id"] for _, _, _, h in test_rows}
    assert {b"r-early", b"r-late"} <= ids and b"c-1" not in ids


def outcome_of(call: Any, producer: Any) -> tuple[str, str]:
    """Where ``call(producer)`` failed ("call": at .remote(), "get": from ray.get) and with
    what."""
    try:
        ref = call(producer)
    except Exception as exc:
        return "call", type(exc).__name__
    try:
        return "ok", str(ray.get(ref))
    except Exception as exc:
        causes = [c.__name__ for c in type(exc).__mro__
                  if c.__module__.startswith("athomic") or c is NotImplementedError]
        return "get", causes[0] if causes else type(exc).__name__


def test_errors_surface_in_the_same_place(settings_factory: Any, topic: str) -> None:
    settings = settings_factory(producer={"max_request_size": 4096})
    real = ProducerFactory.create(settings)
    calls = {
        "fine": lambda p: p.publish.remote(topic=topic, message={"ok": 1}),
        "too large": lambda p: p.publish.remote(topic=topic, message="x" * 5000),
        "bad topic": lambda p: p.publish.remote(topic="no spaces", message=1),
        "negative delay": lambda p: p.publish.remote(topic=topic, message=1,
                                                     delay_seconds=-3),
        "no delay topics": lambda p: p.publish.remote(topic=topic, message=1,
                                                      delay_seconds=3),
        "unserialisable": lambda p: p.publish.remote(topic=topic, message={1, 2}),
        "cancel": lambda p: p.cancel.remote(message_id="m-1"),
        "batch too large": lambda p: p.publish_batch.remote(
            [{"message": 1}, {"message": "y" * 5000}], topic=topic),
    }
    with TestProducer(settings) as test:
        seen = {name: (outcome_of(call, real), outcome_of(call, test))
                for name, call in calls.items()}
    for name, (on_real, on_test) in seen.items():
        assert on_real == on_test, name
    assert seen["too large"][1] == ("get", RecordTooLargeError.__name__)
    assert seen["bad topic"][1] == ("call", InvalidTopicError.__name__)
    assert seen["negative delay"][1] == ("call", InvalidDelayError.__name__)
    assert seen["no delay topics"][1] == ("call", "NotImplementedError")
    assert seen["unserialisable"][1] == ("call", SerializationError.__name__)
    assert seen["fine"][1] == ("ok", str(PublishingOutcome.SUCCESS_DIRECT))
