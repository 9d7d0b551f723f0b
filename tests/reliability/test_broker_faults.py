"""Broker faults under traffic: a leader killed, a transaction coordinator killed, a broker
stalled, the whole cluster stopped (scenarios 1-4 of RELIABILITY.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from rig import BROKERS, Run, assert_bar, drive

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]


def test_kill_final_topic_leader(scenario: Callable[..., Run]) -> None:
    """1. kill -9 the leader of a final-topic partition mid-stream; restart it 25 s later."""
    run = scenario("s01-kill-final-leader")

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(25)
        victim = run.kafka.leaders(run.finals[0])[0]
        run.notes["victim_broker"] = victim
        began = run.fault(f"kill -9 broker {victim} (leader of {run.finals[0]}/0)")
        run.kafka.signal(victim, "KILL")
        time.sleep(25)
        run.kafka.restart(victim)
        return began, run.fault(f"broker {victim} restarted and answering")

    assert_bar(drive(run, fault))


def test_kill_delay_leader_and_coordinator(scenario: Callable[..., Run]) -> None:
    """2. kill -9 the broker leading a delay-topic partition and coordinating its
    transactional id (one broker when one does both; else each in turn)."""
    run = scenario("s02-kill-delay-leader-coordinator")

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(25)
        roles: dict[int, list[str]] = {i: [] for i in range(BROKERS)}
        both = None
        for topic in run.buckets.values():
            for partition, leader in sorted(run.kafka.leaders(topic).items()):
                coordinator = run.kafka.coordinator(f"athomic.delay.{topic}.{partition}")
                roles[leader].append(f"leader {topic}/{partition}")
                roles[coordinator].append(f"coordinator athomic.delay.{topic}.{partition}")
                if leader == coordinator and both is None:
                    both = (leader, f"{topic}/{partition}")
        victims = [both[0]] if both else sorted(
            {run.kafka.leaders(run.buckets[1])[0],
             run.kafka.coordinator(f"athomic.delay.{run.buckets[1]}.0")})
        run.notes["victims"] = {v: roles[v] for v in victims}
        began = None
        for victim in victims:
            at = run.fault(f"kill -9 broker {victim} ({', '.join(roles[victim][:4])} ...)")
            began = began or at
            run.kafka.signal(victim, "KILL")
            time.sleep(20)
            run.kafka.restart(victim)
            end = run.fault(f"broker {victim} restarted and answering")
            run.kafka.wait_healthy()
        assert began is not None
        return began, end

    assert_bar(drive(run, fault, duration_s=70))


def test_stall_a_broker(scenario: Callable[..., Run]) -> None:
    """3. SIGSTOP a broker for 20 s (a stall, not a crash), then SIGCONT."""
    run = scenario("s03-stall-broker")

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(25)
        # the broker coordinating the most of this run's transactional ids
        load = {i: 0 for i in range(BROKERS)}
        for topic in run.buckets.values():
            for partition in run.kafka.leaders(topic):
                load[run.kafka.coordinator(f"athomic.delay.{topic}.{partition}")] += 1
        victim = max(load, key=lambda i: load[i])
        run.notes["victim_broker"] = victim
        run.notes["victim_coordinates_transactional_ids"] = load[victim]
        began = run.fault(f"SIGSTOP broker {victim} (coordinator of {load[victim]} "
                          "transactional ids)")
        run.kafka.signal(victim, "STOP")
        time.sleep(20)
        run.kafka.signal(victim, "CONT")
        return began, run.fault(f"SIGCONT broker {victim}")

    assert_bar(drive(run, fault))


def test_whole_kafka_down_30s(scenario: Callable[..., Run]) -> None:
    """4. Stop every broker (kill -9) for 30 s, then start them again."""
    run = scenario("s04-kafka-down")

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(25)
        began = run.fault("kill -9 all three brokers")
        for i in range(BROKERS):
            run.kafka.signal(i, "KILL")
        time.sleep(30)
        run.fault("starting all three brokers")
        run.kafka.restart_all()
        return began, run.fault("all three brokers answering")

    figures = drive(run, fault, duration_s=75, settle_timeout_s=400)
    # Publishes during the outage fail (PublishError after producer.delivery_timeout_ms):
    # not acknowledged, so not owed.
    assert figures["not_acked"] > 0
    assert_bar(figures)
