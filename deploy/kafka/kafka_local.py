"""kafka-local from Python: start, stop and find the project's local Apache Kafka.

The one place tests, benchmarks and examples turn ``deploy/kafka/kafka-local`` into a
bootstrap string (the script prints it as its last line). ``KAFKA_BOOTSTRAP`` wins over
everything: then nothing is started or stopped.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "kafka-local"


def _run(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


def _where(port: int | None, data_dir: str | Path | None) -> list[str]:
    args = [] if port is None else ["--port", str(port)]
    return args + ([] if data_dir is None else ["--dir", str(data_dir)])


def start(port: int | None = None, *, brokers: int = 1,
          data_dir: str | Path | None = None) -> str:
    """Start (or find running) a local cluster; returns its bootstrap servers."""
    try:
        out = _run("start", "--brokers", str(brokers), *_where(port, data_dir))
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"kafka-local start failed:\n{exc.stderr[-3000:]}") from None
    return out.stdout.strip().splitlines()[-1]


def stop(port: int | None = None, *, data_dir: str | Path | None = None) -> None:
    _run("stop", *_where(port, data_dir), check=False, timeout=120)


def status(port: int | None = None, *, data_dir: str | Path | None = None) -> str | None:
    """The bootstrap servers of a running local cluster, or None."""
    out = _run("status", *_where(port, data_dir), check=False, timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else None


def ensure(port: int | None = None) -> tuple[str, bool]:
    """``KAFKA_BOOTSTRAP``, a running local broker, or one started now. The second value
    is True when this call started it (the caller may stop it)."""
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        return existing, False
    running = status(port)
    if running:
        return running, False
    return start(port), True


def node_stop(node: int, port: int, *, data_dir: str | Path | None = None,
              signal: str = "KILL") -> None:
    """Signal one broker of a cluster: KILL (kill -9, waits for it to die), TERM, STOP
    (a stall), CONT."""
    try:
        _run("node-stop", "--node", str(node), "--signal", signal, *_where(port, data_dir),
             timeout=120)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"kafka-local node-stop failed:\n{exc.stderr[-2000:]}") from None


def node_start(node: int, port: int, *, data_dir: str | Path | None = None) -> None:
    """Start one broker again (its data kept); returns once it answers."""
    try:
        _run("node-start", "--node", str(node), *_where(port, data_dir), timeout=180)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"kafka-local node-start failed:\n{exc.stderr[-2000:]}") from None


def node_pid(node: int, port: int, *, data_dir: str | Path | None = None) -> int | None:
    out = _run("node-pid", "--node", str(node), *_where(port, data_dir), check=False,
               timeout=30)
    return int(out.stdout.strip()) if out.returncode == 0 else None
