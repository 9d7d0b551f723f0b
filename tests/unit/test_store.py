"""The held-message store, pure: one due order over hot objects and compact cold records,
byte-exact round trips through compression and the arena, removal, chunks given back."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from athomic.republisher.store import CHUNK, Frozen, HeldStore


@dataclass
class Item:
    offset: int
    due: int = 0
    data: bytes = b""
    tag: int = 0
    hold: int = 0
    cold: bool = False
    restage: bool = True
    notes: list[str] = field(default_factory=list)


def thaw(f: Frozen) -> Item:
    return Item(f.offset, f.due_ms, f.data, f.tag, f.hold_ms, cold=True)


def store() -> HeldStore[Item]:
    return HeldStore(thaw)


def record(i: int, payload: int = 1024, *, rnd: random.Random | None = None) -> bytes:
    """An envelope-like record: headers that repeat, a few fields that do not, a payload
    of random bytes."""
    rnd = rnd or random.Random(i)
    head = (b"ATHD\x02\x08\x01" + i.to_bytes(8, "big") + b"final.topic.orders"
            + b"athomic-producer athomic athomic-host vm athomic-ray-node-id "
            + b"5f74cf22ed7aeb0dad312e6808397915749df63e6e06bb327b2fc857 content-type "
            + b"application/octet-stream message-id " + f"{i:036d}".encode())
    return head + rnd.randbytes(payload)


def test_hot_and_cold_share_one_order_by_due_time_then_insertion() -> None:
    s = store()
    s.push(30, Item(1, 30))
    s.freeze(10, 2, b"a" * 100)
    s.push(20, Item(3, 20))
    s.freeze(20, 4, b"b" * 100)
    s.freeze(20_000, 5, b"c" * 100)  # another wheel slot
    s.push(20, Item(6, 20))
    assert len(s) == 6 and s.cold == 3
    assert s.next_due() == 10
    assert [i.offset for i in s.pop_due(20, 10)] == [2, 3, 4, 6]
    assert s.pop_due(29, 10) == [] and s.next_due() == 30
    assert [i.offset for i in s.pop_due(10**6, 1)] == [1]
    (last,) = s.pop_due(10**6, 10)
    assert (last.offset, last.due, last.data, last.cold) == (5, 20_000, b"c" * 100, True)
    assert len(s) == 0 and s.next_due() is None


def test_an_earlier_cold_record_goes_before_the_sorted_head() -> None:
    s = store()
    s.freeze(50_000, 1, b"x")
    assert s.next_due() == 50_000  # its wheel slot is now the sorted head
    s.freeze(50_050, 2, b"x")  # same wheel slot
    s.freeze(50_010, 3, b"x")
    s.freeze(1_000, 4, b"x")  # an earlier slot
    assert [i.offset for i in s.pop_due(10**6, 10)] == [4, 1, 3, 2]


def test_records_come_back_byte_for_byte_and_compressed_when_they_repeat() -> None:
    s = store()
    rnd = random.Random(1)
    records = [record(i, rnd=rnd) for i in range(2000)]
    for i, data in enumerate(records):
        s.freeze(1000 + i, i, data, tag=i % 3, hold_ms=7 * i)
    raw = sum(map(len, records))
    assert s.stored < raw * 0.85  # the repeated headers cost next to nothing
    assert s.nbytes() < s.stored + CHUNK + 60 * len(records)
    out = s.pop_due(10**6, 10**6)
    assert [i.data for i in out] == records
    assert [(i.tag, i.hold) for i in out] == [(n % 3, 7 * n) for n in range(2000)]


def test_records_that_do_not_compress_are_kept_as_they_are() -> None:
    s = store()
    records = [os.urandom(n) for n in (0, 10, 100, 1500, 5000)]
    for i, data in enumerate(records):
        s.freeze(1, i, data)
    assert [i.data for i in s.pop_due(1, 10)] == records


def test_a_record_larger_than_an_eighth_of_a_chunk_is_kept_on_its_own() -> None:
    s = store()
    big = os.urandom(CHUNK // 4)
    s.freeze(5, 0, big)
    s.freeze(6, 1, b"small")
    assert s.nbytes() >= CHUNK // 4
    assert [i.data for i in s.pop_due(10, 10)] == [big, b"small"]


def test_records_unlike_the_dictionary_get_a_new_one_and_old_ones_still_decode() -> None:
    s = store()
    rnd = random.Random(2)
    first = [record(i, rnd=rnd) for i in range(300)]
    other = [bytes(reversed(record(i, rnd=rnd))) for i in range(300)]  # other headers
    for i, data in enumerate(first + other):
        s.freeze(i, i, data)
    assert len(s._dicts) == 2  # the first still decodes the records it compressed
    assert [i.data for i in s.pop_due(10**6, 10**6)] == first + other
    assert len(s._dicts) == 1  # the first dropped with its last record


def test_take_removes_by_offset_from_both_kinds_and_restageable_names_them() -> None:
    s = store()
    for o in range(0, 40, 2):
        s.freeze(100 + o, o, record(o), restage=o != 10)
        s.push(100 + o, Item(o + 1, 100 + o, restage=o + 1 != 11))
    assert s.restageable(lambda i: i.restage) == [o for o in range(40) if o not in (10, 11)]
    taken = s.take([0, 1, 2, 3, 10, 11, 39, 100])
    assert [(i.offset, i.cold) for i in taken] == [
        (0, True), (1, False), (2, True), (3, False), (10, True), (11, False), (39, False)]
    assert taken[0].data == record(0)
    assert len(s) == 40 - 7
    rest = s.pop_due(10**6, 100)
    assert sorted(i.offset for i in rest) == [o for o in range(40)
                                              if o not in (0, 1, 2, 3, 10, 11, 39)]
    assert [i.due for i in rest] == sorted(i.due for i in rest)


def test_chunks_are_given_back_as_they_empty_and_sparse_ones_compacted() -> None:
    s = store()
    rnd = random.Random(3)
    n = 6000  # about 7 MiB of incompressible records
    for i in range(n):
        s.freeze(i, i, rnd.randbytes(1200))
    full = s.nbytes()
    assert full >= n * 1200
    # every other one leaves: half of each chunk is garbage, then compaction
    kept = {i for i in range(n) if i % 10 == 0}
    s.take([i for i in range(n) if i not in kept and i % 2])
    s.take([i for i in range(n) if i not in kept and i % 2 == 0])
    assert s.nbytes() < len(kept) * 1200 + 3 * CHUNK + 60 * n
    out = s.pop_due(10**9, n)
    assert [i.offset for i in out] == sorted(kept)
    rnd = random.Random(3)
    expected = [rnd.randbytes(1200) for _ in range(n)]
    assert all(i.data == expected[i.offset] for i in out)
    assert len(s) == 0 and s.nbytes() <= CHUNK + 60 * n


@settings(deadline=None, max_examples=100)
@given(st.data())
def test_the_store_behaves_like_a_sorted_list(data: st.DataObject) -> None:
    """Any mix of hot pushes, cold freezes, pops and removals gives what a plain list
    sorted by (due time, insertion) gives."""
    s = store()
    model: list[tuple[int, int, int, bool, bytes]] = []  # due, seq, offset, cold, data
    seq = offset = 0
    now = 0
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["push", "freeze", "freeze", "pop", "take"]))
        if op in ("push", "freeze"):
            for _ in range(data.draw(st.integers(1, 8))):
                due = now + data.draw(st.integers(-200, 1000))
                blob = data.draw(st.sampled_from([b"", b"abc", record(offset, 50)]))
                if op == "push":
                    s.push(due, Item(offset, due, blob))
                else:
                    s.freeze(due, offset, blob, restage=True)
                model.append((due, seq, offset, op == "freeze", blob))
                seq += 1
                offset += 1
        elif op == "pop":
            now += data.draw(st.integers(0, 400))
            limit = data.draw(st.integers(1, 10))
            model.sort()
            due = [m for m in model if m[0] <= now][:limit]
            got = s.pop_due(now, limit)
            assert [(i.offset, i.data) for i in got] == [(m[2], m[4]) for m in due]
            assert [i.cold for i in got] == [m[3] for m in due]
            model = model[len(due):]
        else:
            present = [m[2] for m in model]
            drop = data.draw(st.lists(st.sampled_from(present), unique=True)) if present else []
            got = s.take(drop)
            assert [i.offset for i in got] == sorted(drop)
            model = [m for m in model if m[2] not in set(drop)]
        assert len(s) == len(model)
        assert s.next_due() == (min(m[0] for m in model) if model else None)
    assert sorted(s.restageable(lambda i: True)) == sorted(m[2] for m in model)
