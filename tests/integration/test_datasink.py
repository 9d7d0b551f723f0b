"""AthomicDatasink end to end: a Ray Dataset written with ``ds.write_datasink`` reaches the
real broker once per row (direct, delayed, HIGH, with caller ids and headers), read back by
an independent read_committed consumer; a failed write says what was acknowledged."""

from __future__ import annotations

import datetime as dt
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray
import ray.cloudpickle
import ray.data
from helpers import read_records

from athomic import (
    ConfigurationError,
    InvalidHeaderError,
    PublishError,
    PublishingOutcome,
    decode_record,
)
from athomic.data import AthomicDatasink

pytestmark = pytest.mark.integration

ROWS = 100_000

# Ray workers do not have tests/ on their path: ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """Every 10th row delayed 1-3 s, every 17th HIGH, every 7th with its own message id,
    every row a header; keys over 1,000 users."""
    ids = batch["id"].tolist()
    return pa.table({
        "row": pa.array(ids, pa.int64()),
        "key": [f"user-{i % 1000}" for i in ids],
        "delay_s": pa.array([float(1 + i % 3) if i % 10 == 0 else None for i in ids],
                            pa.float64()),
        "priority": [("high" if i % 17 == 0 else None) for i in ids],
        "message_id": [(f"row-{i}" if i % 7 == 0 else None) for i in ids],
        "headers": pa.array([[("x-row", str(i))] for i in ids],
                            pa.map_(pa.string(), pa.string())),
        "pad": ["p" * 64] * len(ids),
    })


@pytest.fixture
def delay_topics() -> dict[float, str]:
    tag = uuid.uuid4().hex[:8]
    return {1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s"}


async def test_a_hundred_thousand_rows_arrive_once_each_delayed_ones_not_early(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str) -> None:
    settings = settings_factory(delay_topics=delay_topics)
    sink = AthomicDatasink(settings, topic=topic, key_column="key", delay_column="delay_s",
                           priority_column="priority", message_id_column="message_id",
                           headers_column="headers", batch_size=2000)
    ds = ray.data.range(ROWS, override_num_blocks=8).map_batches(
        make_rows, batch_format="numpy", batch_size=12_500)
    ds.write_datasink(sink)
    delayed = ROWS // 10
    assert sink.written == ROWS
    assert sink.outcomes == {PublishingOutcome.SUCCESS_DIRECT: ROWS - delayed,
                             PublishingOutcome.SUCCESS_DELAYED: delayed}

    records = await read_records(kafka_bootstrap, topic, ROWS, timeout=90, extra_wait=2.0)
    seen = []
    for record in records:
        event = decode_record(record, settings)
        i = event["row"]
        seen.append(i)
        h = dict(record.headers)
        assert event == {"row": i, "key": f"user-{i % 1000}", "pad": "p" * 64}
        assert record.key == f"user-{i % 1000}".encode()
        assert h["x-row"] == str(i).encode()
        assert h["athomic-priority"] == (b"high" if i % 17 == 0 else b"normal")
        if i % 7 == 0:
            assert h["message-id"] == f"row-{i}".encode()
        if i % 10 == 0:
            due = int(h["athomic-deliver-at"])
            published = int(h["athomic-published-at"])
            assert 0 <= due - published - (1 + i % 3) * 1000 <= 1
            assert record.timestamp >= due, f"row {i} delivered early"
        else:
            assert "athomic-deliver-at" not in h
    assert len(seen) == ROWS, f"{ROWS - len(set(seen))} lost, {len(seen) - len(set(seen))} twice"
    assert sorted(seen) == list(range(ROWS))


async def test_a_failed_write_says_how_many_rows_were_acknowledged(
        settings_factory: Any, kafka_bootstrap: str, topic: str) -> None:
    """Two write tasks: one meets a bad row (its task sends nothing more), the other
    completes; the error counts both."""
    settings = settings_factory()
    rows = [{"n": i, "priority": "urgent" if i == 250 else "normal"} for i in range(800)]
    sink = AthomicDatasink(settings, topic=topic, priority_column="priority",
                           batch_size=100, max_in_flight=1)
    with pytest.raises(PublishError, match="600 of 800 rows were acknowledged; 1 of 2 "
                                           "write tasks failed") as caught:
        ray.data.from_items(rows, override_num_blocks=2).write_datasink(sink)
    assert sink.written == 600
    assert sink.outcomes == {PublishingOutcome.SUCCESS_DIRECT: 600}
    task_error = caught.value.__cause__
    assert isinstance(task_error, PublishError)
    assert task_error.outcomes is not None and len(task_error.outcomes) == 300
    assert task_error.outcomes[:200] == [PublishingOutcome.SUCCESS_DIRECT] * 200
    assert task_error.outcomes[200:] == [None] * 100
    assert list(task_error.failures) == [250]
    assert InvalidHeaderError.__name__ in task_error.failures[250]
    records = await read_records(kafka_bootstrap, topic, 600, extra_wait=1.0)
    assert sorted(decode_record(r, settings)["n"] for r in records) == [
        *range(200), *range(400, 800)]


def test_a_missing_column_is_refused_before_anything_is_sent(settings_factory: Any,
                                                            topic: str) -> None:
    sink = AthomicDatasink(settings_factory(), topic=topic, key_column="user")
    with pytest.raises(ConfigurationError, match="key_column"):
        ray.data.from_items([{"id": 1}]).write_datasink(sink)
    assert sink.written == 0


def test_rows_become_messages_as_documented(settings_factory: Any) -> None:
    """The row -> publish mapping, through a TestProducer (sink.write called in process)."""
    from types import SimpleNamespace

    from athomic import MessagePriority
    from athomic.testing import TestProducer

    # a timestamp column without a time zone: UTC
    due = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)).replace(
        tzinfo=None, microsecond=0)
    table = pa.table({
        "user": ["u1", "u2", None, "u4"],
        "to": [None, "other", None, None],
        "wait": [None, 30.0, 2.5, float("nan")],
        "at": pa.array([None, None, None, due], pa.timestamp("us")),
        "prio": [None, "high", "low", "normal"],
        "id": [None, "m-2", None, "m-4"],
        "hdr": pa.array([[("x-a", "1")], None, [], [("x-b", "2")]],
                        pa.map_(pa.string(), pa.string())),
        "n": [1, 2, 3, 4],
    })
    settings = settings_factory(delay_topics={1: "d.1s", 60: "d.1m", 3600: "d.1h"})
    with TestProducer(settings) as test:
        sink = AthomicDatasink(test, topic="main", topic_column="to", key_column="user",
                               delay_column="wait", deliver_at_column="at",
                               priority_column="prio", message_id_column="id",
                               headers_column="hdr", batch_size=3)
        result = sink.write([table], SimpleNamespace(task_idx=0))
        assert result.error is None
        assert result.outcomes == {PublishingOutcome.SUCCESS_DIRECT: 1,
                                   PublishingOutcome.SUCCESS_DELAYED: 3}
        by_n = {m.value["n"]: m for m in test.published}
    assert sorted(by_n) == [1, 2, 3, 4]
    # the key column stays in the message, the control columns do not
    assert by_n[1].value == {"user": "u1", "n": 1}
    assert (by_n[1].topic, by_n[1].key, by_n[1].deliver_at) == ("main", b"u1", None)
    assert by_n[1].headers["x-a"] == b"1" and by_n[1].priority is MessagePriority.NORMAL
    assert (by_n[2].topic, by_n[2].priority, by_n[2].message_id) == (
        "other", MessagePriority.HIGH, "m-2")
    assert by_n[2].deliver_at is not None
    assert 29.9 < (by_n[2].deliver_at - by_n[2].published_at).total_seconds() < 30.1
    assert by_n[3].key is None and by_n[3].priority is MessagePriority.LOW
    assert by_n[4].deliver_at == due.replace(tzinfo=dt.timezone.utc)  # NaN delay: not given
    assert by_n[4].message_id == "m-4" and by_n[4].headers["x-b"] == b"2"


def test_a_duration_column_is_a_delay_and_a_bad_row_is_named(settings_factory: Any) -> None:
    from types import SimpleNamespace

    from athomic.testing import TestProducer

    table = pa.table({"wait": pa.array([dt.timedelta(seconds=5), None, None],
                                       pa.duration("ms")),
                      "to": [None, None, "not a topic"]})
    settings = settings_factory(delay_topics={1: "d.1s"})
    with TestProducer(settings) as test:
        sink = AthomicDatasink(test, topic="main", topic_column="to", delay_column="wait",
                               batch_size=2, max_in_flight=1)
        result = sink.write([table], SimpleNamespace(task_idx=0))
        assert result.rows == 2 and result.error is not None
        assert re.search(r"2 of the 3 rows .* first \(row 2\)", str(result.error))
        assert result.error.outcomes == [PublishingOutcome.SUCCESS_DELAYED,
                                         PublishingOutcome.SUCCESS_DIRECT, None]
        assert "InvalidTopicError" in result.error.failures[2]
        assert [m.value for m in test.published] == [{}, {}]


async def test_the_examples_deliver_what_they_say(
        settings_factory: Any, delay_topics: dict[float, str], kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    import datasink_events

    ray.cloudpickle.register_pickle_by_value(datasink_events)
    settings = settings_factory(delay_topics=delay_topics)
    sink = datasink_events.run(settings, topic, rows=300)
    assert sink.written == 300
    assert sink.outcomes == {PublishingOutcome.SUCCESS_DIRECT: 270,
                             PublishingOutcome.SUCCESS_DELAYED: 30}
    records = await read_records(kafka_bootstrap, topic, 300, timeout=30)
    events = sorted((decode_record(r, settings) for r in records), key=lambda e: e["order_id"])
    assert [e["order_id"] for e in events] == list(range(300))
    assert events[7] == {"order_id": 7, "user": "user-7", "total": 8.75}
    assert {r.key for r in records} == {f"user-{i}".encode() for i in range(50)}

    import confluent_kafka  # noqa: F401  (ray.data.read_kafka's client: a dev dependency)
    import replay_from_kafka

    ray.cloudpickle.register_pickle_by_value(replay_from_kafka)
    replayed = replay_from_kafka.replay(settings, topic, topic + ".fixed")
    assert replayed.written == 300
    fixed = await read_records(kafka_bootstrap, topic + ".fixed", 300, timeout=30)
    by_id = {dict(r.headers)["message-id"]: decode_record(r, settings) for r in fixed}
    assert by_id == {dict(r.headers)["message-id"]: {
        "order_id": e["order_id"], "user": e["user"], "total_cents": round(e["total"] * 100)}
        for r, e in ((r, decode_record(r, settings)) for r in records)}
