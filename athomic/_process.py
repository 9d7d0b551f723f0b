"""Tuning of the processes athomic's Ray actors run in (each actor has its own).

An actor's process holds the ~90k objects Ray, aiokafka and athomic create at start; with
Python's default collector settings, a call of 1,000 messages (a few thousand short-lived
containers that live across the await for the acknowledgements) set off a full collection
every few calls, each walking every object of the process: 40 pauses of ~64 ms in 20 s of
``publish_batch`` calls, measured (BENCHMARKS.md). ProducerActors also collect the youngest
generation less often; DelayBucketActors do not (holding 100k messages, their memory grew
by 1.57x the payload with it, 1.46x without: BENCHMARKS.md). DelayBucketActors collect the
oldest generation less often instead: the messages they hold live until due and a full
collection walks them all for nothing (draining 30,000 due messages set off 7 full
collections, 105-242 ms in all, with Python's default; none with ``OLD_THRESHOLD``).

DelayBucketActors also collect on a clock rather than per allocation count
(``collect_on_a_clock``): every message a bucket actor reads lives from its fetch to its
transaction's commit, many thousands of allocations later, so a collection per 700
allocations walked nearly every message's objects once or twice before they were freed
(~830 young and ~75 middle collections per 30,000 messages drained, 75-110 ms, about a
tenth of the loop's time). Collected every half second, only what is alive at that moment
is walked.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 20_000
"""Allocations (net of frees) between collections of the youngest generation (Python's
default: 700). A call's own objects are freed before the next call, so steady publishing
seldom reaches it; garbage in reference cycles is still collected, ~20k objects later."""

OLD_THRESHOLD = 100
"""Collections of the middle generation between two of the oldest (Python's default: 10;
Python also waits until a quarter more objects than the last full collection left have
reached the oldest generation)."""


def settle_gc(young_threshold: int | None = YOUNG_THRESHOLD,
              old_threshold: int | None = None) -> None:
    """Move every object alive now (the process's start) out of the collector's sight, for
    good; with ``young_threshold``, collect the youngest generation less often; with
    ``old_threshold``, the oldest (collections of the middle one between two)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young_threshold is not None:
        young = max(young, young_threshold)
    if old_threshold is not None:
        old = max(old, old_threshold)
    gc.set_threshold(young, middle, old)


COLLECT_EVERY_S = 0.5
"""How often ``collect_on_a_clock`` collects the youngest generation."""


async def collect_on_a_clock(every_s: float = COLLECT_EVERY_S, middle_every: int = 10,
                             old_every: int = OLD_THRESHOLD) -> None:
    """Collect by time instead of by allocation count, until cancelled: the youngest
    generation every ``every_s``, the middle one every ``middle_every`` of those, the
    oldest every ``old_every`` of the middle one's (every 500 s by default). Automatic
    collection is off meanwhile (and on again after). Garbage in reference cycles is then
    freed at most ``every_s`` after it becomes garbage, as long as the event loop turns;
    objects freed by their reference counts (nearly all) are freed at once as ever."""
    gc.disable()
    ticks = 0
    try:
        while True:
            await asyncio.sleep(every_s)
            ticks += 1
            if ticks % (middle_every * old_every) == 0:
                gc.collect(2)
            elif ticks % middle_every == 0:
                gc.collect(1)
            else:
                gc.collect(0)
    finally:
        gc.enable()


def gc_stats() -> dict[str, Any]:
    """The collector's state in this process, for an actor's ``stats``."""
    return {"gc_collections": [g["collections"] for g in gc.get_stats()],
            "gc_frozen": gc.get_freeze_count(), "gc_threshold": list(gc.get_threshold()),
            "gc_automatic": gc.isenabled()}


def lower_priority(increment: int) -> None:
    """Lower this process's scheduling priority (raise its niceness, at most to 19)."""
    try:
        os.nice(increment)
    except OSError as exc:  # e.g. a platform without it: every lane then runs alike
        log.warning("cannot lower the actor's scheduling priority: %s", exc)
