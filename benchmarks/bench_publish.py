"""Publishing benchmark: athomic against the floor a publish cannot go below, same run.

    python benchmarks/bench_publish.py [--runs 5] [--json out.json]

1. One at a time: ``ray.get(handle.publish.remote(...))`` per 1 KiB JSON message. The
   floor is the two round trips a publish cannot avoid, measured in the same run: a no-op
   async Ray actor call (``ray.get(noop.f.remote())``) plus ``send_and_wait`` on a plain
   in-process aiokafka producer; floor rate = 1 / (1/no-op rate + 1/send_and_wait rate).
2. Batches: ``publish_batch`` of 1,000 per call, one call in flight, and 3 in flight,
   against a plain in-process aiokafka producer with the same acks/idempotence sending the
   same messages in batches of 1,000 (serialise and ``send`` all, then await all), and
   against the fastest aiokafka has (``create_batch``/``send_batch``, one per partition).
   The calls in flight once more through a handle whose NORMAL lane has ``--pool``
   ProducerActors (``lanes.normal``): one producer, in process or in an actor, works on
   one core; the pool is how athomic uses more.
3. Throughput against batch size (10 .. 5,000, 3 calls in flight), for the plot.
4. The same publishes through a minimal actor (``MinimalActor``: an async Ray actor around
   a plain aiokafka producer, given bytes ready to send), one at a time and in batches:
   what a publish through any actor costs here, so athomic's own share can be told apart
   from the hop it shares with every actor-based publisher. ``publish_outcome`` is the same
   call returning ``PublishingOutcome.SUCCESS_DIRECT``, as athomic's contract requires
   (``ray.get(ref) is PublishingOutcome.SUCCESS_DIRECT``): the least any conforming
   publisher through an actor can cost.
5. One at a time again, interleaved call by call (``--interleaved``): no-op call,
   in-process ``send_and_wait``, the minimal actor (both returns) and athomic, in a
   shuffled order each round, so the machine's drift between blocks does not enter the
   ratios; medians of the latencies. Each variant has its own actor, called once a round:
   an actor called more often answers faster (its process stays warm).
6. Batches again, interleaved block by block (``--interleaved-batches``, ``--block``):
   in-process aiokafka, the minimal actor, athomic with one call and with ``--in-flight``
   calls in flight, ``--block`` batches each in a shuffled order each round; per run, the
   median over the rounds of each round's ratio. With them, ``RecordsFloor`` with one call
   and with ``--in-flight`` calls: the least an actor can do to write athomic's records
   (the same headers on every record; values, keys and ids handed over ready), the floor
   of this path for any publisher that keeps athomic's wire format.

Each run measures every variant, interleaved; figures are medians with the per-run spread.
For the batch variants it also gives the CPU the whole machine spent per message (every
process: caller, actors, Ray, broker) and the cores busy meanwhile: on 2 cores, a path's rate
cannot exceed 2 cores / its CPU per message.
Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import ray
from _bench import cpu_busy, kafka_and_ray, machine, median, spread
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from athomic import MessagingSettings, ProducerFactory, PublishingOutcome
from athomic.messages import (
    H_CONTENT_TYPE,
    H_MESSAGE_ID,
    H_PRIORITY,
    H_PUBLISHED_AT,
    new_message_ids,
)


def event(i: int) -> dict[str, Any]:
    """A 1 KiB JSON event."""
    doc = {"event": "order.priced", "order_id": i, "user": f"user-{i % 977}",
           "amount": round(i * 1.37, 2), "note": ""}
    doc["note"] = "x" * (1024 - len(orjson.dumps(doc)))
    return doc


async def plain_producer(bootstrap: str, max_batch_size: int = 16384) -> AIOKafkaProducer:
    """A started plain aiokafka producer with athomic's guarantees (acks=all, idempotent,
    no linger): the baselines' and the minimal actor's."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=0,
                                max_batch_size=max_batch_size)
    await producer.start()
    return producer


@ray.remote(num_cpus=0)
class NoOp:
    async def publish(self, request: Any) -> str:
        return "ok"


@ray.remote(num_cpus=0)
class MinimalActor:
    """The least an actor publishing to Kafka can be: an async Ray actor holding a plain
    aiokafka producer (same acks and idempotence), taking bytes that are ready to send.
    What athomic adds on both sides (validation, context, ids, headers, the in-flight
    window, telemetry) is measured against it."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self.producer = await plain_producer(self.bootstrap, 256 * 1024)

    async def publish(self, topic: str, key: bytes, value: bytes) -> str:
        assert self.producer is not None
        await self.producer.send_and_wait(topic, value, key=key)
        return "ok"

    async def publish_outcome(self, topic: str, key: bytes, value: bytes
                              ) -> PublishingOutcome:
        """``publish``, returning what athomic's ``publish`` must return: the
        ``PublishingOutcome`` member itself (``ray.get(ref) is SUCCESS_DIRECT``), which Ray
        pickles, where a plain ``str`` goes through its MessagePack path."""
        assert self.producer is not None
        await self.producer.send_and_wait(topic, value, key=key)
        return PublishingOutcome.SUCCESS_DIRECT

    async def publish_batch(self, topic: str, records: list[tuple[bytes, bytes]]) -> int:
        assert self.producer is not None
        futures = [await self.producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        return len(futures)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


@ray.remote(num_cpus=0)
class RecordsFloor:
    """The least an actor can do to write athomic's records: the caller hands it keys,
    serialised values and message ids as plain lists, and the headers every record of the
    call shares (the caller's context, captured once, and the publish time); it gives each
    record athomic's headers, in athomic's order, and sends one record batch per partition
    (``create_batch`` / ``send_batch``, partitioned by key as ``send`` would), partition
    ``p`` through producer ``p % 2``, as a ProducerActor does. No validation, no request
    objects, no size checks, no telemetry, no outcome per message: what separates athomic's
    batches from this is athomic's own work; what separates this from in-process aiokafka
    is the actor hop and the headers the contract puts on every record."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producers: list[AIOKafkaProducer] = []
        self.counts: dict[str, int] = {}

    async def start(self) -> None:
        self.producers = [await plain_producer(self.bootstrap, 256 * 1024) for _ in range(2)]

    async def publish(self, topic: str, keys: list[bytes], values: list[bytes],
                      ids: list[str], context: list[list[Any]], published_at: bytes) -> int:
        producers = self.producers
        count = self.counts.get(topic)
        if count is None:
            count = self.counts[topic] = len(await producers[0].partitions_for(topic))
        shared = [(k, v) for k, v in context]
        tail = [(H_PRIORITY, b"normal"), (H_PUBLISHED_AT, published_at),
                (H_CONTENT_TYPE, b"application/json")]
        groups: dict[int, list[tuple[bytes, bytes, list[tuple[str, bytes]]]]] = {}
        for key, value, message_id in zip(keys, values, ids, strict=True):
            groups.setdefault((murmur2(key) & 0x7FFFFFFF) % count, []).append(
                (key, value, [*shared, (H_MESSAGE_ID, message_id.encode()), *tail]))
        await send_record_batches(producers, topic, groups)
        return len(keys)

    async def stop(self) -> None:
        for producer in self.producers:
            await producer.stop()


def minimal_single(actor: Any, topic: str, n: int, outcome: bool = False) -> float:
    """One at a time through the minimal actor; ``outcome``: its ``publish_outcome``."""
    method, expected = ((actor.publish_outcome, PublishingOutcome.SUCCESS_DIRECT) if outcome
                        else (actor.publish, "ok"))
    assert ray.get(method.remote(topic, b"warm", b"{}")) == expected  # the topic, first
    start = time.perf_counter()
    for i in range(n):
        result = ray.get(method.remote(topic, f"k{i}".encode(), orjson.dumps(event(i))))
        assert result == expected and type(result) is type(expected)
    return n / (time.perf_counter() - start)


def interleaved_single(bootstrap: str, handle: Any, noop: Any, minimal: Any,
                       minimal_outcome: Any, topic: str, n: int) -> dict[str, float]:
    """One-at-a-time publishing with the variants interleaved call by call (in a shuffled
    order each round), so every variant sees the same moment of this machine's load: the
    median latency of each, in microseconds. The blocks of 2,000 calls above run one
    variant after another, minutes apart at most, and the machine's speed drifts between
    them."""
    loop = asyncio.new_event_loop()
    producer = loop.run_until_complete(plain_producer(bootstrap))
    msgs = [event(i) for i in range(n)]

    def raw(i: int) -> None:
        loop.run_until_complete(producer.send_and_wait(
            topic + ".iraw", orjson.dumps(msgs[i]), key=f"k{i}".encode()))

    def athomic(i: int) -> None:
        assert ray.get(handle.publish.remote(topic=topic + ".iath", message=msgs[i],
                                             key=f"k{i}")) is PublishingOutcome.SUCCESS_DIRECT

    variants = {
        "noop_actor": lambda i: ray.get(noop.publish.remote(None)),
        "send_and_wait": raw,
        "minimal_actor": lambda i: ray.get(minimal.publish.remote(
            topic + ".imin", f"k{i}".encode(), orjson.dumps(msgs[i]))),
        "minimal_actor_outcome": lambda i: ray.get(minimal_outcome.publish_outcome.remote(
            topic + ".iout", f"k{i}".encode(), orjson.dumps(msgs[i]))),
        "athomic": athomic,
    }
    latencies: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    shuffle = random.Random(7).shuffle
    try:
        for name in names:
            variants[name](0)
        for i in range(n):
            shuffle(names)
            for name in names:
                start_t = time.perf_counter()
                variants[name](i)
                latencies[name].append(time.perf_counter() - start_t)
    finally:
        loop.run_until_complete(producer.stop())
        loop.close()
    return {k: 1e6 * median(v) for k, v in latencies.items()}


def minimal_batches(actor: Any, topic: str, batches: int, size: int, in_flight: int
                    ) -> float:
    # the topic is created before the clock starts, as the baselines' are (~0.1 s here)
    assert ray.get(actor.publish_batch.remote(topic, [(b"warm", b"{}")])) == 1
    return batches * size / minimal_run(actor, topic, 0, batches, size, in_flight)


def minimal_run(actor: Any, topic: str, first: int, batches: int, size: int,
                in_flight: int) -> float:
    """Seconds for batches ``first`` .. ``first + batches - 1`` through the minimal actor."""
    start = time.perf_counter()
    pending: list[Any] = []
    for b in range(first, first + batches):
        records = [(f"k{i}".encode(), orjson.dumps(event(b * size + i))) for i in range(size)]
        if len(pending) >= in_flight:
            assert ray.get(pending.pop(0)) == size
        pending.append(actor.publish_batch.remote(topic, records))
    assert ray.get(pending) == [size] * len(pending)
    return time.perf_counter() - start


def floor_run(actor: Any, context: list[tuple[str, bytes]], topic: str, first: int,
              batches: int, size: int, in_flight: int) -> float:
    """Seconds for batches ``first`` .. ``first + batches - 1`` through ``RecordsFloor``:
    from the same list of events as athomic's caller gets, the caller serialises each
    event and takes athomic's message ids."""
    wire_context = [[k, v] for k, v in context]
    start = time.perf_counter()
    pending: list[Any] = []
    for b in range(first, first + batches):
        events = [event(b * size + i) for i in range(size)]
        keys = [f"k{i}".encode() for i in range(size)]
        # an exact-size copy, as athomic's serialiser makes: a batch's values held
        # together in orjson's own buffers fragment the heap (BENCHMARKS.md)
        values = [bytes(memoryview(orjson.dumps(e))) for e in events]
        if len(pending) >= in_flight:
            assert ray.get(pending.pop(0)) == size
        pending.append(actor.publish.remote(topic, keys, values, new_message_ids(size),
                                            wire_context,
                                            str(round(time.time() * 1000)).encode()))
    assert ray.get(pending) == [size] * len(pending)
    return time.perf_counter() - start


async def aiokafka_single(bootstrap: str, topic: str, n: int) -> float:
    producer = await plain_producer(bootstrap)
    try:
        await producer.send_and_wait(topic, b"warm")
        payloads = [orjson.dumps(event(i)) for i in range(n)]
        start = time.perf_counter()
        for i, p in enumerate(payloads):
            await producer.send_and_wait(topic, p, key=f"k{i}".encode())
        return n / (time.perf_counter() - start)
    finally:
        await producer.stop()


async def aiokafka_batch(producer: AIOKafkaProducer, topic: str, b: int, size: int) -> None:
    """Batch ``b`` of ``size`` through a plain producer: serialise and ``send`` every
    message (the same work athomic does per message), then await every acknowledgement."""
    futures = [await producer.send(topic, orjson.dumps(event(b * size + i)),
                                   key=f"k{i}".encode())
               for i in range(size)]
    await asyncio.gather(*futures)


async def aiokafka_batches(bootstrap: str, topic: str, batches: int, size: int) -> float:
    producer = await plain_producer(bootstrap, 256 * 1024)
    try:
        await producer.send_and_wait(topic, b"warm")
        start = time.perf_counter()
        for b in range(batches):
            await aiokafka_batch(producer, topic, b, size)
        return batches * size / (time.perf_counter() - start)
    finally:
        await producer.stop()


async def send_record_batches(
        producers: list[AIOKafkaProducer], topic: str,
        groups: dict[int, list[tuple[bytes, bytes, list[tuple[str, bytes]] | None]]]) -> None:
    """Each partition's records (key, value, headers) as record batches (``create_batch`` /
    ``send_batch``, a new one when full), partition ``p`` through ``producers[p % n]``;
    returns once every batch is acknowledged."""
    futures = []
    for partition, records in groups.items():
        producer = producers[partition % len(producers)]
        batch = producer.create_batch()
        for key, value, headers in records:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*futures)


async def aiokafka_record_batches(bootstrap: str, topic: str, batches: int, size: int
                                  ) -> float:
    """The fastest way aiokafka has: serialise, then one record batch (``create_batch`` /
    ``send_batch``, up to 256 KiB) per partition, partitioned by key as ``send`` would."""
    producer = await plain_producer(bootstrap, 256 * 1024)
    try:
        await producer.send_and_wait(topic, b"warm")
        count = len(await producer.partitions_for(topic))
        start = time.perf_counter()
        for b in range(batches):
            groups: dict[int, list[tuple[bytes, bytes, None]]] = {}
            for i in range(size):
                key = f"k{i}".encode()
                groups.setdefault((murmur2(key) & 0x7FFFFFFF) % count, []).append(
                    (key, orjson.dumps(event(b * size + i)), None))
            await send_record_batches([producer], topic, groups)
        return batches * size / (time.perf_counter() - start)
    finally:
        await producer.stop()


def in_loop(measure: Callable[..., Coroutine[Any, Any, float]]) -> Callable[..., float]:
    """``measure`` (an async benchmark) run to completion in its own event loop."""
    return lambda *args: asyncio.run(measure(*args))


def athomic_batches(handle: Any, topic: str, batches: int, size: int, in_flight: int
                    ) -> float:
    # the topic is created, and known to the lane's actors, before the clock starts, as
    # the baselines' topics are: its creation took ~0.1 s here, a fifth of a measurement
    ray.get([handle.publish_batch.remote([{"message": {"warm": 1}}], topic=topic)
             for _ in range(in_flight)])
    return batches * size / athomic_run(handle, topic, 0, batches, size, in_flight)


def athomic_run(handle: Any, topic: str, first: int, batches: int, size: int,
                in_flight: int) -> float:
    """Seconds for batches ``first`` .. ``first + batches - 1`` through athomic."""
    start = time.perf_counter()
    pending: list[Any] = []
    for b in range(first, first + batches):
        items = [{"message": event(b * size + i), "key": f"k{i}"} for i in range(size)]
        if len(pending) >= in_flight:
            assert ray.get(pending.pop(0))[-1] is PublishingOutcome.SUCCESS_DIRECT
        pending.append(handle.publish_batch.remote(items, topic=topic))
    for out in ray.get(pending):
        assert out[-1] is PublishingOutcome.SUCCESS_DIRECT
    return time.perf_counter() - start


def interleaved_batches(bootstrap: str, handle: Any, minimal: Any, topic: str, rounds: int,
                        block: int, size: int, in_flight: int, pool: Any = None,
                        floor: Any = None) -> dict[str, list[float]]:
    """Batches with the variants interleaved block by block: each round, in a shuffled
    order, in-process aiokafka, the minimal actor and athomic one call in flight, and
    athomic with ``in_flight`` calls (with ``pool``, also through its NORMAL lane; with
    ``floor``, a ``RecordsFloor``, it too with one call and ``in_flight`` calls),
    ``block`` batches each, so every variant sees the same moment of this machine's load
    (the blocks above run minutes apart). Per variant and round, the rate in msg/s; a
    round of blocks before them warms up, not counted."""
    loop = asyncio.new_event_loop()
    producer = loop.run_until_complete(plain_producer(bootstrap, 256 * 1024))
    firsts = itertools.count(0, block)  # each block's first batch: its events differ

    def raw(first: int) -> float:
        async def run() -> float:
            start = time.perf_counter()
            for b in range(first, first + block):
                await aiokafka_batch(producer, topic + ".ibraw", b, size)
            return time.perf_counter() - start
        return loop.run_until_complete(run())

    variants: dict[str, Callable[[int], float]] = {
        "aiokafka": raw,
        "minimal_actor": lambda first: minimal_run(minimal, topic + ".ibmin", first, block,
                                                   size, 1),
        "athomic": lambda first: athomic_run(handle, topic + ".ibath", first, block, size,
                                             1),
        f"athomic_{in_flight}_in_flight": lambda first: athomic_run(
            handle, topic + ".ibathp", first, block, size, in_flight),
    }
    if pool is not None:
        variants[f"athomic_{in_flight}_in_flight_pool"] = lambda first: athomic_run(
            pool, topic + ".ibpool", first, block, size, in_flight)
    if floor is not None:
        context = handle._captured()[0]  # the context athomic's records carry
        variants["records_floor"] = lambda first: floor_run(
            floor, context, topic + ".ibfl", first, block, size, 1)
        variants[f"records_floor_{in_flight}_in_flight"] = lambda first: floor_run(
            floor, context, topic + ".ibflp", first, block, size, in_flight)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    shuffle = random.Random(11).shuffle
    try:
        for r in range(rounds + 1):
            shuffle(names)
            for name in names:
                seconds = variants[name](next(firsts))
                if r:
                    rates[name].append(block * size / seconds)
    finally:
        loop.run_until_complete(producer.stop())
        loop.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--single", type=int, default=2000, help="messages, one at a time")
    parser.add_argument("--batches", type=int, default=20, help="batches of --batch-size")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=3,
                        help="publish_batch calls in flight in the pipelined variant")
    parser.add_argument("--pool", type=int, default=2,
                        help="ProducerActors in the NORMAL lane of the pool variant "
                             "(0: skip it)")
    parser.add_argument("--sizes", default="10,100,1000,5000",
                        help="batch sizes for the throughput curve (empty: skip)")
    parser.add_argument("--interleaved", type=int, default=2000,
                        help="calls per variant of the interleaved one-at-a-time "
                             "measurement, per run (0: skip)")
    parser.add_argument("--interleaved-batches", type=int, default=8, metavar="ROUNDS",
                        help="rounds of the interleaved batch measurement, per run (0: skip)")
    parser.add_argument("--block", type=int, default=10,
                        help="batches per variant and round of the interleaved batches")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results: dict[str, list[float]] = {k: [] for k in (
        "noop_actor", "aiokafka_single", "minimal_actor_single",
        "minimal_actor_single_outcome", "athomic_single",
        "aiokafka_batch", "aiokafka_record_batch", "minimal_actor_batch",
        "minimal_actor_batch_pipelined", "athomic_batch", "athomic_batch_pipelined",
        "athomic_batch_pipelined_pool")}
    if not args.pool:
        del results["athomic_batch_pipelined_pool"]
    cpu_us: dict[str, list[float]] = {}
    cores: dict[str, list[float]] = {}

    def metered(name: str, messages: int, run: Callable[..., float], *run_args: Any
                ) -> float:
        busy, start = cpu_busy(), time.perf_counter()
        rate = run(*run_args)
        busy, wall = cpu_busy() - busy, time.perf_counter() - start
        cpu_us.setdefault(name, []).append(1e6 * busy / messages)
        cores.setdefault(name, []).append(busy / wall)
        return rate

    sizes = [int(s) for s in args.sizes.split(",") if s]
    curve: dict[int, list[float]] = {s: [] for s in sizes}
    interleaved: list[dict[str, float]] = []
    batch_rounds: list[dict[str, list[float]]] = []
    with kafka_and_ray() as bootstrap:
        conn = f"bench{uuid.uuid4().hex[:6]}"
        handle = ProducerFactory.create(MessagingSettings(bootstrap_servers=bootstrap,
                                                          connection_name=conn))
        pool = None
        if args.pool:
            pool = ProducerFactory.create(MessagingSettings(
                bootstrap_servers=bootstrap, connection_name=conn + "pool",
                lanes={"normal": args.pool}))
            athomic_batches(pool, f"bench.pool.{conn}", 2 * args.pool, 10, args.pool)
        noop = NoOp.remote()
        ray.get(noop.publish.remote(None))
        minimal = MinimalActor.remote(bootstrap)
        ray.get(minimal.start.remote())
        # its own actor for the interleaved variant returning the outcome: an actor
        # called twice a round (between the other variants' calls) answers each call
        # ~0.3 ms sooner than one called once, as the others are (BENCHMARKS.md)
        minimal_outcome = MinimalActor.remote(bootstrap)
        ray.get(minimal_outcome.start.remote())
        floor = RecordsFloor.remote(bootstrap)
        ray.get(floor.start.remote())
        tag = uuid.uuid4().hex[:6]
        ray.get(handle.publish.remote(topic=f"bench.{tag}", message={"warm": 1}))
        for run in range(1, args.runs + 1):
            topic = f"bench.{tag}.{run}"
            start = time.perf_counter()
            for _ in range(args.single):
                ray.get(noop.publish.remote(None))
            results["noop_actor"].append(args.single / (time.perf_counter() - start))

            results["aiokafka_single"].append(asyncio.run(
                aiokafka_single(bootstrap, topic + ".raw1", args.single)))

            results["minimal_actor_single"].append(minimal_single(
                minimal, topic + ".min1", args.single))

            results["minimal_actor_single_outcome"].append(minimal_single(
                minimal, topic + ".mino", args.single, outcome=True))

            msgs = [event(i) for i in range(args.single)]
            ray.get(handle.publish.remote(topic=topic + ".ath1", message={"warm": 1}))
            start = time.perf_counter()
            for i, m in enumerate(msgs):
                ray.get(handle.publish.remote(topic=topic + ".ath1", message=m, key=f"k{i}"))
            results["athomic_single"].append(args.single / (time.perf_counter() - start))

            per_call, flight = args.batch_size, args.in_flight
            n = args.batches * per_call
            batch_variants: list[tuple[str, Callable[..., float], tuple[Any, ...]]] = [
                ("aiokafka_batch", in_loop(aiokafka_batches),
                 (bootstrap, topic + ".rawb", args.batches, per_call)),
                ("aiokafka_record_batch", in_loop(aiokafka_record_batches),
                 (bootstrap, topic + ".rawr", args.batches, per_call)),
                ("minimal_actor_batch", minimal_batches,
                 (minimal, topic + ".minb", args.batches, per_call, 1)),
                ("minimal_actor_batch_pipelined", minimal_batches,
                 (minimal, topic + ".minp", args.batches, per_call, flight)),
                ("athomic_batch", athomic_batches,
                 (handle, topic + ".athb", args.batches, per_call, 1)),
                ("athomic_batch_pipelined", athomic_batches,
                 (handle, topic + ".athp", args.batches, per_call, flight)),
            ]
            if pool is not None:
                batch_variants.append(("athomic_batch_pipelined_pool", athomic_batches,
                                       (pool, topic + ".athq", args.batches, per_call, flight)))
            for name, variant, variant_args in batch_variants:
                results[name].append(metered(name, n, variant, *variant_args))
            for size in sizes:
                batches = max(3, 20_000 // size)
                curve[size].append(athomic_batches(handle, f"{topic}.curve{size}", batches,
                                                   size, args.in_flight))
            if args.interleaved:
                interleaved.append(interleaved_single(bootstrap, handle, noop, minimal,
                                                      minimal_outcome,
                                                      topic, args.interleaved))
                print(f"run {run}, interleaved median latency: " + ", ".join(
                    f"{k} {v:.0f} us" for k, v in interleaved[-1].items()), flush=True)
            if args.interleaved_batches:
                batch_rounds.append(interleaved_batches(
                    bootstrap, handle, minimal, topic, args.interleaved_batches, args.block,
                    per_call, flight, pool, floor))
                print(f"run {run}, interleaved batches, median msg/s: " + ", ".join(
                    f"{k} {median(v):.0f}" for k, v in batch_rounds[-1].items()), flush=True)
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items())
                  + "".join(f", batch {s} {curve[s][-1]:.0f}/s" for s in sizes), flush=True)
        ProducerFactory.shutdown(conn)
        if pool is not None:
            ProducerFactory.shutdown(conn + "pool")
        ray.get([minimal.stop.remote(), minimal_outcome.stop.remote(), floor.stop.remote()])
    floor = [1 / (1 / n + 1 / k) for n, k in zip(results["noop_actor"],
                                                 results["aiokafka_single"], strict=True)]
    ratios = {
        "single / floor": [a / f for a, f in zip(results["athomic_single"], floor,
                                                 strict=True)],
        "batch / aiokafka": [a / b for a, b in zip(results["athomic_batch"],
                                                   results["aiokafka_batch"], strict=True)],
        f"batch, {args.in_flight} in flight / aiokafka": [
            a / b for a, b in zip(results["athomic_batch_pipelined"],
                                  results["aiokafka_batch"], strict=True)],
        "single, minimal actor returning PublishingOutcome / floor": [
            a / f for a, f in zip(results["minimal_actor_single_outcome"], floor,
                                  strict=True)],
        "single, minimal actor / floor": [
            a / f for a, f in zip(results["minimal_actor_single"], floor, strict=True)],
        "single / minimal actor": [a / b for a, b in zip(
            results["athomic_single"], results["minimal_actor_single"], strict=True)],
        "batch / minimal actor": [a / b for a, b in zip(
            results["athomic_batch"], results["minimal_actor_batch"], strict=True)],
        f"batch, {args.in_flight} in flight / minimal actor, same": [a / b for a, b in zip(
            results["athomic_batch_pipelined"], results["minimal_actor_batch_pipelined"],
            strict=True)],
        **({f"batch, {args.in_flight} in flight, {args.pool} actors / aiokafka": [
            a / b for a, b in zip(results["athomic_batch_pipelined_pool"],
                                  results["aiokafka_batch"], strict=True)]}
           if args.pool else {}),
        f"batch, {args.in_flight} in flight / aiokafka record batches": [
            a / b for a, b in zip(results["athomic_batch_pipelined"],
                                  results["aiokafka_record_batch"], strict=True)],
    }
    for run in interleaved:
        # the same ratios from latencies: the floor is the no-op call plus send_and_wait
        floor_us = run["noop_actor"] + run["send_and_wait"]
        for name, key in (("single / floor", "athomic"),
                          ("single, minimal actor returning PublishingOutcome / floor",
                           "minimal_actor_outcome"),
                          ("single, minimal actor / floor", "minimal_actor"),
                          ("single / minimal actor", None)):
            value = (run["minimal_actor"] / run["athomic"] if key is None
                     else floor_us / run[key])
            ratios.setdefault(f"{name}, interleaved", []).append(value)
    for rounds in batch_rounds:
        # per run, the median over its rounds of each round's ratio (the variants of a
        # round ran within a second of each other)
        base = rounds["aiokafka"]
        for name, key in (("batch / aiokafka", "athomic"),
                          ("batch, minimal actor / aiokafka", "minimal_actor"),
                          (f"batch, {args.in_flight} in flight / aiokafka",
                           f"athomic_{args.in_flight}_in_flight"),
                          (f"batch, {args.in_flight} in flight, {args.pool} actors / aiokafka",
                           f"athomic_{args.in_flight}_in_flight_pool"),
                          ("batch, records floor / aiokafka", "records_floor"),
                          (f"batch, {args.in_flight} in flight, records floor / aiokafka",
                           f"records_floor_{args.in_flight}_in_flight")):
            if key not in rounds:
                continue
            ratios.setdefault(f"{name}, interleaved", []).append(
                median([a / b for a, b in zip(rounds[key], base, strict=True)]))
        # athomic against the least an actor writing its records does, same rounds
        for name, key, floor_key in (
                ("batch / records floor", "athomic", "records_floor"),
                (f"batch, {args.in_flight} in flight / records floor, same",
                 f"athomic_{args.in_flight}_in_flight",
                 f"records_floor_{args.in_flight}_in_flight")):
            if floor_key in rounds:
                ratios.setdefault(f"{name}, interleaved", []).append(median(
                    [a / b for a, b in zip(rounds[key], rounds[floor_key], strict=True)]))
    print(f"\n{args.runs} runs, 1 KiB JSON messages, acks=all, idempotent ({machine()})")
    print(f"{'variant':34} {'median msg/s':>12}  per run")
    for k, v in {**results, "floor (no-op call + send_and_wait)": floor}.items():
        print(f"{k:34} {median(v):>12.0f}  {', '.join(f'{x:.0f}' for x in v)}")
    for size in sizes:
        print(f"{f'batch {size}, {args.in_flight} in flight':34} "
              f"{median(curve[size]):>12.0f}  {', '.join(f'{x:.0f}' for x in curve[size])}")
    for k in cpu_us:
        print(f"{f'{k}, machine CPU us/msg':34} {median(cpu_us[k]):>12.1f}  "
              f"{', '.join(f'{x:.1f}' for x in cpu_us[k])}; cores busy "
              f"{median(cores[k]):.2f} ({spread(cores[k])})")
    for k in interleaved[0] if interleaved else ():
        values = [run[k] for run in interleaved]
        print(f"{f'interleaved {k}, latency us':34} {median(values):>12.0f}  "
              f"{', '.join(f'{x:.0f}' for x in values)}")
    targets = {"single / floor": 0.85, "single / floor, interleaved": 0.85,
               "batch / aiokafka": 0.7, "batch / aiokafka, interleaved": 0.7,
               f"batch, {args.in_flight} in flight / aiokafka": 1.0,
               f"batch, {args.in_flight} in flight / aiokafka, interleaved": 1.0,
               f"batch, {args.in_flight} in flight, {args.pool} actors / aiokafka": 1.0,
               f"batch, {args.in_flight} in flight, {args.pool} actors / aiokafka, "
               "interleaved": 1.0}
    for name, values in ratios.items():
        target = f"; target >= {targets[name]}" if name in targets else ""
        print(f"ratio {name:50} median {median(values):.2f} ({spread(values)}){target}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"runs": results, "floor": floor, "ratios": ratios,
                       "curve": {str(k): v for k, v in curve.items()},
                       "interleaved_us": interleaved, "interleaved_batches": batch_rounds,
                       "cpu_us_per_msg": cpu_us,
                       "cores_busy": cores,
                       "in_flight": args.in_flight, "pool": args.pool,
                       "machine": machine()}, f, indent=2)


if __name__ == "__main__":
    main()
