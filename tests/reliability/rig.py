"""The reliability rig: a real 3-broker Kafka, a real 3-node Ray cluster, athomic deployed
on them with ``athomic up``, a workload of Ray tasks, and the checker.

- Kafka: ``deploy/kafka/kafka_local.py``, 3 brokers (KRaft, RF 3, min.insync.replicas 2)
  on ports 21000-21002 (controllers 22000-22002), data under ``$ATHOMIC_RELIABILITY_DIR``
  (``/tmp/athomic-reliability``). Faults: kill -9, SIGSTOP/SIGCONT, restart of a broker.
- Ray: ``tests/integration/ray_cluster.py``, ``ray start --head`` plus two worker raylets
  (1 CPU each); this process joins it as a driver. A node is lost with kill -9 of its
  raylet; the cluster is started again for the next scenario when it lacks a node.
- One ``Run`` per scenario: its own connection, delay topics, final topics and dead-letter
  topic (names carry a random tag), a settings file, the workload's acknowledgements, the
  checker, and the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (ROOT / "deploy" / "kafka", ROOT / "tests" / "integration"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import kafka_local  # noqa: E402
import workload  # noqa: E402
from checker import Checker, analyze  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402

KAFKA_PORT = int(os.environ.get("ATHOMIC_RELIABILITY_KAFKA_PORT", "21000"))
WORK_DIR = Path(os.environ.get("ATHOMIC_RELIABILITY_DIR", "/tmp/athomic-reliability"))
BROKERS = 3
QUICK = os.environ.get("ATHOMIC_RELIABILITY_QUICK") == "1"
"""The short variant of the scenarios that offer one (6 and 10, the CI candidates): 30 s
of traffic, delays up to 11 s, the fault 10 s in."""
QUICK_DELAYS = [0.5, 1.5, 3.2, 6.5, 11.0]
BUCKETS = (1, 4, 16)
RAY_ENV = {
    # notice a lost node within seconds, not the default ~30 s
    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- Kafka -----------------------------------------------------------------------------------
class KafkaRig:
    """The 3-broker cluster and its faults; broker ``i`` is node id ``i``."""

    def __init__(self, port: int = KAFKA_PORT, data_dir: Path = WORK_DIR / "kafka") -> None:
        self.port = port
        self.data_dir = data_dir
        self.bootstrap = ""
        self._admin_client: Any = None

    def start(self) -> str:
        self.bootstrap = kafka_local.start(self.port, brokers=BROKERS, data_dir=self.data_dir)
        self.wait_healthy()
        return self.bootstrap

    def stop(self) -> None:
        for i in range(BROKERS):  # a stalled broker does not stop on SIGTERM
            self.signal(i, "CONT", quiet=True)
        kafka_local.stop(self.port, data_dir=self.data_dir)

    def pid(self, node: int) -> int | None:
        return kafka_local.node_pid(node, self.port, data_dir=self.data_dir)

    def signal(self, node: int, sig: str, *, quiet: bool = False) -> None:
        """KILL (kill -9, waits for the process to end), TERM, STOP (a stall), CONT."""
        try:
            kafka_local.node_stop(node, self.port, data_dir=self.data_dir, signal=sig)
        except RuntimeError:
            if not quiet:
                raise

    def restart(self, node: int) -> None:
        kafka_local.node_start(node, self.port, data_dir=self.data_dir)

    def restart_all(self) -> None:
        """Start every broker that is down, at once (one alone has no controller quorum,
        so starting them one after the other would wait for the first forever)."""
        down = [i for i in range(BROKERS) if self.pid(i) is None]
        with ThreadPoolExecutor(len(down) or 1) as pool:
            for future in [pool.submit(self.restart, i) for i in down]:
                future.result()

    def heal(self) -> None:
        """Every broker running and answering, every partition fully in sync."""
        for i in range(BROKERS):
            if self.pid(i) is not None:
                self.signal(i, "CONT", quiet=True)
        self.restart_all()
        self.wait_healthy()

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        if self._admin_client is None:
            self._admin_client = AdminClient({"bootstrap.servers": self.bootstrap,
                                              "log_level": 0})
        return self._admin_client

    def metadata(self, topics: list[str] | None = None) -> dict[str, dict[int, Any]]:
        meta = self._admin().list_topics(timeout=30)
        return {name: t.partitions for name, t in meta.topics.items()
                if topics is None or name in topics}

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        """Three brokers registered, every partition led and with all replicas in sync."""
        deadline = time.monotonic() + timeout_s
        why = ""
        while time.monotonic() < deadline:
            try:
                meta = self._admin().list_topics(timeout=10)
                lagging = [f"{name}/{p}" for name, t in meta.topics.items()
                           for p, part in t.partitions.items()
                           if part.leader < 0 or len(part.isrs) < len(part.replicas)]
                if len(meta.brokers) == BROKERS and not lagging:
                    return
                why = f"{len(meta.brokers)} brokers, not in sync: {lagging[:5]}"
            except Exception as exc:
                why = repr(exc)
            time.sleep(1)
        raise TimeoutError(f"Kafka not healthy after {timeout_s}s: {why}")

    def leaders(self, topic: str) -> dict[int, int]:
        return {p: part.leader for p, part in self.metadata([topic])[topic].items()}

    def coordinator(self, transactional_id: str) -> int:
        """The broker coordinating a transactional id (FindCoordinator, type 1)."""
        from aiokafka.admin import AIOKafkaAdminClient

        async def find() -> int:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                return int(await admin.find_coordinator(transactional_id, 1))
            finally:
                await admin.close()

        return asyncio.run(find())

    def create_topics(self, names: list[str], partitions: int = 3) -> None:
        from confluent_kafka.admin import NewTopic

        admin = self._admin()  # kept alive until its futures are done
        futures = admin.create_topics(
            [NewTopic(n, partitions, BROKERS) for n in names], operation_timeout=30)
        for future in futures.values():
            future.result()

    def add_partitions(self, topic: str, total: int) -> None:
        from confluent_kafka.admin import NewPartitions

        admin = self._admin()
        for future in admin.create_partitions(
                [NewPartitions(topic, total)], operation_timeout=30).values():
            future.result()


# --- Ray -------------------------------------------------------------------------------------
class RayRig:
    """The 3-node cluster, this process its driver; started again when it lost a node."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.cluster: RayCluster | None = None

    def ensure(self) -> RayCluster:
        import ray

        cluster = self.cluster
        if cluster is not None and len(cluster.alive_nodes()) == self.workers + 1 \
                and ray.is_initialized():
            return cluster
        self.stop()
        log("starting a Ray cluster (head + 2 workers)")
        cluster = RayCluster(workers=self.workers, cpus=1, env_vars=dict(RAY_ENV))
        cluster.start()
        self.cluster = cluster
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            os.environ.pop(name, None)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray.init(address=cluster.address, namespace="athomic-reliability",
                 log_to_driver=False, configure_logging=False)
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(workload)
        return cluster

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def node_ids(self) -> tuple[str, list[str]]:
        """(head, workers) node ids."""
        assert self.cluster is not None
        head = next(n.node_id() for n in self.cluster.nodes if n.head)
        workers = [n.node_id() for n in self.cluster.nodes if not n.head]
        assert head is not None
        return head, [w for w in workers if w is not None]


# --- one scenario ----------------------------------------------------------------------------
def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    return json.dumps(str(value))


@dataclass
class Run:
    """One scenario's connection, topics, settings file, workload and checker."""

    name: str
    kafka: KafkaRig
    ray_rig: RayRig
    republisher: dict[str, Any] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    started_ms: int = field(default_factory=now_ms)
    began: float = field(default_factory=time.monotonic)
    faults: list[tuple[str, int]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir = WORK_DIR / "runs" / f"{self.name}-{self.tag}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.acks_dir = self.dir / "acks"
        self.acks_dir.mkdir(exist_ok=True)
        self.conf = self.dir / "athomic.toml"
        self.connection = f"rel{self.tag}"
        self.buckets = {b: f"rel.{self.tag}.delay.{b}s" for b in BUCKETS}
        self.finals = [f"rel.{self.tag}.final.a", f"rel.{self.tag}.final.b"]
        self.dlq = f"rel.{self.tag}.dlq"
        self.checker: Checker | None = None
        self.acks: list[dict[str, Any]] = []
        self.workload_results: list[Any] = []

    # settings and deployment
    def rep_settings(self, **overrides: Any) -> dict[str, Any]:
        rep: dict[str, Any] = {
            "replicas": 2, "partitions": 3, "partition_refresh_s": 5, "ack_timeout_s": 10,
            "transaction_timeout_ms": 30000, "dead_letter_topic": self.dlq}
        rep.update(self.republisher)
        rep.update(overrides)
        return rep

    def write_config(self, **overrides: Any) -> Path:
        rep = self.rep_settings(**overrides)
        auth = rep.pop("auth", None)
        lines = [f'connection_name = "{self.connection}"',
                 f'bootstrap_servers = "{self.kafka.bootstrap}"', "", "[delay_topics]"]
        lines += [f'{b} = "{t}"' for b, t in self.buckets.items()]
        lines += ["", "[producer]", "request_timeout_ms = 10000",
                  "delivery_timeout_ms = 30000", "", "[lanes]", "high = 1", "normal = 2",
                  "", "[republisher]"]
        lines += [f"{k} = {_toml(v)}" for k, v in rep.items()]
        if auth is not None:
            lines += ["", "[republisher.auth]", f"primary = {_toml(auth['primary'])}",
                      f"keys = {_toml(auth['keys'])}"]
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    def settings(self) -> Any:
        from athomic import MessagingSettings

        return MessagingSettings.from_toml(self.conf)

    def athomic(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The ``athomic`` command, as a driver joining the cluster from this machine."""
        cluster = self.ray_rig.cluster
        assert cluster is not None
        return subprocess.run([sys.executable, "-m", "athomic", *args, "--address",
                               cluster.address], capture_output=True, text=True,
                              timeout=timeout, env=cluster.env, cwd=self.dir)

    def up(self, **overrides: Any) -> float:
        """``athomic up`` with the settings file (rewritten with ``overrides``); returns
        how long it took."""
        self.write_config(**overrides)
        began = time.monotonic()
        out = self.athomic("up", "--config", str(self.conf))
        took = time.monotonic() - began
        with (self.dir / "up.log").open("a") as up_log:
            up_log.write(out.stdout + out.stderr)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        log(f"athomic up ({overrides or 'initial'}) took {took:.1f}s")
        return took

    def handle(self) -> Any:
        from athomic import ProducerFactory

        return ProducerFactory.create(self.settings())

    def prepare(self, *, up: bool = True, **overrides: Any) -> None:
        """The final topics, the settings file, the actors (``athomic up``) and the checker
        (reading from before anything is published)."""
        self.ray_rig.ensure()
        self.kafka.heal()
        self.kafka.create_topics(self.finals)
        self.kafka.create_topics([self.dlq], partitions=1)
        self.write_config(**overrides)
        if up:
            self.up(**overrides)
        self.checker = Checker(self.kafka.bootstrap, [*self.finals, self.dlq]).start_reading()

    def delay_actors(self) -> dict[str, Any]:
        """name -> handle of this connection's DelayBucketActors."""
        import ray

        from athomic.actors.topology import NAMESPACE, actor_names

        return {n: ray.get_actor(n, namespace=NAMESPACE)
                for n in actor_names(self.connection, "delay")}

    def status(self) -> dict[str, Any]:
        from athomic.actors.topology import status

        return status(self.settings())

    def wait_healthy(self, timeout_s: float = 180.0) -> list[str]:
        """Until ``status`` says healthy (every actor alive and answering, every partition
        owned); returns the problems seen on the way."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                report = self.status()
            except Exception as exc:
                report = {"healthy": False, "problems": [repr(exc)]}
            if report["healthy"]:
                return seen
            for problem in report["problems"]:
                if problem not in seen:
                    seen.append(problem)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout_s}s: {report['problems']}")
            time.sleep(1)

    def kill_delay_actors(self) -> int:
        """``ray.kill(actor, no_restart=False)`` every DelayBucketActor (Ray restarts
        them); returns how many were killed."""
        import ray

        killed = 0
        for handle in self.delay_actors().values():
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=False)
                killed += 1
        return killed

    # the workload
    def start_workload(self, handle: Any, tasks: int = 3, nodes: list[str] | None = None,
                       **spec: Any) -> list[Any]:
        """``tasks`` Ray tasks publishing through ``handle`` (placed on ``nodes`` in
        turn, when given); returns their refs."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        full = workload.default_spec(self.tag, self.finals, self.acks_dir, **spec)
        remote = ray.remote(workload.publish)
        refs = []
        for i in range(tasks):
            options: dict[str, Any] = {"num_cpus": 0.1, "max_retries": 0}
            if nodes:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    nodes[i % len(nodes)], soft=False)
            refs.append(remote.options(**options).remote(handle, full, i))
        self.notes["workload"] = {k: v for k, v in full.items()
                                  if k not in ("tag", "finals", "out", "stop_file")}
        self.notes["workload"]["tasks"] = tasks
        log(f"workload started: {tasks} tasks, {full['duration_s']}s")
        return refs

    def finish_workload(self, refs: list[Any], timeout_s: float = 600) -> None:
        import ray

        for ref in refs:
            try:
                self.workload_results.append(ray.get(ref, timeout=timeout_s))
            except Exception as exc:  # a task lost with its node: its log says what it did
                self.workload_results.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        self.acks = workload.read_acks(self.acks_dir)
        log(f"workload done: {len(self.acks)} published, "
            f"{sum(1 for a in self.acks if a['ok'])} acknowledged")

    # faults
    def fault(self, what: str) -> int:
        at = now_ms()
        self.faults.append((what, at))
        log(f"fault: {what}")
        return at

    # the end
    def settle(self, *, timeout_s: float = 300.0, quiet_s: float = 5.0,
               expect_dlq: int = 0) -> None:
        """Wait until everything acknowledged can have been delivered: past the last due
        time, the delay topics' committed progress at their ends (lag 0), the checker at
        the last stable offset of every final partition, and ``quiet_s`` without a new
        record."""
        from athomic.actors.topology import undelivered

        checker = self.checker
        assert checker is not None
        last_due = max((a["due"] for a in self.acks if a["due"] is not None), default=0)
        wait = last_due / 1000 + 1 - time.time()
        if wait > 0:
            log(f"waiting {wait:.0f}s for the last due time")
            time.sleep(wait)
        expected = {a["id"] for a in self.acks if a["ok"]}
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            missing = len(expected - checker.seen_ids())
            try:
                # what still waits: records after the committed offsets, less those the
                # commits name as published (status's "lag" counts transaction markers)
                waiting = sum(asyncio.run(undelivered(
                    self.settings(), list(self.buckets.values()))).values())
            except Exception as exc:
                waiting = -1
                log(f"cannot count what waits: {exc!r}")
            caught_up = checker.caught_up()
            state = (f"missing {missing}, waiting in delay topics {waiting}, checker caught "
                     f"up {caught_up}, quiet {checker.quiet_for():.0f}s")
            if waiting == 0 and caught_up and checker.quiet_for() >= quiet_s and (
                    missing == 0 or time.monotonic() > deadline - quiet_s):
                break
            time.sleep(1)
        else:
            log(f"settle timed out: {state}")
        self.notes["settled"] = state
        log(f"settled: {state}")

    def figures(self, fault_start_ms: int | None = None, fault_end_ms: int | None = None,
                injected: set[str] | None = None) -> dict[str, Any]:
        assert self.checker is not None
        self.checker.stop()
        rep = self.settings().republisher
        delay_records = Checker(self.kafka.bootstrap, list(self.buckets.values())).read_all()
        figures = analyze(self.acks, self.checker.records, finals=self.finals,
                          dlq=self.dlq, buckets=sorted(self.buckets),
                          near_window_s=rep.near_window_s, linger_ms=rep.linger_ms,
                          fault_start_ms=fault_start_ms, fault_end_ms=fault_end_ms,
                          delay_records=delay_records, release_topics=self.buckets,
                          injected=injected)
        t0 = min((a["pub"] for a in self.acks), default=self.started_ms)
        parts: dict[str, list[int]] = {}
        for r in delay_records:  # per delay-topic partition: records, the first one's time
            row = parts.setdefault(f"{r.topic}/{r.partition}", [0, r.timestamp])
            row[0] += 1
            row[1] = min(row[1], r.timestamp)
        figures["delay_topic_records"] = {
            k: {"records": n, "first_s": round((first - t0) / 1000, 1)}
            for k, (n, first) in sorted(parts.items())}
        figures["faults"] = [(what, round((at - t0) / 1000, 1)) for what, at in self.faults]
        figures["checker_client_errors"] = dict(self.checker.errors)
        figures["workload_tasks"] = self.workload_results
        figures.update(self.notes)
        return figures

    def teardown(self) -> None:
        """Stop this run's actors (whatever state the scenario left them in)."""
        import ray

        if self.checker is not None and self.checker.is_alive():
            self.checker.stop()
        (self.acks_dir / "stop").touch()
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                from athomic import ProducerFactory

                ProducerFactory.shutdown(self.connection)


def kill_process(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_until(check: Callable[[], bool], timeout_s: float, what: str,
               every_s: float = 0.5) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(every_s)
    return time.monotonic() - began


@contextlib.contextmanager
def cleanup_dir(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- a scenario from start to figures ---------------------------------------------------------
Fault = Callable[["Run"], tuple[int | None, int | None]]
"""Injects a scenario's fault while the workload runs (blocking); returns when the fault
began and when it ended (epoch ms), for the recovery time."""


def drive(run: Run, fault: Fault, *, handle: Any = None, tasks: int = 3,
          nodes: list[str] | None = None, prepare: bool = True,
          injected: set[str] | None = None, settle_timeout_s: float = 300.0,
          **spec: Any) -> dict[str, Any]:
    """Prepare, publish, inject the fault, wait until everything can have arrived, count;
    the figures are written to ``tests/reliability/results/<name>.json``."""
    import results

    if prepare:
        run.prepare()
    handle = handle if handle is not None else run.handle()
    refs = run.start_workload(handle, tasks=tasks, nodes=nodes, **spec)
    try:
        fault_start, fault_end = fault(run)
    finally:
        run.finish_workload(refs)
    run.settle(timeout_s=settle_timeout_s)
    figures = run.figures(fault_start, fault_end, injected=injected)
    path = results.write(run.name, figures, time.monotonic() - run.began)
    log(f"figures in {path}:\n{summary(figures)}")
    return figures


def summary(f: dict[str, Any]) -> str:
    late = f.get("lateness_ms") or {}
    return (f"  acked {f['acked']} (direct {f['acked_direct']}, delayed {f['acked_delayed']}), "
            f"not acked {f['not_acked']} {f['not_acked_by_error']}\n"
            f"  delivered {f['delivered']}, lost {f['lost']}, duplicated delayed "
            f"{f['duplicated_delayed']} direct {f['duplicated_direct']}, early {f['early']}, "
            f"out of order {f['out_of_order']} (upstream {f['out_of_order_upstream']}, other "
            f"partition {f['out_of_order_other_partition']}, of {f['order_pairs_checked']} "
            f"pairs; cross-bucket {f['cross_bucket_inversions']}), dlq {f['dlq']}\n"
            f"  lateness ms p50 {late.get('p50')} p99 {late.get('p99')} max {late.get('max')} "
            f"(normal p99 {late.get('baseline_p99')}, {f['late_beyond_threshold']} late beyond "
            f"{late.get('threshold')}), disturbed {f['disturbed_s']}s, recovery "
            f"{f['recovery_s']}s, "
            f"longest ack gap {f['longest_ack_gap_s']}s, faults {f['faults']}")


def assert_bar(f: dict[str, Any], *, direct_duplicates: bool = False, dlq: int = 0) -> None:
    """0 lost, 0 duplicated, 0 early, 0 out of order, nothing unexpected in the DLQ."""
    problems = []
    if f["lost"]:
        problems.append(f"{f['lost']} acknowledged messages lost: {f['lost_ids'][:5]}")
    if f["duplicated_delayed"]:
        problems.append(f"{f['duplicated_delayed']} delayed messages delivered twice: "
                        f"{f['duplicated_delayed_ids'][:5]}")
    if f["duplicated_direct"] and not direct_duplicates:
        problems.append(f"{f['duplicated_direct']} direct messages delivered twice: "
                        f"{f['duplicated_direct_ids'][:5]}")
    if f["early"]:
        problems.append(f"{f['early']} delivered early: {f['early_ids'][:5]}")
    if f["out_of_order"]:
        problems.append(f"{f['out_of_order']} out of order within their release partition "
                        f"(e.g. {f['out_of_order_examples'][:1]})")
    if f["unknown_delivered"]:
        problems.append(f"{f['unknown_delivered']} unknown ids delivered: "
                        f"{f['unknown_ids'][:5]}")
    if f["dlq"] != dlq:
        problems.append(f"{f['dlq']} dead letters (expected {dlq}): {f['dlq_errors']}")
    if f["acked"] == 0 or f["acked_delayed"] == 0:
        problems.append("nothing acknowledged")
    assert not problems, "; ".join(problems)
