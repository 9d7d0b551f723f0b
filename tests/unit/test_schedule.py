"""Due-time scheduling (pure): bucket choice, hop plans, the heap, the offset watermark."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from athomic.republisher.schedule import (
    FINAL,
    MAX_METADATA,
    Cascade,
    DueHeap,
    LatenessStats,
    OffsetTracker,
    choose_bucket,
    decode_done,
    encode_done,
    first_hop,
    next_step,
    percentile,
)

BUCKETS = [1.0, 2.0, 4.0]
DAYS = [1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0]


def test_choose_bucket() -> None:
    assert choose_bucket(BUCKETS, 0.5) is None
    assert choose_bucket(BUCKETS, 1.0) == 1.0
    assert choose_bucket(BUCKETS, 3.99) == 2.0
    assert choose_bucket(BUCKETS, 100) == 4.0


def test_short_delay_enters_the_smallest_bucket_and_leaves_at_its_due_time() -> None:
    assert first_hop(BUCKETS, 1_000, 1_500) == (1.0, 1_500)
    assert first_hop(BUCKETS, 1_000, 4_000) == (2.0, 3_000)
    assert first_hop(BUCKETS, 1_000, 13_000) == (4.0, 5_000)


def plan(buckets: list[float], published: int, due: int) -> list[tuple[float, int]]:
    """The whole path of a message, hop by hop, assuming each hop happens on time."""
    bucket, hold = first_hop(buckets, published, due)
    path = [(bucket, hold)]
    while True:
        step = next_step(buckets, hold, due, hold)
        if step == FINAL:
            return path
        assert isinstance(step, Cascade)
        path.append((step.bucket, step.hold_until_ms))
        hold = step.hold_until_ms


@settings(deadline=None)
@given(st.integers(0, 10**12), st.integers(1, 10**7),
       st.lists(st.floats(1.0, 10**6), min_size=1, max_size=8, unique=True))
def test_hop_plan_never_leaves_after_the_due_time(published: int, delay_ms: int,
                                                  buckets: list[float]) -> None:
    buckets = sorted(buckets)
    due = published + delay_ms
    path = plan(buckets, published, due)
    holds = [h for _, h in path]
    assert all(h <= due for h in holds)
    assert holds == sorted(holds)
    # the last stretch, held in memory, is shorter than the smallest bucket
    assert due - holds[-1] < buckets[0] * 1000 + 1 or holds[-1] == due


def test_same_delay_same_path_and_any_length() -> None:
    a = plan(DAYS, 1_000, 1_000 + 90 * 86_400_000)
    b = plan(DAYS, 5_000, 5_000 + 90 * 86_400_000)
    assert [x for x, _ in a] == [x for x, _ in b]
    assert [h - 1_000 for _, h in a] == [h - 5_000 for _, h in b]
    assert len(a) == 90  # a day at a time
    year = plan(DAYS, 0, 365 * 86_400_000 + 3_723_000)
    assert year[-1][1] <= 365 * 86_400_000 + 3_723_000


def test_late_message_goes_final_at_once() -> None:
    assert next_step(BUCKETS, 1_000, 20_000, 25_000) == FINAL
    assert next_step(BUCKETS, 1_000, 20_000, 1_000) == Cascade(4.0, 5_000)


def test_due_heap_orders_by_time_then_insertion() -> None:
    heap: DueHeap[str] = DueHeap()
    for due, name in [(30, "c"), (10, "a"), (20, "b1"), (20, "b2")]:
        heap.push(due, name)
    assert heap.next_due() == 10
    assert heap.pop_due(20, 10) == ["a", "b1", "b2"]
    assert heap.pop_due(25, 10) == [] and len(heap) == 1
    assert heap.pop_due(30, 10) == ["c"] and heap.next_due() is None


def test_done_bitmap_round_trip() -> None:
    done = {101, 102, 105, 150, 10_000}
    meta = encode_done(100, done | {99, 100})
    assert decode_done(100, meta) == done
    assert encode_done(100, []) == "" and decode_done(100, "") == set()
    dense = set(range(1, 200_001))
    assert len(encode_done(0, dense)) < MAX_METADATA  # long runs compress well


def test_tracker_commits_the_lowest_pending_offset_and_names_done_ones() -> None:
    t = OffsetTracker(position=10)
    for o in range(10, 16):
        t.read(o)
    assert t.commit_point() == (10, "")
    off, meta = t.commit_point([12, 13])
    assert off == 10 and decode_done(10, meta) == {12, 13}
    t.finish([12, 13])
    t.finish([10, 11])
    assert t.commit_point() == (14, "")
    t.finish([14, 15])
    assert t.commit_point() == (16, "")


@settings(deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=300), st.randoms())
def test_restart_from_any_commit_is_exactly_once(ops: list[int],
                                                 rnd: random.Random) -> None:
    """Read offsets, publish random subsets (each commit atomic with its metadata), crash
    anywhere: a restart from the last commit republishes exactly the unpublished ones."""
    t = OffsetTracker(position=0)
    published: set[int] = set()
    committed = (0, "")
    nxt = 0
    for op in ops:
        if op == 0:
            t.read(nxt)
            nxt += 1
        elif t.pending:
            batch = rnd.sample(sorted(t.pending), rnd.randint(1, len(t.pending)))
            committed = t.commit_point(batch)
            t.finish(batch)
            published |= set(batch)
    offset, meta = committed
    restarted = OffsetTracker.from_commit(offset, meta)
    again = {o for o in range(offset, nxt) if not restarted.is_done(o)}
    assert again.isdisjoint(published)
    assert again | published >= set(range(nxt))


def test_lateness_stats() -> None:
    stats = LatenessStats(size=100)
    for i in range(1000):
        stats.add(i / 1000)
    stats.add(-0.001)
    s = stats.summary()
    assert s["count"] == 1001 and s["early"] == 1 and s["max_s"] == 0.999
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and percentile([], 99) == 0.0
