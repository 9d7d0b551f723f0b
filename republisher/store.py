"""Where a republisher keeps the messages it holds until due, pure: no I/O.

A delay topic read ``near_window_s`` ahead holds rate x window messages: 100,000 of them
for a minute at under 2,000 msg/s. As Python objects (the record's bytes, its decoded
head, the ``Held`` around them, a heap entry) one costs about 2.3 times its payload; most
of that is per-object overhead and the envelope's headers, which repeat from one message
to the next (topic, lineage, content type, header names).

``HeldStore`` keeps two kinds of entry, in one order (due time, then insertion):

- *hot*: objects, as they are (a message due within moments, one that failed and waits
  for its retry, an undecodable record on its way to the dead-letter topic);
- *cold*: a message read long before it is due, as its record bytes compressed with
  zstd against a dictionary made of an earlier record of the same partition (what
  repeats compresses to almost nothing; what does not is stored as it is), in 1 MiB
  arena chunks, with its schedule in ``array`` columns and its place in the due order in
  a wheel of 100 ms slots. Turned back into an object (``thaw``) only when it leaves.

A cold message costs its compressed bytes plus about 55 bytes. Chunks are returned to
the system as they empty; when released messages leave more than half the arena unused,
the live ones of sparse chunks are moved together.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import mmap
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import zstandard

CHUNK = 1 << 20
"""Bytes of one arena chunk; a record above ``CHUNK // 8`` is kept as its own bytes."""
SLOT_MS = 100
"""Width of one slot of the due-time wheel."""
_RAW = 0xFF  # dictionary index of a record stored uncompressed
_ALIVE, _RESTAGE = 1, 2
_DICT_SAMPLE = 64
"""Records compressed with a dictionary before its expected saving is known."""
_LEVEL = 1


class HasOffset(Protocol):
    offset: int


T = TypeVar("T", bound=HasOffset)


@dataclass(frozen=True, slots=True)
class Frozen:
    """A cold entry as it was stored, given to ``thaw`` when it leaves."""

    offset: int
    due_ms: int
    data: bytes
    tag: int
    """The caller's (e.g. what to do with the message when due)."""
    hold_ms: int
    """The caller's (e.g. when the message leaves its next delay topic)."""


class _Dictionary:
    """Compression against one sample record; ``saving`` learnt on its first uses."""

    __slots__ = ("compressor", "decompressor", "live", "samples", "saving", "seen")

    def __init__(self, sample: bytes) -> None:
        data = zstandard.ZstdCompressionDict(sample, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        data.precompute_compress(level=_LEVEL)
        self.compressor = zstandard.ZstdCompressor(
            level=_LEVEL, dict_data=data, write_checksum=False, write_dict_id=False)
        self.decompressor = zstandard.ZstdDecompressor(dict_data=data)
        self.live = 0  # records compressed with it still held
        self.saving = 0.0  # mean bytes saved per record over its first samples
        self.samples = 0
        self.seen = 0.0  # recent mean saving


class HeldStore(Generic[T]):
    """Items by due time, ties in insertion order; see the module docstring.

    ``thaw`` turns a cold entry back into an item. Items need an ``offset`` (their
    record's, distinct among the items held)."""

    def __init__(self, thaw: Callable[[Frozen], T], *, compress: bool = True) -> None:
        self._thaw = thaw
        self._compress = compress
        self._seq = itertools.count()
        self._hot: list[tuple[int, int, T]] = []
        # cold columns, indexed by slot
        self._due = array("q")
        self._order = array("q")  # insertion sequence
        self._offset = array("q")
        self._hold = array("q")
        self._chunk = array("i")  # -1: kept in _big
        self._pos = array("I")
        self._size = array("I")
        self._tag = array("B")
        self._dict = array("B")
        self._flags = array("B")
        self._free = array("I")  # slots to reuse
        self._cold = 0
        self._big: dict[int, bytes] = {}
        # arena
        self._chunks: dict[int, mmap.mmap] = {}
        self._chunk_live = array("q")  # live bytes per chunk id
        self._current = -1
        self._fill = CHUNK
        self._arena = 0  # bytes of the chunks allocated
        self._live = 0  # bytes of the records held in them
        # compression
        self._dicts: dict[int, _Dictionary] = {}
        self._dict_now = -1
        self._next_dict = 0
        # wheel: slot index -> cold slots due in it; a heap of the wheel slots in use; the
        # earliest of them sorted by (due, order), popped from its end
        self._wheel: dict[int, array[int]] = {}
        self._wheel_keys: list[int] = []
        self._head_key: int | None = None
        self._head: list[int] = []

    # --- adding -----------------------------------------------------------------------
    def push(self, due_ms: int, item: T) -> None:
        """Keep ``item`` as it is."""
        heapq.heappush(self._hot, (due_ms, next(self._seq), item))

    def freeze(self, due_ms: int, offset: int, data: bytes, *, tag: int = 0,
               hold_ms: int = 0, restage: bool = False) -> None:
        """Keep a message compactly: its record's bytes and what ``thaw`` needs.
        ``restage``: it may be written again to the end of its partition."""
        dict_index, stored = self._pack(data)
        slot = self._free.pop() if self._free else len(self._due)
        chunk, pos = self._place(stored)
        if chunk < 0:
            self._big[slot] = stored
        values = (due_ms, next(self._seq), offset, hold_ms, chunk, pos, len(stored), tag,
                  dict_index, _ALIVE | (_RESTAGE if restage else 0))
        columns = (self._due, self._order, self._offset, self._hold, self._chunk, self._pos,
                   self._size, self._tag, self._dict, self._flags)
        if slot == len(self._due):
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        else:
            for column, value in zip(columns, values, strict=True):
                column[slot] = value
        self._cold += 1
        self._enqueue(slot)

    def _pack(self, data: bytes) -> tuple[int, bytes]:
        """(dictionary index, bytes to store) of a record."""
        if not self._compress or len(data) < 64:
            return _RAW, data
        current = self._dicts.get(self._dict_now)
        if current is None or (current.samples >= _DICT_SAMPLE and current.saving >= 64
                               and current.seen < current.saving / 2):
            # none yet, or the records no longer look like its sample (another producer,
            # other headers): a new one from this record
            current = self._new_dictionary(data)
            if current is None:
                return _RAW, data
        packed = current.compressor.compress(data)
        saved = len(data) - len(packed)
        if current.samples < _DICT_SAMPLE:
            current.samples += 1
            current.saving += (saved - current.saving) / current.samples
            current.seen = current.saving
        else:
            current.seen += (saved - current.seen) / _DICT_SAMPLE
        if saved < 8:
            return _RAW, data
        current.live += 1
        return self._dict_now, packed

    def _new_dictionary(self, sample: bytes) -> _Dictionary | None:
        """A dictionary made of ``sample``, used from now on (None: every index is held
        by records still compressed with theirs)."""
        index = next((i for i in itertools.chain(range(self._next_dict, _RAW),
                                                 range(self._next_dict))
                      if i not in self._dicts), None)
        if index is None:
            return None
        self._next_dict = (index + 1) % _RAW
        old, self._dict_now = self._dict_now, index
        self._dicts[index] = _Dictionary(sample)
        self._drop_dictionary(old)
        return self._dicts[index]

    def _drop_dictionary(self, index: int) -> None:
        found = self._dicts.get(index)
        if found is not None and found.live == 0 and index != self._dict_now:
            del self._dicts[index]

    def _place(self, data: bytes) -> tuple[int, int]:
        """Copy ``data`` into the arena: (chunk, position); chunk -1: kept on its own."""
        size = len(data)
        if size > CHUNK // 8:
            return -1, 0
        if self._current < 0 or self._fill + size > CHUNK:
            self._current = len(self._chunk_live)
            self._chunks[self._current] = mmap.mmap(-1, CHUNK)
            self._chunk_live.append(0)
            self._arena += CHUNK
            self._fill = 0
        pos = self._fill
        self._chunks[self._current][pos:pos + size] = data
        self._fill += size
        self._chunk_live[self._current] += size
        self._live += size
        return self._current, pos

    def _enqueue(self, slot: int) -> None:
        key = self._due[slot] // SLOT_MS
        if key == self._head_key:
            bisect.insort(self._head, slot, key=self._reverse_key)
            return
        bucket = self._wheel.get(key)
        if bucket is None:
            bucket = self._wheel[key] = array("I")
            heapq.heappush(self._wheel_keys, key)
            if self._head_key is not None and key < self._head_key:
                self._unsort_head()
        if slot >= 1 << 32:
            raise OverflowError("too many messages held")
        bucket.append(slot)

    def _reverse_key(self, slot: int) -> tuple[int, int]:
        return -self._due[slot], -self._order[slot]

    def _unsort_head(self) -> None:
        """An earlier wheel slot appeared: the sorted head goes back to the wheel."""
        assert self._head_key is not None
        self._wheel[self._head_key] = array("I", self._head)
        heapq.heappush(self._wheel_keys, self._head_key)
        self._head_key, self._head = None, []

    def _cold_first(self) -> int | None:
        """The earliest cold slot (None: none)."""
        while not self._head:
            if self._head_key is not None:
                self._head_key = None
            if not self._wheel_keys:
                return None
            key = heapq.heappop(self._wheel_keys)
            bucket = self._wheel.pop(key)
            self._head = sorted(bucket, key=self._reverse_key)
            self._head_key = key
        return self._head[-1]

    # --- reading ----------------------------------------------------------------------
    def next_due(self) -> int | None:
        hot = self._hot[0][0] if self._hot else None
        slot = self._cold_first()
        cold = self._due[slot] if slot is not None else None
        if hot is None or cold is None:
            return hot if cold is None else cold
        return min(hot, cold)

    def pop_due(self, now_ms: int, limit: int) -> list[T]:
        """Items due at ``now_ms``, earliest first, at most ``limit``."""
        out: list[T] = []
        while len(out) < limit:
            slot = self._cold_first()
            hot = self._hot[0] if self._hot else None
            if slot is None:  # nothing cold (left): the hot heap alone, without looking again
                heap, pop = self._hot, heapq.heappop
                while heap and heap[0][0] <= now_ms and len(out) < limit:
                    out.append(pop(heap)[2])
                break
            if hot is None or (self._due[slot], self._order[slot]) < (hot[0], hot[1]):
                if self._due[slot] > now_ms:
                    break
                self._head.pop()
                out.append(self._release(slot))
            else:
                if hot[0] > now_ms:
                    break
                out.append(heapq.heappop(self._hot)[2])
        self._maybe_compact()
        return out

    def restageable(self, hot: Callable[[T], bool]) -> list[int]:
        """Offsets of the items that may be written again to the end of the partition
        (cold ones frozen with ``restage``, hot ones ``hot`` accepts), ascending."""
        found = [e[2].offset for e in self._hot if hot(e[2])]
        offsets, flags = self._offset, self._flags
        found.extend(offsets[s] for s in range(len(flags))
                     if flags[s] & (_ALIVE | _RESTAGE) == _ALIVE | _RESTAGE)
        found.sort()
        return found

    def take(self, offsets: Iterable[int]) -> list[T]:
        """Take out the items of these offsets, by offset."""
        wanted = set(offsets)
        taken = [e[2] for e in self._hot if e[2].offset in wanted]
        if taken:
            self._hot = [e for e in self._hot if e[2].offset not in wanted]
            heapq.heapify(self._hot)
        slots = [s for s in range(len(self._flags))
                 if self._flags[s] & _ALIVE and self._offset[s] in wanted]
        self._dequeue(set(slots))
        taken.extend(self._release(slot) for slot in slots)
        self._maybe_compact()
        taken.sort(key=lambda item: item.offset)
        return taken

    def _dequeue(self, slots: set[int]) -> None:
        """Take these cold slots out of the due order."""
        keys = {self._due[s] // SLOT_MS for s in slots}
        if self._head_key in keys:
            self._head = [s for s in self._head if s not in slots]
            keys.discard(self._head_key)
        for key in keys:
            bucket = array("I", (s for s in self._wheel[key] if s not in slots))
            if bucket:
                self._wheel[key] = bucket
            else:
                del self._wheel[key]
                self._wheel_keys.remove(key)
        heapq.heapify(self._wheel_keys)

    def _release(self, slot: int) -> T:
        """The item of a cold slot (no longer queued), its slot and bytes freed."""
        data = self._read(slot)
        dict_index = self._dict[slot]
        if dict_index != _RAW:
            found = self._dicts[dict_index]
            data = found.decompressor.decompress(data)
            found.live -= 1
            self._drop_dictionary(dict_index)
        item = self._thaw(Frozen(self._offset[slot], self._due[slot], data, self._tag[slot],
                                 self._hold[slot]))
        chunk = self._chunk[slot]
        if chunk < 0:
            del self._big[slot]
        else:
            size = self._size[slot]
            self._chunk_live[chunk] -= size
            self._live -= size
            if self._chunk_live[chunk] == 0:
                if chunk != self._current:
                    self._chunks.pop(chunk).close()
                    self._arena -= CHUNK
                else:  # empty: written again from its start, its pages given back
                    self._fill = 0
                    self._chunks[chunk].madvise(mmap.MADV_DONTNEED)
        self._flags[slot] = 0
        self._free.append(slot)
        self._cold -= 1
        return item

    def _read(self, slot: int) -> bytes:
        chunk = self._chunk[slot]
        if chunk < 0:
            return self._big[slot]
        pos = self._pos[slot]
        return self._chunks[chunk][pos:pos + self._size[slot]]

    def _maybe_compact(self) -> None:
        if self._cold == 0 and len(self._due) > 1024:
            # nothing cold: the columns start over (the current chunk is empty already)
            for column in (self._due, self._order, self._offset, self._hold, self._chunk,
                           self._pos, self._size, self._tag, self._dict, self._flags,
                           self._free):
                del column[:]
        if self._arena > 2 * self._live + 2 * CHUNK:
            self.compact()

    def compact(self) -> None:
        """Move the records of chunks less than half full together; free those chunks."""
        sparse = {c for c in self._chunks
                  if c != self._current and self._chunk_live[c] < CHUNK // 2}
        if not sparse:
            return
        for slot in range(len(self._flags)):
            if self._flags[slot] & _ALIVE and self._chunk[slot] in sparse:
                data = self._read(slot)
                old = self._chunk[slot]
                self._chunk_live[old] -= len(data)
                self._live -= len(data)
                chunk, pos = self._place(data)
                self._chunk[slot], self._pos[slot] = chunk, pos
        for chunk in sparse:
            self._chunks.pop(chunk).close()
            self._arena -= CHUNK

    # --- size -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._hot) + self._cold

    @property
    def cold(self) -> int:
        """Entries kept compactly."""
        return self._cold

    @property
    def stored(self) -> int:
        """Bytes of the cold records as stored (compressed) in the arena."""
        return self._live

    def nbytes(self) -> int:
        """Memory of the cold entries, near enough: arena, large records, columns, wheel."""
        columns = (self._due, self._order, self._offset, self._hold, self._chunk, self._pos,
                   self._size, self._tag, self._dict, self._flags, self._free)
        return (self._arena + sum(len(b) + 33 for b in self._big.values())
                + sum(c.itemsize * len(c) for c in columns)
                + 4 * (self._cold + len(self._head)))
