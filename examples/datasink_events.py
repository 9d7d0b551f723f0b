"""A Ray Data pipeline written to Kafka with AthomicDatasink: one event per row, some
delayed, some HIGH priority, each with the user as key.

    python examples/datasink_events.py   (uses KAFKA_BOOTSTRAP or a local broker)
"""

from __future__ import annotations

import uuid
from typing import Any

import ray
import ray.data

from athomic import MessagingSettings, ProducerFactory
from athomic.data import AthomicDatasink


def order_event(row: dict[str, Any]) -> dict[str, Any]:
    i = int(row["id"])
    return {"order_id": i, "user": f"user-{i % 50}", "total": round(i * 1.25, 2),
            # control columns: not part of the message
            "delay_s": 2.0 if i % 10 == 0 else None,        # a reminder, 2 s later
            "priority": "high" if i % 25 == 0 else "normal"}


def run(settings: MessagingSettings, topic: str, rows: int = 500) -> AthomicDatasink:
    ds = ray.data.range(rows).map(order_event)
    sink = AthomicDatasink(settings, topic=topic, key_column="user",
                           delay_column="delay_s", priority_column="priority")
    ds.write_datasink(sink)
    return sink


if __name__ == "__main__":
    from _local import ensure_kafka, read_topic

    bootstrap, _ = ensure_kafka()
    ray.init(log_to_driver=False)
    tag = uuid.uuid4().hex[:6]
    settings = MessagingSettings(bootstrap_servers=bootstrap,
                                 connection_name="example-datasink",
                                 delay_topics={1: f"examples.delay.{tag}.1s",
                                               10: f"examples.delay.{tag}.10s"})
    topic = f"examples.orders.{tag}"
    sink = run(settings, topic)
    outcomes = ", ".join(f"{n} {o.value}" for o, n in sink.outcomes.items())
    print(f"{sink.written} rows acknowledged ({outcomes})")
    records = read_topic(bootstrap, topic, sink.written)
    print(f"{len(records)} read back from {topic}, delayed ones included")
    ProducerFactory.shutdown("example-datasink")
