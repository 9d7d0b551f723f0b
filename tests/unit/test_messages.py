"""Core types: headers, ids, topic names, priorities (pure, no broker)."""

from __future__ import annotations

import os
import pickle
import time
import uuid

import pytest

from athomic import (
    CancelOutcome,
    InvalidHeaderError,
    InvalidTopicError,
    MessageHeaders,
    MessagePriority,
    PublishingOutcome,
)
from athomic.messages import (
    Outcomes,
    PublishRequest,
    PublishRequests,
    message_id_time,
    new_message_id,
    new_message_ids,
    validate_topic,
)


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


def test_single_and_batch_ids_interleave_in_order() -> None:
    """Single ids take their random bytes from a pool, large batches from one urandom
    call; both share the millisecond counter, so the ids stay in order and distinct. A call
    of 10,000 runs past the 4,096 values of one millisecond's counter and borrows the next
    milliseconds."""
    ids = [new_message_id() for _ in range(500)] + new_message_ids(3000) + \
        new_message_ids(20) + new_message_ids(10_000) + [new_message_id() for _ in range(900)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for value in ids:
        u = uuid.UUID(value)
        assert u.version == 7 and u.variant == uuid.RFC_4122 and str(u) == value
    assert len({value[19:] for value in ids}) == len(ids)  # the random tails differ too
    assert len({value[:13] for value in ids}) >= 3  # at least two milliseconds borrowed


def test_a_forked_child_does_not_reuse_the_parents_random_bytes() -> None:
    new_message_id()  # the pool holds random bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: ten ids, then out
        os.write(write, ",".join(new_message_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 10_000).decode().split(",")
    os.close(read)
    parent = [new_message_id() for _ in range(10)]
    assert len(child) == 10
    assert not {c[19:] for c in child} & {p[19:] for p in parent}


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


class _CountingPickler(pickle.Pickler):
    """Ray's pickler calls a Python hook (``reducer_override``) for every object that is
    not a plain list, dict, tuple or scalar; this one counts the calls."""

    calls = 0

    def reducer_override(self, obj: object) -> object:
        type(self).calls += 1
        return NotImplemented


def _hook_calls(obj: object) -> int:
    import io

    _CountingPickler.calls = 0
    _CountingPickler(io.BytesIO(), protocol=5).dump(obj)
    return _CountingPickler.calls


def test_a_batch_of_requests_pickles_as_columns_and_arrives_whole() -> None:
    shared = [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")]
    requests = PublishRequests(
        PublishRequest(f"t{i % 3}", b"v%d" % i, None if i % 2 else b"k", shared if i else [],
                       "application/json", "m:Model" if i == 4 else None,
                       MessagePriority.HIGH if i == 2 else MessagePriority.NORMAL,
                       10.5 if i == 3 else None, f"id-{i}", float(1_700_000_000 + 0.25),
                       b"\x01" * 16 if i == 3 else None)
        for i in range(1000))
    back = pickle.loads(pickle.dumps(requests, protocol=5))
    assert type(back) is list and back == list(requests)
    assert all(type(r) is PublishRequest for r in back)
    assert back[5].headers is back[7].headers  # a shared list stays one list
    # a field the same in every request crossed once: one float object, not 1,000
    assert back[0].published_at is back[999].published_at
    assert back[1].deliver_at is None and back[3].deliver_at == 10.5
    # A plain list of requests costs the hook once per request (and per priority);
    # the batch, a handful in all.
    assert _hook_calls(list(requests)) >= 1000
    assert _hook_calls(requests) < 10


@pytest.mark.parametrize("count", [0, 1, 2])
def test_a_batch_of_none_one_or_two_requests_arrives_whole(count: int) -> None:
    requests = PublishRequests(
        PublishRequest("t", b"v", b"k%d" % i, [], None, None, MessagePriority.LOW, None,
                       f"id-{i}", 1.5) for i in range(count))
    back = pickle.loads(pickle.dumps(requests, protocol=5))
    assert type(back) is list and back == list(requests)


@pytest.mark.parametrize("i", range(5))
def test_one_request_crosses_as_messagepack_and_arrives_equal(i: int) -> None:
    """``wire()`` holds only MessagePack's own types, so Ray sends one publish's request
    without its pickler (it packs with ``strict_types``: a tuple or an enum member would
    go to the pickler); ``from_wire`` gives back an equal request."""
    import msgpack

    request = PublishRequest(
        "orders", None if i == 1 else b"v" * 1024, None if i % 2 else b"k",
        [] if i == 0 else [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
                           ("athomic-host", b"vm")],
        None if i == 2 else "application/json", "m:Model" if i == 4 else None,
        list(MessagePriority)[i % 3], 1_700_000_000.123456 if i == 3 else None,
        new_message_id(), 1_700_000_000.5, b"\x01" * 16 if i == 3 else None)
    data = msgpack.packb(request.wire(), use_bin_type=True, strict_types=True)
    back = PublishRequest.from_wire(msgpack.unpackb(data, raw=False))
    assert back == request
    assert type(back.priority) is MessagePriority and back.priority is request.priority
    assert all(type(h) is tuple for h in back.headers)
    with pytest.raises(TypeError):  # the request itself is not MessagePack's
        msgpack.packb(request, use_bin_type=True, strict_types=True)


def test_outcomes_pickle_as_one_byte_each_and_arrive_as_a_list() -> None:
    values = [PublishingOutcome.SUCCESS_DIRECT, None, PublishingOutcome.SUCCESS_DELAYED] * 400
    data = pickle.dumps(Outcomes(values), protocol=5)
    back = pickle.loads(data)
    assert type(back) is list and back == values
    assert back[0] is PublishingOutcome.SUCCESS_DIRECT and back[1] is None
    assert len(data) < 1400 and _hook_calls(Outcomes(values)) < 5


def test_enum_members_pickle_by_name_and_load_as_themselves() -> None:
    """What ``publish`` returns crosses Ray pickled: by name (a lookup on load), never as
    a call of its class with its value, and it loads as the member itself."""
    import pickletools

    import ray.cloudpickle

    members = [*PublishingOutcome, *CancelOutcome, *MessagePriority]
    for member in members:
        for dumps in (pickle.dumps, ray.cloudpickle.dumps):
            for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
                data = dumps(member, protocol=protocol)
                assert pickle.loads(data) is member
            ops = {op.name for op, _, _ in pickletools.genops(dumps(member, protocol=5))}
            assert "REDUCE" not in ops and "STACK_GLOBAL" in ops
            assert f"{type(member).__name__}.{member.name}".encode() in data
