"""A Ray Data pipeline that emits one event per row through the handle.

    python examples/map_batches_events.py   (uses KAFKA_BOOTSTRAP or a local broker)
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray
import ray.data

from athomic import MessagingSettings, ProducerFactory, ProducerHandle


class EmitEvents:
    """A ``map_batches`` callable: one ``order.priced`` event per row, one batch call to the
    producer per Ray Data batch; rows gain the outcome of their publish."""

    def __init__(self, handle: ProducerHandle, topic: str) -> None:
        self.handle = handle
        self.topic = topic

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items = [{"message": {"order_id": int(oid), "total": float(total)},
                  "key": f"order-{int(oid)}"}
                 for oid, total in zip(batch["id"], batch["total"], strict=True)]
        outcomes = ray.get(self.handle.publish_batch.remote(items, topic=self.topic))
        batch["published"] = np.array([o.value for o in outcomes])
        return batch


def run(handle: ProducerHandle, topic: str, rows: int = 500) -> list[dict[str, Any]]:
    ds = ray.data.range(rows).map(lambda r: {"id": r["id"], "total": r["id"] * 1.25})
    # The emitter waits on the broker, not the CPU: half a CPU keeps a 2-core laptop free
    # for the read and map stages.
    out = ds.map_batches(EmitEvents, fn_constructor_args=(handle, topic), batch_size=100,
                         compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    return out.take_all()


if __name__ == "__main__":
    from _local import ensure_kafka, read_topic

    bootstrap, _ = ensure_kafka()
    ray.init(log_to_driver=False)
    settings = MessagingSettings(bootstrap_servers=bootstrap,
                                 connection_name="example-map-batches")
    handle = ProducerFactory.create(settings)
    topic = f"examples.orders.{uuid.uuid4().hex[:6]}"
    rows = run(handle, topic)
    records = read_topic(bootstrap, topic, len(rows))
    print(f"{len(rows)} rows processed by map_batches, "
          f"{sum(r['published'] == 'success_direct' for r in rows)} events acknowledged, "
          f"{len(records)} read back from {topic}")
    ProducerFactory.shutdown("example-map-batches")
