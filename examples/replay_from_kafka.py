"""Replay: read what athomic published with ``ray.data.read_kafka``, decode it, and publish
a corrected copy to another topic with AthomicDatasink, keeping keys and message ids.

    python examples/replay_from_kafka.py   (uses KAFKA_BOOTSTRAP or a local broker;
                                            read_kafka needs ``pip install confluent-kafka``)

``read_kafka`` reads a bounded range (earliest to latest by default) into rows with
``topic``, ``partition``, ``offset``, ``key``, ``value``, ``headers`` (a dict) and
``timestamp`` columns (pass ``timeout_ms`` when the topic receives delayed messages: see
below). ``athomic.data.decode_row`` decodes a row as ``decode_record``
decodes a consumed record: from its headers, decompressing and decrypting with the
settings' keys, bound to the row's topic and key.
"""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import ray
import ray.data

from athomic import MessagingSettings, ProducerFactory
from athomic.data import AthomicDatasink, decode_row


def replay(settings: MessagingSettings, source: str, target: str) -> AthomicDatasink:
    def corrected(row: dict[str, Any]) -> dict[str, Any]:
        event = decode_row(row, settings)
        event["total_cents"] = round(event.pop("total") * 100)  # the fix being replayed
        return {"event": event, "key": row["key"],
                "message_id": row["headers"]["message-id"].decode()}

    # timeout_ms: read_kafka (Ray 2.60) reads each partition until it sees a record at the
    # partition's end offset; a topic whose last offset is a transaction marker (delayed
    # messages arrive in the republisher's transactions) never shows one, so the read
    # stops at the timeout instead, with every record before it.
    rows = ray.data.read_kafka(source, bootstrap_servers=settings.bootstrap_servers,
                               timeout_ms=5_000)
    sink = AthomicDatasink(settings, topic=target, value_column="event", key_column="key",
                           message_id_column="message_id")
    rows.map(corrected).write_datasink(sink)
    return sink


if __name__ == "__main__":
    from _local import ensure_kafka, read_topic

    from athomic import decode_record

    bootstrap, _ = ensure_kafka()
    ray.init(log_to_driver=False)
    key = base64.b64encode(os.urandom(32)).decode()
    settings = MessagingSettings(
        bootstrap_servers=bootstrap, connection_name="example-replay",
        pipeline=[{"stage": "serialize", "codec": "orjson"},
                  {"stage": "compress", "codec": "zstd", "min_size": 64},
                  {"stage": "encrypt", "cipher": "aes-256-gcm", "keys": {"k1": key},
                   "primary": "k1"}])
    tag = uuid.uuid4().hex[:6]
    source, target = f"examples.orders.{tag}", f"examples.orders-fixed.{tag}"
    producer = ProducerFactory.create(settings)
    ray.get(producer.publish_batch.remote(
        [{"message": {"order_id": i, "total": i * 1.25, "note": "n" * 100},
          "key": f"order-{i}"} for i in range(200)], topic=source))
    sink = replay(settings, source, target)
    events = [decode_record(r, settings) for r in read_topic(bootstrap, target, sink.written)]
    first = min(events, key=lambda e: e["order_id"])
    print(f"replayed {sink.written} events from {source} to {target}; read back "
          f"{len(events)}; order 0 is now {first['order_id']}, {first['total_cents']} cents")
    ProducerFactory.shutdown("example-replay")
