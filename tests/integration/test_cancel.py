"""Cancel and replace delayed messages by message id, end to end: real Kafka, real Ray, a
read_committed consumer checking what arrived."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

import pytest
import ray
from helpers import read_timed

from athomic import CancelOutcome, MessagePriority, ProducerFactory, PublishingOutcome
from athomic.actors.topology import NAMESPACE, delay_actor_name

pytestmark = pytest.mark.integration


@pytest.fixture
def delay_topics() -> dict[float, str]:
    tag = uuid.uuid4().hex[:8]
    return {1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s", 4: f"delay.{tag}.4s"}


def mid(record: Any) -> str:
    return dict(record.headers)["message-id"].decode()


def buckets(settings: Any) -> list[Any]:
    return [ray.get_actor(delay_actor_name(settings.connection_name, t, 0),
                          namespace=NAMESPACE) for t in settings.delay_topics.values()]


async def test_cancel_before_the_due_time_means_never_delivered(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    for name, prio in [("keep", MessagePriority.NORMAL), ("cancel-me", MessagePriority.HIGH),
                       ("cancel-async", MessagePriority.LOW)]:
        assert ray.get(handle.publish.remote(topic=topic, message={"id": name}, key=name,
                                             delay_seconds=2.5, message_id=name,
                                             priority=prio)) is \
            PublishingOutcome.SUCCESS_DELAYED
    assert ray.get(handle.cancel.remote(message_id="cancel-me")) is CancelOutcome.RECORDED
    assert await handle.cancel(message_id="cancel-async") is CancelOutcome.RECORDED
    assert ray.get(handle.cancel.remote(message_id="never-published")) is \
        CancelOutcome.RECORDED  # not an error
    received = await read_timed(kafka_bootstrap, topic, 1, timeout=30, extra_wait=3.0)
    assert [mid(r) for r, _ in received] == ["keep"]


async def test_a_cancel_racing_the_due_time_is_never_both_before_it_and_ignored(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    """Cancels sent from a few ms before to a few ms after each message's due time: a
    cancel acknowledged before the due time always wins."""
    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    rnd = random.Random(4)
    runs = 40
    due: dict[str, float] = {}
    for i in range(runs):
        name = f"race-{i}"
        due[name] = time.time() + 1.2 + i * 0.15
        ray.get(handle.publish.remote(topic=topic, message={"i": i}, key=f"k{i}",
                                      deliver_at=due[name], message_id=name))
    acked: dict[str, float] = {}
    for name in sorted(due, key=due.__getitem__):
        target = due[name] + rnd.uniform(-0.04, 0.02)
        await asyncio.sleep(max(target - time.time(), 0))
        ray.get(handle.cancel.remote(message_id=name))
        acked[name] = time.time()
    received = await read_timed(kafka_bootstrap, topic, runs, timeout=20, extra_wait=3.0)
    delivered = {mid(r) for r, _ in received}
    before = {n for n in due if acked[n] < due[n]}
    assert before, "some cancels were acknowledged before their due time"
    assert not before & delivered, "a cancel acknowledged before the due time lost"
    assert len(received) == len(delivered)  # once each at most
    assert delivered <= set(due) - before


async def test_replace_earlier_later_and_with_a_new_payload(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    start = time.time()
    plans = {"earlier": (6.0, 2.0), "later": (1.5, 5.0), "payload": (3.0, 3.0)}
    for name, (first, _) in plans.items():
        ray.get(handle.publish.remote(topic=topic, message={"v": "old"}, key=name,
                                      deliver_at=start + first, message_id=name))
    for name, (_, second) in plans.items():
        ray.get(handle.publish.remote(topic=topic, message={"v": "new"}, key=name,
                                      deliver_at=start + second, message_id=name))
    received = await read_timed(kafka_bootstrap, topic, 3, timeout=30,
                                extra_wait=max(start + 7.5 - time.time(), 0))
    assert sorted(mid(r) for r, _ in received) == sorted(plans)
    for record, at in received:
        assert json.loads(record.value) == {"v": "new"}
        due_ms = (start + plans[mid(record)][1]) * 1000
        assert int(dict(record.headers)["athomic-deliver-at"]) == pytest.approx(due_ms,
                                                                               abs=2)
        assert at * 1000 >= due_ms and record.timestamp >= due_ms


async def test_a_cancel_holds_when_every_bucket_actor_is_killed(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    items = [{"message": {"n": n}, "key": n, "delay_seconds": 4.0, "message_id": n}
             for n in ("gone", "kept")]
    ray.get(handle.publish_batch.remote(items, topic=topic))
    ray.get(handle.cancel.remote(message_id="gone"))
    for actor in buckets(settings):
        ray.kill(actor, no_restart=False)  # Ray restarts them; they read the ids again
    received = await read_timed(kafka_bootstrap, topic, 1, timeout=40, extra_wait=4.0)
    assert [mid(r) for r, _ in received] == ["kept"]


@ray.remote
def cancel_in_a_task(handle: Any, names: list[str]) -> int:
    refs = [handle.cancel.remote(message_id=n) for n in names]  # all in flight at once
    return sum(outcome is CancelOutcome.RECORDED for outcome in ray.get(refs))


@pytest.mark.timeout(300)
async def test_ten_thousand_pending_every_other_one_cancelled(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    n = 10_000
    due = time.time() + 25.0
    names = [f"m-{i:05d}" for i in range(n)]
    for lo in range(0, n, 1000):
        items = [{"message": {"i": i}, "key": f"k{i % 97}", "deliver_at": due + i / 2000,
                  "message_id": names[i]} for i in range(lo, lo + 1000)]
        ray.get(handle.publish_batch.remote(items, topic=topic))
    cancelled = names[1::2]
    counts = ray.get([cancel_in_a_task.remote(handle, cancelled[k::4]) for k in range(4)])
    assert sum(counts) == n // 2 and time.time() < due, "cancelled before the due time"
    received = await read_timed(kafka_bootstrap, topic, n // 2, timeout=120,
                                extra_wait=5.0)
    got = [mid(r) for r, _ in received]
    assert len(got) == len(set(got)) == n // 2
    assert set(got) == set(names[0::2])
