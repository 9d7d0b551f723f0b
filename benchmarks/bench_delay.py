"""Delayed delivery benchmark.

    python benchmarks/bench_delay.py [--rate 2000 --seconds 20] [--runs 3]

1. Lateness under load: delayed messages published at ``--rate`` msg/s for ``--seconds``
   (delays uniform in 0.5..10 s over buckets 1/2/4/8 s, so most cascade), through
   ProducerFactory and the DelayBucketActors on a local Ray. A consumer in its own process
   (read_committed), reading the final topic (3 partitions, created first) before the
   first publish, stamps each record on arrival; lateness = arrival - due time. Reports
   p50 / p99 / max, how many arrived early (must be 0), and how many were delivered
   (must be all, once). All runs share one broker, first loaded for ``--warmup`` seconds
   (not counted): a freshly started broker's JVM spends its first minute of load
   compiling, on the same cores.
2. Republish throughput: a backlog of ``--backlog`` messages, all due, in one delay topic;
   one DelayBucketActor (run in this process) republishes it, against a plain aiokafka
   transactional consume -> produce loop (read_committed consumer, one transaction per
   fetched batch with the consumed offsets) over the same records, in the same run.

Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import time
import uuid
from typing import Any

import orjson
from _bench import create_topic, local_ray, machine, median, spread, start_kafka
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from athomic import MessagingSettings, ProducerFactory
from athomic.republisher.schedule import percentile


# --- part 1: lateness ------------------------------------------------------------------------
def consume(bootstrap: str, topic: str, expected: int, timeout: float, out: Any,
            ready: Any) -> None:
    """In its own process: read ``expected`` records, stamp arrival, report lateness.
    ``ready`` is set once it reads every partition of ``topic`` (created before): a
    consumer still looking for the topic's partitions when the first messages come would
    count its own wait as their lateness."""

    async def run() -> dict[str, Any]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", group_id=None,
                                    isolation_level="read_committed", fetch_max_wait_ms=10,
                                    metadata_max_age_ms=500)
        await consumer.start()
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=50)
        for tp in consumer.assignment():
            await consumer.position(tp)
        ready.set()
        late: list[float] = []
        ids: set[bytes] = set()
        deadline = time.time() + timeout
        try:
            while len(late) < expected and time.time() < deadline:
                batch = await consumer.getmany(timeout_ms=20)
                now = time.time()
                for records in batch.values():
                    for r in records:
                        h = dict(r.headers)
                        late.append(now - int(h["athomic-deliver-at"]) / 1000)
                        ids.add(h["message-id"])
        finally:
            await consumer.stop()
        late.sort()
        return {"received": len(late), "unique": len(ids),
                "early": sum(1 for x in late if x < 0), "p50": percentile(late, 50),
                "p99": percentile(late, 99), "max": late[-1] if late else 0.0,
                # for the CDF plot: every half percentile, and the last 1 % in full
                "quantiles": [percentile(late, q / 2) for q in range(201)] if late else [],
                "tail": late[-max(len(late) // 100, 1):] if late else []}

    out.put(asyncio.run(run()))


def lateness(bootstrap: str, rate: int, seconds: int, *, ids: bool = False,
             cancel_share: float = 0.0, republisher: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """``ids``: every message gets a caller-chosen id (so its release waits for the ids
    topic); ``cancel_share``: that share of them (among those due in 2 s or more) is
    cancelled right after publishing; ``republisher``: settings other than the defaults."""
    import ray

    tag = uuid.uuid4().hex[:6]
    buckets = {1: f"bench.delay.{tag}.1s", 2: f"bench.delay.{tag}.2s",
               4: f"bench.delay.{tag}.4s", 8: f"bench.delay.{tag}.8s"}
    settings = MessagingSettings(
        bootstrap_servers=bootstrap, connection_name=f"bd{tag}", delay_topics=buckets,
        republisher=republisher or {})
    handle = ProducerFactory.create(settings)
    final = f"bench.final.{tag}"
    total = rate * seconds
    ray.get(handle.publish.remote(topic=final + ".warm", message=1))
    rnd = random.Random(1)
    tick = 0.1
    per_tick = int(rate * tick)
    plan = [[(f"k{rnd.randrange(1000)}", rnd.uniform(0.5, 10.0)) for _ in range(per_tick)]
            for _ in range(int(seconds / tick))]
    cancel = {(t, i) for t, batch in enumerate(plan) for i, (_, d) in enumerate(batch)
              if d >= 2.0 and rnd.random() < cancel_share / 0.84}  # 84 % are due >= 2 s
    asyncio.run(create_topic(bootstrap, final, 3))  # as the brokers would, on first use
    queue: Any = mp.get_context("spawn").Queue()
    ready = mp.get_context("spawn").Event()
    reader = mp.get_context("spawn").Process(
        target=consume, args=(bootstrap, final, total - len(cancel), seconds + 60, queue,
                              ready))
    reader.start()
    if not ready.wait(60):
        raise RuntimeError("the consumer found no partition of the final topic in 60 s")
    start = time.time()
    pending: list[Any] = []
    for t, batch in enumerate(plan):
        items = [{"message": {"n": t * per_tick + i, "pad": "x" * 200}, "key": key,
                  "delay_seconds": delay} for i, (key, delay) in enumerate(batch)]
        if ids:
            for i, item in enumerate(items):
                item["message_id"] = f"{tag}-{t}-{i}"
        pending.append(handle.publish_batch.remote(items, topic=final))
        if cancel_share:
            ray.get(pending.pop())
            pending.extend(handle.cancel.remote(message_id=f"{tag}-{t}-{i}")
                           for i in range(per_tick) if (t, i) in cancel)
        while len(pending) > 4 + per_tick:
            ray.get(pending.pop(0))
        sleep = start + (t + 1) * tick - time.time()
        if sleep > 0:
            time.sleep(sleep)
    ray.get(pending)
    published_rate = total / (time.time() - start)
    result: dict[str, Any] = queue.get(timeout=seconds + 120)
    reader.join()
    actors = [ray.get_actor(n, namespace="athomic") for n in
              (e["name"] for e in ray.util.list_named_actors(all_namespaces=True))
              if n.startswith(f"bd{tag}.delay.")]
    stats = ray.get([a.stats.remote() for a in actors])
    ProducerFactory.shutdown(settings.connection_name)
    result.update(published=total, cancelled=len(cancel), published_rate=published_rate,
                  republisher={s["topic"].rsplit(".", 1)[-1]: s["lateness"] for s in stats})
    return result


# --- part 2: throughput ------------------------------------------------------------------------
async def backlog(bootstrap: str, n: int) -> tuple[MessagingSettings, str]:
    """A delay topic holding ``n`` messages, all due by the time this returns."""
    tag = uuid.uuid4().hex[:6]
    topic = f"bench.backlog.{tag}.1s"
    settings = MessagingSettings(bootstrap_servers=bootstrap, connection_name=f"bt{tag}",
                                 delay_topics={1: topic},
                                 republisher={"enabled": False, "partitions": 3})
    await create_topic(bootstrap, topic, 3, {"retention.ms": str(7 * 24 * 3600 * 1000)})
    from athomic.actors.producer import ProducerActor
    from athomic.messages import MessagePriority, PublishRequest, new_message_ids

    actor = ProducerActor(settings)
    # due only once every message is in the delay topic (one due after it would go direct)
    due = time.time() + 5.0 + n / 5000
    now = time.time()
    body = orjson.dumps({"pad": "x" * 200})
    for lo in range(0, n, 5000):
        ids = new_message_ids(min(5000, n - lo))
        await actor.publish_batch([
            PublishRequest(f"bench.out.{tag}", body, f"k{lo + i}".encode(), [],
                           "application/json", None, MessagePriority.NORMAL, due, mid, now)
            for i, mid in enumerate(ids)])
    await actor.stop()
    await asyncio.sleep(max(due - time.time(), 0) + 0.5)
    return settings, topic


async def ours(settings: MessagingSettings, topic: str, n: int) -> float:
    from athomic.actors.delay_bucket import DelayBucketActor

    worker = DelayBucketActor(settings, topic, autostart=False)
    rep = worker.republisher
    task = asyncio.create_task(worker.run_forever())
    # Timed from the first record read, as the baseline is from its first fetch: a
    # partition claimed first starts republishing before the others are claimed (before
    # ``ready()`` returns), so timing from ``ready()`` left out a varying part of the work.
    begun = time.perf_counter()
    start = None
    while rep.counts["final"] < n:
        if start is None and (rep.held or rep.counts["final"]):
            start = time.perf_counter()
        if worker._error is not None:
            raise worker._error
        if time.perf_counter() - begun > 300:
            raise RuntimeError(f"republished {rep.counts} of {n} in 300 s")
        await asyncio.sleep(0.002)
    assert start is not None
    elapsed = time.perf_counter() - start
    worker.republisher.stop()
    await task
    return n / elapsed


async def baseline(bootstrap: str, topic: str, n: int) -> float:
    """Plain aiokafka: read_committed consume -> transactional produce + offsets."""
    group = f"bench.base.{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=group,
                                enable_idempotence=True, acks="all", linger_ms=0,
                                max_batch_size=256 * 1024)
    await producer.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                isolation_level="read_committed", fetch_max_wait_ms=50,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(3)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    out = topic + ".base"
    done = 0
    start = None
    try:
        deadline = time.perf_counter() + 300
        while done < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"baseline read {done} of {n} in 300 s")
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            if not batch:
                continue
            start = start or time.perf_counter()
            async with producer.transaction():
                futures = [await producer.send(out, r.value, key=r.key,
                                               headers=list(r.headers))
                           for records in batch.values() for r in records]
                await asyncio.gather(*futures)
                await producer.send_offsets_to_transaction(
                    {tp: records[-1].offset + 1 for tp, records in batch.items()}, group)
            done += len(futures)
    finally:
        await consumer.stop()
        await producer.stop()
    assert start is not None
    return n / (time.perf_counter() - start)


def throughput(n: int, runs: int) -> dict[str, list[float]]:
    # Both loops run in this process, tuned as a DelayBucketActor's own process is (the
    # collector: athomic._process).
    from athomic._process import OLD_THRESHOLD, settle_gc

    settle_gc(young_threshold=None, old_threshold=OLD_THRESHOLD)
    bootstrap, stop = start_kafka()
    results: dict[str, list[float]] = {"athomic": [], "aiokafka": []}
    try:
        for run in range(1, runs + 1):
            settings, topic = asyncio.run(backlog(bootstrap, n))
            results["aiokafka"].append(asyncio.run(baseline(bootstrap, topic, n)))
            results["athomic"].append(asyncio.run(ours(settings, topic, n)))
            print(f"run {run}: athomic {results['athomic'][-1]:.0f} msg/s, aiokafka "
                  f"{results['aiokafka'][-1]:.0f} msg/s", flush=True)
    finally:
        stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--backlog", type=int, default=30000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-lateness", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--cancel", action="store_true",
                        help="also with caller-chosen ids, and with 10%% cancelled")
    parser.add_argument("--compact-ab", action="store_true",
                        help="lateness with held messages compact (default) and as objects")
    parser.add_argument("--warmup", type=int, default=20, metavar="SECONDS",
                        help="first load the broker this long, not counted (0: none)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a republisher setting for the lateness runs (JSON value), "
                             "e.g. --set linger_ms=20")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    overrides = {name: json.loads(value) for name, value in
                 (item.split("=", 1) for item in args.set)}
    report: dict[str, Any] = {"machine": machine(), "republisher": overrides}
    if not args.skip_lateness:
        variants = {"auto ids": {}, "caller ids": {"ids": True},
                    "caller ids, 10% cancelled": {"ids": True, "cancel_share": 0.1}}
        if not args.cancel:
            variants = {"auto ids": {}}
        if args.compact_ab:  # held messages compact (the default) vs as objects
            variants = {"auto ids": {},
                        "auto ids, held as objects": {"republisher": {"compact_after_s": None}}}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        # One broker for every run (a fresh local Ray each), warmed first: a broker's JVM
        # compiles its hot paths in its first minute of load, ~17 CPU-seconds here that
        # would otherwise land in the first run, on the same two cores.
        bootstrap, stop_kafka = start_kafka()
        try:
            if args.warmup:
                with local_ray():
                    warm = lateness(bootstrap, args.rate, args.warmup,
                                    republisher=overrides)
                print(f"warm-up ({args.warmup} s, not counted): p99 "
                      f"{warm['p99'] * 1000:.0f} ms, max {warm['max'] * 1000:.0f} ms",
                      flush=True)
                report["warmup"] = {k: v for k, v in warm.items()
                                    if k not in ("quantiles", "tail")}
            for run in range(1, args.runs + 1):
                for name, options in variants.items():
                    with local_ray():
                        runs[name].append(lateness(bootstrap, args.rate, args.seconds, **{
                            **options, "republisher": {**overrides, **options.get(
                                "republisher", {})}}))  # type: ignore[arg-type]
                    r = runs[name][-1]
                    print(f"lateness run {run} ({name}): {r['received']}/"
                          f"{r['published'] - r['cancelled']} delivered ({r['unique']} unique, "
                          f"{r['cancelled']} cancelled), early {r['early']}, p50 "
                          f"{r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms, max "
                          f"{r['max'] * 1000:.0f} ms at {r['published_rate']:.0f} msg/s "
                          "published", flush=True)
        finally:
            stop_kafka()
        report["lateness"] = runs
        for name, rs in runs.items():
            per_run_p99 = ", ".join(f"{r['p99'] * 1000:.0f}" for r in rs)
            print(f"\nlateness ({name}), median of {args.runs} runs: p50 "
                  f"{median([r['p50'] for r in rs]) * 1000:.0f} ms, p99 "
                  f"{median([r['p99'] for r in rs]) * 1000:.0f} ms, max "
                  f"{median([r['max'] for r in rs]) * 1000:.0f} ms (p99 per run "
                  f"{per_run_p99}); early in all runs: {sum(r['early'] for r in rs)} "
                  "(target: p99 <= 100 ms, max <= 300 ms, 0 early)")
    if not args.skip_throughput:
        res = throughput(args.backlog, args.runs)
        report["throughput"] = res
        ratios = [a / b for a, b in zip(res["athomic"], res["aiokafka"], strict=True)]
        print(f"\nrepublish throughput, median of {args.runs}: athomic "
              f"{median(res['athomic']):.0f} msg/s, plain aiokafka transactional loop "
              f"{median(res['aiokafka']):.0f} msg/s; ratio median {median(ratios):.2f} "
              f"({spread(ratios)}) (target >= 0.85)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
