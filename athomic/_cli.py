"""The ``athomic`` command (also ``python -m athomic``).

One function adds each command's arguments, another runs it; ``COMMANDS`` maps a command
to the pair. A failure is one line on stderr (``athomic: ...``) and a non-zero exit;
``-v`` adds the traceback and the Kafka clients' own logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from athomic import __version__
from athomic._exporters import check_exporter
from athomic._kafka import AIOKAFKA
from athomic.actors import topology
from athomic.actors.delay_bucket import DelayBucketActor
from athomic.actors.topology import DELAY, NAMESPACE, actor_names
from athomic.errors import AthomicError, ConfigurationError
from athomic.pipeline import Pipeline
from athomic.republisher import dlq, ids
from athomic.republisher.topics import progress
from athomic.settings import MessagingSettings

THIRD_PARTY_LOGGERS = ("aiokafka", "kafka")
"""Quiet below CRITICAL unless ``-v``: the command says what failed, in one line."""
RAY_START_S = 120.0
_OUT = [sys.stdout]
"""Where the command's output goes (the process's stdout when the command started)."""


class Usage(Exception):
    """Raised when the command line lacks something it needs (exit 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="athomic", description="Ray-native event publishing to Apache Kafka")
    parser.add_argument("--version", action="version", version=f"athomic {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, Kafka clients included; tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    _, run = COMMANDS[args.command]
    _OUT[0] = stdout = sys.stdout
    try:
        return run(args)
    except Usage as exc:
        print(f"athomic: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("athomic: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            logging.getLogger("athomic").exception("athomic %s failed", args.command)
        print(f"athomic: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = stdout


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, AthomicError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- common arguments ------------------------------------------------------------------------
def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="athomic TOML settings file (default: $ATHOMIC_CONFIG)")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the Ray cluster: its GCS address host:port, or 'auto' "
                             "(default: $RAY_ADDRESS, else auto)")


def _settings(args: argparse.Namespace) -> MessagingSettings:
    path = args.config or os.environ.get("ATHOMIC_CONFIG")
    if not path:
        raise Usage("no settings file: pass --config or set ATHOMIC_CONFIG")
    return MessagingSettings.from_toml(path)


def _connect(args: argparse.Namespace) -> str:
    """Join the Ray cluster (never start one: actors made here would die with this
    process). Returns its address."""
    import ray

    if ray.is_initialized():  # called in-process, e.g. from a test
        return str(ray.get_runtime_context().gcs_address)
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith(("http://", "https://")):
        raise Usage(f"{address} is a dashboard address (for `ray job submit`); give the "
                    "cluster's GCS address (host:6379) or auto")
    _check_reachable(address)
    if not args.verbose:
        # A failed call nobody read (an actor stopped after another one's failure was
        # reported) is logged by Ray when collected; the command's one line says it all.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    try:
        ray.init(address=address, log_to_driver=False,
                 logging_level=logging.INFO if args.verbose else logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigurationError(f"cannot join the Ray cluster at {address}: {first}"
                                 ) from None
    if not args.verbose:
        # Ray warns about every detached actor in a placement group; athomic removes its
        # groups itself (down, or up once a layout is replaced).
        logging.getLogger("ray.actor").setLevel(logging.ERROR)
    sys.stdout = sys.stderr  # see _say
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        # Ray's own threads also write to the process's stdout (file descriptor 1, or
        # sys.__stdout__): the command's output gets a descriptor of its own, and 1 goes to
        # stderr, so `athomic status --json | jq` reads the report alone.
        _OUT[0].flush()
        own = os.dup(_OUT[0].fileno())
        os.dup2(sys.stderr.fileno(), _OUT[0].fileno())
        _OUT[0] = os.fdopen(own, "w", buffering=1)
    return str(ray.get_runtime_context().gcs_address)


def _check_reachable(address: str) -> None:
    """Ray waits minutes for a GCS that does not answer; a refused connection is known at
    once."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or address.startswith("ray://"):
        return  # auto, or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigurationError(f"cannot join the Ray cluster at {address}: "
                                 f"{exc.strerror or exc}") from None


def _say(line: str) -> None:
    """Write a line of the command's output. Ray prints cluster events (a node lost, an
    actor died) on the driver's stdout from a thread of its own: once Ray is joined,
    ``sys.stdout`` points at stderr and only the command's output goes to stdout."""
    print(line, file=_OUT[0], flush=True)


# --- athomic up: reconcile the cluster to the file ------------------------------------------
def _add_up(sub: Any) -> None:
    up = sub.add_parser(
        "up", help="create, replace or remove the connection's actors and topics so they "
                   "match the settings file (prints the plan first)")
    _add_config(up)
    _add_address(up)
    up.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    up.add_argument("--force", action="store_true",
                    help="remove delay buckets even while messages wait in them (they "
                         "stay in their topic until the bucket is configured again)")
    up.add_argument("--timeout", type=float, default=RAY_START_S,
                    help="seconds to wait for each step (default %(default)s)")


def _up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # Stage and exporter problems are settings problems: say so before touching anything.
    Pipeline.from_settings(settings)
    check_exporter(settings.telemetry)
    address = _connect(args)
    _say(f"athomic up: connection {settings.connection_name!r} (settings "
         f"{settings.fingerprint()}), Ray at {address}, Kafka at "
         f"{settings.bootstrap_servers}")
    plan = topology.read_plan(settings, timeout_s=min(args.timeout, 30.0))
    for line in plan.render():
        _say(line)
    if plan.stranded and not args.force:
        waiting = ", ".join(f"{topic} ({n})" for topic, n in plan.stranded)
        raise ConfigurationError(
            f"messages still wait in delay topics no longer configured: {waiting}; keep "
            "those buckets until they are delivered (athomic status shows their lag), or "
            "pass --force to leave the messages there")
    if not plan.changes:
        _say(f"No changes: connection {settings.connection_name!r} already matches "
             f"{args.config or os.environ.get('ATHOMIC_CONFIG')}.")
        return 0
    if args.dry_run:
        _say("Dry run: nothing changed.")
        return 0
    start = time.monotonic()
    topology.apply(settings, plan, progress=_say, timeout_s=args.timeout)
    _say(f"Applied in {time.monotonic() - start:.1f}s: connection "
         f"{settings.connection_name!r} matches the settings.")
    return 0


# --- athomic down: flush and remove the connection's actors ---------------------------------
def _add_down(sub: Any) -> None:
    down = sub.add_parser(
        "down", help="flush and remove the connection's actors (messages waiting in "
                     "delay topics stay there for the next up)")
    _add_config(down)
    down.add_argument("--connection", default=None,
                      help="the connection name (instead of --config)")
    _add_address(down)


def _down(args: argparse.Namespace) -> int:
    connection = args.connection or _settings(args).connection_name
    _connect(args)
    names = topology.actor_names(connection)
    if not names:
        _say(f"Nothing runs for connection {connection!r}.")
        return 0
    _say(f"athomic down: flushing and stopping {len(names)} actor(s) of connection "
         f"{connection!r}")
    start = time.monotonic()
    stopped = topology.teardown(connection)
    for name in stopped:
        _say(f"  - removed  {name}")
    left = topology.actor_names(connection)
    if left:
        raise ConfigurationError(f"still running after down: {', '.join(left)}")
    _say(f"Removed {len(stopped)} actor(s) in {time.monotonic() - start:.1f}s; messages "
         "waiting in delay topics are delivered after the next `athomic up`.")
    return 0


# --- athomic cancel: a delayed message by its id ---------------------------------------------
def _add_cancel(sub: Any) -> None:
    cancel = sub.add_parser(
        "cancel", help="cancel a delayed message by the message_id it was published with "
                       "(durable once this returns; no effect once it was delivered)")
    _add_config(cancel)
    cancel.add_argument("message_id", help="the message_id given to publish")


def _cancel(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.delay_topics:
        raise ConfigurationError("no delay_topics configured: nothing can be cancelled")
    asyncio.run(ids.record_cancel(settings, args.message_id, AIOKAFKA))
    _say(f"Cancelled {args.message_id!r}: if it is still waiting at its due time, it is "
         "not delivered.")
    return 0


# --- athomic status: health of the connection -----------------------------------------------
def _add_status(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="the connection's actors and delay-topic partitions; exits "
                       "non-zero when something is unhealthy")
    _add_config(status)
    _add_address(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--timeout", type=float, default=5.0,
                        help="seconds an actor may take to answer (default %(default)s)")


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _connect(args)
    report = topology.status(settings, timeout_s=args.timeout)
    if args.json:
        _say(json.dumps(report, indent=2, default=str))
    else:
        for line in _status_lines(report):
            _say(line)
    return 0 if report["healthy"] else 1


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _status_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"connection {report['connection']!r} (settings {report['fingerprint']})",
             "actors",
             f"  {'kind':<9} {'role':<40} {'node':<9} {'state':<12} {'restarts':>8}"]
    for a in report["actors"]:
        state = a["state"] or "?"
        if state == "ALIVE" and not a["responding"]:
            state = "UNRESPONSIVE"
        role = a["role"] + (f" [{a['slot']}]" if a["slot"] else "")
        lines.append(f"  {a['kind']:<9} {role:<40} {(a['node'] or '?')[:8]:<9} "
                     f"{state:<12} {a['restarts'] if a['restarts'] is not None else '?':>8}")
    if not report["actors"]:
        lines.append("  (none running)")
    roles = {a["name"]: f"replica {a['replica']} [{a['slot']}] on {(a['node'] or '?')[:8]}"
             for a in report["actors"] if a["kind"] == DELAY}
    if report["partitions"]:
        lines += ["delay topics",
                  f"  {'topic':<32} {'part':>4}  {'owner':<40} {'lag':>7} {'held':>6} "
                  f"{'p99 ms':>8} {'skew ms':>8}"]
        for p in report["partitions"]:
            if p["partition"] is None:
                lines.append(f"  {p['topic']:<32}    -  (topic does not exist)")
                continue
            owner = roles.get(p["owner"], p["owner"]) or f"none ({p['state'] or 'unowned'})"
            lines.append(f"  {p['topic']:<32} {p['partition']:>4}  {owner[:40]:<40} "
                         f"{p['lag']:>7} {p['held']:>6} {_ms(p['lateness_p99_ms']):>8} "
                         f"{_ms(p['clock_skew_ms']):>8}")
    dead = report["dlq"]
    if dead.get("exists") is not None:
        lines.append(f"dead letters: {dead['topic']} "
                     + (f"depth {dead['depth']}" if dead["exists"] else "(no topic yet)"))
    if report["healthy"]:
        lines.append("healthy")
    else:
        lines.append("unhealthy:")
        lines += [f"  {problem}" for problem in report["problems"]]
    return lines


# --- athomic republisher run|status: the republisher without a driver, and its state ------
def _add_republisher(sub: Any) -> None:
    rep = sub.add_parser("republisher", help="deliver delayed messages; show their state")
    cmds = rep.add_subparsers(dest="republisher_command", required=True)
    run = cmds.add_parser("run", help="run the republisher in this process until stopped")
    _add_config(run)
    run.add_argument("--topic", action="append", default=None,
                     help="only this delay topic (repeatable; default: all)")
    run.add_argument("--replica", type=int, default=0)
    run.add_argument("--replicas", type=int, default=None,
                     help="replicas per topic (default: republisher.replicas)")
    run.add_argument("--start-timeout", type=float, default=RAY_START_S,
                     help="seconds to claim the partitions before giving up "
                          "(default %(default)s)")
    status = cmds.add_parser("status", help="per-bucket lag, held messages and lateness")
    _add_config(status)
    status.add_argument("--ray-address", dest="address", default=None,
                        help="also ask the running DelayBucketActors (e.g. 'auto')")
    status.add_argument("--json", action="store_true", help="print JSON")


def _republisher(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.delay_topics:
        raise ConfigurationError("no delay_topics configured: nothing to republish")
    if args.republisher_command == "run":
        return asyncio.run(_run(settings, args))
    return _republisher_status(settings, args)


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
    # Until it runs, a failure to start is the one line this command ends with, not also
    # the loop's own warnings.
    quiet = logging.getLogger("athomic.republisher")
    level = quiet.level
    if not args.verbose:
        quiet.setLevel(logging.CRITICAL)
    tasks = [asyncio.create_task(w.run_forever()) for w in workers]
    try:
        # Say at once when it cannot start (brokers unreachable, a topic refused).
        started: asyncio.Future[Any] = asyncio.gather(
            *(w.ready(args.start_timeout) for w in workers))
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if started in done:
            started.result()
            quiet.setLevel(level)
            _say(f"republishing {', '.join(topics)} (replica {args.replica} of "
                  f"{replicas}); Ctrl-C stops")
            await stopping.wait()
        else:
            started.cancel()
        stopped.cancel()
    finally:
        for w in workers:
            w.republisher.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def _republisher_status(settings: MessagingSettings, args: argparse.Namespace) -> int:
    rows = asyncio.run(progress(settings))
    actors: list[dict[str, Any]] = []
    if args.address:
        import ray

        _connect(args)
        names = actor_names(settings.connection_name, DELAY)
        actors = ray.get([ray.get_actor(n, namespace=NAMESPACE).stats.remote()
                          for n in names])
    if args.json:
        _say(json.dumps({"partitions": rows, "actors": actors}, indent=2))
        return 0
    _say(f"{'bucket':>8}  {'topic':<32} {'part':>4} {'end':>10} {'committed':>10} "
          f"{'lag':>8}")
    for r in rows:
        if r["partition"] is None:
            _say(f"{r['bucket_s']:>7g}s  {r['topic']:<32}    -  (topic does not exist yet)")
            continue
        _say(f"{r['bucket_s']:>7g}s  {r['topic']:<32} {r['partition']:>4} {r['end']:>10} "
              f"{r['committed']:>10} {r['lag']:>8}")
    for a in actors:
        late = a["lateness"]
        _say(f"{a['topic']} replica {a['replica']}: held {a['held']}, paused "
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
    _add_config(replay)
    replay.add_argument("--limit", type=int, default=None, help="at most this many")
    replay.add_argument("--dry-run", action="store_true",
                        help="say what would be replayed, send nothing")
    replay.add_argument("--json", action="store_true", help="print JSON")


def _dlq(args: argparse.Namespace) -> int:
    settings = _settings(args)
    report = asyncio.run(dlq.replay(settings, limit=args.limit, dry_run=args.dry_run))
    if args.json:
        _say(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would replay" if report.dry_run else "replayed"
    _say(f"{verb}: {report.delivered} to their final topics, {report.delayed} back into "
          f"delay topics; {len(report.left)} left in "
          f"{settings.republisher.dead_letter_topic}")
    for line in report.left:
        _say(f"  left {line}")
    return 0


Command = tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "up": (_add_up, _up),
    "down": (_add_down, _down),
    "status": (_add_status, _status),
    "republisher": (_add_republisher, _republisher),
    "dlq": (_add_dlq, _dlq),
    "cancel": (_add_cancel, _cancel),
}
"""command -> (add its arguments to the subparsers, run it and return the exit code)."""


if __name__ == "__main__":
    sys.exit(main())
