"""The handle's caller-side logic: validation, due times, routing, backpressure.

Actors are faked at our own boundary (objects with ``publish.remote``); the real actors are
exercised in test_publish.py.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import threading
import time
from typing import Any

import pytest

from athomic import (
    InvalidDelayError,
    InvalidHeaderError,
    MessagePriority,
    MessagingSettings,
    SerializationError,
    ValidationError,
)
from athomic._handle import ProducerHandle, _to_deliver_at
from athomic.messages import PublishRequest


class FakeRef:
    def __init__(self) -> None:
        self.fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def future(self) -> concurrent.futures.Future[Any]:
        return self.fut


class FakeMethod:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def remote(self, payload: Any) -> FakeRef:
        ref = FakeRef()
        self.log.append((payload, ref))
        return ref


class FakeActor:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.publish = FakeMethod(self.calls)
        self.publish_batch = FakeMethod(self.calls)


def make(**settings: Any) -> tuple[ProducerHandle, dict[str, list[FakeActor]]]:
    s = MessagingSettings(**{"lanes": {"normal": 3}, **settings})
    lanes = {"high": [FakeActor() for _ in range(s.lanes.high)],
             "normal": [FakeActor() for _ in range(s.lanes.normal)]}
    if s.lanes.low:
        lanes["low"] = [FakeActor() for _ in range(s.lanes.low)]
    return ProducerHandle(s, lanes), lanes


def test_request_is_built_on_the_caller_side() -> None:
    handle, lanes = make(delay_topics={1: "d1"})
    handle.publish.remote(topic="t", message={"a": 1}, key="k", headers={"x": "1"},
                          delay_seconds=2.5, priority="high")
    (request, _), = lanes["high"][0].calls
    assert isinstance(request, PublishRequest)
    assert request.value == b'{"a":1}' and request.key == b"k"
    assert request.priority is MessagePriority.HIGH
    assert request.deliver_at == pytest.approx(time.time() + 2.5, abs=0.5)
    headers = dict(request.headers)
    assert headers["x"] == b"1"
    assert request.content_type == "application/json"
    assert headers["athomic-producer"] == b"athomic"


def test_caller_headers_win_over_captured_but_not_over_content_type() -> None:
    handle, lanes = make()
    handle.publish.remote(topic="t", message="hi",
                          headers={"athomic-producer": "mine", "content-type": "x/y"})
    (request, _), = lanes["normal"][0].calls + lanes["normal"][1].calls + \
        lanes["normal"][2].calls
    assert dict(request.headers)["athomic-producer"] == b"mine"
    assert request.content_type == "text/plain; charset=utf-8"


def test_due_time_rules() -> None:
    now = 1_000.0
    assert _to_deliver_at(None, None, now) is None
    assert _to_deliver_at(0, None, now) is None
    assert _to_deliver_at(2, None, now) == 1_002.0
    assert _to_deliver_at(None, 999.0, now) is None  # in the past: direct
    assert _to_deliver_at(None, 1_005, now) == 1_005.0
    aware = dt.datetime.fromtimestamp(1_010, tz=dt.timezone.utc)
    assert _to_deliver_at(None, aware, now) == 1_010.0
    for args in [(-1, None), (float("nan"), None), (float("inf"), None), ("1", None),
                 (True, None), (1, 2000), (None, dt.datetime(2030, 1, 1)),
                 (None, "tomorrow"), (None, float("inf"))]:
        with pytest.raises(InvalidDelayError):
            _to_deliver_at(*args, now)


def test_validation_before_anything_is_submitted() -> None:
    handle, lanes = make(delay_topics={1: "d1"}, max_delay_seconds=3600)
    with pytest.raises(InvalidDelayError, match="max_delay_seconds"):
        handle.publish.remote(topic="t", message=1, delay_seconds=7200)
    with pytest.raises(SerializationError):
        handle.publish.remote(topic="t", message={"x": object()})
    with pytest.raises(InvalidHeaderError, match="exceed"):
        handle.publish.remote(topic="t", message=1, headers={f"h{i}": "v" for i in range(65)})
    with pytest.raises(ValidationError, match="message #1"):
        handle.publish_batch.remote([{"topic": "t", "message": 1},
                                     {"topic": "t", "key": 2.0}])
    with pytest.raises(ValidationError, match="unknown publish arguments"):
        handle.publish_batch.remote([{"topic": "t", "mesage": 1}])
    assert all(not a.calls for group in lanes.values() for a in group)


def test_no_delay_topics_means_not_implemented() -> None:
    handle, _ = make()
    with pytest.raises(NotImplementedError):
        handle.publish.remote(topic="t", message=1, delay_seconds=1)


def test_lanes_by_priority() -> None:
    handle, lanes = make()
    handle.publish.remote(topic="t", message=1, priority=MessagePriority.HIGH)
    handle.publish.remote(topic="t", message=1, priority=MessagePriority.LOW)
    assert len(lanes["high"][0].calls) == 1
    assert sum(len(a.calls) for a in lanes["normal"]) == 1  # LOW shares NORMAL by default
    handle2, lanes2 = make(lanes={"normal": 3, "low": 1})
    handle2.publish.remote(topic="t", message=1, priority="low")
    assert len(lanes2["low"][0].calls) == 1


def test_power_of_two_choices_avoids_the_busy_actor() -> None:
    handle, lanes = make()
    busy = lanes["normal"][0]
    # occupy actor 0 with a large unfinished batch
    handle._in_flight["normal"][0] = 500
    handle._lane_total["normal"] = 500
    for _ in range(60):
        handle.publish.remote(topic="t", message=1)
    assert not busy.calls
    counts = [len(a.calls) for a in lanes["normal"][1:]]
    assert sum(counts) == 60 and min(counts) >= 20  # the two idle actors share the work


def test_in_flight_window_blocks_and_releases() -> None:
    handle, lanes = make(lanes={"max_in_flight": 3, "normal": 1})
    for _ in range(3):
        handle.publish.remote(topic="t", message=1)
    started = threading.Event()
    done = threading.Event()

    def fourth() -> None:
        started.set()
        handle.publish.remote(topic="t", message=1)
        done.set()

    threading.Thread(target=fourth, daemon=True).start()
    started.wait()
    assert not done.wait(0.3)  # window full: the 4th waits
    # HIGH has a window of its own
    handle.publish.remote(topic="t", message=1, priority="high")
    lanes["normal"][0].calls[0][1].fut.set_result("ok")
    assert done.wait(2)
    assert handle._lane_total["normal"] == 3
