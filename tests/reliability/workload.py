"""The workload: Ray tasks publishing direct and delayed messages through athomic.

Each task publishes batches of ``batch`` messages every ``interval_s`` for ``duration_s``
(or until ``stop_file`` exists), with caller-chosen message ids ``<tag>-<task>-<n>``. Its
keys are its own (``<tag>-t<task>-k<i>``), so the publish order of a key is the task's
sequence number. Every ``direct_every``-th message is direct; the others are due at
``t + delay`` (``deliver_at``, epoch seconds, so the due time is known exactly: the same
``ceil(ms)`` athomic computes), the delay cycling through ``delays`` per key. Every
``high_every``-th batch is HIGH. ``max_messages`` (per task) ends it early.

What each batch came to is appended to ``<out>/acks-<task>.jsonl`` as soon as its call
returned, one line per message, so it is known even when the task's process is lost:
``ok`` is true only for messages athomic acknowledged (for a batch that failed with
``PublishError``, its ``outcomes`` tell which).

This module is shipped to the Ray workers by value (``register_pickle_by_value``): the
cluster's workers do not have ``tests/`` on their path.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

DELAYS = (0.5, 1.5, 3.2, 6.5, 11.0, 17.5, 23.0, 35.0, 47.0, 59.5)
"""0.5 s to 60 s, over every bucket of {1, 4, 16} s, each at least 0.2 s away from a
boundary of the hop plan (so the release bucket of each is certain)."""


def default_spec(tag: str, finals: list[str], out: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tag": tag, "finals": finals, "out": str(out), "duration_s": 60.0, "batch": 10,
        "interval_s": 0.25, "keys": 6, "direct_every": 4, "high_every": 5,
        "delays": list(DELAYS), "call_timeout_s": 120.0, "stop_file": str(out / "stop"),
        "payload_bytes": 64, "max_messages": None,
    }
    spec.update(overrides)
    return spec


def publish(handle: Any, spec: dict[str, Any], task: int) -> dict[str, Any]:
    """The body of one workload task: publish until the end, log every outcome."""
    import ray

    out = Path(spec["out"]) / f"acks-{task}.jsonl"
    stop_file = Path(spec["stop_file"])
    finals: list[str] = spec["finals"]
    delays: list[float] = spec["delays"]
    keys: int = spec["keys"]
    pad = "x" * int(spec["payload_bytes"])
    n = batches = acked = failed = 0
    errors: dict[str, int] = {}
    end = time.time() + float(spec["duration_s"])
    most = spec["max_messages"]
    with out.open("a", encoding="utf-8") as log:
        while time.time() < end and not stop_file.exists() and (most is None or n < most):
            t0 = time.time()
            high = bool(spec["high_every"]) and batches % spec["high_every"] == \
                spec["high_every"] - 1
            items: list[dict[str, Any]] = []
            meta: list[tuple[str, str, str, int | None, int]] = []
            for _ in range(int(spec["batch"])):
                k = n % keys
                key = f"{spec['tag']}-t{task}-k{k}"
                topic = finals[(task + k) % len(finals)]
                mid = f"{spec['tag']}-{task}-{n}"
                item: dict[str, Any] = {"topic": topic, "key": key, "message_id": mid,
                                        "message": {"n": n, "task": task, "pad": pad}}
                if high:
                    item["priority"] = "high"
                due = None
                if not (spec["direct_every"] and n % spec["direct_every"] == 0):
                    deliver_at = t0 + delays[(n // keys) % len(delays)]
                    item["deliver_at"] = deliver_at
                    due = math.ceil(deliver_at * 1000)
                items.append(item)
                meta.append((mid, key, topic, due, n))
                n += 1
            batches += 1
            err = None
            try:
                ray.get(handle.publish_batch.remote(items), timeout=spec["call_timeout_s"])
                ok = [True] * len(items)
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                cause = cause if isinstance(cause, BaseException) else exc
                outcomes = getattr(cause, "outcomes", None)
                ok = [o is not None for o in outcomes] if outcomes else [False] * len(items)
                err = f"{type(cause).__name__}: {' '.join(str(cause).split())[:160]}"
                errors[type(cause).__name__] = errors.get(type(cause).__name__, 0) + 1
            now = time.time()
            for (mid, key, topic, due, seq), good in zip(meta, ok, strict=True):
                log.write(json.dumps({
                    "id": mid, "key": key, "topic": topic, "due": due, "seq": seq,
                    "task": task, "high": high, "ok": good, "pub": round(t0 * 1000),
                    "ack": round(now * 1000), "err": None if good else err}) + "\n")
            log.flush()
            acked += sum(ok)
            failed += len(ok) - sum(ok)
            time.sleep(max(0.0, float(spec["interval_s"]) - (time.time() - t0)))
    return {"task": task, "published": n, "acked": acked, "failed": failed,
            "errors": errors}


def read_acks(out: Path) -> list[dict[str, Any]]:
    """Every line the tasks logged (a torn last line of a lost task is skipped)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(out.glob("acks-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def create_handle(conf: str) -> Any:
    """``ProducerFactory.create`` from the settings file, run as a Ray task on a chosen node:
    the actors it starts are placed near their creator when they can be."""
    from athomic import MessagingSettings, ProducerFactory

    return ProducerFactory.create(MessagingSettings.from_toml(conf))
