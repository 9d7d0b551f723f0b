"""Fan out over Ray tasks: each task publishes its share of events through one handle.

    python examples/ray_tasks_fanout.py     (uses KAFKA_BOOTSTRAP or a local broker)
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray

from athomic import MessagingSettings, ProducerFactory, ProducerHandle


@ray.remote
def score_users(handle: ProducerHandle, topic: str, user_ids: list[int]) -> int:
    """A unit of batch work that emits one event per user it scored."""
    items = [{"message": {"user_id": u, "score": (u * 37) % 100}, "key": f"user-{u}"}
             for u in user_ids]
    outcomes = ray.get(handle.publish_batch.remote(items, topic=topic))
    return len(outcomes)


def run(handle: ProducerHandle, topic: str, users: int = 1000, tasks: int = 8) -> int:
    chunks = [list(range(i, users, tasks)) for i in range(tasks)]
    return sum(ray.get([score_users.remote(handle, topic, c) for c in chunks]))


if __name__ == "__main__":
    from _local import ensure_kafka, read_topic

    bootstrap, _ = ensure_kafka()
    ray.init(log_to_driver=False)
    settings = MessagingSettings(bootstrap_servers=bootstrap,
                                 connection_name="example-fanout")
    handle = ProducerFactory.create(settings)
    topic = f"examples.scores.{uuid.uuid4().hex[:6]}"
    start = time.monotonic()
    sent = run(handle, topic)
    took = time.monotonic() - start
    records: list[Any] = read_topic(bootstrap, topic, sent)
    print(f"{sent} events published from 8 Ray tasks in {took:.2f}s; "
          f"{len(records)} read back from {topic}")
    ProducerFactory.shutdown("example-fanout")
