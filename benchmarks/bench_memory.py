"""Memory of a DelayBucketActor holding delayed messages.

    python benchmarks/bench_memory.py [--messages 100000 --payload 1024] [--runs 3]

One delay topic (bucket 60 s, 3 partitions), ``republisher.near_window_s=60`` so that
everything published is read at once and held in memory until due, ``max_held`` above
``--messages``. Per run, on a fresh DelayBucketActor (a new connection):

1. warm-up: a few delayed messages go through the actor (so its first transaction, imports
   and caches are part of the baseline), then the baseline: RSS and USS of the actor's
   process (``stats()["pid"]``);
2. ``--messages`` delayed messages of ``--payload`` random bytes (incompressible: nothing
   flatters the number), delays uniform in 40-55 s, through ``handle.publish_batch``;
3. once the actor's ``stats()["held"]`` reaches ``--messages``: RSS and USS again. The
   growth is reported per message and as a ratio to the payload bytes and to the bytes of
   the delay topic's records (envelope value + key + headers, read back from the topic);
4. the held messages are then delivered: a consumer in its own process (read_committed)
   checks that each arrives once and none before its due time.

Target: growth <= 1.5 x payload bytes. Uses KAFKA_BOOTSTRAP when set, else starts
deploy/kafka/kafka-local on ATHOMIC_BENCH_KAFKA_PORT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import time
import uuid
from typing import Any

from _bench import kafka_and_ray, machine, median, spread
from aiokafka import AIOKafkaConsumer, TopicPartition

import athomic
from athomic import MessagingSettings, ProducerFactory

TARGET = 1.5
MiB = 1024 * 1024


def memory(pid: int) -> dict[str, int]:
    """RSS and USS (private pages) of a process, in bytes: what psutil's
    ``memory_full_info()`` reports, read from /proc (psutil when installed)."""
    try:
        import psutil  # type: ignore[import-untyped]

        info = psutil.Process(pid).memory_full_info()
        return {"rss": info.rss, "uss": info.uss}
    except ImportError:
        pass
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return {"rss": fields["Rss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def consume(bootstrap: str, topic: str, expected: int, timeout: float, out: Any) -> None:
    """In its own process: read ``expected`` records of the final topic, count early
    arrivals (arrival before the due time) and distinct message ids."""

    async def run() -> dict[str, Any]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", group_id=None,
                                    isolation_level="read_committed", fetch_max_wait_ms=10,
                                    metadata_max_age_ms=500)
        await consumer.start()
        received = early = 0
        ids: set[bytes] = set()
        deadline = time.time() + timeout
        try:
            while received < expected and time.time() < deadline:
                batch = await consumer.getmany(timeout_ms=100)
                now_ms = time.time() * 1000
                for records in batch.values():
                    for r in records:
                        h = dict(r.headers)
                        received += 1
                        early += now_ms < int(h["athomic-deliver-at"])
                        ids.add(h["message-id"])
        finally:
            await consumer.stop()
        return {"received": received, "unique": len(ids), "early": early}

    out.put(asyncio.run(run()))


async def record_bytes(bootstrap: str, topic: str, partitions: int) -> dict[str, int]:
    """Records and bytes (value, and value + key + headers) in a delay topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                isolation_level="read_committed",
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * MiB)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    end = await consumer.end_offsets(tps)
    count = values = total = 0
    try:
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                for r in records:
                    count += 1
                    values += len(r.value or b"")
                    total += len(r.value or b"") + len(r.key or b"") + sum(
                        len(k) + len(v) for k, v in r.headers)
    finally:
        await consumer.stop()
    return {"records": count, "value_bytes": values, "record_bytes": total}


def stats_of(actor: Any) -> dict[str, Any]:
    import ray

    return ray.get(actor.stats.remote(), timeout=60)  # type: ignore[no-any-return]


def wait_for(actor: Any, what: str, check: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = stats_of(actor)
        if check(stats):
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {timeout:.0f}s "
                               f"(held {stats['held']}, {stats['republished']})")
        time.sleep(0.2)


def _where() -> str:
    import athomic.republisher.loop

    return os.path.dirname(athomic.republisher.loop.__file__)


def one_run(bootstrap: str, n: int, payload: int, partitions: int) -> dict[str, Any]:
    import ray

    from athomic.actors.topology import NAMESPACE, actor_names

    tag = uuid.uuid4().hex[:6]
    topic = f"bench.mem.{tag}.1m"
    settings = MessagingSettings(
        bootstrap_servers=bootstrap, connection_name=f"bm{tag}", delay_topics={60: topic},
        republisher={"near_window_s": 60, "max_held": max(200_000, 2 * n),
                     "partitions": partitions})
    handle = ProducerFactory.create(settings)
    final = f"bench.mem.final.{tag}"
    reader = None
    try:
        (name,) = actor_names(settings.connection_name, "delay")
        actor = ray.get_actor(name, namespace=NAMESPACE)
        rnd = random.Random(3)
        # warm-up: the actor's first transactions are part of the baseline
        warm = 200
        ray.get(handle.publish_batch.remote(
            [{"message": rnd.randbytes(payload), "key": f"w{i}", "delay_seconds": 1.0}
             for i in range(warm)], topic=final))
        wait_for(actor, "warm-up", lambda s: s["republished"]["final"] >= warm, 60)
        time.sleep(2)
        pid = stats_of(actor)["pid"]
        before = memory(pid)

        queue: Any = mp.get_context("spawn").Queue()
        reader = mp.get_context("spawn").Process(
            target=consume, args=(bootstrap, final, warm + n, 300, queue))
        reader.start()
        batch = 1000
        start = time.time()
        pending: list[Any] = []
        for lo in range(0, n, batch):
            items = [{"message": rnd.randbytes(payload), "key": f"k{(lo + i) % 1000}",
                      "delay_seconds": rnd.uniform(40.0, 55.0)}
                     for i in range(min(batch, n - lo))]
            pending.append(handle.publish_batch.remote(items, topic=final))
            while len(pending) > 3:
                ray.get(pending.pop(0))
        ray.get(pending)
        published_s = time.time() - start
        held = wait_for(actor, "held", lambda s: s["held"] >= n, 35)
        held_s = time.time() - start
        after = memory(pid)
        time.sleep(1)
        settled = memory(pid)  # a second later: nothing freed or grown meanwhile?

        sizes = asyncio.run(record_bytes(bootstrap, topic, partitions))
        result: dict[str, Any] = queue.get(timeout=400)
        reader.join()
        done = stats_of(actor)
        payload_bytes = n * payload
        record = sizes["record_bytes"] * n / sizes["records"]  # the warm-up's excluded
        growth = {k: after[k] - before[k] for k in after}
        result.update(
            messages=n, payload=payload, published_s=round(published_s, 1),
            held_after_s=round(held_s, 1), held=held["held"], pid=pid,
            before=before, after=after, settled=settled, sizes=sizes,
            rss_per_message=growth["rss"] / n, uss_per_message=growth["uss"] / n,
            rss_ratio_payload=growth["rss"] / payload_bytes,
            uss_ratio_payload=growth["uss"] / payload_bytes,
            rss_ratio_records=growth["rss"] / record, uss_ratio_records=growth["uss"] / record,
            envelope_bytes=sizes["value_bytes"] / sizes["records"],
            # the actor's own account of the held messages (absent before it existed)
            held_bytes_per_message=held.get("held_bytes", 0) / n,
            settled_rss_per_message=(settled["rss"] - before["rss"]) / n,
            republished=done["republished"], lateness=done["lateness"])
        return result
    finally:
        if reader is not None and reader.is_alive():
            reader.terminate()
            reader.join()
        ProducerFactory.shutdown(settings.connection_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="", help="a name for the code measured")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"athomic from {os.path.dirname(athomic.__file__)}", flush=True)
    report: dict[str, Any] = {"machine": machine(), "label": args.label, "runs": []}
    with kafka_and_ray() as bootstrap:
        import ray

        print(f"Ray workers import athomic.republisher from "
              f"{ray.get(ray.remote(_where).remote())}", flush=True)
        attempts = 0
        while len(report["runs"]) < args.runs:
            attempts += 1
            run = len(report["runs"]) + 1
            try:
                r = one_run(bootstrap, args.messages, args.payload, args.partitions)
            except Exception as exc:  # e.g. publishes timing out on a loaded machine
                print(f"run {run} failed, measured again: {exc!r:.300}", flush=True)
                report.setdefault("failed", []).append(repr(exc)[:1000])
                if attempts >= 2 * args.runs:
                    raise
                continue
            report["runs"].append(r)
            print(f"run {run}: held {r['held']} after {r['held_after_s']} s; growth RSS "
                  f"{r['rss_per_message']:.0f} B/msg ({r['rss_ratio_payload']:.2f}x payload, "
                  f"{r['rss_ratio_records']:.2f}x records), USS {r['uss_per_message']:.0f} "
                  f"B/msg ({r['uss_ratio_payload']:.2f}x payload); 1 s later RSS "
                  f"{r['settled_rss_per_message']:.0f} B/msg; store's own account "
                  f"{r['held_bytes_per_message']:.0f} B/msg; envelope "
                  f"{r['envelope_bytes']:.0f} B; delivered {r['received']} "
                  f"({r['unique']} unique), early {r['early']}", flush=True)
    runs = report["runs"]

    def summary(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{median(values):.2f} ({spread(values)})"

    print(f"\nmemory growth holding {args.messages} x {args.payload} B, median of "
          f"{len(runs)} runs (per-run range):")
    print(f"  RSS: {summary('rss_per_message')} B/msg, {summary('rss_ratio_payload')} x "
          f"payload, {summary('rss_ratio_records')} x record bytes")
    print(f"  USS: {summary('uss_per_message')} B/msg, {summary('uss_ratio_payload')} x "
          f"payload, {summary('uss_ratio_records')} x record bytes")
    ratio = median([r["rss_ratio_payload"] for r in runs])
    print(f"  target: <= {TARGET} x payload: {'met' if ratio <= TARGET else 'MISSED'} "
          f"(RSS {ratio:.2f}); early deliveries in all runs: "
          f"{sum(r['early'] for r in runs)}, delivered once: "
          f"{all(r['unique'] == r['received'] == r['messages'] + 200 for r in runs)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
