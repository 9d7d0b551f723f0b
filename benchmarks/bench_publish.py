"""Publishing benchmark: athomic against its ceilings, measured in the same run.

    python benchmarks/bench_publish.py [--runs 5]

1. One at a time: ``ray.get(handle.publish.remote(...))`` per 1 KiB JSON message, against
   a no-op async Ray actor call (Ray's round trip, the ceiling of any actor-based
   publisher) and against ``await producer.send_and_wait(...)`` on a plain in-process
   aiokafka producer (the broker's round trip).
2. Batches: ``publish_batch`` of 1,000 messages per call, against a plain in-process
   aiokafka producer with the same acks/idempotence sending the same bytes (serialise and
   send all, then await all acknowledgements). athomic is measured one call at a time, and
   with a few calls in flight (how a Ray job publishing many batches would call it).

Runs are interleaved (each run measures every variant) and each figure is the median.
Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import orjson
import ray
from _bench import kafka_and_ray, machine, median
from aiokafka import AIOKafkaProducer

from athomic import MessagingSettings, ProducerFactory, PublishingOutcome


def event(i: int) -> dict[str, Any]:
    """A 1 KiB JSON event."""
    doc = {"event": "order.priced", "order_id": i, "user": f"user-{i % 977}",
           "amount": round(i * 1.37, 2), "note": ""}
    doc["note"] = "x" * (1024 - len(orjson.dumps(doc)))
    return doc


@ray.remote(num_cpus=0)
class NoOp:
    async def publish(self, request: Any) -> str:
        return "ok"


async def aiokafka_single(bootstrap: str, topic: str, n: int) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=0)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"warm")
        payloads = [orjson.dumps(event(i)) for i in range(n)]
        start = time.perf_counter()
        for i, p in enumerate(payloads):
            await producer.send_and_wait(topic, p, key=f"k{i}".encode())
        return n / (time.perf_counter() - start)
    finally:
        await producer.stop()


async def aiokafka_batches(bootstrap: str, topic: str, batches: int, size: int) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=0,
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"warm")
        start = time.perf_counter()
        for b in range(batches):
            # the same work athomic does per message: serialise, then send
            futures = [await producer.send(topic, orjson.dumps(event(b * size + i)),
                                           key=f"k{i}".encode())
                       for i in range(size)]
            await asyncio.gather(*futures)
        return batches * size / (time.perf_counter() - start)
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--single", type=int, default=2000, help="messages, one at a time")
    parser.add_argument("--batches", type=int, default=20, help="batches of --batch-size")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=3,
                        help="publish_batch calls in flight in the pipelined variant")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results: dict[str, list[float]] = {k: [] for k in (
        "noop_actor", "aiokafka_single", "athomic_single", "aiokafka_batch",
        "athomic_batch", "athomic_batch_pipelined")}
    with kafka_and_ray() as bootstrap:
        conn = f"bench{uuid.uuid4().hex[:6]}"
        handle = ProducerFactory.create(MessagingSettings(bootstrap_servers=bootstrap,
                                                          connection_name=conn))
        noop = NoOp.remote()
        ray.get(noop.publish.remote(None))
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

            msgs = [event(i) for i in range(args.single)]
            start = time.perf_counter()
            for i, m in enumerate(msgs):
                ray.get(handle.publish.remote(topic=topic + ".ath1", message=m, key=f"k{i}"))
            results["athomic_single"].append(args.single / (time.perf_counter() - start))

            results["aiokafka_batch"].append(asyncio.run(aiokafka_batches(
                bootstrap, topic + ".rawb", args.batches, args.batch_size)))

            start = time.perf_counter()
            for b in range(args.batches):
                items = [{"message": event(b * args.batch_size + i), "key": f"k{i}"}
                         for i in range(args.batch_size)]
                out = ray.get(handle.publish_batch.remote(items, topic=topic + ".athb"))
                assert out[-1] is PublishingOutcome.SUCCESS_DIRECT
            results["athomic_batch"].append(
                args.batches * args.batch_size / (time.perf_counter() - start))

            # the way a Ray job would publish many batches: several calls in flight
            start = time.perf_counter()
            pending: list[Any] = []
            for b in range(args.batches):
                items = [{"message": event(b * args.batch_size + i), "key": f"k{i}"}
                         for i in range(args.batch_size)]
                if len(pending) >= args.in_flight:
                    ray.get(pending.pop(0))
                pending.append(handle.publish_batch.remote(items, topic=topic + ".athp"))
            ray.get(pending)
            results["athomic_batch_pipelined"].append(
                args.batches * args.batch_size / (time.perf_counter() - start))
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items()),
                  flush=True)
        ProducerFactory.shutdown(conn)
    med = {k: median(v) for k, v in results.items()}
    print(f"\nmedian of {args.runs} runs, 1 KiB JSON messages, acks=all, idempotent "
          f"({machine()})")
    print(f"{'variant':34} {'msg/s':>10}")
    for k, v in med.items():
        print(f"{k:34} {v:>10.0f}")
    print(f"one at a time: athomic / no-op actor call   = "
          f"{med['athomic_single'] / med['noop_actor']:.2f}  (target >= 0.8)")
    print(f"one at a time: athomic / aiokafka send_and_wait = "
          f"{med['athomic_single'] / med['aiokafka_single']:.2f}")
    print(f"batches of {args.batch_size}: athomic / aiokafka = "
          f"{med['athomic_batch'] / med['aiokafka_batch']:.2f}  (target >= 0.7)")
    print(f"batches of {args.batch_size}, {args.in_flight} in flight: athomic / aiokafka = "
          f"{med['athomic_batch_pipelined'] / med['aiokafka_batch']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "median": med, "machine": machine()}, f, indent=2)


if __name__ == "__main__":
    main()
