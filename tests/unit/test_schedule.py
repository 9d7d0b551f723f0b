"""Due-time scheduling (pure): bucket choice, hop plans, the heap, the offset watermark."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from athomic.republisher.schedule import (
    FINAL,
    MAX_METADATA,
    Cascade,
    ClockSkew,
    LatenessStats,
    OffsetTracker,
    Owner,
    Plan,
    RecentIds,
    choose_bucket,
    decode_commit,
    decode_done,
    encode_done,
    first_hop,
    next_step,
    percentile,
    plan,
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


def path_of(buckets: list[float], published: int, due: int) -> list[tuple[float, int]]:
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
    path = path_of(buckets, published, due)
    holds = [h for _, h in path]
    assert all(h <= due for h in holds)
    assert holds == sorted(holds)
    # the last stretch, held in memory, is shorter than the smallest bucket
    assert due - holds[-1] < buckets[0] * 1000 + 1 or holds[-1] == due


def test_same_delay_same_path_and_any_length() -> None:
    a = path_of(DAYS, 1_000, 1_000 + 90 * 86_400_000)
    b = path_of(DAYS, 5_000, 5_000 + 90 * 86_400_000)
    assert [x for x, _ in a] == [x for x, _ in b]
    assert [h - 1_000 for _, h in a] == [h - 5_000 for _, h in b]
    assert len(a) == 90  # a day at a time
    year = path_of(DAYS, 0, 365 * 86_400_000 + 3_723_000)
    assert year[-1][1] <= 365 * 86_400_000 + 3_723_000


def test_late_message_goes_final_at_once() -> None:
    assert next_step(BUCKETS, 1_000, 20_000, 25_000) == FINAL
    assert next_step(BUCKETS, 1_000, 20_000, 1_000) == Cascade(4.0, 5_000)


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


def test_a_restart_never_forgets_an_offset_published_out_of_order() -> None:
    """Restart from the commit (100, done={101}); the first fetch ends at 100. Publishing
    100 must not commit (101, "") and forget 101 (which a second restart would publish
    again)."""
    run1 = OffsetTracker(position=100)
    for o in (100, 101, 102):
        run1.read(o)
    commit = run1.commit_point([101])
    assert commit[0] == 100 and decode_done(*commit) == {101}
    run2 = OffsetTracker.from_commit(*commit)
    run2.read(100)  # the fetch ended here
    commit2 = run2.commit_point([100])
    run2.finish([100])
    assert commit2[0] == 102 or decode_done(*commit2) == {101}
    run3 = OffsetTracker.from_commit(*commit2)
    assert commit2[0] > 101 or run3.is_done(101)
    assert run2.is_done(101)  # and the same process skips it when it reads it


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_exactly_once_across_any_restarts_and_fetch_boundaries(data: st.DataObject) -> None:
    """A model of one partition: fetches that end anywhere, offsets missing (transaction
    markers), publishes of any subset of what is read (each committed atomically with its
    metadata), and crashes at any point, any number of times. Every record is published
    exactly once."""
    n = data.draw(st.integers(1, 120))
    gaps = data.draw(st.sets(st.integers(0, n - 1), max_size=n // 4))
    records = [o for o in range(n) if o not in gaps]
    published: dict[int, int] = {}
    committed = (0, "")
    tracker = OffsetTracker(position=0)
    cursor = 0  # the consumer's position

    def fetch(count: int) -> None:
        nonlocal cursor
        batch = [o for o in records if o >= cursor][:count]
        for o in batch:
            if tracker.is_done(o):
                tracker.read(o, done=True)
            else:
                tracker.read(o)
            cursor = o + 1

    def publish(batch: list[int]) -> None:
        nonlocal committed
        committed = tracker.commit_point(batch)
        tracker.finish(batch)
        for o in batch:
            published[o] = published.get(o, 0) + 1

    for _ in range(data.draw(st.integers(0, 60))):
        op = data.draw(st.sampled_from(["fetch", "publish", "restart"]))
        if op == "fetch":
            fetch(data.draw(st.integers(1, 10)))
        elif op == "publish" and tracker.pending:
            pending = sorted(tracker.pending)
            publish(data.draw(st.lists(st.sampled_from(pending), min_size=1, unique=True)))
        elif op == "restart":
            tracker = OffsetTracker.from_commit(*committed)
            cursor = committed[0]
    fetch(n)  # drain
    publish(sorted(tracker.pending))
    assert published == dict.fromkeys(records, 1)


def test_plan_in_closed_form_matches_the_hop_by_hop_path() -> None:
    rnd = random.Random(11)
    for _ in range(1500):
        buckets = sorted(rnd.sample([0.5, 1, 2, 4, 10, 60, 600, 3600, 86400],
                                    rnd.randint(1, 6)))
        published = rnd.randint(0, 10**12)
        due = published + rnd.choice([rnd.randint(1, 10**4), rnd.randint(1, 10**7)])
        near = rnd.choice([0.0, 0.5, 2.0, 5.0])
        bucket, hold = first_hop(buckets, published, due)
        path = [bucket]
        while True:
            step = next_step(buckets, hold, due, hold, near)
            if step == FINAL:
                break
            assert isinstance(step, Cascade)
            path.append(step.bucket)
            hold = step.hold_until_ms
        assert plan(buckets, published, due, near) == Plan(len(path), path[-1])


def test_long_delays_fit_the_hop_limit() -> None:
    hours5 = plan([1, 10, 60], 0, 5 * 3600 * 1000, 2.0)
    assert hours5.hops == 300 and hours5.release_bucket == 60
    assert plan(DAYS, 0, 90 * 86_400_000, 2.0).hops == 90


def test_recent_ids_forget_after_their_window() -> None:
    ids = RecentIds(window_ms=60_000, slice_ms=10_000)
    ids.add("a", 0)
    ids.add("b", 15_000)
    assert "a" in ids and "b" in ids and "c" not in ids
    ids.add("c", 75_000)
    assert "a" not in ids and "b" in ids and "c" in ids
    assert len(ids) == 2 and ids.nbytes() < 1000
    many = RecentIds(window_ms=600_000)
    for i in range(100_000):
        many.add(f"01890a5d-{i:08d}", i * 5)
    assert all(f"01890a5d-{i:08d}" in many for i in range(0, 100_000, 997))
    assert many.nbytes() < 16 * 100_000


def test_clock_skew_is_bounded_by_produce_and_consume_samples() -> None:
    skew = ClockSkew()
    assert skew.estimate() is None
    skew.consumed(received_ms=100_000, broker_ms=98_000)  # a backlog read late: loose
    assert skew.estimate() is None  # one side only says nothing
    # the brokers are 250 ms ahead: appended 5 ms after our send, acked 10 ms after it
    for t in range(0, 10_000, 100):
        skew.produced(sent_ms=t, acked_ms=t + 10, broker_ms=t + 5 + 250)
        skew.consumed(received_ms=t + 20, broker_ms=t + 15 + 250)
    estimate = skew.estimate()
    assert estimate is not None and 240 <= estimate <= 260


def test_commit_metadata_names_the_owner_and_picks_the_shorter_encoding() -> None:
    owner = Owner("orders", 17, "ab12cd34", 1_700_000_000_000)
    assert Owner.parse(str(owner)) == owner
    assert Owner.parse("garbage") is None
    meta = encode_done(100, {101, 103}, str(owner))
    assert decode_commit(100, meta) == ({101, 103}, str(owner))
    assert decode_commit(100, encode_done(100, [], str(owner))) == (set(), str(owner))
    stuck = set(range(1, 50_000))  # everything above one stuck offset: run lengths
    assert decode_done(0, encode_done(0, stuck)) == stuck
    assert len(encode_done(0, stuck)) < 40
    legacy = "athomic1:" + __import__("base64").b64encode(
        __import__("zlib").compress(bytes([0b101]))).decode()
    assert decode_commit(10, legacy) == ({11, 13}, "")


def test_lateness_stats() -> None:
    stats = LatenessStats(size=100)
    for i in range(1000):
        stats.add(i / 1000)
    stats.add(-0.001)
    s = stats.summary()
    assert s["count"] == 1001 and s["early"] == 1 and s["max_s"] == 0.999
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and percentile([], 99) == 0.0
