"""A 3-node Ray cluster on one machine (ray.cluster_utils.Cluster) loses the node that runs
a DelayBucketActor mid-stream; prints what a read_committed consumer then saw, as JSON.

Run by tests/test_delay_cluster.py in its own process (a process holds one Ray cluster).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import ray
from helpers import read_timed
from ray.cluster_utils import Cluster

from athomic import MessagingSettings, ProducerFactory
from athomic.actors.topology import NAMESPACE, delay_actor_name


@ray.remote(num_cpus=1)
def _hold_a_cpu() -> str:
    time.sleep(1.0)  # the three overlap: each needs a whole CPU of its own
    return ray.get_runtime_context().get_node_id()


def main(bootstrap: str) -> dict[str, object]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    tag = uuid.uuid4().hex[:8]
    topics = {1: f"delay.{tag}.1s", 2: f"delay.{tag}.2s", 4: f"delay.{tag}.4s"}
    settings = MessagingSettings(bootstrap_servers=bootstrap, connection_name=f"c{tag}",
                                 delay_topics=topics)
    handle = ProducerFactory.create(settings)
    final = f"final.{tag}"
    actors = {b: ray.get_actor(delay_actor_name(settings.connection_name, t, 0),
                               namespace=NAMESPACE) for b, t in topics.items()}
    nodes = {b: ray.get(a.stats.remote())["node_id"] for b, a in actors.items()}
    # Spread over the nodes, the bucket actors (0 CPU) leave every node's CPU whole: one
    # 1-CPU task per node runs at the same time.
    cpu_free = ray.available_resources().get("CPU", 0.0)
    hogs = [_hold_a_cpu.remote() for _ in range(3)]
    done, _ = ray.wait(hogs, num_returns=3, timeout=60)
    tasks_ran = sorted(ray.get(done))
    by_id = {w.node_id: w for w in workers}
    victim_bucket = next((b for b in (1, 2, 4) if nodes[b] in by_id), None)
    sent = 0
    removed = None
    for wave in range(8):
        items = [{"message": {"w": wave, "i": i}, "key": f"k{i}",
                  "delay_seconds": 0.5 + (i % 10) * 0.5} for i in range(40)]
        ray.get(handle.publish_batch.remote(items, topic=final))
        sent += 40
        if wave == 3 and victim_bucket is not None:
            removed = nodes[victim_bucket]
            cluster.remove_node(by_id[removed], allow_graceful=False)
        time.sleep(0.5)
    received = asyncio.run(read_timed(bootstrap, final, sent, timeout=120, extra_wait=3.0))
    after = ray.get(actors[victim_bucket].stats.remote()) if victim_bucket else {}
    ids = [dict(r.headers)["message-id"].decode() for r, _ in received]
    early = sum(1 for r, at in received
                if at * 1000 < int(dict(r.headers)["athomic-deliver-at"]))
    ProducerFactory.shutdown(settings.connection_name)
    ray.shutdown()
    cluster.shutdown()
    return {"sent": sent, "received": len(ids), "unique": len(set(ids)), "early": early,
            "nodes": len({*nodes.values()}), "removed": removed,
            "victim_bucket": victim_bucket, "moved_to": after.get("node_id"),
            "cpu_free": cpu_free, "tasks_ran": tasks_ran}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
