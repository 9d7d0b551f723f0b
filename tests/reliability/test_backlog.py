"""A backlog of 200k due messages in a delay topic, every replica restarted on it: memory
stays within ``republisher.max_held``, the process's RSS stays bounded, nothing is lost
(scenario 9 of RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import results
from rig import Run, assert_bar, kill_process, log, rss_mb, summary

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]

BACKLOG = 200_000
MAX_HELD = 20_000


def _stats(actors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    import ray

    out = {}
    for name, handle in actors.items():
        try:
            out[name] = ray.get(handle.stats.remote(), timeout=5)
        except Exception:  # restarting
            continue
    return out


def test_backlog_of_200k_with_every_replica_restarted(scenario: Callable[..., Run]) -> None:
    from athomic.actors.topology import undelivered

    run = scenario("s09-backlog-200k", max_held=MAX_HELD)
    run.prepare()
    actors = run.delay_actors()
    before = _stats(actors)
    assert len(before) == len(actors) == 2 * len(run.buckets)
    baseline = {n: rss_mb(s["pid"]) for n, s in before.items()}
    run.notes["rss_mb_before"] = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]: v
                                  for n, v in baseline.items()}

    # (the handle first: ProducerFactory.create asks the DelayBucketActors how they are)
    handle = run.handle()
    # 1. the republisher stalls (SIGSTOP every replica) while 200k messages due in 2.2-2.8 s
    #    are published: they wait in the 1 s delay topic, due, unread
    stalled_at = run.fault(f"SIGSTOP all {len(before)} DelayBucketActor processes")
    for s in before.values():
        os.kill(s["pid"], signal.SIGSTOP)
    try:
        refs = run.start_workload(
            handle, tasks=2, duration_s=900, batch=1000, interval_s=0.0, keys=50,
            direct_every=0, high_every=0, delays=[2.2, 2.5, 2.8],
            max_messages=BACKLOG // 2)
        run.finish_workload(refs, timeout_s=900)
        published = time.monotonic()
        acked = sum(1 for a in run.acks if a["ok"])
        assert acked >= 0.99 * BACKLOG, f"only {acked} acknowledged"
        last_due = max(a["due"] for a in run.acks if a["ok"])
        time.sleep(max(0.0, last_due / 1000 + 1 - time.time()))
        waiting = asyncio.run(undelivered(run.settings(), [run.buckets[1]], limit=10**6,
                                          timeout_s=120))[run.buckets[1]]
        run.notes["waiting_before_restart"] = waiting
        log(f"{waiting} due messages wait in {run.buckets[1]}")
    finally:
        # 2. restart every replica: kill -9 the stopped processes, Ray restarts the actors
        restart_at = run.fault("kill -9 every stopped DelayBucketActor (Ray restarts them)")
        for s in before.values():
            kill_process(s["pid"])
    run.notes["publish_s"] = round(published - run.began, 1)

    # 3. sample every replica's held count and RSS until the backlog is delivered
    peak_held: dict[str, int] = {}
    peak_rss: dict[str, float] = {}
    samples = 0
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        for name, s in _stats(actors).items():
            peak_held[name] = max(peak_held.get(name, 0), int(s["held"]))
            rss = rss_mb(s["pid"])
            if rss is not None:
                peak_rss[name] = max(peak_rss.get(name, 0.0), rss)
        samples += 1
        if samples % 5 == 0:
            left = asyncio.run(undelivered(run.settings(), [run.buckets[1]],
                                           timeout_s=60))[run.buckets[1]]
            log(f"waiting {left}, held now {sorted(peak_held.values())[-2:]} (peaks), "
                f"rss peaks {sorted(round(v) for v in peak_rss.values())}")
            if left == 0:
                break
        time.sleep(1)
    drained_at = run.fault("backlog delivered (nothing waits in the delay topic)")
    after = _stats(actors)
    short = {n: n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in actors}
    run.notes.update(
        max_held=MAX_HELD, held_peak={short[n]: v for n, v in peak_held.items()},
        rss_mb_peak={short[n]: round(v, 1) for n, v in peak_rss.items()},
        rss_mb_after={short[n]: rss_mb(s["pid"]) for n, s in after.items()},
        drain_s=round((drained_at - restart_at) / 1000, 1),
        drain_msg_per_s=round(run.notes["waiting_before_restart"]
                              / max((drained_at - restart_at) / 1000, 0.001)),
        stalled_s=round((restart_at - stalled_at) / 1000, 1))
    # RSS: a replica of the 1 s bucket (the backlog's) against one of the 16 s bucket,
    # which held nothing but read the same ids topic (200k caller-chosen ids)
    ones = [v for n, v in peak_rss.items() if f".{run.buckets[1]}." in n]
    idle = [v for n, v in peak_rss.items() if f".{run.buckets[16]}." in n]
    run.notes["rss_mb_held_extra"] = round(max(ones) - max(idle), 1)
    run.settle(timeout_s=300)
    figures = run.figures(fault_start_ms=stalled_at, fault_end_ms=restart_at)
    results.write(run.name, figures, time.monotonic() - run.began)
    log(f"figures:\n{summary(figures)}\n  held peaks {run.notes['held_peak']}\n"
        f"  rss peaks {run.notes['rss_mb_peak']} (before {run.notes['rss_mb_before']})")

    assert_bar(figures)
    assert max(peak_held.values()) <= MAX_HELD, run.notes["held_peak"]
    assert max(ones) - max(idle) < 400, (ones, idle)
