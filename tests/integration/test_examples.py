"""The examples run against the real broker and Ray, and deliver what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
from helpers import read_records

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import map_batches_events
import ray_tasks_fanout

pytestmark = pytest.mark.integration

# Ray workers do not have examples/ on their path: ship these modules by value.
for module in (map_batches_events, ray_tasks_fanout):
    ray.cloudpickle.register_pickle_by_value(module)


async def test_fanout_example(producer: Any, kafka_bootstrap: str, topic: str) -> None:
    assert ray_tasks_fanout.run(producer, topic, users=200, tasks=4) == 200
    records = await read_records(kafka_bootstrap, topic, 200)
    users = sorted(json.loads(r.value)["user_id"] for r in records)
    assert users == list(range(200))
    assert {r.key for r in records} == {f"user-{u}".encode() for u in range(200)}


async def test_map_batches_example(producer: Any, kafka_bootstrap: str, topic: str) -> None:
    rows = map_batches_events.run(producer, topic, rows=120)
    assert len(rows) == 120 and {r["published"] for r in rows} == {"success_direct"}
    records = await read_records(kafka_bootstrap, topic, 120)
    events = sorted((json.loads(r.value)["order_id"], json.loads(r.value)["total"])
                    for r in records)
    assert events == [(i, i * 1.25) for i in range(120)]
