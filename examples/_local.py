"""Shared by the examples: find or start a local Kafka, and read a topic back."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy" / "kafka"))
import kafka_local


def ensure_kafka() -> tuple[str, bool]:
    """Bootstrap servers of KAFKA_BOOTSTRAP, or of a local broker (started now when none
    runs: then the second value is True and the caller may stop it)."""
    return kafka_local.ensure()


def stop_kafka() -> None:
    kafka_local.stop()


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    """Read ``count`` records from the start of ``topic`` (read_committed)."""
    from aiokafka import AIOKafkaConsumer

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    isolation_level="read_committed")
        await consumer.start()
        records: list[Any] = []
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while len(records) < count and asyncio.get_running_loop().time() < deadline:
                for part in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(part)
        finally:
            await consumer.stop()
        return records

    return asyncio.run(run())
