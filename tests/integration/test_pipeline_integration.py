"""The payload pipeline end to end: real Kafka, real local Ray, records read back raw."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
import zstandard
from helpers import read_records

from athomic import (
    ConfigurationError,
    DecryptionError,
    MessagePriority,
    ProducerFactory,
    PublishingOutcome,
    decode_message,
    decode_record,
)
from athomic.actors.topology import NAMESPACE, actor_names

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEY = base64.b64encode(os.urandom(32)).decode()


def stages(placement: str = "inline", replicas: int = 1) -> list[dict[str, Any]]:
    return [
        {"stage": "serialize", "codec": "orjson"},
        {"stage": "compress", "codec": "zstd", "level": 3, "min_size": 256,
         "placement": placement, "replicas": replicas},
        {"stage": "encrypt", "cipher": "aes-256-gcm", "keys": {"k1": KEY}, "primary": "k1",
         "placement": placement, "replicas": replicas},
    ]


def hdrs(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


async def relay(bootstrap: str, records: list[Any], topic: str, key: bytes | None = None
                ) -> None:
    """Copy records byte for byte (value and headers) to another topic / key."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for r in records:
            await producer.send_and_wait(topic, r.value, key=key if key else r.key,
                                         headers=list(r.headers))
    finally:
        await producer.stop()


async def test_compressed_encrypted_messages_through_kafka(settings_factory: Any,
                                                          kafka_bootstrap: str,
                                                          topic: str) -> None:
    settings = settings_factory(pipeline=stages())
    producer = ProducerFactory.create(settings)
    payloads = [{"i": i, "text": "lorem ipsum dolor " * 300} for i in range(4)]
    payloads.append({"i": 4, "tiny": True})  # under min_size: encrypted, not compressed
    outcomes = ray.get(producer.publish_batch.remote(
        [{"topic": topic, "message": p, "key": f"user-{i}"} for i, p in enumerate(payloads)]))
    assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 5

    records = sorted(await read_records(kafka_bootstrap, topic, 5), key=lambda r: r.key)
    assert len(records) == 5
    for i, r in enumerate(records):
        h = hdrs(r)
        assert h["content-type"] == b"application/json"
        assert h["content-encoding"] == (b"zstd, aes-256-gcm" if i < 4 else b"aes-256-gcm")
        assert h["athomic-encryption"] == b"aes-256-gcm"
        assert h["athomic-key-id"] == b"k1"
        assert h["athomic-bound-topic"] == topic.encode()
        assert h["athomic-bound-key"] == f"user-{i}".encode()
        assert b"lorem" not in r.value and b"tiny" not in r.value
        if i < 4:
            assert len(r.value) < 400  # 5.4 KB of repetitive JSON, compressed first
        assert decode_record(r, settings) == payloads[i]
        assert decode_message(r.value, r.headers, settings) == payloads[i]  # 3-arg form

    # Copied byte for byte to another topic (or under another key): refused by
    # decode_record; the 3-argument form only sees the bound headers (documented).
    moved_topic = f"{topic}.moved"
    await relay(kafka_bootstrap, records[:1], moved_topic)
    await relay(kafka_bootstrap, records[1:2], f"{topic}.rekeyed", key=b"user-99")
    (moved,) = await read_records(kafka_bootstrap, moved_topic, 1)
    (rekeyed,) = await read_records(kafka_bootstrap, f"{topic}.rekeyed", 1)
    for r in (moved, rekeyed):
        with pytest.raises(DecryptionError):
            decode_record(r, settings)
    assert decode_message(moved.value, moved.headers, settings) == payloads[0]


async def test_independent_decoder_reads_a_real_message(settings_factory: Any,
                                                        kafka_bootstrap: str,
                                                        topic: str) -> None:
    script = ROOT / "examples" / "decode_standalone.py"
    imported = {alias.name.split(".")[0]
                for node in ast.walk(ast.parse(script.read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert "athomic" not in imported
    assert {"zstandard", "cryptography"} <= imported

    settings = settings_factory(pipeline=stages())
    producer = ProducerFactory.create(settings)
    payloads = [{"order": 1, "lines": [{"sku": f"s{n}", "qty": n} for n in range(80)]},
                "plain text, encrypted", b"\x00\xffbinary"]
    ray.get([producer.publish.remote(topic=topic, message=p, key=f"k{i}")
             for i, p in enumerate(payloads)])
    out = subprocess.run(
        [sys.executable, str(script), "--bootstrap", kafka_bootstrap, "--topic", topic,
         "--keys", json.dumps({"k1": KEY}), "--count", "3"],
        capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert out.returncode == 0, out.stderr
    decoded = sorted((json.loads(line) for line in out.stdout.splitlines()),
                     key=lambda d: d["key"])
    assert [d["key"] for d in decoded] == ["k0", "k1", "k2"]
    assert decoded[0]["value"] == payloads[0]
    assert decoded[1]["value"] == payloads[1]
    assert base64.b64decode(decoded[2]["value"]) == payloads[2]


async def test_priority_topics_bind_the_physical_topic(settings_factory: Any,
                                                       kafka_bootstrap: str,
                                                       topic: str) -> None:
    settings = settings_factory(pipeline=stages(), priority_topics=True)
    producer = ProducerFactory.create(settings)
    ray.get(producer.publish.remote(topic=topic, message={"urgent": "x" * 500}, key="k",
                                    priority=MessagePriority.HIGH))
    (record,) = await read_records(kafka_bootstrap, f"{topic}.high", 1)
    assert hdrs(record)["athomic-bound-topic"] == f"{topic}.high".encode()
    assert decode_record(record, settings) == {"urgent": "x" * 500}


async def test_stage_actor_pool_encodes_batches(settings_factory: Any, kafka_bootstrap: str,
                                                topic: str, connection_name: str) -> None:
    settings = settings_factory(pipeline=stages("actors", 2))
    producer = ProducerFactory.create(settings)
    stage_names = [n for n in actor_names(connection_name) if ".stage." in n]
    assert stage_names == [f"{connection_name}.stage.0", f"{connection_name}.stage.1"]

    payloads = [{"i": i, "body": f"event {i} " * 400} for i in range(20)]
    outcomes = ray.get(producer.publish_batch.remote(
        [{"topic": topic, "message": p, "key": f"k{i:02d}"} for i, p in enumerate(payloads)]))
    assert outcomes == [PublishingOutcome.SUCCESS_DIRECT] * 20
    records = sorted(await read_records(kafka_bootstrap, topic, 20), key=lambda r: r.key)
    assert [decode_record(r, settings) for r in records] == payloads
    assert all(hdrs(r)["content-encoding"] == b"zstd, aes-256-gcm" for r in records)

    stats = ray.get([ray.get_actor(n, namespace=NAMESPACE).stats.remote()
                     for n in stage_names])
    # one batch of 20 -> one call per replica, 10 messages each
    assert [(s["calls"], s["messages"]) for s in stats] == [(1, 10), (1, 10)]
    assert stats[0]["pid"] != stats[1]["pid"]

    ProducerFactory.shutdown(connection_name)
    assert actor_names(connection_name) == []


async def test_stage_actor_output_is_byte_identical_to_inline(settings_factory: Any,
                                                              kafka_bootstrap: str,
                                                              topic: str) -> None:
    # Without encryption (whose nonce is random by design) the bytes must match exactly.
    placed = settings_factory(
        connection_name=f"t{uuid.uuid4().hex[:10]}",
        pipeline=[{"stage": "serialize"}, {"stage": "compress", "level": 5, "min_size": 64,
                                           "placement": "actors", "replicas": 2}])
    producer = ProducerFactory.create(placed)
    payloads = [{"n": i, "words": ["alpha", "beta", "gamma"] * (i * 30)} for i in range(1, 7)]
    ray.get(producer.publish_batch.remote(
        [{"topic": topic, "message": p, "key": f"k{i}"} for i, p in enumerate(payloads)]))
    records = sorted(await read_records(kafka_bootstrap, topic, 6), key=lambda r: r.key)
    import orjson

    for r, p in zip(records, payloads, strict=True):
        inline = zstandard.ZstdCompressor(level=5).compress(orjson.dumps(p))
        assert r.value == inline
        assert hdrs(r)["content-encoding"] == b"zstd"
        assert decode_record(r, placed) == p


async def test_stage_pool_larger_than_the_cluster_is_a_clear_error(
        settings_factory: Any, connection_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from athomic.actors import topology

    monkeypatch.setattr(topology, "STAGE_START_TIMEOUT_S", 3.0)
    settings = settings_factory(pipeline=stages("actors", 64))  # the test Ray has 4 CPUs
    with pytest.raises(ConfigurationError, match=r"StageActors .* did not start within 3s"):
        ProducerFactory.create(settings)
    ProducerFactory.shutdown(connection_name)
    assert actor_names(connection_name) == []


async def test_a_broken_custom_stage_fails_at_create(settings_factory: Any,
                                                     connection_name: str) -> None:
    settings = settings_factory(pipeline=[
        {"stage": "serialize"},
        {"stage": "custom", "name": "armor", "path": "no_such_module_here:Codec"}])
    with pytest.raises(ConfigurationError, match="cannot be imported"):
        ProducerFactory.create(settings)
    assert actor_names(connection_name) == []
