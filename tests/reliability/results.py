"""Each scenario's figures as JSON under ``tests/reliability/results/`` (git-ignored), with
the machine they were measured on; ``python tests/reliability/results.py`` prints them as
the Markdown table of RELIABILITY.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in
                      Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem_kb = 0
    jars = sorted(p.name for p in (ROOT / "deploy" / "kafka" / ".lib").glob("kafka_2.13-*.jar"))
    versions = {}
    for name in ("ray", "aiokafka", "confluent_kafka"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", None) or (
                module.version()[0] if hasattr(module, "version") else None)
        except ImportError:
            versions[name] = None
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "kafka": jars[0].removeprefix("kafka_2.13-").removesuffix(".jar") if jars
            else None, **versions}


def write(scenario: str, figures: dict[str, Any], duration_s: float) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{scenario}.json"
    body = {"scenario": scenario,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(duration_s, 1), "machine": machine(), "figures": figures}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


COLUMNS = [("acked", "acked"), ("delivered", "delivered"), ("lost", "lost"),
           ("duplicated_delayed", "dup. delayed"), ("duplicated_direct", "dup. direct"),
           ("early", "early"), ("out_of_order", "out of order"), ("dlq", "DLQ")]


def render() -> str:
    rows = ["| scenario | " + " | ".join(h for _, h in COLUMNS)
            + " | lateness p50 / p99 / max (s) | recovery (s) | run (s) |",
            "|---" * (len(COLUMNS) + 4) + "|"]
    for path in sorted(RESULTS.glob("*.json")):
        body = json.loads(path.read_text())
        f = body["figures"]
        late = f.get("lateness_ms") or {}

        def sec(v: Any) -> str:
            return "-" if v is None else f"{v / 1000:.2f}"

        rows.append(f"| {body['scenario']} | " + " | ".join(str(f.get(k, "-"))
                                                         for k, _ in COLUMNS)
                    + f" | {sec(late.get('p50'))} / {sec(late.get('p99'))} / "
                      f"{sec(late.get('max'))} | {f.get('recovery_s', '-')} | "
                      f"{body['duration_s']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
