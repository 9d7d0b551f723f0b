"""Changes under traffic: the republisher's replicas 2 -> 3 -> 1 with ``athomic up``, and
partitions added to a delay topic (scenarios 7 and 8 of RELIABILITY.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from rig import Run, assert_bar, drive, log, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1500)]


def test_replicas_2_3_1_during_traffic(scenario: Callable[..., Run]) -> None:
    """7. ``athomic up`` with the settings file changed: replicas 2 -> 3, then 3 -> 1."""
    run = scenario("s07-replicas-2-3-1")

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(20)
        began = run.fault("athomic up: replicas 2 -> 3")
        run.notes["up_s"] = [round(run.up(replicas=3), 1)]
        time.sleep(10)
        run.fault("athomic up: replicas 3 -> 1")
        run.notes["up_s"].append(round(run.up(replicas=1), 1))
        report = run.status()
        delay = [a for a in report["actors"] if a["kind"] == "delay"]
        run.notes["delay_actors_after"] = len(delay)
        assert len(delay) == len(run.buckets), delay
        return began, run.fault("second athomic up applied")

    # Each up replaces the ProducerActors (their settings changed): calls caught by the
    # replacement fail (not acknowledged), the handle finds the new actors by name.
    figures = drive(run, fault, duration_s=80)
    assert_bar(figures)


def test_partitions_added_to_a_delay_topic(scenario: Callable[..., Run]) -> None:
    """8. The 1 s delay topic grows from 3 to 6 partitions during traffic."""
    run = scenario("s08-add-partitions")
    topic = run.buckets[1]

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(20)
        began = run.fault(f"{topic}: 3 -> 6 partitions")
        run.kafka.add_partitions(topic, 6)

        def claimed() -> bool:
            owned = {p["partition"] for p in run.status()["partitions"]
                     if p["topic"] == topic and p.get("state") == "owned"}
            return owned >= set(range(6))

        took = wait_until(claimed, 60, "the added partitions claimed", every_s=1)
        run.notes["new_partitions_claimed_s"] = round(took, 1)
        return began, run.fault(f"partitions 3-5 of {topic} claimed by the republisher")

    figures = drive(run, fault, duration_s=float(run.notes.get("duration_s", 80)))
    log(f"records written to the added partitions: {run.notes.get('new_partition_records')}")
    assert_bar(figures)
