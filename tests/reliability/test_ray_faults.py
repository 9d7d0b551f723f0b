"""Ray faults under traffic: a node lost with its DelayBucketActors and ProducerActors, and
every DelayBucketActor killed again and again (scenarios 5 and 6 of RELIABILITY.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import workload
from rig import QUICK, QUICK_DELAYS, Run, assert_bar, drive, log

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]


def test_lose_the_node_of_bucket_actors_and_producers(scenario: Callable[..., Run]) -> None:
    """5. kill -9 the raylet of the worker node hosting ProducerActors and DelayBucketActor
    replicas, mid-stream."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run = scenario("s05-kill-raylet")
    run.prepare(up=False)
    head, workers = run.ray_rig.node_ids()
    victim_id, survivor = workers[0], workers[1]
    # ProducerFactory.create from a task on the victim: the producers start next to their
    # creator, the DelayBucketActors spread over the three nodes (placement group)
    handle = ray.get(ray.remote(workload.create_handle).options(
        num_cpus=0.1, scheduling_strategy=NodeAffinitySchedulingStrategy(victim_id, soft=False)
    ).remote(str(run.conf)), timeout=300)
    report = run.status()
    on_victim = [a for a in report["actors"] if a["node"] == victim_id]
    run.notes["actors_on_lost_node"] = sorted(f"{a['kind']} {a['role']}" for a in on_victim)
    assert any(a["kind"] == "producer" for a in on_victim), report["actors"]
    assert any(a["kind"] == "delay" for a in on_victim), report["actors"]
    victim = next(n for n in run.ray_rig.cluster.nodes if n.node_id() == victim_id)

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(25)
        began = run.fault(f"kill -9 the raylet of node {victim_id[:8]} "
                          f"({', '.join(run.notes['actors_on_lost_node'])})")
        run.ray_rig.cluster.kill_node(victim)
        problems = run.wait_healthy(timeout_s=240)
        run.notes["status_while_recovering"] = problems[:10]
        return began, run.fault("athomic status healthy again (actors restarted elsewhere, "
                                "partitions owned)")

    # the workload's tasks run on the head and the other worker (the caller is not lost)
    figures = drive(run, fault, handle=handle, prepare=False, nodes=[head, survivor])
    # A direct publish caught by the loss of its ProducerActor is retried by Ray on the
    # restarted actor (max_task_retries=-1), with the same message id: at least once.
    # Only such calls (acknowledged after the loss) may have been delivered twice.
    lost_at = run.faults[0][1]
    by_id = {a["id"]: a for a in run.acks}
    retried = [i for i in figures["duplicated_direct_ids"] if by_id[i]["ack"] < lost_at]
    assert not retried, f"direct duplicates not explained by the node loss: {retried}"
    log(f"direct messages delivered twice after Ray retried their call: "
        f"{figures['duplicated_direct']}")
    assert_bar(figures, direct_duplicates=True)


def test_kill_every_bucket_actor_five_times(scenario: Callable[..., Run]) -> None:
    """6. ``ray.kill(actor, no_restart=False)`` every DelayBucketActor five times in 30 s;
    Ray restarts them."""
    run = scenario("s06-kill-bucket-actors" + ("-quick" if QUICK else ""))

    def fault(run: Run) -> tuple[int, int]:
        time.sleep(10 if QUICK else 25)
        began = None
        for round_ in range(5):
            at = run.fault(f"ray.kill every DelayBucketActor, round {round_ + 1}")
            began = began or at
            run.notes.setdefault("killed", []).append(run.kill_delay_actors())
            if round_ < 4:
                time.sleep(7.5)
        run.wait_healthy(timeout_s=180)
        assert began is not None
        return began, run.fault("athomic status healthy again")

    spec = {"duration_s": 45, "delays": QUICK_DELAYS} if QUICK else {}
    assert_bar(drive(run, fault, **spec))
