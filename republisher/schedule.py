"""Due-time scheduling, pure: bucket choice, the hop plan, the offset watermark, lateness
statistics. No I/O; the republish loop and the DelayedPublishStrategy drive these (the
messages a republisher holds until due live in ``store``).

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
import functools
import math
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

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


@dataclass(frozen=True, slots=True)
class Plan:
    """A delayed message's whole path, assuming every hop happens on time: how many delay
    topics it passes and the bucket it is released from (its *release bucket*)."""

    hops: int
    release_bucket: float


def plan(buckets: Sequence[float], published_ms: int, deliver_at_ms: int,
         hold_final_s: float = 0.0) -> Plan:
    """The path ``first_hop`` then ``next_step`` (on time) give, in closed form: a step
    always takes the largest bucket that fits, so the path is runs of equal buckets, one
    run per bucket size, largest first. O(number of buckets) for any delay.

    It depends on the delay alone (``deliver_at_ms - published_ms``): remembered for the
    last few thousand delays (a backlog released at once asks again and again)."""
    return _plan(tuple(buckets), deliver_at_ms - published_ms, hold_final_s)


@functools.lru_cache(maxsize=4096)
def _plan(buckets: tuple[float, ...], delay_ms: int, hold_final_s: float) -> Plan:
    published_ms, deliver_at_ms = 0, delay_ms
    bucket, hold = first_hop(buckets, published_ms, deliver_at_ms)
    hops, last = 1, bucket
    remaining = deliver_at_ms - hold
    final_ms = hold_final_s * 1000
    for b in sorted(buckets, reverse=True):
        b_ms = round(b * 1000)
        # next_step takes b while b fits (choose_bucket) and the time left is not below
        # the final window; each time, the time left shrinks by b.
        if remaining < final_ms or b_ms > remaining + 1e-6 or b_ms <= 0:
            continue
        fits = int((remaining + 1e-6) // b_ms)
        not_final = int((remaining - final_ms) // b_ms) + 1 if final_ms > 0 else fits
        k = min(fits, not_final)
        if k > 0:
            hops += k
            remaining -= k * b_ms
            last = b
    return Plan(hops, last)


def release_bucket(buckets: Sequence[float], published_ms: int, deliver_at_ms: int,
                   hold_final_s: float = 0.0) -> float:
    """The bucket a message is released from on its planned path. Every copy of a message
    (a retried publish, a late arrival) is released from the same partition of this
    bucket's delay topic, so one republisher decides it, once."""
    return plan(buckets, published_ms, deliver_at_ms, hold_final_s).release_bucket


# --- the offset watermark ------------------------------------------------------------------
METADATA_PREFIX = "athomic1:"
METADATA_V2 = "athomic2:"
MAX_METADATA = 3500  # below Kafka's offset.metadata.max.bytes default of 4096


def _varint(n: int, out: bytearray) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _runs(above: list[int]) -> bytes:
    """Offsets (relative, sorted, distinct) as alternating run lengths: a gap of not-done,
    then a run of done, ... as varints."""
    out = bytearray()
    expected = 0
    i = 0
    while i < len(above):
        gap = above[i] - expected
        j = i
        while j + 1 < len(above) and above[j + 1] == above[j] + 1:
            j += 1
        _varint(gap, out)
        _varint(j - i + 1, out)
        expected = above[j] + 1
        i = j + 1
    return bytes(out)


def _unruns(data: bytes) -> list[int]:
    values: list[int] = []
    n = shift = 0
    for byte in data:
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            values.append(n)
            n = shift = 0
    out: list[int] = []
    pos = 0
    for gap, run in zip(values[::2], values[1::2], strict=False):
        pos += gap
        out.extend(range(pos, pos + run))
        pos += run
    return out


def encode_done(watermark: int, done: Iterable[int], owner: str = "") -> str:
    """Commit metadata naming offsets above ``watermark`` that are already published, and
    the partition's owner (``<connection>@<generation>``, see ``Owner``).

    ``athomic2:<owner>:<b|r><base64 zlib data>``: ``b`` a bitmap (bit i = offset
    ``watermark + 1 + i``), ``r`` run lengths; whichever is shorter (random holes favour the
    bitmap, long runs the run lengths)."""
    above = sorted(o - watermark - 1 for o in set(done) if o > watermark)
    if not above and not owner:
        return ""
    body = ""
    if above:
        bits = bytearray(above[-1] // 8 + 1)
        for i in above:
            bits[i >> 3] |= 1 << (i & 7)
        bitmap = zlib.compress(bytes(bits), 6)
        runs = zlib.compress(_runs(above), 6)
        kind, data = ("b", bitmap) if len(bitmap) <= len(runs) else ("r", runs)
        body = kind + base64.b64encode(data).decode()
    return f"{METADATA_V2}{owner}:{body}"


def decode_commit(watermark: int, metadata: str | None) -> tuple[set[int], str]:
    """(offsets named as already published, owner) of committed ``metadata``."""
    if not metadata:
        return set(), ""
    if metadata.startswith(METADATA_PREFIX):  # written before owners were recorded
        bits = zlib.decompress(base64.b64decode(metadata[len(METADATA_PREFIX):]))
        return _from_bits(watermark, bits), ""
    if not metadata.startswith(METADATA_V2):
        return set(), ""
    owner, _, body = metadata[len(METADATA_V2):].partition(":")
    if not body:
        return set(), owner
    data = zlib.decompress(base64.b64decode(body[1:]))
    if body[0] == "b":
        return _from_bits(watermark, data), owner
    return {watermark + 1 + i for i in _unruns(data)}, owner


def decode_done(watermark: int, metadata: str | None) -> set[int]:
    """Offsets a committed ``metadata`` names as already published (empty when none)."""
    return decode_commit(watermark, metadata)[0]


def _from_bits(watermark: int, bits: bytes) -> set[int]:
    return {watermark + 1 + (i << 3) + b
            for i, byte in enumerate(bits) if byte for b in range(8) if byte >> b & 1}


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a delay-topic partition, as its commit metadata says: a connection, the
    generation of the layout its republisher was started with (newer layouts win), the
    process (a random id), and when it last committed (its lease)."""

    connection: str
    generation: int
    instance: str
    lease_ms: int

    def __str__(self) -> str:
        return f"{self.connection}@{self.generation}@{self.instance}@{self.lease_ms}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        parts = text.rsplit("@", 3)
        if len(parts) != 4 or not parts[0] or not parts[1].isdigit() or \
                not parts[3].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], int(parts[3]))

    def renewed(self, now_ms: int) -> Owner:
        return replace(self, lease_ms=now_ms)


@dataclass
class OffsetTracker:
    """Progress of one delay-topic partition, for exactly-once commits.

    ``position`` is the next offset to read. ``pending`` are offsets read but not yet
    published (held, or in a transaction not yet committed). ``done`` are offsets published
    out of order: above the lowest pending one, and any the commit metadata named that are
    not read again yet. The committed offset (the watermark) is the lowest pending offset,
    or ``position`` when nothing is pending, moved past any offsets known done; the
    metadata names the done offsets above it. So a restart, whatever the fetch boundaries,
    neither loses a pending message nor republishes a done one.
    """

    position: int
    pending: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    owner: str = ""

    @classmethod
    def from_commit(cls, offset: int, metadata: str | None, owner: str = "") -> OffsetTracker:
        return cls(position=offset, done=decode_done(offset, metadata), owner=owner)

    def is_done(self, offset: int) -> bool:
        return offset in self.done

    def read(self, offset: int, *, done: bool = False) -> None:
        """Record that ``offset`` was read: pending, or already done (skipped)."""
        if offset >= self.position:
            self.position = offset + 1
        if not done:
            self.pending.add(offset)

    def _watermark(self, pending: set[int], done: set[int]) -> int:
        mark = min(pending) if pending else self.position
        while mark in done:  # published already (out of order, or before a restart)
            mark += 1
        return mark

    def watermark(self) -> int:
        return self._watermark(self.pending, self.done)

    def commit_point(self, finishing: Iterable[int] = ()) -> tuple[int, str]:
        """(offset, metadata) to commit if ``finishing`` complete; changes nothing."""
        finishing = set(finishing)
        pending = self.pending - finishing
        done = self.done | finishing
        mark = self._watermark(pending, done)
        return mark, encode_done(mark, done, self.owner)

    def finish(self, offsets: Iterable[int]) -> None:
        """The transaction publishing ``offsets`` committed."""
        offsets = set(offsets)
        self.pending -= offsets
        self.done |= offsets
        # Keep what a later read must still skip: done offsets at or above the watermark,
        # and those not read yet (the watermark may have moved past them).
        keep = min(self.watermark(), self.position)
        self.done = {o for o in self.done if o >= keep}


# --- recently released message ids ----------------------------------------------------------
class RecentIds:
    """Message ids released in the last ``window_ms``, compactly: the current time slice in
    a set, older slices as sorted arrays of 64-bit hashes (8 bytes an id). Membership is
    by hash; with 64 bits, a false "seen" among millions of ids is about 1 in 10^7."""

    def __init__(self, window_ms: int, slice_ms: int = 10_000) -> None:
        self.window_ms = window_ms
        self.slice_ms = max(1, min(slice_ms, window_ms))
        self._current: set[int] = set()
        self._current_start: int | None = None
        self._slices: list[tuple[int, array[int]]] = []  # (slice start ms, sorted hashes)

    @staticmethod
    def _hash(message_id: str) -> int:
        return hash(message_id)

    def add(self, message_id: str, now_ms: int) -> None:
        self._roll(now_ms)
        self._current.add(self._hash(message_id))

    def __contains__(self, message_id: object) -> bool:
        if not isinstance(message_id, str):
            return False
        h = self._hash(message_id)
        if h in self._current:
            return True
        for _, hashes in self._slices:
            i = bisect.bisect_left(hashes, h)
            if i < len(hashes) and hashes[i] == h:
                return True
        return False

    def _roll(self, now_ms: int) -> None:
        if self._current_start is None:
            self._current_start = now_ms
        elif now_ms - self._current_start >= self.slice_ms:
            if self._current:
                self._slices.append((self._current_start, array("q", sorted(self._current))))
            self._current = set()
            self._current_start = now_ms
        horizon = now_ms - self.window_ms
        while self._slices and self._slices[0][0] + self.slice_ms < horizon:
            self._slices.pop(0)

    def __len__(self) -> int:
        return len(self._current) + sum(len(h) for _, h in self._slices)

    def nbytes(self) -> int:
        """Memory the ids take, near enough."""
        return 64 * len(self._current) + sum(8 * len(h) for _, h in self._slices)


# --- clock skew --------------------------------------------------------------------------
class ClockSkew:
    """How far the brokers' clock is ahead of ours (ms), bounded by samples.

    Delay topics athomic creates stamp records with the broker's append time. A record we
    produced was appended between our send and its acknowledgement:
    ``broker - acked <= skew <= broker - sent``. A record we consumed was appended before
    we received it: ``skew >= broker - received``. The estimate is the middle of the
    tightest bounds over the last ``size`` samples of each kind."""

    def __init__(self, size: int = 500) -> None:
        self._lows: list[int] = []
        self._highs: list[int] = []
        self._size = size

    def _keep(self, values: list[int], value: int) -> None:
        values.append(value)
        if len(values) > self._size:
            del values[0]

    def produced(self, sent_ms: int, acked_ms: int, broker_ms: int) -> None:
        self._keep(self._lows, broker_ms - acked_ms)
        self._keep(self._highs, broker_ms - sent_ms)

    def consumed(self, received_ms: int, broker_ms: int) -> None:
        self._keep(self._lows, broker_ms - received_ms)

    def estimate(self) -> float | None:
        """The skew (broker - local, ms), or None before samples bound it from both sides
        (records read long after they were written bound it loosely from below only: a
        republisher catching up on a backlog would otherwise look far behind)."""
        if not self._lows or not self._highs:
            return None
        low = max(self._lows)
        high = min(self._highs)
        if low > high:  # a clock stepped: the old samples no longer hold
            self._lows, self._highs = self._lows[-1:], self._highs[-1:]
            return self.estimate()
        return (low + high) / 2


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
