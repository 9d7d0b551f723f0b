"""The republisher's commit plan, without a broker: what a transaction commits."""

from __future__ import annotations

import random

from aiokafka import TopicPartition

from athomic import MessagingSettings
from athomic.republisher.loop import CASCADE, BucketRepublisher, Held
from athomic.republisher.schedule import MAX_METADATA, OffsetTracker, decode_done

TP = TopicPartition("d1", 0)


def republisher() -> BucketRepublisher:
    return BucketRepublisher(MessagingSettings(delay_topics={1: "d1"}), "d1")


def held(offset: int) -> Held:
    return Held(TP, offset, 0, CASCADE, None)


def test_commit_point_of_a_transaction() -> None:
    rep = republisher()
    rep.trackers[TP] = tracker = OffsetTracker(position=0)
    for o in range(6):
        tracker.read(o)
    due, deferred, offsets = rep._plan_commit([held(3), held(1)])
    assert [h.offset for h in due] == [3, 1] and deferred == []
    assert offsets[TP].offset == 0  # 0 is still pending
    assert decode_done(0, offsets[TP].metadata) == {1, 3}


def test_metadata_that_would_not_fit_defers_the_highest_offsets() -> None:
    rep = republisher()
    rep.trackers[TP] = tracker = OffsetTracker(position=0)
    rnd = random.Random(5)
    # offset 0 held back; a random (incompressible) half of 100,000 offsets above it due
    for o in range(100_000):
        tracker.read(o)
    chosen = sorted(rnd.sample(range(1, 100_000), 50_000))
    due, deferred, offsets = rep._plan_commit([held(o) for o in chosen])
    assert deferred and due
    assert max(h.offset for h in due) < min(h.offset for h in deferred)
    assert len(due) + len(deferred) == len(chosen)
    assert len(offsets[TP].metadata) <= MAX_METADATA
    assert decode_done(0, offsets[TP].metadata) == {h.offset for h in due}
