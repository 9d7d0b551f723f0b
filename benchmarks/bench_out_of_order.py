"""Out-of-order commits: what the commit-metadata limit does to lateness.

    python benchmarks/bench_out_of_order.py [--messages 60000] [--runs 3]

One partition of a delay topic (the smallest bucket, 8 s, which reads its whole length
ahead) receives ``--messages`` messages in a burst; a random half is due 1 s later, the
other half 8 s later. The early half leaves out of offset order above the late half, so the
commit metadata must name tens of thousands of scattered offsets: more than Kafka's 4 KiB
hold (about 20,800 at this density). Two ways to stay within it, same run:

- ``restage`` (what athomic does): the lowest messages still waiting are written once more at
  the end of the partition, so the committed offset moves on;
- ``defer`` (the fallback, forced here by hiding the waiting messages): the highest due
  messages wait until the lowest pending one is out.

Reports the lateness of the early half (commit time - due time, from the republisher's own
statistics), how many were restaged or deferred, and that each message was released once.
Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from typing import Any

from _bench import machine, median, start_kafka

from athomic import MessagingSettings
from athomic.actors.delay_bucket import DelayBucketActor
from athomic.actors.producer import ProducerActor
from athomic.messages import MessagePriority, PublishRequest, new_message_ids
from athomic.republisher import loop


async def one(bootstrap: str, n: int, mode: str) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    topic = f"bench.ooo.{tag}.8s"
    settings = MessagingSettings(
        bootstrap_servers=bootstrap, connection_name=f"bo{tag}", delay_topics={8: topic},
        republisher={"enabled": False, "partitions": 1, "max_held": 200_000,
                     "near_window_s": 0.5})
    producer = ProducerActor(settings)
    rnd = random.Random(7)
    start = time.time() + 2.0
    body = b'{"pad": "' + b"x" * 100 + b'"}'
    early = 0
    for lo in range(0, n, 5000):
        ids = new_message_ids(min(5000, n - lo))
        reqs = []
        for i, mid in enumerate(ids):
            soon = rnd.random() < 0.5
            early += soon
            reqs.append(PublishRequest(
                f"bench.ooo.out.{tag}", body, f"k{lo + i}".encode(), [], "application/json",
                None, MessagePriority.NORMAL, start + (1.0 if soon else 8.0), mid, start))
        await producer.publish_batch(reqs)
    await producer.stop()
    worker = DelayBucketActor(settings, topic, autostart=False)
    original = loop.HeldStore.restageable
    if mode == "defer":
        loop.HeldStore.restageable = lambda self, hot: []  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(worker.run_forever())
        await worker.ready(60)
        deadline = time.time() + 120
        rep = worker.republisher
        while rep.counts["final"] < n and time.time() < deadline:
            await asyncio.sleep(0.1)
        stats = rep.stats()
        rep.stop()
        await task
    finally:
        loop.HeldStore.restageable = original  # type: ignore[method-assign]
    return {"mode": mode, "messages": n, "early_half": early,
            "released": stats["republished"]["final"],
            "restaged": stats["republished"]["restage"],
            "lateness": stats["lateness"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    bootstrap, stop = start_kafka()
    results: dict[str, list[dict[str, Any]]] = {"restage": [], "defer": []}
    try:
        for run in range(1, args.runs + 1):
            for mode in ("restage", "defer"):
                r = asyncio.run(one(bootstrap, args.messages, mode))
                results[mode].append(r)
                late = r["lateness"]
                print(f"run {run} {mode:>7}: released {r['released']}/{r['messages']}, "
                      f"restaged {r['restaged']}, lateness p50 {late['p50_s'] * 1000:.0f} ms "
                      f"p99 {late['p99_s'] * 1000:.0f} ms max {late['max_s'] * 1000:.0f} ms",
                      flush=True)
    finally:
        stop()
    for mode, runs in results.items():
        print(f"{mode}: median p50 {median([r['lateness']['p50_s'] for r in runs]) * 1000:.0f}"
              f" ms, p99 {median([r['lateness']['p99_s'] for r in runs]) * 1000:.0f} ms, max "
              f"{median([r['lateness']['max_s'] for r in runs]) * 1000:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
