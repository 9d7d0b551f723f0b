"""Due-time scheduling, pure: bucket choice, the hop plan, the due-time heap, the offset
watermark, lateness statistics. No I/O; the republish loop and the DelayedPublishStrategy
drive these.

The hop plan. A message with due time ``D`` published at ``P`` enters the largest bucket
``b`` not longer than ``D - P`` (the smallest bucket when the delay is shorter than every
bucket) and leaves it at ``hold = min(D, P + b)``. At ``hold`` it moves on: to the largest
bucket not longer than ``D - hold`` (leaving at ``hold + b'``), or, when no bucket fits,
it waits in memory and goes to its final topic at ``D``. Every time is computed from the
publish time, not from when a hop happened, so messages with the same delay follow the same
path through the same partitions and keep their order; and since ``hold <= D`` everywhere, a
message is never delivered early.
"""

from __future__ import annotations

import base64
import bisect
import heapq
import itertools
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


# --- bucket choice -----------------------------------------------------------------------
def choose_bucket(buckets: Sequence[float], remaining_s: float) -> float | None:
    """The largest bucket not longer than ``remaining_s``; None when none fits.
    ``buckets`` must be sorted ascending."""
    i = bisect.bisect_right(buckets, remaining_s + 1e-9)
    return buckets[i - 1] if i else None


def first_hop(buckets: Sequence[float], published_ms: int, deliver_at_ms: int
              ) -> tuple[float, int]:
    """The bucket a new delayed message enters, and when it leaves it (epoch ms)."""
    bucket = choose_bucket(buckets, (deliver_at_ms - published_ms) / 1000)
    if bucket is None:
        return buckets[0], deliver_at_ms
    return bucket, min(deliver_at_ms, published_ms + round(bucket * 1000))


@dataclass(frozen=True, slots=True)
class Cascade:
    """Forward to ``bucket``, leaving it at ``hold_until_ms``."""

    bucket: float
    hold_until_ms: int


FINAL = "final"


def next_step(buckets: Sequence[float], hold_until_ms: int, deliver_at_ms: int,
              now_ms: int, hold_final_s: float = 0.0) -> Cascade | str:
    """What to do with a message leaving a bucket: cascade to a shorter bucket, or
    ``FINAL`` (hold in memory until ``deliver_at_ms``, then publish to the final topic).

    A message due less than ``hold_final_s`` after leaving goes final from memory rather
    than through one more delay topic (a hop costs a produce, a consume and a share of a
    transaction). A message already late (its due time passed, e.g. after an outage) goes
    final at once rather than through more buckets.
    """
    if deliver_at_ms <= now_ms:
        return FINAL
    remaining_s = (deliver_at_ms - hold_until_ms) / 1000
    bucket = choose_bucket(buckets, remaining_s)
    if bucket is None or remaining_s < hold_final_s:
        return FINAL
    return Cascade(bucket, min(deliver_at_ms, hold_until_ms + round(bucket * 1000)))


# --- the due-time heap ---------------------------------------------------------------------
class DueHeap(Generic[T]):
    """Items keyed by the time they are due; ties keep insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, T]] = []
        self._seq = itertools.count()

    def push(self, due_ms: int, item: T) -> None:
        heapq.heappush(self._heap, (due_ms, next(self._seq), item))

    def next_due(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now_ms: int, limit: int) -> list[T]:
        out: list[T] = []
        while self._heap and self._heap[0][0] <= now_ms and len(out) < limit:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def __len__(self) -> int:
        return len(self._heap)


# --- the offset watermark ------------------------------------------------------------------
METADATA_PREFIX = "athomic1:"
MAX_METADATA = 3500  # below Kafka's offset.metadata.max.bytes default of 4096


def encode_done(watermark: int, done: Iterable[int]) -> str:
    """Commit metadata naming offsets above ``watermark`` that are already published:
    a zlib-compressed bitmap, bit i = offset ``watermark + 1 + i``."""
    above = sorted(o - watermark - 1 for o in done if o > watermark)
    if not above:
        return ""
    bits = bytearray(above[-1] // 8 + 1)
    for i in above:
        bits[i >> 3] |= 1 << (i & 7)
    return METADATA_PREFIX + base64.b64encode(zlib.compress(bytes(bits), 6)).decode()


def decode_done(watermark: int, metadata: str | None) -> set[int]:
    """Offsets a committed ``metadata`` names as already published (empty when none)."""
    if not metadata or not metadata.startswith(METADATA_PREFIX):
        return set()
    bits = zlib.decompress(base64.b64decode(metadata[len(METADATA_PREFIX):]))
    return {watermark + 1 + (i << 3) + b
            for i, byte in enumerate(bits) if byte for b in range(8) if byte >> b & 1}


@dataclass
class OffsetTracker:
    """Progress of one delay-topic partition, for exactly-once commits.

    ``position`` is the next offset to read. ``pending`` are offsets read but not yet
    published (held, or in a transaction not yet committed). ``done`` are offsets published
    above the lowest pending one. The committed offset (the watermark) is the lowest pending
    offset, or ``position`` when nothing is pending; the metadata names ``done``, so a
    restart neither loses a pending message nor republishes a done one.
    """

    position: int
    pending: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)

    @classmethod
    def from_commit(cls, offset: int, metadata: str | None) -> OffsetTracker:
        return cls(position=offset, done=decode_done(offset, metadata))

    def is_done(self, offset: int) -> bool:
        return offset in self.done

    def read(self, offset: int, *, done: bool = False) -> None:
        """Record that ``offset`` was read: pending, or already done (skipped)."""
        if offset >= self.position:
            self.position = offset + 1
        if not done:
            self.pending.add(offset)

    def commit_point(self, finishing: Iterable[int] = ()) -> tuple[int, str]:
        """(offset, metadata) to commit if ``finishing`` complete; changes nothing."""
        finishing = set(finishing)
        pending = self.pending - finishing
        watermark = min(pending) if pending else self.position
        done = (self.done | finishing) if pending else set()
        return watermark, encode_done(watermark, done)

    def finish(self, offsets: Iterable[int]) -> None:
        """The transaction publishing ``offsets`` committed."""
        offsets = set(offsets)
        self.pending -= offsets
        self.done |= offsets
        watermark = min(self.pending) if self.pending else self.position
        self.done = {o for o in self.done if o > watermark}


# --- lateness ------------------------------------------------------------------------------
class LatenessStats:
    """Lateness (actual - due, seconds) of recent deliveries: a bounded reservoir of the last
    ``size`` samples for percentiles, plus totals over the whole life of the process."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._ring: list[float] = []
        self._next = 0
        self.count = 0
        self.early = 0
        self.max = 0.0

    def add(self, lateness_s: float) -> None:
        self.count += 1
        if lateness_s < 0:
            self.early += 1
        self.max = max(self.max, lateness_s)
        if len(self._ring) < self._size:
            self._ring.append(lateness_s)
        else:
            self._ring[self._next] = lateness_s
            self._next = (self._next + 1) % self._size

    def summary(self) -> dict[str, float]:
        data = sorted(self._ring)
        return {"count": self.count, "early": self.early, "max_s": self.max,
                "p50_s": percentile(data, 50), "p99_s": percentile(data, 99)}


def percentile(sorted_data: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted data (0.0 when empty)."""
    if not sorted_data:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_data)))
    return sorted_data[rank - 1]
