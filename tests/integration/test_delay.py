"""Delayed delivery end to end: real Kafka, real Ray, timing read by an independent consumer.

Buckets of 1, 2 and 4 seconds make every delay above 1 s cascade through several delay
topics, so these tests exercise the whole republish path in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import random
import time
import uuid
from typing import Any

import pytest
import ray
from helpers import create_topics, produce_raw, read_records, read_timed

from athomic import (
    ConfigurationError,
    MessagePriority,
    ProducerFactory,
    PublishingOutcome,
    decode_message,
    decode_record,
)
from athomic.actors.delay_bucket import DelayBucketActor
from athomic.actors.topology import NAMESPACE, delay_actor_name

pytestmark = pytest.mark.integration


@pytest.fixture
def delay_topics() -> dict[float, str]:
    tag = uuid.uuid4().hex[:8]
    return {1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s", 4: f"delay.{tag}.4s"}


@pytest.fixture
def dlq_topic() -> str:
    return f"dlq.{uuid.uuid4().hex[:8]}"


def bucket_actor(settings: Any, topic: str, replica: int = 0) -> Any:
    """The running DelayBucketActor of a delay topic."""
    return ray.get_actor(delay_actor_name(settings.connection_name, topic, replica),
                         namespace=NAMESPACE)


def h(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


def due_ms(record: Any) -> int:
    return int(h(record)["athomic-deliver-at"])


def assert_never_early(received: list[tuple[Any, float]]) -> list[float]:
    """Every record arrived (and was stamped) at or after its due time; returns lateness."""
    lateness = []
    for record, at in received:
        assert record.timestamp >= due_ms(record), "stamped before its due time"
        assert at * 1000 >= due_ms(record), "received before its due time"
        lateness.append(at - due_ms(record) / 1000)
    return lateness


async def test_mixed_delays_cascade_once_each_never_early(
        settings_factory: Any, delay_topics: dict[float, str], dlq_topic: str,
        kafka_bootstrap: str, topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"dead_letter_topic": dlq_topic})
    handle = ProducerFactory.create(settings)
    rnd = random.Random(7)
    delays = [round(rnd.uniform(0.5, 12.0), 3) for _ in range(150)]
    before = time.time()
    items = [{"message": {"i": i, "delay": d}, "key": f"user-{i % 11}", "delay_seconds": d,
              "headers": {"x-origin": f"o{i}"}} for i, d in enumerate(delays)]
    outcomes = ray.get(handle.publish_batch.remote(items, topic=topic))
    after = time.time()
    assert outcomes == [PublishingOutcome.SUCCESS_DELAYED] * 150
    # the same message published directly, to compare the final records with
    direct_topic = topic + ".direct"
    ray.get(handle.publish.remote(topic=direct_topic, message={"i": 0, "delay": delays[0]},
                                  key="user-0", headers={"x-origin": "o0"}))

    received = await read_timed(kafka_bootstrap, topic, 150, timeout=60, extra_wait=2.0)
    ids = [h(r)["message-id"] for r, _ in received]
    assert len(received) == 150 and len(set(ids)) == 150  # all delivered, once
    lateness = assert_never_early(received)
    assert max(lateness) < 2.0, max(lateness)
    by_i = {json.loads(r.value)["i"]: r for r, _ in received}
    assert sorted(by_i) == list(range(150))
    hops = set()
    for i, record in by_i.items():
        d = delays[i]
        assert (before + d) * 1000 - 1 <= due_ms(record) <= (after + d) * 1000 + 1
        assert record.key == f"user-{i % 11}".encode()
        assert h(record)["x-origin"] == f"o{i}".encode()
        hops.add(int(h(record)["athomic-hop"]))
    assert hops >= {1, 2, 3}  # short delays stay in one bucket, long ones cascade

    (direct,) = await read_records(kafka_bootstrap, direct_topic, 1)
    delayed = by_i[0]
    assert delayed.value == direct.value
    skip = {"message-id", "athomic-deliver-at", "athomic-hop", "athomic-ray-task-id",
            "athomic-published-at"}
    assert {k: v for k, v in h(delayed).items() if k not in skip} == \
        {k: v for k, v in h(direct).items() if k not in skip}


async def test_deliver_at_datetime_and_past(settings_factory: Any,
                                            delay_topics: dict[float, str],
                                            kafka_bootstrap: str, topic: str) -> None:
    handle = ProducerFactory.create(settings_factory(delay_topics=delay_topics))
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2.5)
    assert ray.get(handle.publish.remote(topic=topic, message="later", deliver_at=when)) \
        is PublishingOutcome.SUCCESS_DELAYED
    start = time.time()
    assert ray.get(handle.publish.remote(topic=topic, message="now",
                                         deliver_at=start - 3600)) \
        is PublishingOutcome.SUCCESS_DIRECT
    received = await read_timed(kafka_bootstrap, topic, 2, timeout=30)
    (first, first_at), (second, _) = received
    assert first.value == b"now" and "athomic-deliver-at" not in h(first)
    assert first_at - start < 2.0
    assert second.value == b"later"
    assert due_ms(second) == pytest.approx(when.timestamp() * 1000, abs=1)
    assert_never_early([received[1]])


async def test_same_key_same_delay_keeps_publish_order(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    handle = ProducerFactory.create(settings_factory(delay_topics=delay_topics))
    for i in range(30):  # one at a time
        ray.get(handle.publish.remote(topic=topic, message={"n": i}, key="same",
                                      delay_seconds=4.0))
    items = [{"message": {"n": i}, "key": "same", "delay_seconds": 2.0}
             for i in range(30, 80)]
    ray.get(handle.publish_batch.remote(items, topic=topic))
    received = await read_timed(kafka_bootstrap, topic, 80, timeout=40)
    order = [json.loads(r.value)["n"] for r, _ in sorted(received, key=lambda x:
                                                          x[0].offset)]
    assert len({r.partition for r, _ in received}) == 1
    assert [n for n in order if n < 30] == list(range(30))
    assert [n for n in order if n >= 30] == list(range(30, 80))


async def test_killed_bucket_actors_lose_nothing_and_duplicate_nothing(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    rnd = random.Random(3)
    expected = 0
    for wave in range(6):
        items = [{"message": {"w": wave, "i": i}, "key": f"k{i}",
                  "delay_seconds": rnd.uniform(0.5, 6.0)} for i in range(50)]
        ray.get(handle.publish_batch.remote(items, topic=topic))
        expected += 50
        if wave in (2, 4):  # mid-stream: kill the actors of the 1 s and 2 s buckets
            for bucket in (1, 2):
                ray.kill(bucket_actor(settings, delay_topics[bucket]), no_restart=False)
        await asyncio.sleep(0.7)
    received = await read_timed(kafka_bootstrap, topic, expected, timeout=90,
                                extra_wait=3.0)
    ids = [h(r)["message-id"] for r, _ in received]
    assert len(set(ids)) == expected, "lost messages"
    assert len(ids) == expected, "duplicates visible to a read_committed consumer"
    assert_never_early(received)
    stats = ray.get(bucket_actor(settings, delay_topics[1]).stats.remote())
    assert stats["running"]


async def test_two_replicas_share_partitions(settings_factory: Any,
                                             delay_topics: dict[float, str],
                                             kafka_bootstrap: str, topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"replicas": 2, "partitions": 4})
    handle = ProducerFactory.create(settings)
    items = [{"message": {"i": i}, "key": f"key-{i}", "delay_seconds": 1.5}
             for i in range(200)]
    ray.get(handle.publish_batch.remote(items, topic=topic))
    received = await read_timed(kafka_bootstrap, topic, 200, timeout=30, extra_wait=1.0)
    assert len(received) == 200
    assert len({h(r)["message-id"] for r, _ in received}) == 200
    assert_never_early(received)
    stats = [ray.get(bucket_actor(settings, delay_topics[1], i).stats.remote())
             for i in (0, 1)]
    assert [s["partitions"] for s in stats] == [[0, 2], [1, 3]]
    assert all(s["republished"]["final"] > 0 for s in stats)
    assert sum(s["republished"]["final"] for s in stats) == 200


async def test_malformed_envelope_goes_to_dead_letter_and_partition_moves_on(
        settings_factory: Any, kafka_bootstrap: str, topic: str, dlq_topic: str) -> None:
    tag = uuid.uuid4().hex[:8]
    delay_topics = {1: f"delay.{tag}.1s"}
    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"dead_letter_topic": dlq_topic,
                                             "partitions": 1})
    handle = ProducerFactory.create(settings)
    await produce_raw(kafka_bootstrap, delay_topics[1], b"not an envelope", key=b"bad",
                      headers=[("h", b"1")])
    ray.get(handle.publish.remote(topic=topic, message={"after": True}, delay_seconds=0.5))
    (dead,) = await read_records(kafka_bootstrap, dlq_topic, 1, timeout=30)
    assert dead.value == b"not an envelope" and dead.key == b"bad"
    assert h(dead)["h"] == b"1"
    assert b"magic" in h(dead)["athomic-error"] or b"short" in h(dead)["athomic-error"]
    assert h(dead)["athomic-error-source"] == f"{delay_topics[1]}/0/0".encode()
    (good,) = await read_records(kafka_bootstrap, topic, 1, timeout=30)
    assert json.loads(good.value) == {"after": True}


async def test_too_short_retention_is_refused(settings_factory: Any,
                                              kafka_bootstrap: str) -> None:
    tag = uuid.uuid4().hex[:8]
    short = f"delay.{tag}.10s"
    await create_topics(kafka_bootstrap, short, config={"retention.ms": "60000"})
    with pytest.raises(ConfigurationError, match="retention"):
        ProducerFactory.create(settings_factory(delay_topics={10: short}))


async def test_encrypted_delayed_message_stays_bound_to_its_final_topic(
        settings_factory: Any, kafka_bootstrap: str, topic: str, dlq_topic: str) -> None:
    tag = uuid.uuid4().hex[:8]
    delay_topics = {1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s"}
    key = base64.b64encode(os.urandom(32)).decode()
    settings = settings_factory(
        delay_topics=delay_topics, republisher={"dead_letter_topic": dlq_topic,
                                                "partitions": 1},
        pipeline=[{"stage": "serialize"}, {"stage": "compress", "min_size": 0},
                  {"stage": "encrypt", "keys": {"k1": key}, "primary": "k1"}])
    handle = ProducerFactory.create(settings)
    secret = {"card": "4111-1111", "pad": "x" * 300}
    ray.get(handle.publish.remote(topic=topic, message=secret, key="c1", delay_seconds=2.5))
    (record,) = await read_records(kafka_bootstrap, topic, 1, timeout=30)
    assert b"4111" not in record.value
    assert decode_record(record, settings) == secret
    assert decode_message(record.value, record.headers, settings) == secret
    # the envelope in the delay topic is authenticated: a tampered one is dead-lettered
    (waiting,) = await read_records(kafka_bootstrap, delay_topics[2], 1)
    tampered = bytearray(waiting.value)
    tampered[20] ^= 0xFF  # inside the due time
    await produce_raw(kafka_bootstrap, delay_topics[1], bytes(tampered), key=b"c1")
    (dead,) = await read_records(kafka_bootstrap, dlq_topic, 1, timeout=30)
    assert b"authentication failed" in h(dead)["athomic-error"]


async def test_standalone_backlog_goes_high_first(settings_factory: Any,
                                                  delay_topics: dict[float, str],
                                                  kafka_bootstrap: str, topic: str) -> None:
    # The republisher is off: a backlog builds up, then a standalone one starts.
    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"enabled": False, "partitions": 1})
    await create_topics(kafka_bootstrap, *delay_topics.values())
    await create_topics(kafka_bootstrap, topic)
    handle = ProducerFactory.create(settings)
    due = time.time() + 1.2
    items = [{"message": {"i": i}, "key": f"k{i}", "deliver_at": due,
              "priority": MessagePriority.HIGH if i % 20 == 0 else MessagePriority.NORMAL}
             for i in range(200)]
    ray.get(handle.publish_batch.remote(items, topic=topic))
    await asyncio.sleep(max(due - time.time(), 0) + 0.5)
    worker = DelayBucketActor(settings, delay_topics[1], autostart=False)
    task = asyncio.create_task(worker.run_forever())
    try:
        received = await read_timed(kafka_bootstrap, topic, 200, timeout=30)
    finally:
        worker.republisher.stop()
        await task
    order = [json.loads(r.value)["i"] for r, _ in sorted(received, key=lambda x:
                                                          x[0].offset)]
    assert len(order) == 200
    assert sorted(order[:10]) == list(range(0, 200, 20))  # the 10 HIGH ones first
    assert_never_early(received)


async def test_held_messages_are_bounded(settings_factory: Any,
                                         delay_topics: dict[float, str],
                                         kafka_bootstrap: str, topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"max_held": 100, "partitions": 1})
    handle = ProducerFactory.create(settings)
    actor = bucket_actor(settings, delay_topics[1])
    items = [{"message": {"i": i}, "delay_seconds": 1.0 + i / 1000} for i in range(1500)]
    ray.get(handle.publish_batch.remote(items, topic=topic))
    peak = 0
    reader = asyncio.create_task(read_timed(kafka_bootstrap, topic, 1500, timeout=60))
    while not reader.done():
        peak = max(peak, ray.get(actor.stats.remote())["held"])
        await asyncio.sleep(0.02)
    received = reader.result()
    assert len({h(r)["message-id"] for r, _ in received}) == 1500
    assert_never_early(received)
    assert 0 < peak <= 100


async def test_cli_republisher_run_and_status(settings_factory: Any,
                                              delay_topics: dict[float, str],
                                              kafka_bootstrap: str, topic: str,
                                              tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"enabled": False, "partitions": 2})
    config = tmp_path / "athomic.toml"
    config.write_text(
        f'connection_name = "{settings.connection_name}"\n'
        f'bootstrap_servers = "{kafka_bootstrap}"\n'
        "[republisher]\npartitions = 2\n[delay_topics]\n"
        + "".join(f'{int(b)} = "{t}"\n' for b, t in delay_topics.items()))
    cli = [sys.executable, "-m", "athomic._cli", "republisher"]
    runner = subprocess.Popen([*cli, "run", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await create_topics(kafka_bootstrap, *delay_topics.values(), partitions=2)
        handle = ProducerFactory.create(settings)
        items = [{"message": {"i": i}, "key": f"k{i}", "delay_seconds": 1.0 + i / 10}
                 for i in range(30)]
        ray.get(handle.publish_batch.remote(items, topic=topic))
        received = await read_timed(kafka_bootstrap, topic, 30, timeout=60)
        assert len({h(r)["message-id"] for r, _ in received}) == 30
        assert_never_early(received)
        await asyncio.sleep(0.5)
        status = subprocess.run([*cli, "status", "--config", str(config), "--json"],
                                capture_output=True, text=True, timeout=60, check=True)
        rows = json.loads(status.stdout)["partitions"]
        assert {(r["topic"], r["partition"]) for r in rows} == {
            (t, p) for t in delay_topics.values() for p in (0, 1)}
        assert sum(r["end"] for r in rows) >= 30 and all(r["lag"] == 0 for r in rows)
    finally:
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err[-2000:]
    assert "republishing" in out


async def test_a_publish_retried_by_ray_or_by_its_caller_is_delivered_once(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    from athomic.actors.topology import producer_actor_name

    settings = settings_factory(delay_topics=delay_topics)
    handle = ProducerFactory.create(settings)
    actor = ray.get_actor(producer_actor_name(settings.connection_name, "normal", 0),
                          namespace=NAMESPACE)
    # Ray retries a call whose actor died: the same request, sent twice
    request = handle._request({"n": 1}, topic, "k1", None, 1.5)
    assert ray.get([actor.publish.remote(request), actor.publish.remote(request)]) == \
        [PublishingOutcome.SUCCESS_DELAYED] * 2
    # ... or after the due time: it goes to the release bucket, once more
    await asyncio.sleep(2.5)
    assert ray.get(actor.publish.remote(request)) is PublishingOutcome.SUCCESS_DELAYED
    # a caller retries with the id it chose, before and after the first one is due
    for _ in range(2):
        ray.get(handle.publish.remote(topic=topic, message={"n": 2}, key="k2",
                                      delay_seconds=1.5, message_id="order-42-reminder"))
    received = await read_timed(kafka_bootstrap, topic, 2, timeout=30, extra_wait=3.0)
    assert sorted(h(r)["message-id"] for r, _ in received) == sorted(
        [request.message_id.encode(), b"order-42-reminder"])
    assert_never_early(received)
    stats = [ray.get(bucket_actor(settings, t).stats.remote())
             for t in delay_topics.values()]
    # the Ray retry's second copy, its late third one, and the caller's first version
    # (replaced by the second before it was due)
    dropped = sum(s["republished"]["duplicate"] + s["republished"]["replaced"]
                  for s in stats)
    assert dropped >= 3


@pytest.mark.timeout(300)
async def test_replicas_2_3_1_during_traffic_on_the_real_broker(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    """The layout changes while messages flow: each owner of a partition fences the one
    before; a read_committed consumer gets every message once."""
    tag = uuid.uuid4().hex[:8]
    delay_topics = {1: f"delay.{tag}.1s"}
    settings = settings_factory(delay_topics=delay_topics,
                                republisher={"enabled": False, "partitions": 6,
                                             "partition_refresh_s": 1.0})
    await create_topics(kafka_bootstrap, topic, partitions=3)
    handle = ProducerFactory.create(settings)
    sent = 0

    async def traffic(seconds: float) -> None:
        nonlocal sent
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            items = [{"message": {"i": sent + i}, "key": f"k{i % 17}",
                      "delay_seconds": 0.3 + (i % 5) * 0.2} for i in range(40)]
            ray.get(handle.publish_batch.remote(items, topic=topic))
            sent += 40
            await asyncio.sleep(0.2)

    def layout(replicas: int, generation: int) -> list[DelayBucketActor]:
        return [DelayBucketActor(settings, delay_topics[1], r, replicas,
                                 generation=generation, autostart=False)
                for r in range(replicas)]

    async def start(workers: list[DelayBucketActor]) -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(w.run_forever()) for w in workers]
        for w in workers:
            await w.ready(60)
        return tasks

    async def stop(workers: list[DelayBucketActor], tasks: list[asyncio.Task[None]]
                   ) -> None:
        for w in workers:
            w.republisher.stop()
        await asyncio.gather(*tasks)

    two = layout(2, 1)
    two_tasks = await start(two)
    await traffic(3)
    three = layout(3, 2)
    three_tasks = await start(three)
    await traffic(3)
    await stop(two, two_tasks)
    await traffic(2)
    one = layout(1, 3)
    one_tasks = await start(one)
    await traffic(3)
    await stop(three, three_tasks)
    await traffic(2)
    received = await read_timed(kafka_bootstrap, topic, sent, timeout=90, extra_wait=3.0)
    await stop(one, one_tasks)
    ids = [h(r)["message-id"] for r, _ in received]
    assert len(set(ids)) == sent, "lost messages"
    assert len(ids) == sent, "duplicates for a read_committed consumer"
    assert_never_early(received)


async def test_a_drained_backlog_sets_off_no_full_collection_in_the_bucket_actor(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    """A bucket actor holds what it reads until due, and a full collection walks all of
    it: its process collects the oldest generation seldom (draining 30,000 due messages
    set off 7 full collections with Python's defaults). 20,000 messages due at once go
    through with none, each delivered once, none early."""
    tag = uuid.uuid4().hex[:8]
    settings = settings_factory(delay_topics={1: f"delay.{tag}.1s"},
                                republisher={"partitions": 1})
    handle = ProducerFactory.create(settings)
    actor = bucket_actor(settings, f"delay.{tag}.1s")
    before = ray.get(actor.stats.remote())
    assert before["gc_threshold"][2] >= 100 and before["gc_frozen"] > 10_000, before
    n = 20_000
    due = time.time() + 3.0  # every one in the delay topic before the first is due
    for lo in range(0, n, 1000):
        ray.get(handle.publish_batch.remote(
            [{"message": {"i": lo + i, "pad": "x" * 100}, "key": f"k{lo + i}",
              "deliver_at": due} for i in range(1000)], topic=topic))
    received = await read_timed(kafka_bootstrap, topic, n, timeout=120, extra_wait=1.0)
    after = ray.get(actor.stats.remote())
    assert after["republished"]["final"] == n
    assert after["gc_collections"][2] == before["gc_collections"][2], (before, after)
    assert sorted(json.loads(r.value)["i"] for r, _ in received) == list(range(n))
    assert_never_early(received)
