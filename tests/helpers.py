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


async def read_timed(bootstrap: str, topic: str, count: int, *, timeout: float = 60.0,
                     isolation_level: str = "read_committed", extra_wait: float = 0.0
                     ) -> list[tuple[Any, float]]:
    """Like read_records, with the wall-clock time each record was received."""
    import time

    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
        enable_auto_commit=False, isolation_level=isolation_level, group_id=None,
        metadata_max_age_ms=500, fetch_max_wait_ms=20)
    await consumer.start()
    out: list[tuple[Any, float]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        end = None
        while loop.time() < deadline:
            if len(out) >= count:
                end = end or loop.time() + extra_wait
                if loop.time() >= end:
                    break
            batch = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for part in batch.values():
                out.extend((r, now) for r in part)
    finally:
        await consumer.stop()
    return out


async def produce_raw(bootstrap: str, topic: str, value: bytes, key: bytes | None = None,
                      headers: list[tuple[str, bytes]] | None = None) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers or [])
    finally:
        await producer.stop()
