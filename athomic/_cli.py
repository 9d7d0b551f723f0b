"""The ``athomic`` command (also ``python -m athomic``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import Any

from athomic import __version__
from athomic.actors.delay_bucket import DelayBucketActor
from athomic.actors.topology import DELAY, NAMESPACE, actor_names
from athomic.errors import AthomicError
from athomic.republisher import dlq
from athomic.republisher.topics import progress
from athomic.settings import MessagingSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="athomic", description="Ray-native event publishing to Apache Kafka")
    parser.add_argument("--version", action="version", version=f"athomic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_republisher(sub)
    _add_dlq(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "republisher":
        return _republisher(args)
    if args.command == "dlq":
        return _dlq(args)
    parser.error(f"unknown command {args.command}")
    return 2


# --- athomic republisher run|status: the republisher without a driver, and its state ------
def _add_republisher(sub: Any) -> None:
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


def _republisher(args: argparse.Namespace) -> int:
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
    topics = args.topic or list(settings.delay_topics.values())
    replicas = args.replicas or settings.republisher.replicas
    generation = time.time_ns() // 1_000_000
    workers = [DelayBucketActor(settings, t, args.replica, replicas, generation=generation,
                                autostart=False) for t in topics]
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


def _status(settings: MessagingSettings, args: argparse.Namespace) -> int:
    rows = asyncio.run(progress(settings))
    actors: list[dict[str, Any]] = []
    if args.ray_address:
        import ray

        ray.init(address=args.ray_address, log_to_driver=False)
        names = actor_names(settings.connection_name, DELAY)
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


# --- athomic dlq replay: dead letters back into delivery ----------------------------------
def _add_dlq(sub: Any) -> None:
    dead = sub.add_parser("dlq", help="the dead-letter topic")
    cmds = dead.add_subparsers(dest="dlq_command", required=True)
    replay = cmds.add_parser(
        "replay", help="send dead letters back into delivery (exactly once; each is "
                       "replayed once, however often this runs)")
    replay.add_argument("--config", required=True, help="athomic TOML settings file")
    replay.add_argument("--limit", type=int, default=None, help="at most this many")
    replay.add_argument("--dry-run", action="store_true",
                        help="say what would be replayed, send nothing")
    replay.add_argument("--json", action="store_true", help="print JSON")


def _dlq(args: argparse.Namespace) -> int:
    try:
        settings = MessagingSettings.from_toml(args.config)
        report = asyncio.run(dlq.replay(settings, limit=args.limit, dry_run=args.dry_run))
    except AthomicError as exc:
        print(f"athomic: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would replay" if report.dry_run else "replayed"
    print(f"{verb}: {report.delivered} to their final topics, {report.delayed} back into "
          f"delay topics; {len(report.left)} left in "
          f"{settings.republisher.dead_letter_topic}")
    for line in report.left:
        print(f"  left {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
