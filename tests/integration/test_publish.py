"""Publishing end to end: real Kafka broker, real local Ray, read back independently."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from aiokafka.partitioner import DefaultPartitioner
from helpers import create_topics, read_records
from pydantic import BaseModel

from athomic import (
    ConfigurationError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidTopicError,
    MessagePriority,
    MessagingConnectionError,
    ProducerFactory,
    PublishingOutcome,
    RecordTooLargeError,
    SerializationError,
    ValidationError,
    decode_message,
)
from athomic.actors.topology import actor_names
from athomic.messages import message_id_time

pytestmark = pytest.mark.integration


class UserCreated(BaseModel):
    user_id: str
    email: str
    tags: list[str] = []


def hdrs(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


async def test_round_trip_dict_model_bytes_str(producer: Any, settings_factory: Any,
                                               kafka_bootstrap: str, topic: str) -> None:
    payloads: list[Any] = [
        {"a": 1, "nested": {"b": [1, 2.5, None, "x"]}},
        UserCreated(user_id="user-123", email="u@example.com", tags=["new"]),
        b"\x00\x01binary\xff",
        "plain text \u00e9",
    ]
    refs = [producer.publish.remote(topic=topic, message=p, key=f"k{i}",
                                    headers={"x-trace-me": "yes"})
            for i, p in enumerate(payloads)]
    assert ray.get(refs) == [PublishingOutcome.SUCCESS_DIRECT] * 4
    assert all(o is PublishingOutcome.SUCCESS_DIRECT for o in ray.get(refs))

    records = await read_records(kafka_bootstrap, topic, 4)
    records.sort(key=lambda r: r.key)
    assert [r.key for r in records] == [b"k0", b"k1", b"k2", b"k3"]
    settings = settings_factory()
    decoded = [decode_message(r.value, r.headers, settings) for r in records]
    assert decoded[0] == payloads[0]
    assert decoded[1] == payloads[1].model_dump()
    assert decode_message(records[1].value, records[1].headers, settings,
                          model=UserCreated) == payloads[1]
    assert decoded[2] == payloads[2]
    assert decoded[3] == payloads[3]

    types = [hdrs(r)["content-type"] for r in records]
    assert types == [b"application/json", b"application/json",
                     b"application/octet-stream", b"text/plain; charset=utf-8"]
    assert records[2].value == payloads[2]  # bytes pass through untouched
    assert hdrs(records[1])["athomic-schema"] == b"test_publish:UserCreated"
    ids = set()
    for r in records:
        h = hdrs(r)
        assert h["x-trace-me"] == b"yes"
        assert h["athomic-priority"] == b"normal"
        assert h["athomic-producer"] == b"athomic"
        assert h["athomic-host"] == socket.gethostname().encode()
        assert h["athomic-ray-job-id"] == ray.get_runtime_context().get_job_id().encode()
        assert h["athomic-ray-node-id"] == ray.get_runtime_context().get_node_id().encode()
        mid = uuid.UUID(h["message-id"].decode())
        assert mid.version == 7
        assert abs(message_id_time(str(mid)) - time.time()) < 60
        ids.add(mid)
    assert len(ids) == 4


async def test_async_publish_and_batch(producer: Any, kafka_bootstrap: str,
                                       topic: str) -> None:
    outcome = await producer.publish(topic=topic, message={"n": -1}, key="a")
    assert outcome is PublishingOutcome.SUCCESS_DIRECT
    items = [{"message": {"n": i}, "key": f"k{i % 7}"} for i in range(500)]
    outcomes = await producer.publish_batch(items, topic=topic)
    assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 500
    records = await read_records(kafka_bootstrap, topic, 501)
    assert len(records) == 501
    got = sorted(json.loads(r.value)["n"] for r in records)
    assert got == list(range(-1, 500))
    # a batch goes out as record batches, partitioned as send() partitions one record
    every = list(range(3))  # the broker's num.partitions
    assert {r.partition for r in records} == set(every)
    assert all(r.partition == DefaultPartitioner()(r.key, every, every) for r in records)
    # per-key order within the batch is kept
    by_key: dict[bytes, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(r.key, []).append(json.loads(r.value)["n"])
    for seq in by_key.values():
        assert seq == sorted(seq)


async def test_batch_split_over_lanes_keeps_order(producer: Any, kafka_bootstrap: str,
                                                  topic: str) -> None:
    prios = ["high", "normal", "low", "normal", "high"]
    items = [{"topic": topic, "message": {"i": i}, "priority": p}
             for i, p in enumerate(prios)]
    outcomes = ray.get(producer.publish_batch.remote(items))
    assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 5
    records = await read_records(kafka_bootstrap, topic, 5)
    got = {json.loads(r.value)["i"]: hdrs(r)["athomic-priority"].decode() for r in records}
    assert got == dict(enumerate(prios))


async def test_kcat_reads_keys_values_headers(producer: Any, kafka_bootstrap: str,
                                              topic: str) -> None:
    assert shutil.which("kcat"), "kcat is required (.ci/run installs it with apt-get)"
    await producer.publish(topic=topic, message={"hello": "kcat"}, key="user-9",
                           headers={"tenant": "acme"})
    proc = await asyncio.create_subprocess_exec(
        "kcat", "-C", "-b", kafka_bootstrap, "-t", topic, "-o", "beginning", "-c", "1",
        "-e", "-J", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    msg = json.loads(out.decode().strip().splitlines()[0])
    assert msg["key"] == "user-9"
    assert json.loads(msg["payload"]) == {"hello": "kcat"}
    headers = dict(zip(msg["headers"][::2], msg["headers"][1::2], strict=False))
    assert headers["tenant"] == "acme"
    assert headers["content-type"] == "application/json"
    assert uuid.UUID(headers["message-id"]).version == 7


async def test_handle_inside_ray_tasks(producer: Any, kafka_bootstrap: str,
                                       topic: str) -> None:

    @ray.remote
    def emit(handle: Any, start: int) -> list[str]:
        refs = [handle.publish.remote(topic=topic, message={"n": start + i}, key=str(i))
                for i in range(25)]
        return [o.value for o in ray.get(refs)]

    results = ray.get([emit.remote(producer, s) for s in range(0, 100, 25)])
    assert results == [["success_direct"] * 25] * 4
    records = await read_records(kafka_bootstrap, topic, 100)
    assert sorted(json.loads(r.value)["n"] for r in records) == list(range(100))
    task_ids = {hdrs(r).get("athomic-ray-task-id") for r in records}
    assert None not in task_ids and len(task_ids) == 4  # lineage names the calling task


async def test_handle_in_map_batches(producer: Any, kafka_bootstrap: str,
                                     topic: str) -> None:
    import ray.data

    def emit(batch: dict[str, Any]) -> dict[str, Any]:
        refs = [producer.publish.remote(topic=topic, message={"row": int(i)}, key=str(i))
                for i in batch["id"]]
        batch["outcome"] = [o.value for o in ray.get(refs)]
        return batch

    ds = ray.data.range(60).map_batches(emit, batch_size=16)
    rows = ds.take_all()
    assert len(rows) == 60
    assert {r["outcome"] for r in rows} == {"success_direct"}
    records = await read_records(kafka_bootstrap, topic, 60)
    assert sorted(json.loads(r.value)["row"] for r in records) == list(range(60))


async def test_factory_is_idempotent_across_processes(settings_factory: Any) -> None:
    settings = settings_factory()
    a = ProducerFactory.create(settings)
    b = ProducerFactory.create(settings)

    def ids(handle: Any) -> list[str]:
        return [s["actor_id"] for s in ray.get(
            [act.stats.remote() for lane in handle._lanes.values() for act in lane])]

    @ray.remote
    def from_task(s: Any) -> list[str]:
        h = ProducerFactory.create(s)
        return [s["actor_id"] for s in ray.get(
            [act.stats.remote() for lane in h._lanes.values() for act in lane])]

    assert ids(a) == ids(b) == ray.get(from_task.remote(settings))
    assert len(set(ids(a))) == 2  # one HIGH, one NORMAL actor
    with pytest.raises(ConfigurationError, match="run with other settings than these"):
        ProducerFactory.create(settings_factory(producer={"linger_ms": 17}))
    # refused with a lane the running actors lack: the actor it started goes again
    before = actor_names(settings.connection_name)
    with pytest.raises(ConfigurationError, match="run with other settings than these"):
        ProducerFactory.create(settings_factory(lanes={"normal": 2}))
    deadline = time.monotonic() + 10
    while actor_names(settings.connection_name) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert actor_names(settings.connection_name) == before
    assert ids(a) == ids(b)  # the running ones untouched


async def test_high_lane_not_blocked_by_normal_flood(settings_factory: Any,
                                                     kafka_bootstrap: str,
                                                     topic: str) -> None:
    handle = ProducerFactory.create(settings_factory(lanes={"max_in_flight": 8000}))
    bulk = [{"message": "x" * 1024, "key": str(i)} for i in range(4000)]
    flood: list[Any] = []
    # The flood fills the NORMAL lane's in-flight window, so its submitter blocks in the
    # handle; HIGH has a window (and actors) of its own.
    submitter = threading.Thread(target=lambda: flood.extend(
        handle.publish_batch.remote(bulk, topic=topic) for _ in range(12)))
    submitter.start()
    while len(flood) < 3:
        time.sleep(0.01)
    start = time.monotonic()
    outcome = ray.get(handle.publish.remote(topic=topic, message={"urgent": True},
                                            priority=MessagePriority.HIGH))
    high_latency = time.monotonic() - start
    pending = len(ray.wait(list(flood), num_returns=len(flood), timeout=0)[1])
    assert outcome is PublishingOutcome.SUCCESS_DIRECT
    assert pending > 0 or len(flood) < 12, "the flood finished first: not a test"
    submitter.join()
    assert ray.get(flood) == [[PublishingOutcome.SUCCESS_DIRECT] * 4000] * 12
    flood_total = time.monotonic() - start
    assert high_latency < flood_total / 3, (high_latency, flood_total)


async def test_bad_input_is_refused_and_nothing_is_sent(producer: Any, settings_factory: Any,
                                                        kafka_bootstrap: str,
                                                        topic: str) -> None:
    await create_topics(kafka_bootstrap, topic)
    cases: list[tuple[type[Exception], dict[str, Any]]] = [
        (InvalidTopicError, {"topic": "bad topic!", "message": {}}),
        (InvalidTopicError, {"topic": "", "message": {}}),
        (InvalidTopicError, {"topic": "t" * 300, "message": {}}),
        (ValidationError, {"message": {}}),
        (InvalidDelayError, {"topic": topic, "message": {}, "delay_seconds": -1}),
        (InvalidDelayError, {"topic": topic, "message": {}, "delay_seconds": "soon"}),
        (InvalidHeaderError, {"topic": topic, "message": {}, "headers": {"h": 12}}),
        (InvalidHeaderError, {"topic": topic, "message": {}, "priority": "urgent"}),
        (ValidationError, {"topic": topic, "message": {}, "key": 1.5}),
        (SerializationError, {"topic": topic, "message": {"s": {1, 2}}}),
        (SerializationError, {"topic": topic, "message": object()}),
        (RecordTooLargeError, {"topic": topic, "message": b"x" * 1_100_000}),
    ]
    for error, kwargs in cases:
        with pytest.raises(error):
            ray.get(producer.publish.remote(**kwargs))
    # a bad message anywhere in a batch: the whole batch is refused
    good = [{"topic": topic, "message": {"ok": i}} for i in range(5)]
    with pytest.raises(SerializationError, match="message #3"):
        ray.get(producer.publish_batch.remote([*good[:3], {"topic": topic, "message": {1j}},
                                               *good[3:]]))
    with pytest.raises(RecordTooLargeError) as info:
        ray.get(producer.publish_batch.remote([*good, {"topic": topic,
                                                       "message": "y" * 2_000_000}]))
    assert info.value.size > info.value.limit == 1024 * 1024
    with pytest.raises(InvalidTopicError):
        producer.publish_batch.remote([*good, {"topic": "no/slash", "message": 1}])
    # nothing reached the topic: the first record there is the sentinel sent now
    await producer.publish(topic=topic, message={"sentinel": True})
    records = await read_records(kafka_bootstrap, topic, 1, extra_wait=1.0)
    assert [json.loads(r.value) for r in records] == [{"sentinel": True}]
    assert records[0].offset == 0


async def test_delay_without_delay_topics_is_not_implemented(producer: Any,
                                                             topic: str) -> None:
    with pytest.raises(NotImplementedError):
        producer.publish.remote(topic=topic, message={}, delay_seconds=5)
    # a delay of zero or a due time in the past is a direct publish
    assert await producer.publish(topic=topic, message={}, delay_seconds=0) is \
        PublishingOutcome.SUCCESS_DIRECT
    assert await producer.publish(topic=topic, message={}, deliver_at=time.time() - 5) is \
        PublishingOutcome.SUCCESS_DIRECT


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung broker). On exit the
    listener is shut down (which wakes the blocked ``accept``: a bare ``close`` does not,
    and the thread would accept one more connection later and drop its sockets unclosed
    in the middle of some other test), the thread joined and every accepted socket closed."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=5)
        assert not thread.is_alive(), "the silent server's accept did not wake"
        srv.close()
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("broker", ["refused", "silent"])
async def test_unreachable_broker_raises_connection_error_in_time(
        settings_factory: Any, topic: str, broker: str) -> None:
    with contextlib.ExitStack() as stack:
        if broker == "refused":
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()
        else:
            port = stack.enter_context(_silent_server())
        settings = settings_factory(
            bootstrap_servers=f"127.0.0.1:{port}",
            connection_name=f"unreachable{uuid.uuid4().hex[:6]}",
            producer={"connect_timeout_s": 3, "request_timeout_ms": 2000})
        handle = ProducerFactory.create(settings)
        start = time.monotonic()
        with pytest.raises(MessagingConnectionError):
            ray.get(handle.publish.remote(topic=topic, message={"x": 1}), timeout=30)
        assert time.monotonic() - start < 3 + 5


async def test_actor_restart_after_kill_keeps_handle_working(producer: Any,
                                                             kafka_bootstrap: str,
                                                             topic: str) -> None:
    assert await producer.publish(topic=topic, message={"n": 0}) is \
        PublishingOutcome.SUCCESS_DIRECT
    actor = producer._lanes["normal"][0]
    before = ray.get(actor.stats.remote())
    ray.kill(actor, no_restart=False)
    outcomes = ray.get([producer.publish.remote(topic=topic, message={"n": i})
                        for i in range(1, 11)], timeout=120)
    assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 10
    after = ray.get(actor.stats.remote())
    assert after["pid"] != before["pid"]
    # A call in flight when the actor died is retried with the same message id:
    # at-least-once, and every copy of a message carries the same id.
    records = await read_records(kafka_bootstrap, topic, 11, extra_wait=1.0)
    by_n: dict[int, set[bytes]] = {}
    for r in records:
        by_n.setdefault(json.loads(r.value)["n"], set()).add(hdrs(r)["message-id"])
    assert sorted(by_n) == list(range(11))
    assert all(len(ids) == 1 for ids in by_n.values())


async def test_a_handle_finds_its_lane_again_after_the_actor_was_replaced(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    """athomic up replaces a producer under the same name: a handle held by a driver fails
    the calls made before it learnt of the replacement, with Ray's typed error (it learns
    from the actor state Ray's core worker keeps, which the GCS updates shortly after the
    kill: how many calls go to the old actor first depends on the machine's load), then
    finds the new actor by name and stays on it."""
    from athomic.actors.topology import NAMESPACE, producer_actor_name

    settings = settings_factory()
    handle = ProducerFactory.create(settings)
    assert ray.get(handle.publish.remote(topic=topic, message={"n": 0})) is \
        PublishingOutcome.SUCCESS_DIRECT
    old = ray.get_actor(producer_actor_name(settings.connection_name, "normal", 0),
                        namespace=NAMESPACE)
    ray.get(old.stop.remote())
    ray.kill(old, no_restart=True)
    ProducerFactory.create(settings)  # the new one, same name
    outcomes: list[PublishingOutcome | None] = []
    ok = PublishingOutcome.SUCCESS_DIRECT
    deadline = time.monotonic() + 20
    while outcomes[-3:] != [ok] * 3 and time.monotonic() < deadline:
        try:
            outcomes.append(ray.get(handle.publish.remote(topic=topic, message={
                "n": len(outcomes) + 1})))
        except ray.exceptions.RayActorError:
            outcomes.append(None)  # a call that found the old actor gone
    assert outcomes[-3:] == [ok] * 3, outcomes  # found the new actor within 20 s ...
    first = outcomes.index(ok)
    assert outcomes[first:] == [ok] * (len(outcomes) - first), outcomes  # ... and stays
    records = await read_records(kafka_bootstrap, topic, 1 + outcomes.count(
        PublishingOutcome.SUCCESS_DIRECT))
    assert {json.loads(r.value)["n"] for r in records} >= {0} | {
        n for n, outcome in enumerate(outcomes, 1) if outcome is not None}


def test_bulk_lanes_run_at_a_lower_scheduling_priority(settings_factory: Any) -> None:
    handle = ProducerFactory.create(settings_factory(lanes={"low": 1, "nice": 3}))
    nice = {lane: ray.get(actors[0].stats.remote())["niceness"]
            for lane, actors in handle._lanes.items()}
    assert set(nice) == {"high", "normal", "low"}
    assert nice["normal"] == nice["low"] == min(nice["high"] + 3, 19)
    assert nice["high"] < nice["normal"]


async def test_batches_set_off_no_full_collection_in_the_actor(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    """An actor's process keeps its start out of the collector's sight: publishing batches
    then never walks every object of the process (with Python's defaults, a full
    collection of ~60 ms came every few calls of 1,000 messages)."""
    handle = ProducerFactory.create(settings_factory())
    actors = [a for group in handle._lanes.values() for a in group]
    items = [{"message": {"n": i, "pad": "x" * 200}, "key": f"k{i}"} for i in range(1000)]
    assert ray.get(handle.publish_batch.remote(items, topic=topic))[-1] is \
        PublishingOutcome.SUCCESS_DIRECT
    before = ray.get([a.stats.remote() for a in actors])
    for _ in range(20):
        outcomes = ray.get(handle.publish_batch.remote(items, topic=topic))
        assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 1000
    after = ray.get([a.stats.remote() for a in actors])
    assert all(s["gc_frozen"] > 10_000 for s in before), before
    assert [s["gc_collections"][2] for s in after] == \
        [s["gc_collections"][2] for s in before]
    records = await read_records(kafka_bootstrap, topic, 21_000)
    assert len(records) == 21_000
    assert {json.loads(r.value)["n"] for r in records} == set(range(1000))


async def test_two_connections_split_the_partitions_on_the_real_broker(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    """The default two producers per actor: partition p goes through producer p % 2 (seen
    in each producer's idempotent sequence numbers, which the broker checks), every record
    arrives once on its key's partition, a key's later single publish after its batch."""
    from aiokafka.structs import TopicPartition

    from athomic.actors.producer import ProducerActor
    from athomic.messages import PublishRequest, new_message_id

    await create_topics(kafka_bootstrap, topic, partitions=3)
    actor = ProducerActor(settings_factory())
    assert actor.settings.producer.connections == 2

    def request(n: int, key: str) -> PublishRequest:
        return PublishRequest(topic, json.dumps({"n": n}).encode(), key.encode(), [],
                              "application/json", None, MessagePriority.NORMAL, None,
                              new_message_id(), time.time())

    try:
        calls = [[request(c * 200 + i, f"k{i % 40}") for i in range(200)] for c in range(3)]
        for outcomes in await asyncio.gather(*(actor.publish_batch(c) for c in calls)):
            assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 200
        for i in range(6):  # one at a time: send() through the partition's producer
            assert await actor.publish(request(1000 + i, f"k{i}")) is \
                PublishingOutcome.SUCCESS_DIRECT
        producers = actor._producer.producers  # type: ignore[union-attr]
        assert len(producers) == 2
        txn = [p._txn_manager for p in producers]  # type: ignore[attr-defined]
        assert txn[0].producer_id != txn[1].producer_id
        sequences = [[m.sequence_number(TopicPartition(topic, p)) for p in range(3)]
                     for m in txn]
        records = await read_records(kafka_bootstrap, topic, 606)
        per_partition = [sum(1 for r in records if r.partition == p) for p in range(3)]
        # each record advances its producer's sequence for its partition by one
        assert sequences == [[per_partition[0], 0, per_partition[2]],
                             [0, per_partition[1], 0]], (sequences, per_partition)
        every = list(range(3))
        assert all(r.partition == DefaultPartitioner()(r.key, every, every) for r in records)
        got = sorted(json.loads(r.value)["n"] for r in records)
        assert got == list(range(600)) + list(range(1000, 1006))
        for i in range(6):
            mine = [json.loads(r.value)["n"] for r in sorted(records, key=lambda r: r.offset)
                    if r.key == f"k{i}".encode()]
            assert mine[-1] == 1000 + i
    finally:
        await actor.stop()
