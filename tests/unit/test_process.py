"""The collector of an actor's process: collection on a clock (DelayBucketActor)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

from athomic._process import collect_on_a_clock


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


async def test_collection_on_a_clock_frees_cycles_by_time_and_not_by_allocations() -> None:
    assert gc.isenabled()
    counts = [g["collections"] for g in gc.get_stats()]
    task = asyncio.create_task(collect_on_a_clock(every_s=0.05, middle_every=2,
                                                  old_every=2))
    try:
        await asyncio.sleep(0.01)
        assert not gc.isenabled(), "automatic collection is off while it runs"
        # far more allocations than Python's young threshold: no collection follows them
        young = gc.get_stats()[0]["collections"]
        kept = [{"i": i} for i in range(50_000)]
        assert gc.get_stats()[0]["collections"] == young
        # garbage in a cycle is freed by the next tick
        a, b = Node(), Node()
        a.other, b.other = b, a
        freed = weakref.ref(a)
        del a, b
        assert freed() is not None
        await asyncio.sleep(0.3)  # six ticks: young, middle, young, oldest, young, middle
        assert freed() is None
        after = [g["collections"] for g in gc.get_stats()]
        assert after[0] - counts[0] >= 2 and after[1] - counts[1] >= 1
        assert after[2] - counts[2] >= 1, (counts, after)
        assert len(kept) == 50_000
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert gc.isenabled(), "automatic collection is on again after"
