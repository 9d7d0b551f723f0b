"""A driver submitted with ``ray job submit`` to the multi-node cluster: publishes direct
and delayed messages with caller-chosen ids through ``ProducerFactory.create`` until
``STOP_FILE`` exists, then prints one ``RESULT {json}`` line: the ids acknowledged, the
time each batch was acknowledged (a batch is ``BATCH`` consecutive numbers), and the ids
that failed.

The settings come from ``ATHOMIC_CONFIG``, read again whenever the actors went away or run
other settings (``athomic up`` replaced them): a driver built from the same file finds
the actors ``up`` made.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ray

from athomic import (
    AthomicError,
    MessagingSettings,
    ProducerClosedError,
    ProducerFactory,
    PublishError,
)

CONFIG = os.environ["ATHOMIC_CONFIG"]
FINAL = os.environ["FINAL_TOPIC"]
STOP = os.environ["STOP_FILE"]
TAG = os.environ["TAG"]
BATCH = 10


def connect(deadline: float) -> Any:
    """A handle from the current settings file, waiting while ``up`` replaces actors."""
    while True:
        try:
            return ProducerFactory.create(MessagingSettings.from_toml(CONFIG))
        except AthomicError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for the actors: {' '.join(str(exc).split())[:160]}", flush=True)
            time.sleep(0.5)


def main() -> dict[str, Any]:
    ray.init(log_to_driver=False)
    handle = connect(time.monotonic() + 120)
    acked: list[str] = []
    acked_at: dict[int, float] = {}  # first number of a batch -> when acknowledged
    failed: list[str] = []
    reconnects = 0
    n = 0
    print("PUBLISHING", flush=True)
    end = time.monotonic() + 240
    while not os.path.exists(STOP) and time.monotonic() < end:
        items, first = [], n
        for _ in range(BATCH):
            message: dict[str, Any] = {"message": {"n": n}, "key": f"k{n % 13}",
                                       "message_id": f"{TAG}-{n}"}
            if n % 3:
                message["delay_seconds"] = 0.5 + (n % 12) * 0.5
            items.append(message)
            n += 1
        ids = [m["message_id"] for m in items]
        try:
            ray.get(handle.publish_batch.remote(items, topic=FINAL))
            acked += ids
            acked_at[first] = time.time()
        except PublishError as exc:
            cause = getattr(exc, "cause", exc)  # the actor's own error, out of Ray's
            outcomes = getattr(cause, "outcomes", None) or [None] * len(ids)
            acked += [i for i, o in zip(ids, outcomes, strict=True) if o is not None]
            failed += [i for i, o in zip(ids, outcomes, strict=True) if o is None]
            acked_at[first] = time.time()
        except (ProducerClosedError, AthomicError, ray.exceptions.RayActorError,
                ray.exceptions.RayTaskError) as exc:
            # the actors were replaced (or their node lost): not acknowledged
            failed += ids
            print(f"batch failed: {type(exc).__name__}", flush=True)
            handle = connect(time.monotonic() + 120)
            reconnects += 1
        time.sleep(0.1)
    return {"acked": acked, "acked_at": acked_at, "failed": failed,
            "reconnects": reconnects}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()), flush=True)
