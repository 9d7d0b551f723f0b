"""The handle's caller-side logic: validation, due times, routing, backpressure.

Actors are faked at our own boundary (objects with ``publish.remote``); the real actors are
exercised in test_publish.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import threading
import time
from typing import Any

import pytest

from athomic import (
    BackpressureTimeoutError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidTopicError,
    MessagePriority,
    MessagingSettings,
    PublishError,
    PublishingOutcome,
    RecordTooLargeError,
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
    def __init__(self, log: list[Any], wire: bool = False) -> None:
        self.log = log
        self.wire = wire

    def remote(self, payload: Any) -> FakeRef:
        if self.wire:  # one publish crosses as its MessagePack list: logged as a request
            assert type(payload) is list
            payload = PublishRequest.from_wire(payload)
        ref = FakeRef()
        self.log.append((payload, ref))
        return ref


class FakeActor:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.publish = FakeMethod(self.calls, wire=True)
        self.publish_batch = FakeMethod(self.calls)
        self.state: int | None = 2  # Ray's ActorTableData: ALIVE

    def _get_local_state(self) -> int | None:
        return self.state


def finished(refs: list[FakeRef]) -> list[FakeRef]:
    """What ``ray.wait`` answers the window: the calls that completed."""
    return [ref for ref in refs if ref.fut.done()]


def make(**settings: Any) -> tuple[ProducerHandle, dict[str, list[FakeActor]]]:
    s = MessagingSettings(**{"lanes": {"normal": 3}, **settings})
    lanes = {"high": [FakeActor() for _ in range(s.lanes.high)],
             "normal": [FakeActor() for _ in range(s.lanes.normal)]}
    if s.lanes.low:
        lanes["low"] = [FakeActor() for _ in range(s.lanes.low)]
    handle = ProducerHandle(s, lanes)
    for window in handle._windows.values():
        window.finished = finished
    return handle, lanes


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


def _batch_requests(handle: ProducerHandle, lanes: dict[str, list[FakeActor]],
                    items: list[dict[str, Any]], **defaults: Any) -> list[PublishRequest]:
    handle.publish_batch.remote(items, **defaults)
    (call,) = [c for group in lanes.values() for a in group for c in a.calls]
    for group in lanes.values():
        for actor in group:
            actor.calls.clear()
    return list(call[0])


def test_a_plain_batch_item_is_built_as_publish_builds_it() -> None:
    """Items of only a topic, a message, a key and a priority are built in the batch's
    own loop; each request equals the one ``_request`` builds from the same arguments,
    field for field but the id and the publish time."""
    handle, lanes = make()
    items: list[dict[str, Any]] = [
        {"message": {"a": 1}, "key": "k"}, {"message": "text", "key": b"b"},
        {"message": b"raw", "key": 7}, {"message": None}, {"key": "only"},
        {"message": [1, 2], "priority": "normal"}, {"message": 1, "topic": "other"}]
    built = _batch_requests(handle, lanes, items, topic="t")
    now = time.time()
    for item, request in zip(items, built, strict=True):
        expected = handle._request(**{"topic": "t", **item}, now=now, auto_id="x")
        assert request._replace(message_id="x", published_at=now) == expected
        assert request.headers is built[0].headers  # one captured list for the batch
    ids = [r.message_id for r in built]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("item", "error"), [
    ({"message": 1}, "topic is required"), ({"topic": "a b", "message": 1}, "a b"),
    ({"topic": "t", "priority": "urgent"}, "unknown priority"),
    ({"topic": "t", "message": {"x": object()}}, "cannot serialise"),
    ({"topic": "t", "key": 2.0}, "key must be"),
    ({"topic": "t", "message": 1, "mesage": 2}, "unknown publish arguments")])
def test_a_bad_item_after_plain_ones_is_named_by_its_index(item: dict[str, Any],
                                                            error: str) -> None:
    handle, lanes = make()
    plain = [{"topic": "t", "message": i, "key": f"k{i}"} for i in range(3)]
    with pytest.raises((ValidationError, SerializationError), match=f"message #3: .*{error}"):
        handle.publish_batch.remote([*plain, item, *plain])
    assert all(not a.calls for group in lanes.values() for a in group)


@pytest.mark.parametrize("codec", ["pydantic", "bytes"])
def test_a_plain_batch_under_another_codec_refuses_dicts_as_publish_does(codec: str) -> None:
    """A dict message goes straight to orjson only under the orjson codec; under another
    it is refused, as ``publish`` refuses it, at its index, before anything is sent."""
    handle, lanes = make(pipeline=[{"stage": "serialize", "codec": codec}])
    with pytest.raises(SerializationError, match=f"the {codec} codec accepts only") as single:
        handle.publish.remote(topic="t", message={"a": 1})
    with pytest.raises(SerializationError, match="message #1: ") as batch:
        handle.publish_batch.remote([{"message": b"raw" if codec == "bytes" else None},
                                     {"message": {"a": 1}}], topic="t")
    assert str(single.value) in str(batch.value)
    assert all(not a.calls for group in lanes.values() for a in group)


def test_a_plain_batch_takes_its_default_priority_as_publish_takes_priority(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A default priority given as a member or as its name, and an item's own, route and
    mark each request as ``publish`` would (a name is parsed, not compared)."""
    monkeypatch.setattr("athomic._handle._merge_lanes",
                        type("Merge", (), {"remote": lambda *a: "m"}))
    handle, lanes = make()
    items: list[dict[str, Any]] = [{"message": 1}, {"message": 2, "priority": "low"},
                                   {"message": 3, "priority": MessagePriority.HIGH}]
    for default in ("high", MessagePriority.HIGH, "HIGH", MessagePriority.LOW):
        handle.publish_batch.remote(items, topic="t", priority=default)
        calls = {lane: [r for a in group for c in a.calls for r in c[0]]
                 for lane, group in lanes.items()}
        for group in lanes.values():
            for actor in group:
                actor.calls.clear()
        expected = MessagePriority.parse(default)
        # the members themselves: a name left unparsed would compare equal to one
        assert all(type(r.priority) is MessagePriority
                   for r in calls["high"] + calls["normal"])
        assert [r.priority for r in calls["high"]] == \
            [MessagePriority.HIGH] * (2 if expected is MessagePriority.HIGH else 1)
        assert [r.priority for r in calls["normal"]] == (
            [MessagePriority.LOW] if expected is MessagePriority.HIGH
            else [MessagePriority.LOW, MessagePriority.LOW])
        assert [r.value for r in calls["normal"] + calls["high"]] == (
            [b"2", b"1", b"3"] if expected is MessagePriority.HIGH else [b"1", b"2", b"3"])
    for default in ("high", MessagePriority.HIGH):  # an item's None is no priority
        with pytest.raises(InvalidHeaderError, match=r"message #1: .*unknown priority None"):
            handle.publish_batch.remote([{"message": 1}, {"message": 2, "priority": None}],
                                        topic="t", priority=default)
    assert all(not a.calls for group in lanes.values() for a in group)


def test_captured_context_over_the_cap_fails_a_plain_batch_at_its_first_item() -> None:
    handle, lanes = make(producer={"max_headers": 1})
    with pytest.raises(InvalidHeaderError, match="message #0: headers exceed"):
        handle.publish_batch.remote([{"message": i} for i in range(3)], topic="t")
    assert all(not a.calls for group in lanes.values() for a in group)


def test_a_batch_of_plain_and_other_items_splits_by_lane_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    merged: list[Any] = []
    monkeypatch.setattr("athomic._handle._merge_lanes",
                        type("Merge", (), {"remote": lambda *a: merged.append(a) or "m"}))
    handle, lanes = make(delay_topics={1: "d1"})
    items: list[dict[str, Any]] = [
        {"message": 0}, {"message": 1, "priority": "high"},
        {"message": 2, "headers": {"h": "v"}}, {"message": 3, "delay_seconds": 0.5}]
    ref = handle.publish_batch.remote(items, topic="t")
    high = [c[0] for a in lanes["high"] for c in a.calls]
    normal = [c[0] for a in lanes["normal"] for c in a.calls]
    assert ref == "m" and len(high) == 1 and len(normal) == 1
    assert sorted(merged[0][0]) == [[0, 2, 3], [1]]  # each lane's positions in the batch
    assert [r.value for r in high[0]] == [b"1"]
    assert [r.value for r in normal[0]] == [b"0", b"2", b"3"]
    assert dict(normal[0][1].headers)["h"] == b"v" and normal[0][2].deliver_at is not None


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
    window = handle._windows["normal"]
    window.loads[0] = 500
    window.total = 500
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
    assert handle._windows["normal"].total == 3


def test_room_comes_back_by_asking_ray_not_by_a_callback_per_call() -> None:
    handle, lanes = make(lanes={"max_in_flight": 1000, "normal": 1})
    window = handle._windows["normal"]
    asked: list[int] = []

    def count_asks(refs: list[FakeRef]) -> list[FakeRef]:
        asked.append(len(refs))
        return finished(refs)

    window.finished = count_asks
    for i in range(100):  # one at a time, as ray.get(handle.publish.remote(...)) does
        handle.publish.remote(topic="t", message=i)
        lanes["normal"][0].calls[-1][1].fut.set_result("ok")
    # no completion callback on any call: the window asked which had finished
    assert not any(ref.fut._done_callbacks for _, ref in lanes["normal"][0].calls)
    # every 31 calls, about the 32 on record: all but the one just made had finished
    assert asked == [32, 32, 32]
    assert window.total == 100 - 3 * 31


def test_a_call_made_while_another_caller_waits_for_room_wakes_it() -> None:
    handle, lanes = make(lanes={"max_in_flight": 3, "normal": 1})
    window = handle._windows["normal"]
    handle.publish.remote(topic="t", message=0)
    done = threading.Event()

    def whole_lane() -> None:  # three messages: waits until the lane is empty
        handle.publish_batch.remote([{"message": i} for i in range(3)], topic="t")
        done.set()

    threading.Thread(target=whole_lane, daemon=True).start()
    while not window._waiting:
        time.sleep(0.01)
    handle.publish.remote(topic="t", message=1)  # fits beside the first
    calls = lanes["normal"][0].calls
    assert len(calls) == 2 and not done.is_set()
    # sent while a caller waits: it carries a callback at once (had the first finished
    # before the waiting caller saw this call, nothing else would wake it)
    assert calls[1][1].fut._done_callbacks
    calls[0][1].fut.set_result("ok")
    assert not done.wait(0.2)  # the second still holds room
    calls[1][1].fut.set_result("ok")  # its callback wakes the waiting caller
    assert done.wait(2)
    assert len(calls) == 3 and window.total == 3


def test_a_replaced_actor_is_found_again_by_name_before_the_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    handle, lanes = make(lanes={"normal": 1})
    old, new = lanes["normal"][0], FakeActor()
    looked_up: list[str] = []

    def get_actor(name: str, namespace: str) -> FakeActor:
        looked_up.append(name)
        return new

    monkeypatch.setattr("athomic._handle.ray.get_actor", get_actor)
    handle.publish.remote(topic="t", message=0)
    old.state = 4  # Ray's ActorTableData: DEAD (athomic up killed it)
    handle.publish.remote(topic="t", message=1)
    handle.publish.remote(topic="t", message=2)
    assert [r.value for r, _ in old.calls] == [b"0"]
    assert [r.value for r, _ in new.calls] == [b"1", b"2"]
    assert looked_up == ["default.producer.normal.0"]


def test_only_an_actor_ray_holds_as_dead_is_looked_up_again() -> None:
    from athomic._handle import _is_dead

    actor = FakeActor()
    assert not _is_dead(actor)
    for state, dead in ((None, False), (0, False), (3, False), (4, True)):
        actor.state = state  # unknown, DEPENDENCIES_UNREADY, RESTARTING, DEAD
        assert _is_dead(actor) is dead
    assert not _is_dead(object())  # a handle without Ray's local state


def test_full_lane_times_out_with_a_typed_error_and_sends_nothing() -> None:
    handle, lanes = make(lanes={"max_in_flight": 2, "normal": 1, "acquire_timeout_s": 0.2})
    for _ in range(2):
        handle.publish.remote(topic="t", message=1)
    start = time.monotonic()
    with pytest.raises(BackpressureTimeoutError, match="acquire_timeout_s"):
        handle.publish.remote(topic="t", message=1)
    assert 0.15 < time.monotonic() - start < 2
    assert len(lanes["normal"][0].calls) == 2


async def test_await_publish_waits_for_room_without_blocking_the_event_loop() -> None:
    handle, lanes = make(lanes={"max_in_flight": 1, "normal": 1})
    handle.publish.remote(topic="t", message=0)  # the lane is now full
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    waiting = asyncio.ensure_future(handle.publish(topic="t", message=1))
    await asyncio.sleep(0.3)
    assert not waiting.done() and ticks >= 10  # the loop kept running
    assert len(lanes["normal"][0].calls) == 1
    # an acknowledgement completes on another thread (as Ray does): room is given back
    first = lanes["normal"][0].calls[0][1]
    threading.Thread(target=first.fut.set_result, args=("ok",)).start()
    for _ in range(100):
        if len(lanes["normal"][0].calls) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(lanes["normal"][0].calls) == 2
    assert lanes["normal"][0].calls[1][0].value == b"1"
    ticking.cancel()
    waiting.cancel()


async def test_await_publish_on_a_full_lane_times_out_typed() -> None:
    handle, _ = make(lanes={"max_in_flight": 1, "normal": 1, "acquire_timeout_s": 0.2})
    handle.publish.remote(topic="t", message=0)
    with pytest.raises(BackpressureTimeoutError):
        await handle.publish(topic="t", message=1)


def test_merged_lanes_report_failures_and_outcomes_by_the_callers_index() -> None:
    from athomic._handle import merge_lane_results

    ok, delayed = PublishingOutcome.SUCCESS_DIRECT, PublishingOutcome.SUCCESS_DELAYED
    # the caller's batch: 0 normal, 1 high, 2 normal, 3 high, 4 normal
    order = [[0, 2, 4], [1, 3]]
    assert merge_lane_results(order, [[ok, delayed, ok], [ok, ok]]) == \
        [ok, ok, delayed, ok, ok]
    # the NORMAL lane lost its second message; HIGH went through
    normal_error = PublishError("1 of 3", failures={1: "KafkaTimeoutError: late"},
                                outcomes=[ok, None, ok])
    with pytest.raises(PublishError) as caught:
        merge_lane_results(order, [normal_error, [ok, ok]])
    assert caught.value.failures == {2: "KafkaTimeoutError: late"}
    assert caught.value.outcomes == [ok, ok, None, ok, ok]
    assert "#2" in str(caught.value)
    # a lane refused before sending (too large): its messages failed, the other's kept
    too_big = RecordTooLargeError("record is big", size=9, limit=1, index=1)
    with pytest.raises(PublishError) as caught:
        merge_lane_results(order, [[ok, ok, ok], too_big])
    assert set(caught.value.failures) == {1, 3}
    assert caught.value.outcomes == [ok, None, ok, None, ok]
    assert too_big.index == 3 and str(too_big).startswith("message #3: ")
    # nothing sent at all: the validation error itself, with the caller's index
    with pytest.raises(RecordTooLargeError, match="message #4"):
        merge_lane_results(order, [RecordTooLargeError("big", size=9, limit=1, index=2),
                                   RecordTooLargeError("big", size=9, limit=1)])


def test_caller_chosen_message_ids_are_validated_and_kept() -> None:
    handle, lanes = make(delay_topics={1: "d1"})
    handle.publish.remote(topic="t", message=1, message_id="order-42-reminder",
                          delay_seconds=5)
    handle.publish.remote(topic="t", message=1, message_id="order-42-reminder",
                          delay_seconds=5)
    first, second = [req for a in lanes["normal"] for req, _ in a.calls]
    assert first.message_id == second.message_id == "order-42-reminder"
    assert first.version and second.version and first.version != second.version
    for bad in ["", "x" * 129, "tab\there", "ünïcode", 42]:
        with pytest.raises(InvalidHeaderError, match="message_id"):
            handle.publish.remote(topic="t", message=1, message_id=bad)
    handle.publish_batch.remote([{"topic": "t", "message": 1, "message_id": "a-1"},
                                 {"topic": "t", "message": 2}])
    (batch,) = [req for a in lanes["normal"] for req, _ in a.calls if isinstance(req, list)]
    assert batch[0].message_id == "a-1" and batch[0].version is not None
    assert batch[1].version is None and batch[1].message_id != "a-1"


def test_athomics_own_topics_are_not_final_topics() -> None:
    handle, lanes = make(delay_topics={1: "d1"}, republisher={"dead_letter_topic": "dead"})
    for own in ["d1", "dead", "athomic.released.default"]:
        with pytest.raises(InvalidTopicError, match="athomic's own"):
            handle.publish.remote(topic=own, message=1)
    assert not any(a.calls for group in lanes.values() for a in group)


def test_implausible_and_uncarriable_delays_are_refused_at_the_call() -> None:
    handle, _ = make(delay_topics={1: "d1", 10: "d10", 60: "d60"})
    now = time.time()
    with pytest.raises(InvalidDelayError, match="not milliseconds"):
        handle.publish.remote(topic="t", message=1, deliver_at=now * 1000)  # a unit slip
    with pytest.raises(InvalidDelayError, match="not plausible"):
        handle.publish.remote(topic="t", message=1, deliver_at=1e17)
    with pytest.raises(InvalidDelayError):
        handle.publish.remote(topic="t", message=1, delay_seconds=1e300)
    handle.publish.remote(topic="t", message=1, delay_seconds=5 * 3600)  # 300 hops: fine
    tiny, _ = make(delay_topics={1: "d1"})
    with pytest.raises(InvalidDelayError, match="65535"):
        tiny.publish.remote(topic="t", message=1, delay_seconds=70_000)


def test_a_caller_chosen_id_is_refused_beyond_the_cancel_horizon() -> None:
    """An id is remembered for ``republisher.cancel_horizon_s``: a delay longer than that
    with a caller-chosen id could not be cancelled or deduplicated, so it is refused."""
    handle, _ = make(delay_topics={1: "d1", 60: "d60"},
                     republisher={"cancel_horizon_s": 3600})
    with pytest.raises(InvalidDelayError, match="cancel_horizon_s"):
        handle.publish.remote(topic="t", message=1, delay_seconds=7200, message_id="late")
    handle.publish.remote(topic="t", message=1, delay_seconds=7200)  # no id: fine
    handle.publish.remote(topic="t", message=1, delay_seconds=1800, message_id="soon")
