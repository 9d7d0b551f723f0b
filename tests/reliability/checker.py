"""The checker: a read_committed consumer of every final topic and the dead-letter topic,
and the comparison of what it read with what athomic acknowledged.

The consumer is librdkafka's (confluent-kafka), not the aiokafka athomic runs on, so the
checker does not share the client it checks. It reads from the start of every partition,
in its own thread, from before the workload starts, and notes when each record arrived.

A read_committed consumer never sees the transaction markers, so "read to the end" means:
its position (librdkafka moves it past markers and aborted records) has reached the last
stable offset (``ListOffsets`` with ``READ_COMMITTED``) of every partition.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class Seen:
    """One record the checker read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    message_id: str | None
    timestamp: int
    arrived: int
    """Epoch ms when the checker received it."""
    deliver_at: int | None
    published_at: int | None
    hop: int | None
    error: str | None
    """``athomic-error`` (dead-letter records)."""
    source: str | None
    """``athomic-error-source`` (dead-letter records)."""


def _header(headers: list[tuple[str, bytes]] | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return v
    return None


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


class Checker(threading.Thread):
    """Reads ``topics`` (read_committed) from their beginning until ``stop()``."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        super().__init__(name="reliability-checker", daemon=True)
        self.bootstrap = bootstrap
        self.topics = topics
        self.records: list[Seen] = []
        self.errors: Counter[str] = Counter()
        self.last_arrival = 0.0
        self._positions: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._admin: Any = None

    def start_reading(self, timeout_s: float = 60.0) -> Checker:
        self.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the checker's consumer did not start")
        if self._failure is not None:
            raise self._failure
        return self

    def admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        return self._admin

    def partitions(self) -> list[tuple[str, int]]:
        meta = self.admin().list_topics(timeout=30)
        out = []
        for topic in self.topics:
            found = meta.topics.get(topic)
            if found is None or found.error is not None:
                raise RuntimeError(f"checker: topic {topic} not found ({found})")
            out += [(topic, p) for p in sorted(found.partitions)]
        return out

    def run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        try:
            parts = self.partitions()
            consumer = Consumer({
                "bootstrap.servers": self.bootstrap, "group.id": f"checker-{uuid.uuid4()}",
                "enable.auto.commit": False, "isolation.level": "read_committed",
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": 50,
                "log_level": 0, "error_cb": self._on_error})
            consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in parts])
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._halt.is_set():
                batch = consumer.consume(1000, 0.1)
                now = time.time_ns() // 1_000_000
                got = []
                for m in batch:
                    if m.error():
                        self.errors[str(m.error().name())] += 1
                        continue
                    headers = m.headers()
                    mid = _header(headers, "message-id")
                    err = _header(headers, "athomic-error")
                    src = _header(headers, "athomic-error-source")
                    got.append(Seen(
                        m.topic(), m.partition(), m.offset(), m.key(),
                        mid.decode() if mid is not None else None, m.timestamp()[1], now,
                        _int(_header(headers, "athomic-deliver-at")),
                        _int(_header(headers, "athomic-published-at")),
                        _int(_header(headers, "athomic-hop")),
                        err.decode(errors="replace") if err is not None else None,
                        src.decode() if src is not None else None))
                if got:
                    with self._lock:
                        self.records.extend(got)
                        self.last_arrival = time.monotonic()
                if batch:
                    positions = consumer.position([TopicPartition(t, p) for t, p in parts])
                    with self._lock:
                        for tp in positions:
                            if tp.offset >= 0:
                                self._positions[(tp.topic, tp.partition)] = tp.offset
        finally:
            consumer.close()

    def _on_error(self, error: Any) -> None:
        self.errors[str(error.name())] += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def seen_ids(self) -> set[str]:
        with self._lock:
            return {r.message_id for r in self.records if r.message_id}

    def caught_up(self) -> bool:
        """Whether the consumer's position reached the last stable offset everywhere."""
        from confluent_kafka import IsolationLevel, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        try:
            parts = self.partitions()
            found = self.admin().list_offsets(
                {TopicPartition(t, p): OffsetSpec.latest() for t, p in parts},
                isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=15)
            ends = {(tp.topic, tp.partition): f.result().offset for tp, f in found.items()}
        except Exception:
            return False
        with self._lock:
            return all(self._positions.get(tp, 0) >= end for tp, end in ends.items())

    def read_all(self, timeout_s: float = 120.0) -> list[Seen]:
        """Started on topics nobody writes to any more: everything they hold, then stop."""
        self.start_reading()
        deadline = time.monotonic() + timeout_s
        try:
            while not self.caught_up():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read {self.topics} to their end")
                time.sleep(0.5)
        finally:
            self.stop()
        return self.records

    def quiet_for(self) -> float:
        with self._lock:
            return time.monotonic() - self.last_arrival


# --- the comparison ---------------------------------------------------------------------------
def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def analyze(acks: list[dict[str, Any]], records: list[Seen], *, finals: list[str],
            dlq: str, buckets: list[float], near_window_s: float, linger_ms: int,
            fault_start_ms: int | None, fault_end_ms: int | None,
            delay_records: list[Seen] | None = None,
            release_topics: dict[float, str] | None = None,
            injected: set[str] | None = None) -> dict[str, Any]:
    """The figures of one run: what was acknowledged, delivered, lost, duplicated, early,
    out of order, how late, how long until recovered, and what went to the dead letters.
    ``delay_records``: what the delay topics hold (read_committed), to tell why a message
    came out of order (see ``_order``); ``release_topics``: bucket -> delay topic.
    ``injected``: message ids put straight into a delay topic (the poison), never
    acknowledged and never to be delivered."""
    final_set = set(finals)
    finals_seen = [r for r in records if r.topic in final_set]
    dead = [r for r in records if r.topic == dlq]
    by_id: dict[str, list[Seen]] = defaultdict(list)
    for r in finals_seen:
        if r.message_id is not None:
            by_id[r.message_id].append(r)
    sent = {a["id"]: a for a in acks}
    acked = {i: a for i, a in sent.items() if a["ok"]}
    acked_direct = {i for i, a in acked.items() if a["due"] is None}
    acked_delayed = {i for i, a in acked.items() if a["due"] is not None}
    delivered_acked = {i for i in acked if i in by_id}
    lost = sorted(set(acked) - delivered_acked)
    unacked_delivered = sorted(i for i in by_id if i in sent and not sent[i]["ok"])
    strangers = sorted(i for i in by_id if i not in sent)
    dup_direct = sorted(i for i in by_id if len(by_id[i]) > 1 and sent.get(i, {}).get("due")
                        is None)
    dup_delayed = sorted(i for i in by_id if len(by_id[i]) > 1 and sent.get(i, {}).get("due")
                         is not None)

    early: list[str] = []
    lateness: list[tuple[int, int, str]] = []  # (due, lateness ms, id) of first copies
    for i, copies in by_id.items():
        a = sent.get(i)
        if a is None or a["due"] is None:
            continue
        due = int(a["due"])
        for r in copies:
            if r.arrived < due or (r.timestamp < due) or (r.deliver_at is not None
                                                           and r.deliver_at < due):
                early.append(i)
                break
        first = min(copies, key=lambda r: r.arrived)
        lateness.append((due, first.arrived - due, i))
    late_values = [float(x[1]) for x in lateness]

    # Order: per key, delayed messages due in publish order and released by the same
    # delay-topic partition (same key, same release bucket) arrive in that order.
    order = _order(sent, by_id, delay_records, buckets=buckets, near_window_s=near_window_s,
                   linger_ms=linger_ms, release_topics=release_topics)

    # Recovery. "Normal" lateness: the p99 of messages due and delivered before the fault
    # began; late beyond normal: more than max(2 s, 2 x that). Disturbed: from the fault's
    # start to the arrival of the last message late beyond normal; recovery: from the
    # fault's end to that arrival (0 when it came before the end: delivery was back to
    # normal while the fault lasted, e.g. after a failover).
    baseline = [float(lat) for due, lat, _ in lateness if fault_start_ms is None
                or due + lat < fault_start_ms]
    base_p99 = _pct(baseline, 99)
    threshold = max(2000.0, 2 * base_p99) if base_p99 is not None else 2000.0
    over = [due + lat for due, lat, _ in lateness if lat > threshold]
    last_late = max(over, default=None)
    disturbed_ms = recovery_ms = None
    if fault_start_ms is not None:
        disturbed_ms = max(0, last_late - fault_start_ms) if last_late is not None else 0
    if fault_end_ms is not None:
        recovery_ms = max(0, last_late - fault_end_ms) if last_late is not None else 0

    # Direct publishing: the longest time no call was acknowledged.
    ack_times = sorted({int(a["ack"]) for a in acks if a["ok"]})
    gaps = [b - a for a, b in itertools.pairwise(ack_times)]
    failed_by_error = Counter((a["err"] or "?").split(":")[0] for a in acks if not a["ok"])

    injected = injected or set()
    return {
        "published": len(sent),
        "acked": len(acked), "acked_direct": len(acked_direct),
        "acked_delayed": len(acked_delayed),
        "not_acked": len(sent) - len(acked), "not_acked_by_error": dict(failed_by_error),
        "delivered": len(delivered_acked), "records_read": len(finals_seen),
        "lost": len(lost), "lost_ids": lost[:20],
        "duplicated_direct": len(dup_direct), "duplicated_direct_ids": dup_direct,
        "duplicated_delayed": len(dup_delayed), "duplicated_delayed_ids": dup_delayed[:20],
        "unacked_delivered": len(unacked_delivered),
        "unknown_delivered": len(strangers), "unknown_ids": strangers[:20],
        "early": len(early), "early_ids": early[:20],
        **order,
        "lateness_ms": {"p50": _pct(late_values, 50), "p99": _pct(late_values, 99),
                        "max": max(late_values, default=None),
                        "baseline_p99": base_p99, "threshold": threshold},
        "late_beyond_threshold": len(over),
        "disturbed_s": None if disturbed_ms is None else round(disturbed_ms / 1000, 1),
        "recovery_s": None if recovery_ms is None else round(recovery_ms / 1000, 1),
        "longest_ack_gap_s": round(max(gaps, default=0) / 1000, 1),
        "dlq": len(dead),
        "dlq_injected": sum(1 for r in dead if r.message_id in injected
                            or (r.source and r.source in injected)),
        "dlq_errors": dict(Counter((r.error or "?").split(":")[0][:60] for r in dead)),
        "injected_delivered": sum(1 for i in injected if i in by_id),
    }


ENTRY_MARGIN_MS = 1000
"""A message whose copy was appended to its release partition less than this before a
later message of its key was released may not have been readable yet (its transaction's
commit and the next fetch): such an inversion counts as "upstream", not as a fault of the
release partition."""


def _order(sent: dict[str, dict[str, Any]], by_id: dict[str, list[Seen]],
           delay_records: list[Seen] | None, *, buckets: list[float], near_window_s: float,
           linger_ms: int, release_topics: dict[float, str] | None) -> dict[str, Any]:
    """Per-key order of delayed messages, and why each inversion happened.

    A pair (m1, m2) is constrained when both have the same key and release bucket, m1 was
    published first (the task's sequence) and is due no later. An inversion (m2's final
    record before m1's) is classified by where m1 was when m2 was released, from the
    copies the release bucket's delay topic holds:

    - ``in_partition``: m1 had a copy in the same partition before m2's last copy, or
      appended before m2 was due (and at least ENTRY_MARGIN_MS before m2 was released).
      The partition had both in time and released them out of order: what
      docs/delays.md promises never happens.
    - ``upstream``: m1 reached the release partition only after m2's copy and after m2
      was due (or, within the margin, not before m2 was released): it was held in an
      earlier bucket (a fault there) while m2 was due.
    - ``other_partition``: their copies were in different partitions of the release
      bucket (the topic gained partitions between them).
    Without delay records every inversion counts as ``in_partition``.

    Equally due messages on different paths (e.g. published 9.5 s apart with delays of
    11 s and 1.5 s) are not constrained: the release partition orders them as it read
    them ("due with it and read before it"), which need not be publish order; they are
    counted as ``equal_due_by_arrival`` when they came out against publish order.

    Pairs with different release buckets but due at least ``linger_ms`` apart are counted
    as ``cross_bucket_inversions`` (released by different partitions)."""
    from athomic.republisher.schedule import plan

    copies: dict[tuple[str, str], list[Seen]] = defaultdict(list)
    for r in delay_records or ():
        if r.message_id is not None:
            copies[(r.message_id, r.topic)].append(r)
    groups: dict[tuple[str, float], list[tuple[int, int, int, int, str]]] = defaultdict(list)
    cross: dict[str, list[tuple[int, int, int, float]]] = defaultdict(list)
    undetermined = 0
    for i, delivered in by_id.items():
        a = sent.get(i)
        if a is None or a["due"] is None:
            continue
        first = min(delivered, key=lambda r: r.offset)
        pub = first.published_at if first.published_at is not None else int(a["pub"])
        due = int(a["due"])
        paths = [plan(buckets, pub + d, due, near_window_s) for d in (-2, 0, 2)]
        if len({p.release_bucket for p in paths}) != 1:
            undetermined += 1  # on a boundary: its release bucket is not certain
            continue
        bucket = paths[1].release_bucket
        groups[(a["key"], bucket)].append((int(a["seq"]), due, first.offset, paths[1].hops,
                                           i))
        cross[a["key"]].append((int(a["seq"]), due, first.offset, bucket))
    counts = Counter[str]()
    pairs = 0
    examples: list[dict[str, Any]] = []
    for (_, bucket), rows in groups.items():
        rows.sort()
        if len(rows) < 2:
            continue
        arr = np.array([r[:4] for r in rows], dtype=np.int64)
        seq, due, off, hops = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
        # m1 (row) published before m2 (column), due before it (or equally, on the same
        # path), and m2's record came first
        before = seq[:, None] < seq[None, :]
        tie = due[:, None] == due[None, :]
        constrained = before & ((due[:, None] < due[None, :]) | (tie & (
            hops[:, None] == hops[None, :])))
        pairs += int(constrained.sum())
        inverted = off[:, None] > off[None, :]
        counts["equal_due_by_arrival"] += int(
            (before & tie & (hops[:, None] != hops[None, :]) & inverted).any(axis=0).sum())
        bad = constrained & inverted
        topic = (release_topics or {}).get(bucket)
        for col in np.flatnonzero(bad.any(axis=0)):
            m2 = rows[col][4]
            worst = "upstream"
            for row in np.flatnonzero(bad[:, col]):
                m1 = rows[row][4]
                why = _why(copies, topic, m1, m2, by_id, int(sent[m2]["due"])) \
                    if topic else "in_partition"
                if why == "in_partition" or (why == "other_partition"
                                             and worst == "upstream"):
                    worst = why
                if len(examples) < 10 and why == "in_partition":
                    examples.append(_example(sent, by_id, copies, topic, m1, m2))
            counts[worst] += 1
    cross_inversions = 0
    for cross_rows in cross.values():
        cross_rows.sort()
        carr = np.array([r[:3] for r in cross_rows], dtype=np.int64)
        bk = np.array([r[3] for r in cross_rows])
        if len(carr) < 2:
            continue
        seq, due, off = carr[:, 0], carr[:, 1], carr[:, 2]
        apart = (seq[:, None] < seq[None, :]) & (due[None, :] - due[:, None] >= linger_ms) \
            & (bk[:, None] != bk[None, :])
        cross_inversions += int((apart & (off[:, None] > off[None, :])).any(axis=0).sum())
    return {"out_of_order": counts["in_partition"],
            "out_of_order_upstream": counts["upstream"],
            "out_of_order_other_partition": counts["other_partition"],
            "equal_due_by_arrival": counts["equal_due_by_arrival"],
            "out_of_order_examples": examples,
            "order_pairs_checked": pairs, "order_undetermined": undetermined,
            "cross_bucket_inversions": cross_inversions}


def _why(copies: dict[tuple[str, str], list[Seen]], topic: str, m1: str, m2: str,
         by_id: dict[str, list[Seen]], due2: int) -> str:
    c1, c2 = copies.get((m1, topic), []), copies.get((m2, topic), [])
    if not c1 or not c2:
        return "in_partition"
    released2 = min(r.timestamp for r in by_id[m2])
    # the copy m2 was released from: its last one appended before its release (a later
    # copy is a duplicate, from an upstream bucket that restarted, and was skipped)
    before = [r for r in c2 if r.timestamp <= released2] or c2
    last2 = max(before, key=lambda r: r.offset)
    same = [r for r in c1 if r.partition == last2.partition]
    if not same:
        return "other_partition"
    if any(r.offset < last2.offset or r.timestamp < min(due2, released2 - ENTRY_MARGIN_MS)
           for r in same):
        return "in_partition"
    return "upstream"


def _example(sent: dict[str, dict[str, Any]], by_id: dict[str, list[Seen]],
             copies: dict[tuple[str, str], list[Seen]], topic: str | None, m1: str, m2: str
             ) -> dict[str, Any]:
    def story(i: str) -> dict[str, Any]:
        a = sent[i]
        final = min(by_id[i], key=lambda r: r.offset)
        return {"id": i, "key": a["key"], "published": a["pub"], "due": a["due"],
                "final": [final.topic, final.partition, final.offset, final.timestamp],
                "release_topic_copies": sorted(
                    [r.partition, r.offset, r.timestamp, r.hop]
                    for r in copies.get((i, topic or ""), []))}

    return {"earlier": story(m1), "later": story(m2)}
