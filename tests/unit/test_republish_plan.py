"""The republisher's commit plan, without a broker: what a transaction commits, and how it
stays within Kafka's commit-metadata limit when many messages leave out of offset order."""

from __future__ import annotations

import random

from aiokafka import TopicPartition

from athomic import MessagePriority, MessagingSettings
from athomic.envelope import Envelope, encode, peek
from athomic.republisher.loop import CASCADE, FINAL, OWNED, BucketRepublisher, Held, Partition
from athomic.republisher.schedule import MAX_METADATA, OffsetTracker, Owner, decode_commit

TP = TopicPartition("d1", 0)
ENV = Envelope(topic="final", key=b"k", value=b"v", headers=(), deliver_at_ms=10**13,
               hold_until_ms=10**13, published_ms=0, hop=1,
               priority=MessagePriority.NORMAL, message_id="m")


def republisher() -> tuple[BucketRepublisher, Partition, OffsetTracker]:
    rep = BucketRepublisher(MessagingSettings(delay_topics={1: "d1"},
                                              connection_name="orders"), "d1")
    part = Partition(TP, 0)
    part.state = OWNED
    part.tracker = tracker = OffsetTracker(position=0)
    rep.parts[TP] = part
    return rep, part, tracker


def held(offset: int, action: str = CASCADE) -> Held:
    return Held(offset, 0, action, ENV)


def test_commit_point_of_a_transaction_names_done_offsets_and_the_owner() -> None:
    rep, part, tracker = republisher()
    for o in range(6):
        tracker.read(o)
    offsets, spilled, deferred = rep._plan_commit(part, [held(3), held(1)], [])
    assert spilled == deferred == []
    assert offsets[TP].offset == 0  # 0 is still pending
    done, owner = decode_commit(0, offsets[TP].metadata)
    assert done == {1, 3}
    parsed = Owner.parse(owner)
    assert parsed is not None and parsed.connection == "orders"


def test_overflowing_metadata_moves_the_lowest_waiting_messages_to_the_end() -> None:
    """Random holes in 100,000 offsets do not fit in 3.5 KB: instead of holding back due
    messages, the lowest messages still waiting are written again at the end of the
    partition (one extra hop), so the committed offset moves on."""
    rep, part, tracker = republisher()
    rnd = random.Random(5)
    for o in range(100_000):
        tracker.read(o)
    due = set(rnd.sample(range(1, 100_000), 50_000))
    for o in sorted(set(range(100_000)) - due):  # the rest waits, offset 0 among them
        part.store.push(10**13, held(o, FINAL))
    rep.held = len(part.store)
    offsets, spilled, deferred = rep._plan_commit(part, [held(o) for o in sorted(due)], [])
    assert deferred == [] and spilled
    waiting = sorted(set(range(100_000)) - due)
    assert [h.offset for h in spilled] == waiting[:len(spilled)]  # the lowest ones
    assert all(h.spill for h in spilled) and len(part.store) == len(waiting) - len(spilled)
    assert len(offsets[TP].metadata) <= MAX_METADATA
    mark = offsets[TP].offset
    assert decode_commit(mark, offsets[TP].metadata)[0] == {
        o for o in due | {h.offset for h in spilled} if o > mark}


def test_with_nothing_waiting_the_highest_due_offsets_wait_for_the_next_commit() -> None:
    rep, part, tracker = republisher()
    rnd = random.Random(5)
    for o in range(100_000):
        tracker.read(o)
    chosen = sorted(rnd.sample(range(1, 100_000), 50_000))  # offset 0 is in flight
    offsets, spilled, deferred = rep._plan_commit(part, [held(o) for o in chosen], [])
    assert deferred and not spilled
    kept = sorted(set(chosen) - {h.offset for h in deferred})
    assert max(kept) < min(h.offset for h in deferred)
    assert len(offsets[TP].metadata) <= MAX_METADATA
    assert decode_commit(0, offsets[TP].metadata)[0] == set(kept)


def test_a_message_held_compactly_leaves_as_the_one_read() -> None:
    """A message due long after it was read waits in the cold store; it comes back with
    the same schedule, action, envelope head and bytes as one kept as an object."""
    rep = BucketRepublisher(MessagingSettings(delay_topics={1: "d1", 10: "d10", 60: "d60"},
                                              connection_name="orders"), "d60")
    part = Partition(TopicPartition("d60", 0), 0, rep.buckets)
    now = 1_000_000
    cases = [  # (deliver_at, hold_until): final from memory, cascading on, late
        (now + 30_000, now + 30_000), (now + 600_000, now + 50_000), (now - 5, now - 5)]
    expected = []
    for offset, (deliver_at, hold) in enumerate(cases):
        data = encode(Envelope(topic="final", key=None, value=b"v", headers=(),
                               deliver_at_ms=deliver_at, hold_until_ms=hold,
                               published_ms=0, hop=1, priority=MessagePriority.NORMAL,
                               message_id=f"m{offset}"))
        h = rep._plan(offset, peek(data), now)
        part.freeze(h, data)
        expected.append((h.offset, h.release_ms, h.action, h.cascade, h.env, data))
    got = part.store.pop_due(10**13, 10)
    assert sorted((h.offset, h.release_ms, h.action, h.cascade, h.env, h.data)
                  for h in got) == sorted(expected, key=lambda e: e[0])
    assert all(h.decoded is not None and h.decoded.message_id == h.env.message_id
               for h in got if h.env is not None)


def test_restaging_takes_the_lowest_waiting_messages_whether_held_compactly_or_not(
        ) -> None:
    rep, part, tracker = republisher()
    part.buckets = tuple(rep.buckets)
    rnd = random.Random(6)
    for o in range(100_000):
        tracker.read(o)
    due = set(rnd.sample(range(1, 100_000), 50_000))
    data = encode(ENV)
    for o in sorted(set(range(100_000)) - due):
        h = held(o, FINAL)
        if o % 2:
            part.store.push(10**13, h)
        else:
            part.freeze(h, data)
    rep.held = len(part.store)
    offsets, spilled, deferred = rep._plan_commit(part, [held(o) for o in sorted(due)], [])
    waiting = sorted(set(range(100_000)) - due)
    assert deferred == [] and [h.offset for h in spilled] == waiting[:len(spilled)]
    assert all(h.spill for h in spilled) and len(part.store) == len(waiting) - len(spilled)
    assert len(offsets[TP].metadata) <= MAX_METADATA
