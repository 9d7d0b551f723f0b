"""``athomic up / status / down`` on a real multi-node Ray cluster, the way users run one.

A head and two worker raylets started with ``ray start`` (``ray_cluster.py``); ``athomic
up`` submitted with ``ray job submit``; a publisher submitted as another job. While it
publishes, the layout changes (republisher replicas 1 -> 2, a bucket added) with another
``up``, and a worker raylet running a DelayBucketActor is killed with ``kill -9``.
``status`` reports the loss and then the recovery; ``down`` flushes and removes the actors
with messages still waiting, the next ``up`` delivers them. A read_committed consumer then
finds every acknowledged message, the delayed ones exactly once, none early (a direct one
twice only when Ray retried its call after its producer's node was lost).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import create_topics
from ray_cluster import RayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
BATCH = 10  # multinode_publisher.py: messages per batch, numbered consecutively


def number(message_id: str) -> int:
    return int(message_id.rsplit("-", 1)[1])


def config(connection: str, bootstrap: str, buckets: dict[int, str], replicas: int) -> str:
    return (f'connection_name = "{connection}"\nbootstrap_servers = "{bootstrap}"\n'
            "[delay_topics]\n" + "".join(f'{b} = "{t}"\n' for b, t in buckets.items())
            + f"[republisher]\nreplicas = {replicas}\npartitions = 2\n"
            "partition_refresh_s = 2\n")


def athomic(cluster: RayCluster, *args: str, timeout: float = 180
            ) -> subprocess.CompletedProcess[str]:
    """The ``athomic`` command as a driver joining the cluster from this machine."""
    return subprocess.run([sys.executable, "-m", "athomic", *args,
                           "--address", cluster.address],
                          capture_output=True, text=True, timeout=timeout, env=cluster.env)


def status(cluster: RayCluster, conf: Path) -> tuple[int, dict[str, Any]]:
    out = athomic(cluster, "status", "--config", str(conf), "--json", timeout=120)
    assert out.stdout.strip(), out.stderr[-2000:]
    return out.returncode, json.loads(out.stdout)


async def read_ids(bootstrap: str, topic: str, expected: set[str], timeout: float,
                   extra_wait: float) -> list[Any]:
    """Every record of ``topic`` (read_committed) until ``expected`` ids are all seen, then
    ``extra_wait`` more seconds for any that should not be there."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed", group_id=None)
    await consumer.start()
    records: list[Any] = []
    seen: set[str] = set()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet_until = None
        while loop.time() < deadline:
            if quiet_until is None and expected <= seen:
                quiet_until = loop.time() + extra_wait
            if quiet_until is not None and loop.time() >= quiet_until:
                break
            for part in (await consumer.getmany(timeout_ms=300)).values():
                records += part
                seen.update(dict(r.headers)["message-id"].decode() for r in part)
    finally:
        await consumer.stop()
    return records


@pytest.mark.timeout(600)
def test_up_change_lose_a_node_down_up_on_a_real_cluster(kafka_bootstrap: str,
                                                          tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    connection, final = f"mn{tag}", f"mn.{tag}.final"
    buckets = {1: f"mn.{tag}.delay.1s", 4: f"mn.{tag}.delay.4s"}
    asyncio.run(create_topics(kafka_bootstrap, final, partitions=3))
    conf_dir, job_dir = tmp_path / "conf", tmp_path / "job"
    conf_dir.mkdir()
    job_dir.mkdir()
    conf = conf_dir / "athomic.toml"
    conf.write_text(config(connection, kafka_bootstrap, buckets, replicas=1))
    shutil.copy(HERE / "multinode_publisher.py", job_dir)
    stop_file = tmp_path / "stop"

    cluster = RayCluster(workers=2, cpus=1, env_vars={
        # notice a lost node within seconds, not the default ~30 s
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    cluster.start()
    try:
        # 1. up, submitted as a job (the working dir holds only the settings file)
        up = cluster.job("athomic", "up", "--config", "athomic.toml", working_dir=conf_dir)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "+ create" in up.stdout and "Applied in" in up.stdout
        assert up.stdout.count("  ready  ") == 2 + 2  # producers high/normal, 2 buckets
        again = athomic(cluster, "up", "--config", str(conf))
        assert again.returncode == 0, again.stderr
        assert "No changes" in again.stdout and "+ create" not in again.stdout

        # 2. a publisher job, from the same settings file
        publisher = f"pub-{tag}"
        sub = cluster.job("python", "multinode_publisher.py", working_dir=job_dir,
                          wait=False, submission_id=publisher,
                          env_vars={"ATHOMIC_CONFIG": str(conf), "FINAL_TOPIC": final,
                                    "STOP_FILE": str(stop_file), "TAG": tag})
        assert sub.returncode == 0, sub.stderr
        deadline = time.monotonic() + 120
        while "PUBLISHING" not in cluster.job_logs(publisher):
            assert cluster.job_status(publisher) in ("PENDING", "RUNNING"), \
                cluster.job_logs(publisher)[-3000:]
            assert time.monotonic() < deadline, "the publisher did not start"
            time.sleep(0.5)
        time.sleep(2)  # some traffic under the first layout

        # 3. change the layout during traffic: replicas 1 -> 2, a bucket added
        buckets[2] = f"mn.{tag}.delay.2s"
        conf.write_text(config(connection, kafka_bootstrap, buckets, replicas=2))
        changed_at = time.time()
        up2 = cluster.job("athomic", "up", "--config", "athomic.toml", working_dir=conf_dir)
        assert up2.returncode == 0, up2.stdout[-3000:] + up2.stderr[-3000:]
        assert "~ replace" in up2.stdout and "+ create" in up2.stdout
        code, report = status(cluster, conf)
        assert code == 0, report["problems"]
        delay_actors = [a for a in report["actors"] if a["kind"] == "delay"]
        assert len(delay_actors) == 3 * 2
        assert len({a["slot"] for a in delay_actors}) == 1, "the old layout is gone"

        # 4. lose a worker node that runs a DelayBucketActor
        victim = next(n for n in cluster.nodes if not n.head
                      and n.node_id() in {a["node"] for a in delay_actors})
        lost = victim.node_id()
        on_lost = {a["name"] for a in delay_actors if a["node"] == lost}
        producers_lost = any(a["node"] == lost for a in report["actors"]
                             if a["kind"] == "producer")
        cluster.kill_node(victim)
        killed_at = time.time()
        # status reports the loss (actors not answering or restarting, their partitions
        # unowned: exit 1) until Ray has restarted them elsewhere and they own their
        # partitions again (exit 0)
        seen: list[tuple[float, int, list[str]]] = []
        deadline = time.monotonic() + 180
        while True:
            code, report = status(cluster, conf)
            seen.append((round(time.time() - killed_at, 1), code, report["problems"]))
            if code == 0:
                break
            assert report["problems"], "non-zero exit names its problems"
            assert time.monotonic() < deadline, report["problems"]
            time.sleep(1)
        moved = {a["name"]: a for a in report["actors"] if a["name"] in on_lost}
        assert moved.keys() == on_lost
        assert all(a["node"] != lost and a["restarts"] >= 1 for a in moved.values())
        assert all(p["owner"] and p["state"] == "owned" for p in report["partitions"])
        print("status after the node loss (s, exit code, problems):", seen)
        time.sleep(2)  # traffic after the recovery

        # 5. stop publishing; down with messages still waiting; up delivers them
        stop_file.touch()
        assert cluster.wait_job(publisher, 120) == "SUCCEEDED", \
            cluster.job_logs(publisher)[-3000:]
        logs = cluster.job_logs(publisher)
        result = json.loads(next(line for line in logs.splitlines()
                                 if line.startswith("RESULT "))[len("RESULT "):])
        down = cluster.job("athomic", "down", "--config", "athomic.toml",
                           working_dir=conf_dir)
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        assert "Removed" in down.stdout
        code, report = status(cluster, conf)
        assert code != 0 and report["actors"] == []
        up3 = athomic(cluster, "up", "--config", str(conf))
        assert up3.returncode == 0, up3.stdout[-3000:] + up3.stderr[-3000:]

        # 6. what a read_committed consumer got
        acked = set(result["acked"])
        batch_at = {int(first): at for first, at in result["acked_at"].items()}
        assert len(acked) == len(result["acked"]) >= 500
        assert min(batch_at.values()) < changed_at < killed_at < max(batch_at.values()), \
            "publishing went on through the layout change and the node loss"
        records = asyncio.run(read_ids(kafka_bootstrap, final, acked, timeout=120,
                                       extra_wait=4.0))
        ids = [dict(r.headers)["message-id"].decode() for r in records]
        missing = acked - set(ids)
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        early = [r for r in records if "athomic-deliver-at" in dict(r.headers)
                 and r.timestamp < int(dict(r.headers)["athomic-deliver-at"])]
        assert not early, f"{len(early)} delayed messages delivered early"
        assert set(ids) <= acked | set(result["failed"])
        counts = Counter(ids)
        twice = {i for i, c in counts.items() if c > 1}
        delayed_twice = {i for i in twice if number(i) % 3}
        assert not delayed_twice, f"delayed messages delivered twice: {sorted(delayed_twice)[:5]}"
        # A direct publish is at-least-once: a call caught by the loss of its ProducerActor's
        # node is retried by Ray on the restarted actor (the same message id, so consumers
        # can deduplicate). Only such calls may have been delivered twice.
        for i in twice:
            assert producers_lost, f"{i} delivered twice, but no producer ran on the lost node"
            assert batch_at[number(i) // BATCH * BATCH] > killed_at, f"{i}: before the loss"
        print(f"acknowledged {len(acked)}, failed {len(result['failed'])}, reconnects "
              f"{result['reconnects']}, delivered {len(ids)}, direct ones retried by Ray "
              f"after the node loss and delivered twice: {len(twice)}")
        down2 = athomic(cluster, "down", "--connection", connection)
        assert down2.returncode == 0, down2.stderr
    finally:
        stop_file.touch()
        cluster.stop()
