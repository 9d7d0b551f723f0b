"""The project's own Kafka: kafka-local is idempotent, and a 3-broker cluster (RF=3,
min.insync.replicas=2) keeps acknowledged messages through a broker loss and turns a
missing in-sync quorum into a typed error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import kafka_local
import pytest
import ray
from helpers import create_topics, read_records

from athomic import ProducerFactory, PublishError, PublishingOutcome

pytestmark = pytest.mark.integration

# The session broker's script and port, as tests/conftest.py sets them up (a conftest is
# not importable by name: pytest loads each directory's conftest as its own module).
KAFKA_LOCAL = kafka_local.SCRIPT
TEST_PORT = int(os.environ.get("ATHOMIC_TEST_KAFKA_PORT", "19092"))


def test_start_twice_is_safe(kafka_bootstrap: str) -> None:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        out = subprocess.run([str(KAFKA_LOCAL), "status", "--port", "1"],
                             capture_output=True, text=True)
        assert out.returncode == 1
        return
    out = subprocess.run([str(KAFKA_LOCAL), "start", "--port", str(TEST_PORT)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == kafka_bootstrap
    assert "already running" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_three_brokers_survive_one_loss_and_fail_typed_without_isr_quorum(
        tmp_path: Path, settings_factory: Any) -> None:
    port = TEST_PORT + 100
    data_dir = tmp_path / "kafka3"
    bootstrap = kafka_local.start(port, brokers=3, data_dir=data_dir)
    assert bootstrap.count(",") == 2
    try:
        topic = f"fault.{uuid.uuid4().hex[:8]}"
        strict = f"fault.strict.{uuid.uuid4().hex[:8]}"
        await create_topics(bootstrap, topic, partitions=3, replication=3,
                            config={"min.insync.replicas": "2"})
        # all three replicas required: one lost broker takes away the quorum
        await create_topics(bootstrap, strict, partitions=1, replication=3,
                            config={"min.insync.replicas": "3"})
        handle = ProducerFactory.create(settings_factory(
            bootstrap_servers=bootstrap, connection_name=f"k3{uuid.uuid4().hex[:6]}",
            producer={"request_timeout_ms": 5000, "delivery_timeout_ms": 15000}))
        items = [{"topic": topic, "message": {"n": i}, "key": str(i)} for i in range(300)]
        assert ray.get(handle.publish_batch.remote(items[:150])) == \
            [PublishingOutcome.SUCCESS_DIRECT] * 150

        pids = sorted((tmp_path / "kafka3" / str(port)).glob("node-*/pid"))
        os.kill(int(pids[2].read_text()), signal.SIGKILL)  # one broker lost
        assert ray.get(handle.publish_batch.remote(items[150:]), timeout=120) == \
            [PublishingOutcome.SUCCESS_DIRECT] * 150

        start = time.monotonic()
        with pytest.raises(PublishError):
            ray.get(handle.publish.remote(topic=strict, message={"n": -1}), timeout=120)
        assert time.monotonic() - start < 15 + 10

        records = await read_records(bootstrap, topic, 300, timeout=60)
        assert sorted(json.loads(r.value)["n"] for r in records) == list(range(300))
    finally:
        kafka_local.stop(port, data_dir=data_dir)
