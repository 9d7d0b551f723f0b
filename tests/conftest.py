"""Shared fixtures: one real Kafka broker and one local Ray per test session.

``KAFKA_BOOTSTRAP`` points the tests at an existing cluster; otherwise the session starts
``deploy/kafka/kafka-local`` on a test port and stops it at the end.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.internal.observability  # noqa: F401  (see integration/conftest.py)
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "kafka"))
import kafka_local  # noqa: E402

KAFKA_LOCAL = kafka_local.SCRIPT
TEST_PORT = int(os.environ.get("ATHOMIC_TEST_KAFKA_PORT", "19092"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    bootstrap = kafka_local.start(TEST_PORT)
    try:
        yield bootstrap
    finally:
        kafka_local.stop(TEST_PORT)


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
