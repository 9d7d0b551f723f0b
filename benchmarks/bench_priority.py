"""Priority benchmark: HIGH latency while the NORMAL lane floods, against HIGH unloaded.

    python benchmarks/bench_priority.py [--runs 5] [--json out.json]

Per run: ``--samples`` HIGH publishes one at a time (``ray.get(handle.publish.remote(...,
priority="high"))``, 1 KiB JSON), first with nothing else running, then while a flood
keeps 4 ``publish_batch`` calls of 1,000 NORMAL messages in flight continuously (from its
own Ray actor process, as another job on the node would). The figure is the ratio of the
HIGH p99 under the flood to the HIGH p99 unloaded, same run.

Two handles are measured, interleaved: the default settings (the NORMAL lane's actor
process at a lower scheduling priority, ``lanes.nice = 4``) and ``lanes.nice = 0`` (every
lane alike), so the effect of that setting is measured, not assumed.
Before the runs, each handle takes a flood and HIGH publishes for part of ``--warmup``
seconds, not counted: a freshly started broker's JVM compiles its hot paths in its first
minute of load, on the same cores.

``--floor`` runs, instead, what HIGH is made of, interleaved call by call with it (in a
shuffled order each round), unloaded and under the same flood: a no-op Ray actor call,
an in-process aiokafka ``send_and_wait``, and the contract's minimal actor (an async Ray
actor around a plain aiokafka producer): how much of HIGH's tail under the flood any
actor call or any send has here.
Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import ray
from _bench import kafka_and_ray, machine, median, spread
from bench_publish import MinimalActor, NoOp, event, plain_producer

from athomic import MessagingSettings, ProducerFactory, PublishingOutcome

FLOOD_BATCH = 1000
FLOOD_IN_FLIGHT = 4


@ray.remote(num_cpus=0)
class Flood:
    """Keeps FLOOD_IN_FLIGHT publish_batch calls of NORMAL messages in flight until
    stopped; returns how many messages were acknowledged."""

    def __init__(self, handle: Any, topic: str) -> None:
        self.handle, self.topic = handle, topic
        self.running = False
        self.items = [{"message": event(i), "key": f"k{i}"} for i in range(FLOOD_BATCH)]

    async def run(self) -> int:
        self.running = True
        sent = 0

        async def one() -> None:
            nonlocal sent
            while self.running:
                out = await self.handle.publish_batch(self.items, topic=self.topic)
                assert out[-1] is PublishingOutcome.SUCCESS_DIRECT
                sent += len(out)

        await asyncio.gather(*(one() for _ in range(FLOOD_IN_FLIGHT)))
        return sent

    async def stop(self) -> None:
        self.running = False


@contextlib.contextmanager
def flooding(handle: Any, topic: str, settle_s: float = 0.0) -> Iterator[dict[str, float]]:
    """A Flood actor keeping NORMAL batches in flight through ``handle`` for the body
    (after ``settle_s`` to reach its steady state); on exit ``found["msg_s"]``: its rate
    over the body and the settling."""
    flood = Flood.remote(handle, topic)
    running = flood.run.remote()
    time.sleep(settle_s)
    start = time.perf_counter()
    found: dict[str, float] = {}
    try:
        yield found
    finally:
        ray.get(flood.stop.remote())
        sent = ray.get(running)
        found["msg_s"] = sent / (time.perf_counter() - start + settle_s)
        ray.kill(flood)


def high_latencies(handle: Any, topic: str, samples: int) -> list[float]:
    """Milliseconds per HIGH publish, one at a time."""
    out = []
    for i in range(samples):
        start = time.perf_counter()
        outcome = ray.get(handle.publish.remote(topic=topic, message=event(i), key=f"h{i}",
                                                priority="high"))
        out.append((time.perf_counter() - start) * 1000)
        assert outcome is PublishingOutcome.SUCCESS_DIRECT
    return out


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def floor_latencies(variants: dict[str, Any], samples: int) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, interleaved call by call."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    shuffle = random.Random(11).shuffle
    for i in range(samples):
        shuffle(names)
        for name in names:
            start = time.perf_counter()
            variants[name](i)
            out[name].append((time.perf_counter() - start) * 1000)
    return out


def floor_runs(bootstrap: str, runs: int, samples: int, warmup: float) -> dict[str, Any]:
    """HIGH beside a no-op actor call, in-process send_and_wait and the minimal actor,
    unloaded and under the flood, per run."""
    tag = uuid.uuid4().hex[:6]
    topic = f"prio.floor.{tag}"
    handle = ProducerFactory.create(MessagingSettings(bootstrap_servers=bootstrap,
                                                      connection_name=f"floor{tag}"))
    noop = NoOp.remote()
    minimal = MinimalActor.remote(bootstrap)
    ray.get([noop.publish.remote(None), minimal.start.remote()])
    loop = asyncio.new_event_loop()
    producer = loop.run_until_complete(plain_producer(bootstrap))

    def high(i: int) -> None:
        assert ray.get(handle.publish.remote(topic=topic, message=event(i), key=f"h{i}",
                                             priority="high")) \
            is PublishingOutcome.SUCCESS_DIRECT

    variants = {
        "athomic HIGH": high,
        "no-op actor call": lambda i: ray.get(noop.publish.remote(None)),
        "send_and_wait in process": lambda i: loop.run_until_complete(
            producer.send_and_wait(topic + ".raw", orjson.dumps(event(i)), key=b"k")),
        "minimal actor": lambda i: ray.get(minimal.publish_outcome.remote(
            topic + ".min", b"k", orjson.dumps(event(i)))),
    }
    for variant in variants.values():
        variant(0)
    results: dict[str, Any] = {k: {"unloaded": [], "flood": []} for k in variants}
    try:
        for run in range(0, runs + 1):  # run 0: the warm-up, not counted
            unloaded = floor_latencies(variants, samples if run else 100)
            with flooding(handle, topic + ".flood", 2.0 if run else warmup):
                flooded = floor_latencies(variants, samples if run else 100)
            if not run:
                continue
            for k in variants:
                results[k]["unloaded"].append(unloaded[k])
                results[k]["flood"].append(flooded[k])
                un, fl = unloaded[k], flooded[k]
                print(f"run {run} {k:26} p50/p99 unloaded {np.median(un):.1f}/{p99(un):.1f} "
                      f"ms, under flood {np.median(fl):.1f}/{p99(fl):.1f} ms "
                      f"(ratio {p99(fl) / p99(un):.2f})", flush=True)
    finally:
        loop.run_until_complete(producer.stop())
        loop.close()
        ray.get(minimal.stop.remote())
        ProducerFactory.shutdown(handle.connection_name)
    print(f"\n{runs} runs, {samples} calls of each per measurement, interleaved; flood "
          f"{FLOOD_IN_FLIGHT} x {FLOOD_BATCH} NORMAL in flight ({machine()})")
    ratios = {}
    for k, lat in results.items():
        ratios[k] = [p99(f) / p99(u) for u, f in zip(lat["unloaded"], lat["flood"],
                                                    strict=True)]
        print(f"{k:26} p99 unloaded {median([p99(x) for x in lat['unloaded']]):.1f} ms, "
              f"under flood {median([p99(x) for x in lat['flood']]):.1f} ms; ratio median "
              f"{median(ratios[k]):.2f} ({spread(ratios[k])}), worst {max(ratios[k]):.2f}")
    return {"latencies_ms": results, "ratios": ratios, "samples": samples,
            "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000,
                        help="HIGH publishes per measurement")
    parser.add_argument("--warmup", type=float, default=20.0, metavar="SECONDS",
                        help="load before the runs, not counted (0: none)")
    parser.add_argument("--floor", action="store_true",
                        help="HIGH beside a no-op actor call, send_and_wait and the minimal "
                             "actor, interleaved (instead of the two handles)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.floor:
        with kafka_and_ray() as bootstrap:
            found = floor_runs(bootstrap, args.runs, args.samples, args.warmup)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(found, f)
        return
    variants = {"nice 4 (default)": 4, "nice 0": 0}
    lat: dict[str, dict[str, list[list[float]]]] = {
        v: {"unloaded": [], "flood": []} for v in variants}
    flooded: dict[str, list[float]] = {v: [] for v in variants}
    with kafka_and_ray() as bootstrap:
        tag = uuid.uuid4().hex[:6]
        handles = {}
        for v, nice in variants.items():
            conn = f"prio{tag}{nice}"
            handles[v] = ProducerFactory.create(MessagingSettings(
                bootstrap_servers=bootstrap, connection_name=conn, lanes={"nice": nice}))
            ray.get(handles[v].publish.remote(topic=f"prio.{tag}", message={"warm": 1},
                                              priority="high"))
            ray.get(handles[v].publish.remote(topic=f"prio.{tag}.flood", message={"warm": 1}))
        for handle in handles.values():  # warm-up, not counted
            with flooding(handle, f"prio.{tag}.flood"):
                until = time.monotonic() + args.warmup / len(handles)
                while time.monotonic() < until:
                    high_latencies(handle, f"prio.{tag}", 50)
        for run in range(1, args.runs + 1):
            for v, handle in handles.items():
                topic = f"prio.{tag}"
                lat[v]["unloaded"].append(high_latencies(handle, topic, args.samples))
                with flooding(handle, f"prio.{tag}.flood", 2.0) as flood:
                    lat[v]["flood"].append(high_latencies(handle, topic, args.samples))
                flooded[v].append(flood["msg_s"])
                un, fl = lat[v]["unloaded"][-1], lat[v]["flood"][-1]
                print(f"run {run} {v}: HIGH p50/p99 unloaded {np.median(un):.1f}/"
                      f"{p99(un):.1f} ms, under flood {np.median(fl):.1f}/{p99(fl):.1f} ms "
                      f"(ratio {p99(fl) / p99(un):.2f}); flood {flooded[v][-1]:.0f} msg/s",
                      flush=True)
        for handle in handles.values():
            ProducerFactory.shutdown(handle.connection_name)
    print(f"\n{args.runs} runs, {args.samples} HIGH publishes per measurement; flood "
          f"{FLOOD_IN_FLIGHT} x {FLOOD_BATCH} NORMAL in flight ({machine()})")
    ratios = {}
    for v in variants:
        ratios[v] = [p99(f) / p99(u) for u, f in zip(lat[v]["unloaded"], lat[v]["flood"],
                                                    strict=True)]
        print(f"{v:18} HIGH p99 unloaded {median([p99(x) for x in lat[v]['unloaded']]):.1f} "
              f"ms, under flood {median([p99(x) for x in lat[v]['flood']]):.1f} ms; ratio "
              f"median {median(ratios[v]):.2f} ({spread(ratios[v])}), worst "
              f"{max(ratios[v]):.2f}; flood median {median(flooded[v]):.0f} msg/s")
    print("target: ratio <= 3 in every run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"latencies_ms": lat, "ratios": ratios, "flood_msg_s": flooded,
                       "samples": args.samples, "machine": machine()}, f)


if __name__ == "__main__":
    main()
