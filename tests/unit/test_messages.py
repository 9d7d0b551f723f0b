"""Core types: headers, ids, topic names, priorities (pure, no broker)."""

from __future__ import annotations

import pickle
import time
import uuid

import pytest

from athomic import InvalidHeaderError, InvalidTopicError, MessageHeaders, MessagePriority
from athomic.messages import message_id_time, new_message_id, validate_topic


def test_headers_keep_order_and_repeats() -> None:
    h = MessageHeaders([("a", b"1"), ("b", "two"), ("a", b"3")])
    assert h.items() == [("a", b"1"), ("b", b"two"), ("a", b"3")]
    assert h["a"] == b"3" and h.get_all("a") == [b"1", b"3"]
    h["a"] = "x"
    assert h.items() == [("b", b"two"), ("a", b"x")]
    h.setdefault("b", b"ignored")
    assert h["b"] == b"two"
    del h["b"]
    assert "b" not in h and len(h) == 1
    assert h.size() == len("a") + len("x")
    assert pickle.loads(pickle.dumps(h)) == h
    with pytest.raises(KeyError):
        h["missing"]


def test_headers_from_mapping_and_update() -> None:
    h = MessageHeaders({"k": "v"})
    h.update({"k": "w", "n": b"1"}, overwrite=False)
    assert h.items() == [("k", b"v"), ("n", b"1")]
    h.update(MessageHeaders({"k": "w"}))
    assert h["k"] == b"w"
    assert MessageHeaders((("a", None), ("b", b"x"))).items() == [
        ("a", b""), ("b", b"x")]


@pytest.mark.parametrize("bad", [[("", b"x")], [(1, b"x")], [("k", 5)], ["notapair"]])
def test_headers_reject_bad_pairs(bad: list[object]) -> None:
    with pytest.raises(InvalidHeaderError):
        MessageHeaders(bad)  # type: ignore[arg-type]


def test_message_ids_are_uuid7_and_monotonic() -> None:
    ids = [new_message_id() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)  # time-ordered, and monotonic within a millisecond
    u = uuid.UUID(ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert abs(message_id_time(ids[-1]) - time.time()) < 5


@pytest.mark.parametrize("name", ["a", "user.events.v1", "A_b-9", "x" * 249])
def test_valid_topics(name: str) -> None:
    assert validate_topic(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a b", "a/b", "ü", "x" * 250, None, 3])
def test_invalid_topics(name: object) -> None:
    with pytest.raises(InvalidTopicError):
        validate_topic(name)


def test_priority_values_and_parse() -> None:
    assert [p.value for p in MessagePriority] == ["low", "normal", "high"]
    assert MessagePriority.parse("HIGH") is MessagePriority.HIGH
    assert MessagePriority.parse(MessagePriority.LOW) is MessagePriority.LOW
    with pytest.raises(InvalidHeaderError):
        MessagePriority.parse("urgent")


def test_one_coercion_for_every_shape_of_headers() -> None:
    pairs = [("a", b"1"), ("b", "2"), ("a", b"3")]
    as_list = MessageHeaders(pairs)
    assert MessageHeaders(tuple(pairs)) == as_list  # aiokafka gives tuples
    assert MessageHeaders.of(as_list) is as_list  # no copy of what already is one
    assert MessageHeaders(as_list) is not as_list
    assert as_list.last_values() == {"a": b"3", "b": b"2"}
    assert MessageHeaders({"a": "3", "b": b"2"}).last_values() == as_list.last_values()
    assert MessageHeaders.of(None).items() == []
    for bad in ([("", b"x")], [(1, b"x")], [("a", 1)], ["abc"]):
        with pytest.raises(InvalidHeaderError):
            MessageHeaders(bad)  # type: ignore[arg-type]
