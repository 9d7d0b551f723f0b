"""Ray Data sink benchmark: AthomicDatasink against ``ds.write_kafka`` and against the
``map_batches`` emitter of examples/map_batches_events.py, same rows, same run.

    python benchmarks/bench_datasink.py [--runs 3] [--rows 30000]

The dataset (1 KiB JSON rows with a key column) is materialised once; every variant writes
the same blocks to a fresh 3-partition topic, and each run measures every variant in turn.
Rows/s is rows acknowledged by the brokers over the wall time of the write; after each
write the topic's end offsets are checked to hold every row.

- ``athomic_sink``: ``ds.write_datasink(AthomicDatasink(settings, topic, key_column="key"))``
  (``publish_batch`` of 1,000 rows, 4 calls in flight per write task).
- ``write_kafka``: Ray Data's own sink (confluent-kafka), with ``enable.idempotence`` (so
  acks=all and idempotent, as athomic): best effort otherwise, no pipeline, no headers.
- ``map_batches_example``: the example's emitter: a class on one actor
  (``ActorPoolStrategy(size=1)``, ``num_cpus=0.5``), ``publish_batch`` per Ray Data batch
  of 100 rows, waited for before the next; ``map_batches_1000``: the same with batches of
  1,000.

Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local (port
ATHOMIC_BENCH_KAFKA_PORT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import ray
import ray.data
from _bench import create_topic, kafka_and_ray, machine, median

from athomic import MessagingSettings, ProducerFactory, ProducerHandle
from athomic.data import AthomicDatasink

PARTITIONS = 3


def make_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """1 KiB JSON rows (as ``write_kafka`` serialises them) with a key column."""
    ids = batch["id"].tolist()
    base = len(orjson.dumps({"row": 0, "key": "user-000", "amount": 0.0, "note": ""}))
    return pa.table({
        "row": pa.array(ids, pa.int64()),
        "key": [f"user-{i % 977:03d}" for i in ids],
        "amount": [round(i * 1.37, 2) for i in ids],
        "note": ["x" * (1024 - base - len(str(i))) for i in ids],
    })


class EmitRows:
    """examples/map_batches_events.py's emitter, publishing the benchmark's rows."""

    def __init__(self, handle: ProducerHandle, topic: str) -> None:
        self.handle = handle
        self.topic = topic

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items = [{"message": {"row": int(r), "key": str(k), "amount": float(a),
                              "note": str(n)}, "key": str(k)}
                 for r, k, a, n in zip(batch["row"], batch["key"], batch["amount"],
                                       batch["note"], strict=True)]
        outcomes = ray.get(self.handle.publish_batch.remote(items, topic=self.topic))
        batch["published"] = np.array([o.value for o in outcomes])
        return batch


async def records_in(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


def timed(write: Callable[[], Any]) -> float:
    start = time.perf_counter()
    write()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    variants = ("athomic_sink", "write_kafka", "map_batches_example", "map_batches_1000")
    results: dict[str, list[float]] = {k: [] for k in variants}
    with kafka_and_ray() as bootstrap:
        conn = f"bench{uuid.uuid4().hex[:6]}"
        settings = MessagingSettings(bootstrap_servers=bootstrap, connection_name=conn)
        handle = ProducerFactory.create(settings)
        ds = ray.data.range(args.rows, override_num_blocks=args.blocks).map_batches(
            make_rows, batch_format="numpy").materialize()
        size = len(orjson.dumps(ds.take(1)[0]))
        tag = uuid.uuid4().hex[:6]
        writes: dict[str, Callable[[Any, str], Any]] = {
            "athomic_sink": lambda data, topic: data.write_datasink(
                AthomicDatasink(handle, topic=topic, key_column="key")),
            "write_kafka": lambda data, topic: data.write_kafka(
                topic, bootstrap, key_field="key",
                producer_config={"enable.idempotence": True}),
            "map_batches_example": lambda data, topic: data.map_batches(
                EmitRows, fn_constructor_args=(handle, topic), batch_size=100,
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5).materialize(),
            "map_batches_1000": lambda data, topic: data.map_batches(
                EmitRows, fn_constructor_args=(handle, topic), batch_size=1000,
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5).materialize(),
        }
        # warm up (actors, worker processes, the confluent client) on a few rows
        few = ray.data.from_arrow(make_rows({"id": np.arange(200)}))
        for name, write in writes.items():
            topic = f"bench.sink.{tag}.warm.{name}"
            asyncio.run(create_topic(bootstrap, topic, PARTITIONS))
            write(few, topic)
        for run in range(1, args.runs + 1):
            for name, write in writes.items():
                topic = f"bench.sink.{tag}.{run}.{name}"
                asyncio.run(create_topic(bootstrap, topic, PARTITIONS))
                seconds = timed(lambda: write(ds, topic))  # noqa: B023 (called at once)
                written = asyncio.run(records_in(bootstrap, topic))
                assert written == args.rows, f"{name}: {written} of {args.rows} rows in {topic}"
                results[name].append(args.rows / seconds)
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in results.items()),
                  flush=True)
        ProducerFactory.shutdown(conn)
    print_report(results, args.rows, size, args.runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "machine": machine()}, f, indent=2)


def print_report(results: dict[str, list[float]], rows: int, size: int, runs: int) -> None:
    med = {k: median(v) for k, v in results.items()}
    m = machine()
    labels = {
        "athomic_sink": "**`ds.write_datasink(AthomicDatasink(...))`**",
        "write_kafka": "`ds.write_kafka(...)` (confluent-kafka, idempotent)",
        "map_batches_example": "`map_batches` emitter of examples/, batches of 100",
        "map_batches_1000": "the same emitter, batches of 1,000",
    }
    print(f"\n## Ray Data sink\n\n{rows:,} rows of {size} B JSON with a key column, written "
          f"from a materialised dataset ({m['cpus']} cores, Python {m['python']}, Ray "
          f"{ray.__version__}, {m['date']}); each run measures every variant in turn; median "
          f"of {runs} runs.\n")
    print("| variant | rows/s (median) | per run | spread |\n|---|---:|---|---:|")
    for k, values in results.items():
        spread = (max(values) - min(values)) / med[k] if med[k] else 0.0
        print(f"| {labels[k]} | {med[k]:.0f} | {', '.join(f'{v:.0f}' for v in values)} "
              f"| ±{spread / 2:.0%} |")
    print("\n| ratio | median | per run |\n|---|---:|---|")
    for other in ("write_kafka", "map_batches_example", "map_batches_1000"):
        per_run = [a / b for a, b in zip(results["athomic_sink"], results[other],
                                         strict=True)]
        print(f"| AthomicDatasink / {other} | **{med['athomic_sink'] / med[other]:.2f}** | "
              f"{', '.join(f'{r:.2f}' for r in per_run)} (median "
              f"{statistics.median(per_run):.2f}) |")


if __name__ == "__main__":
    main()
