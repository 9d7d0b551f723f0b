"""Shared by the benchmarks: a Kafka to measure against, and a local Ray."""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "kafka"))
import kafka_local  # noqa: E402


def start_kafka(default_port: str = "29192") -> tuple[str, Callable[[], None]]:
    """KAFKA_BOOTSTRAP when set, else a kafka-local broker on ATHOMIC_BENCH_KAFKA_PORT
    (stopped by the returned function)."""
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        return existing, lambda: None
    port = int(os.environ.get("ATHOMIC_BENCH_KAFKA_PORT", default_port))
    return kafka_local.start(port), lambda: kafka_local.stop(port)


async def create_topic(bootstrap: str, topic: str, partitions: int,
                       configs: dict[str, str] | None = None) -> None:
    """Create ``topic`` (replication 1) before a benchmark uses it."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs or {})])
    finally:
        await admin.close()


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def kafka_and_ray(num_cpus: int = 4) -> Iterator[str]:
    bootstrap, stop_kafka = start_kafka()
    try:
        with local_ray(num_cpus):
            yield bootstrap
    finally:  # also when Ray failed to start (an overloaded machine)
        stop_kafka()


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """The per-run range, as ``min-max``."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def load() -> float:
    """The machine's 1-minute load average (other work sharing the cores)."""
    return os.getloadavg()[0]


def cpu_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process: the
    caller, Ray's actors and daemons, the broker), from /proc/stat; 0.0 where there is
    none. The difference over a measurement is what that measurement cost in CPU."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    import platform
    import time

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load": round(load(), 1)}
