"""A real multi-node Ray cluster on this machine, started the way users start one.

``ray start --head`` and worker raylets ``ray start --address=<head>``, each a separate
node with its own ports (several raylets share one host only with distinct node-manager,
object-manager, agent, metrics and worker ports). Work goes in with ``ray job submit``
through the head's dashboard, or as a driver with ``--address``.

Each ``ray start`` runs in a new session, so a node's daemons (raylet, GCS, dashboard,
agents) share its process group; its workers (actors, job drivers) take groups of their
own, but carry their raylet's pid (``RAY_RAYLET_PID``). ``kill_node`` loses a node with
``kill -9`` of its raylet and of those workers; ``stop`` kills exactly this cluster's
processes. Never ``ray stop``: it stops every Ray on the machine, other tests' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER_PORTS = 200
"""Worker ports per raylet, below the kernel's ephemeral range (where free ports are
picked for everything else)."""


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _worker_port_base(nodes: int) -> int:
    """The first of ``nodes * WORKER_PORTS`` free ports, below the kernel's ephemeral range
    and above Kafka's and the local test Ray's default worker ports (10002-19999)."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
              .split())
    span = nodes * WORKER_PORTS
    for _ in range(50):
        base = random.randrange(20_000, max(low - span, 20_001), WORKER_PORTS)
        if all(_free(p) for p in range(base, base + span)):
            return base
    raise RuntimeError(f"no {span} free ports between 20000 and {low}")


@dataclass
class Node:
    pgid: int
    node_manager_port: int
    head: bool = False
    raylet: int | None = None
    """The raylet's pid once started (it stays known after the raylet was killed)."""

    def raylet_pid(self) -> int | None:
        """The pid of this node's raylet (found by its node-manager port)."""
        for pid in _pids_in_group(self.pgid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"raylet") and (
                    f"--node_manager_port={self.node_manager_port}".encode() in cmdline):
                return pid
        return None

    def node_id(self) -> str | None:
        pid = self.raylet_pid()
        if pid is None:
            return None
        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            if arg.startswith(b"--node_id="):
                return arg.split(b"=", 1)[1].decode()
        return None


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _workers_of(raylets: set[int]) -> list[int]:
    """Live processes started by these raylets (their environment names the raylet)."""
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marks.intersection(env) and int(entry) != os.getpid():
            found.append(int(entry))
    return found


@dataclass
class RayCluster:
    """``workers`` worker nodes besides the head, ``cpus`` CPUs each."""

    workers: int = 2
    cpus: int = 1
    env_vars: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    temp_dir: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    ip: str = ""

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process that talks to this cluster."""
        env = {**os.environ, **self.env_vars, "RAY_USAGE_STATS_ENABLED": "0",
               # this cluster is reachable only from this machine: no token needed
               "RAY_AUTH_MODE": "disabled"}
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        return env

    @property
    def address(self) -> str:
        """The GCS address, for drivers (``ray.init(address=...)``, ``--address``)."""
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The address ``ray job submit`` talks to."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> RayCluster:
        self.temp_dir = tempfile.mkdtemp(prefix="athomic-ray-", dir="/tmp")
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        base = _worker_port_base(self.workers + 1)
        try:
            self._start_node(["--head", f"--port={self.gcs_port}",
                              f"--dashboard-port={self.dashboard_port}",
                              "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                              f"--ray-client-server-port={client}"], base, head=True)
            self.ip = self._head_ip()
            for i in range(self.workers):
                self._start_node([f"--address={self.address}"],
                                 base + (i + 1) * WORKER_PORTS)
            self.wait_alive(self.workers + 1, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, args: list[str], worker_base: int, *, head: bool = False,
                    attempts: int = 2) -> None:
        """``ray start`` one node; a worker node that times out joining a busy machine's
        head is killed and started once more."""
        for attempt in range(1, attempts + 1):
            nm, om, agent, agent_grpc, runtime_env, metrics = free_ports(6)
            cmd = ["ray", "start", f"--num-cpus={self.cpus}", "--disable-usage-stats",
                   f"--temp-dir={self.temp_dir}", f"--node-manager-port={nm}",
                   f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
                   f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--runtime-env-agent-port={runtime_env}",
                   f"--metrics-export-port={metrics}", f"--min-worker-port={worker_base}",
                   f"--max-worker-port={worker_base + WORKER_PORTS - 1}",
                   "--object-store-memory=100000000", *args]
            proc = subprocess.Popen(cmd, env=self.env, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            node = Node(proc.pid, nm, head=head)
            self.nodes.append(node)
            out, _ = proc.communicate(timeout=180)
            if proc.returncode == 0:
                node.raylet = node.raylet_pid()
                return
            if head or attempt == attempts:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-1500:]}\n{self._logs()}")
            for pid in _pids_in_group(node.pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _logs(self, lines: int = 15) -> str:
        """The ends of the nodes' raylet and GCS logs (why a node did not start)."""
        out = []
        for log in sorted(Path(self.temp_dir).glob("session_*/logs/*")):
            if log.name.startswith(("raylet", "gcs_server")) and log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def _head_ip(self) -> str:
        """The address the head's GCS listens on (Ray picks the host's address)."""
        session = Path(self.temp_dir) / "session_latest" / "logs"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for log in session.glob("gcs_server*.out"):
                found = re.search(r"(\d+\.\d+\.\d+\.\d+):" + str(self.gcs_port),
                                  log.read_text(errors="replace"))
                if found:
                    return found.group(1)
            nodes = self.alive_nodes()
            if nodes:
                return str(nodes[0]["node_ip"])
            time.sleep(0.5)
        raise RuntimeError("cannot tell the head node's address")

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The nodes the GCS holds alive (through the dashboard's state API)."""
        url = f"{self.dashboard}/api/v0/nodes?limit=100&detail=true"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except OSError:
            return []
        return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def wait_alive(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.alive_nodes())} nodes alive, not {count}")
            time.sleep(0.5)

    def kill_node(self, node: Node) -> int:
        """``kill -9`` the node's raylet and every process it started (its workers, the
        actors among them): the node is lost, as when its machine fails. (Killing the
        raylet alone leaves its actors answering direct calls for a moment.)"""
        pid = node.raylet_pid()
        assert pid is not None, "the node's raylet is not running"
        for victim in [*_workers_of({pid}), pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        return pid

    def job(self, *entrypoint: str, working_dir: str | Path, env_vars: dict[str, str] |
            None = None, timeout_s: float = 300.0, wait: bool = True,
            submission_id: str | None = None) -> subprocess.CompletedProcess[str]:
        """``ray job submit`` (waiting for the job's end and its logs unless not ``wait``)."""
        cmd = ["ray", "job", "submit", "--address", self.dashboard,
               "--working-dir", str(working_dir)]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        if env_vars:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        if not wait:
            cmd.append("--no-wait")
        return subprocess.run([*cmd, "--", *entrypoint], env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)

    def job_status(self, submission_id: str) -> str:
        url = f"{self.dashboard}/api/jobs/{submission_id}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(json.loads(response.read())["status"])

    def job_logs(self, submission_id: str) -> str:
        url = f"{self.dashboard}/api/jobs/{submission_id}/logs"
        with urllib.request.urlopen(url, timeout=30) as response:
            return str(json.loads(response.read())["logs"])

    def wait_job(self, submission_id: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (status := self.job_status(submission_id)) in ("PENDING", "RUNNING"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} still {status}")
            time.sleep(0.5)
        return status

    def stop(self) -> None:
        """Kill this cluster's processes (and only them), remove its temp dir."""
        raylets = {n.raylet for n in self.nodes if n.raylet is not None}
        for _ in range(3):
            pids = [pid for node in self.nodes for pid in _pids_in_group(node.pgid)]
            pids += _workers_of(raylets)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
