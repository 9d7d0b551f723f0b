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
"""

from __future__ import annotations

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


def gc_stats() -> dict[str, Any]:
    """The collector's state in this process, for an actor's ``stats``."""
    return {"gc_collections": [g["collections"] for g in gc.get_stats()],
            "gc_frozen": gc.get_freeze_count(), "gc_threshold": list(gc.get_threshold())}


def lower_priority(increment: int) -> None:
    """Lower this process's scheduling priority (raise its niceness, at most to 19)."""
    try:
        os.nice(increment)
    except OSError as exc:  # e.g. a platform without it: every lane then runs alike
        log.warning("cannot lower the actor's scheduling priority: %s", exc)
