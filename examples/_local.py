"""Shared by the examples: find or start a local Kafka, and read a topic back."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

KAFKA_LOCAL = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "kafka-local"


def ensure_kafka() -> tuple[str, bool]:
    """Bootstrap servers of KAFKA_BOOTSTRAP, or of a local broker started now (then the
    second value is True: the caller may stop it)."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return os.environ["KAFKA_BOOTSTRAP"], False
    running = subprocess.run([str(KAFKA_LOCAL), "status"], capture_output=True, text=True)
    if running.returncode == 0:
        return running.stdout.strip().splitlines()[-1], False
    print("starting a local Apache Kafka (deploy/kafka/kafka-local start) ...", flush=True)
    out = subprocess.run([str(KAFKA_LOCAL), "start"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1], True


def stop_kafka() -> None:
    subprocess.run([str(KAFKA_LOCAL), "stop"], capture_output=True)


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
