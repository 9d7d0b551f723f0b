"""``athomic republisher run|status``: the republisher without a driver, and its state."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from athomic.errors import AthomicError, MessagingConnectionError
from athomic.settings import MessagingSettings


def add_commands(sub: Any) -> None:
    rep = sub.add_parser("republisher", help="deliver delayed messages; show their state")
    cmds = rep.add_subparsers(dest="republisher_command", required=True)
    run = cmds.add_parser("run", help="run the republisher in this process until stopped")
    run.add_argument("--config", required=True, help="athomic TOML settings file")
    run.add_argument("--topic", action="append", default=None,
                     help="only this delay topic (repeatable; default: all)")
    run.add_argument("--replica", type=int, default=0)
    run.add_argument("--replicas", type=int, default=None,
                     help="replicas per topic (default: republisher.replicas)")
    status = cmds.add_parser("status", help="per-bucket lag, held messages and lateness")
    status.add_argument("--config", required=True, help="athomic TOML settings file")
    status.add_argument("--ray-address", default=None,
                        help="also ask the running DelayBucketActors (e.g. 'auto')")
    status.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    try:
        settings = MessagingSettings.from_toml(args.config)
        if not settings.delay_topics:
            print("no delay_topics configured: nothing to republish", file=sys.stderr)
            return 1
        if args.republisher_command == "run":
            return asyncio.run(_run(settings, args))
        return _status(settings, args)
    except AthomicError as exc:
        print(f"athomic: {exc}", file=sys.stderr)
        return 1


async def _run(settings: MessagingSettings, args: argparse.Namespace) -> int:
    from athomic.actors.delay_bucket import DelayBucketActor

    topics = args.topic or list(settings.delay_topics.values())
    replicas = args.replicas or settings.republisher.replicas
    workers = [DelayBucketActor(settings, t, args.replica, replicas, autostart=False)
               for t in topics]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    tasks = [asyncio.create_task(w.run_forever()) for w in workers]
    print(f"republishing {', '.join(topics)} (replica {args.replica} of {replicas}); "
          "Ctrl-C stops", flush=True)
    await stopping.wait()
    for w in workers:
        w.republisher.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


async def kafka_progress(settings: MessagingSettings) -> list[dict[str, Any]]:
    """Per delay-topic partition: end offset, committed offset, lag."""
    options = settings.kafka_client_options()
    consumer = AIOKafkaConsumer(**options, isolation_level="read_committed")
    admin = AIOKafkaAdminClient(**options)
    try:
        await consumer.start()
        await admin.start()
    except KafkaError as exc:
        await consumer.stop()
        await admin.close()
        raise MessagingConnectionError(
            f"cannot reach the Kafka brokers at {settings.bootstrap_servers}: {exc}") from None
    try:
        rows = []
        described = {t["topic"]: t for t in await admin.describe_topics(
            list(settings.delay_topics.values()))}
        for bucket, topic in settings.delay_topics.items():
            info = described.get(topic) or {}
            parts = [] if info.get("error_code") else [
                p["partition"] for p in info.get("partitions", ())]
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            if not tps:
                rows.append({"bucket_s": bucket, "topic": topic, "partition": None,
                             "end": 0, "committed": 0, "lag": 0})
                continue
            ends = await consumer.end_offsets(tps)
            committed = await admin.list_consumer_group_offsets(
                settings.republisher_group, partitions=tps)
            for tp in tps:
                done = committed.get(tp)
                offset = done.offset if done is not None and done.offset >= 0 else 0
                rows.append({"bucket_s": bucket, "topic": topic, "partition": tp.partition,
                             "end": ends[tp], "committed": offset,
                             "lag": max(ends[tp] - offset, 0)})
        return rows
    finally:
        await consumer.stop()
        await admin.close()


def _status(settings: MessagingSettings, args: argparse.Namespace) -> int:
    rows = asyncio.run(kafka_progress(settings))
    actors: list[dict[str, Any]] = []
    if args.ray_address:
        import ray

        from athomic.actors.topology import NAMESPACE, actor_names

        ray.init(address=args.ray_address, namespace=NAMESPACE, log_to_driver=False)
        names = [n for n in actor_names(settings.connection_name) if ".delay." in n]
        actors = ray.get([ray.get_actor(n, namespace=NAMESPACE).stats.remote()
                          for n in names])
    if args.json:
        print(json.dumps({"partitions": rows, "actors": actors}, indent=2))
        return 0
    print(f"{'bucket':>8}  {'topic':<32} {'part':>4} {'end':>10} {'committed':>10} "
          f"{'lag':>8}")
    for r in rows:
        if r["partition"] is None:
            print(f"{r['bucket_s']:>7g}s  {r['topic']:<32}    -  (topic does not exist yet)")
            continue
        print(f"{r['bucket_s']:>7g}s  {r['topic']:<32} {r['partition']:>4} {r['end']:>10} "
              f"{r['committed']:>10} {r['lag']:>8}")
    for a in actors:
        late = a["lateness"]
        print(f"{a['topic']} replica {a['replica']}: held {a['held']}, paused "
              f"{a['paused']}, republished {a['republished']}, lateness p50 "
              f"{late['p50_s'] * 1000:.1f} ms p99 {late['p99_s'] * 1000:.1f} ms max "
              f"{late['max_s'] * 1000:.1f} ms, early {late['early']}")
    return 0
