"""Shared fixtures: one real Kafka broker and one local Ray per test session.

``KAFKA_BOOTSTRAP`` points the tests at an existing cluster; otherwise the session starts
``deploy/kafka/kafka-local`` on a test port and stops it at the end.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "deploy" / "kafka" / "kafka-local"
TEST_PORT = int(os.environ.get("ATHOMIC_TEST_KAFKA_PORT", "19092"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    out = subprocess.run([str(KAFKA_LOCAL), "start", "--port", str(TEST_PORT)],
                         check=True, capture_output=True, text=True, timeout=600)
    bootstrap = out.stdout.strip().splitlines()[-1]
    try:
        yield bootstrap
    finally:
        subprocess.run([str(KAFKA_LOCAL), "stop", "--port", str(TEST_PORT)],
                       capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh local Ray, never a cluster some other process runs
        ray.init(address="local", num_cpus=4, namespace="athomic-tests",
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def topic() -> str:
    """A fresh topic name per test."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def connection_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings_factory(kafka_bootstrap: str, connection_name: str, ray_session: Any
                     ) -> Iterator[Any]:
    """Builds MessagingSettings on the test broker; shuts their actors down afterwards."""
    from athomic import MessagingSettings, ProducerFactory

    made: set[str] = set()

    def make(**overrides: Any) -> MessagingSettings:
        values: dict[str, Any] = {"bootstrap_servers": kafka_bootstrap,
                                  "connection_name": connection_name}
        values.update(overrides)
        made.add(values["connection_name"])
        return MessagingSettings(**values)

    yield make
    for name in made:
        ProducerFactory.shutdown(name)


@pytest.fixture
def producer(settings_factory: Any) -> Any:
    from athomic import ProducerFactory

    return ProducerFactory.create(settings_factory())
