"""Helpers for tests that talk to the real broker."""

from __future__ import annotations

import asyncio
from typing import Any


async def create_topics(bootstrap: str, *names: str, partitions: int = 1,
                        replication: int = 1, config: dict[str, str] | None = None) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, replication, topic_configs=config or {})
                                   for n in names])
    finally:
        await admin.close()


async def read_records(bootstrap: str, topic: str, count: int, *, timeout: float = 20.0,
                       isolation_level: str = "read_committed",
                       extra_wait: float = 0.0) -> list[Any]:
    """Read ``count`` records from the start of ``topic`` (and, with ``extra_wait``, keep
    listening that long for records that should not be there)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
        enable_auto_commit=False, isolation_level=isolation_level,
        group_id=None, metadata_max_age_ms=1000)
    await consumer.start()
    records: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(records) < count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for part in batch.values():
                records.extend(part)
        if extra_wait:
            end = loop.time() + extra_wait
            while loop.time() < end:
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records.extend(part)
    finally:
        await consumer.stop()
    return records
