"""Strategies are pure: request + encoded payload -> the record to send."""

from __future__ import annotations

from athomic import DirectPublishStrategy, MessageHeaders, MessagePriority, MessagingSettings
from athomic.envelope import decode
from athomic.messages import PublishRequest
from athomic.pipeline import Encoded
from athomic.strategies import DelayedPublishStrategy, HeaderMemo, physical_topic


def request(priority: MessagePriority = MessagePriority.NORMAL) -> PublishRequest:
    return PublishRequest(topic="orders", value=b"{}", key=b"k",
                          headers=[("message-id", b"spoofed"), ("x", b"1")],
                          content_type="application/json", schema=None, priority=priority,
                          deliver_at=None, message_id="id-1", published_at=1.0)


def test_physical_priority_topics() -> None:
    assert physical_topic("t", MessagePriority.HIGH, False) == "t"
    assert physical_topic("t", MessagePriority.HIGH, True) == "t.high"
    assert physical_topic("t", MessagePriority.LOW, True) == "t.low"
    assert physical_topic("t", MessagePriority.NORMAL, True) == "t"


def test_direct_record_owns_id_priority_and_pipeline_headers() -> None:
    strategy = DirectPublishStrategy()
    record = strategy.build(request(MessagePriority.HIGH),
                            Encoded(b"zz", [("content-encoding", b"zstd")]),
                            physical_topic("orders", MessagePriority.HIGH, True))
    assert record.topic == "orders.high"
    assert (record.key, record.value) == (b"k", b"zz")
    h = MessageHeaders(record.headers)
    assert h["message-id"] == b"id-1"  # a caller cannot spoof the id
    assert h["athomic-priority"] == b"high"
    assert h["content-encoding"] == b"zstd" and h["x"] == b"1"
    assert record.size() > len(b"zz") + len(b"k")


def test_delayed_record_is_an_envelope_in_the_right_bucket() -> None:
    from athomic.envelope import decode

    settings = MessagingSettings(delay_topics={1: "d1", 10: "d10", 60: "d60"})
    mid = "01890a5d-ac96-774b-bcce-b302099a8057"
    req = request()._replace(published_at=1000.0, deliver_at=1000.0 + 25.5, message_id=mid)
    record = DelayedPublishStrategy(settings).build(req, Encoded(b"zz", []), req.topic,
                                                    now=1000.0)
    assert record.topic == "d10" and record.key == b"k"
    env = decode(record.value or b"")
    assert (env.topic, env.key, env.value, env.hop) == ("orders", b"k", b"zz", 1)
    assert (env.deliver_at_ms, env.hold_until_ms) == (1_025_500, 1_010_000)
    assert env.message_id == mid
    assert MessageHeaders(list(env.headers))["message-id"] == mid.encode()
    assert MessageHeaders(record.headers)["athomic-deliver-at"] == b"1025500"


def test_released_record_is_the_direct_record_with_its_due_time_and_hop() -> None:
    """The envelope leaves out the due time and hop (stamped when the message leaves); the
    record the republisher writes is the one a direct publish writes, headers in the same
    order, then the due time and the hop. An envelope that still carries the two (an
    earlier athomic wrote it) gives the same record."""
    from athomic.envelope import Envelope, decode
    from athomic.strategies import delivered_record

    settings = MessagingSettings(delay_topics={1: "d1", 10: "d10"})
    req = request()._replace(published_at=1000.0, deliver_at=1012.0)
    encoded = Encoded(b"zz", [("content-encoding", b"zstd")])
    env = decode(DelayedPublishStrategy(settings).build(req, encoded, "orders",
                                                        now=1000.0).value or b"")
    assert not {"athomic-deliver-at", "athomic-hop"} & set(env.header_names)
    direct = DirectPublishStrategy().build(req, encoded, "orders")
    hop3 = env.moved(hop=3, hold_until_ms=env.hold_until_ms)
    released = delivered_record(hop3)
    assert released.headers == [*direct.headers, ("athomic-hop", b"3")]
    assert (released.topic, released.key, released.value) == ("orders", b"k", b"zz")
    older = Envelope(env.topic, env.key, env.value,
                     [("athomic-hop", b"1"), *env.headers, ("athomic-deliver-at", b"1012000")],
                     env.deliver_at_ms, env.hold_until_ms, env.published_ms, 3, env.priority,
                     env.message_id)
    assert delivered_record(older).headers == released.headers


def test_due_before_reaching_the_producer_goes_to_its_release_bucket() -> None:
    """A delayed message already due at the producer (a backlog, a call Ray retried) is
    not sent directly: it waits, due at once, in the bucket its planned path ends in, where
    every copy of it is released by one republisher."""
    from athomic.actors.producer import ProducerActor
    from athomic.envelope import decode

    settings = MessagingSettings(delay_topics={1: "d1", 10: "d10", 60: "d60"})
    actor = ProducerActor(settings)
    late = request()._replace(published_at=900.0, deliver_at=999.0)
    assert actor.strategy_for(late, now=1000.0) is actor.delayed
    assert actor.strategy_for(request(), now=1000.0) is actor.direct
    on_time = DelayedPublishStrategy(settings).build(late, Encoded(b"{}", []), "orders",
                                                     now=900.0)
    assert on_time.topic == "d60"  # 99 s: first the 60 s bucket
    record = DelayedPublishStrategy(settings).build(late, Encoded(b"{}", []), "orders",
                                                    now=1000.0)
    assert record.topic == "d1"  # the path 60 + 10 + 10 + 10 + 1 ... ends in the 1 s bucket
    env = decode(record.value or b"")
    assert env.hold_until_ms == 1_000_000 and env.deliver_at_ms == 999_000
    assert MessageHeaders(record.headers)["athomic-deliver-at"] == b"999000"
    direct = actor.direct.build(late, Encoded(b"{}", []), late.topic)
    assert MessageHeaders(direct.headers)["athomic-deliver-at"] == b"999000"
    spoof = request()._replace(headers=[("athomic-hop", b"7"), ("athomic-deliver-at", b"1")])
    assert "athomic-hop" not in MessageHeaders(
        actor.direct.build(spoof, Encoded(b"{}", []), spoof.topic).headers)


def test_header_bytes_counted_while_building_match_the_headers() -> None:
    """The size a record is checked against its limit with is counted while its headers
    are built; it must equal counting the headers."""
    shared = [("athomic-host", b"vm"), ("message-id", b"spoofed"), ("x", "é".encode())]
    other = [("y", b"2" * 300)]
    requests = [
        request()._replace(headers=shared, message_id=f"id-{i}", published_at=1.0 + i // 3,
                           schema="m:M" if i == 2 else None,
                           deliver_at=5.0 if i == 4 else None,
                           content_type=None if i == 5 else "application/json")
        for i in range(6)] + [request()._replace(headers=other), request()._replace(headers=[])]
    direct = DirectPublishStrategy()
    for i, r in enumerate(requests):
        encoded = Encoded(r.value, [("content-encoding", b"zstd")] if i % 2 else [])
        record = direct.build(r, encoded, r.topic)
        assert record.header_bytes is not None
        counted = record.size()
        record.header_bytes = None  # count from the headers themselves
        assert counted == record.size(), i
        h = MessageHeaders(record.headers)
        assert h["message-id"] == r.message_id.encode()
        assert ("x" in h) == (i < 6) and ("y" in h) == (i == 6)
        assert h["athomic-published-at"] == str(round(r.published_at * 1000)).encode()


def test_a_calls_shared_header_work_gives_each_record_its_own_headers() -> None:
    """One memo per call: the requests of a batch share the captured headers list, publish
    time, content type, schema and priority, which are filtered and encoded once. Requests
    that share only some of them (or a list with the same contents) still get exactly the
    headers and size a build without the memo gives, and no record's list is another's."""
    shared = [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
              ("message-id", b"spoofed"), ("x", b"1")]
    base = request()._replace(headers=shared)
    requests = [
        base._replace(message_id="id-1"),
        base._replace(message_id="id-2", priority=MessagePriority.HIGH),
        base._replace(message_id="id-3", published_at=2.5),  # same list, other time
        base._replace(message_id="id-4", content_type=None, schema="s1"),
        base._replace(message_id="id-5", headers=list(shared)),  # equal, not the same
        base._replace(message_id="id-6", headers=[("y", b"2")]),
        base._replace(message_id="id-7"),
    ]
    encoded = ([Encoded(b"v", []), Encoded(b"v", [("content-encoding", b"zstd")])] * 4)[:7]
    strategy = DirectPublishStrategy()
    memo: HeaderMemo = {}
    with_memo = [strategy.build(r, e, "orders", memo=memo)
                 for r, e in zip(requests, encoded, strict=True)]
    alone = [strategy.build(r, e, "orders") for r, e in zip(requests, encoded, strict=True)]
    assert [(r.headers, r.size()) for r in with_memo] == \
        [(r.headers, r.size()) for r in alone]
    assert len({id(r.headers) for r in with_memo}) == len(with_memo)
    h3 = MessageHeaders(with_memo[2].headers)
    assert h3["athomic-published-at"] == b"2500" and h3["message-id"] == b"id-3"
    assert "content-type" not in MessageHeaders(with_memo[3].headers)
    assert MessageHeaders(with_memo[5].headers)["y"] == b"2"
    # one entry per distinct headers list, publish time, content type, schema and
    # priority: all but id-7 (id-1's) differ in one of them
    assert len(memo) == 6
    settings = MessagingSettings(delay_topics={1: "d1", 10: "d10"})
    delayed = DelayedPublishStrategy(settings)
    late = [r._replace(deliver_at=r.published_at + 5) for r in requests]
    memo = {}
    assert [decode(delayed.build(r, Encoded(b"v", []), "orders", now=1.0,
                                 memo=memo).value or b"").headers for r in late] == \
        [decode(delayed.build(r, Encoded(b"v", []), "orders", now=1.0).value or b"").headers
         for r in late]


def test_a_batch_without_byte_stages_builds_the_records_build_gives() -> None:
    """``build_all`` (a call's direct requests whose values passed no byte stage) gives
    each request the record ``build`` gives it, headers, size and all."""
    shared = [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
              ("message-id", b"spoofed")]
    base = request()._replace(headers=shared)
    requests = [base._replace(message_id=f"id-{i}", key=None if i == 1 else b"k%d" % i,
                              value=None if i == 2 else b"v%d" % i,
                              schema="m:M" if i == 3 else None,
                              content_type=None if i == 4 else "application/json",
                              headers=[("y", b"2")] if i == 5 else shared,
                              priority=MessagePriority.HIGH if i == 6 else base.priority)
                for i in range(8)]
    topics = [f"t{i % 2}" for i in range(8)]
    strategy = DirectPublishStrategy()
    built = strategy.build_all(requests, topics)
    alone = [strategy.build(r, Encoded(r.value, []), t)
             for r, t in zip(requests, topics, strict=True)]
    assert [(r.topic, r.key, r.value, r.headers, r.size()) for r in built] == \
        [(r.topic, r.key, r.value, r.headers, r.size()) for r in alone]
    assert len({id(r.headers) for r in built}) == len(built)
