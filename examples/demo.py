"""athomic end to end on a laptop: immediate, delayed and priority messages.

    make demo                 (installs, then runs this)
    python examples/demo.py   (uses KAFKA_BOOTSTRAP, a running kafka-local, or starts one)

Publishes through a Ray actor handle to a real Apache Kafka, reads everything back with a
plain Kafka consumer, and prints what happened.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import ray
from _local import ensure_kafka, read_topic, stop_kafka
from pydantic import BaseModel

from athomic import (
    MessagePriority,
    MessagingSettings,
    ProducerFactory,
    PublishingOutcome,
    decode_record,
)


class UserCreated(BaseModel):
    user_id: str
    email: str


def main() -> None:
    bootstrap, started = ensure_kafka()
    ray.init(log_to_driver=False, configure_logging=False)
    run = uuid.uuid4().hex[:6]
    settings = MessagingSettings(
        bootstrap_servers=bootstrap, connection_name=f"demo-{run}",
        delay_topics={1: "athomic.demo.delay.1s", 4: "athomic.demo.delay.4s",
                      16: "athomic.demo.delay.16s"},
        pipeline=[{"stage": "serialize"}, {"stage": "compress", "min_size": 256}])
    t0 = time.monotonic()
    producer = ProducerFactory.create(settings)
    ready_s = time.monotonic() - t0
    events, notes, alerts, bulk = (f"demo.{name}.{run}" for name in
                                   ("user-events", "notifications", "alerts", "bulk"))
    try:
        # 1. immediate: a pydantic model and dicts, keyed by user
        outcomes = ray.get([
            producer.publish.remote(topic=events, key="user-1",
                                    message=UserCreated(user_id="user-1", email="a@b.c")),
            *[producer.publish.remote(topic=events, key=f"user-{i}",
                                      message={"user_id": f"user-{i}", "event": "login",
                                               "detail": "x" * 400})
              for i in range(2, 6)]])
        assert set(outcomes) == {PublishingOutcome.SUCCESS_DIRECT}

        # 2. delayed: exact due times, from 1.5 s to 9 s (the long ones cascade 4s -> 1s)
        delays = [1.5, 2.0, 3.0, 5.0, 9.0]
        delayed = ray.get([producer.publish.remote(
            topic=notes, key="user-1", message={"template": "follow_up", "after_s": d},
            delay_seconds=d) for d in delays])
        at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=6)
        delayed.append(ray.get(producer.publish.remote(
            topic=notes, key="user-2", message={"template": "reminder"}, deliver_at=at)))
        assert set(delayed) == {PublishingOutcome.SUCCESS_DELAYED}

        # 3. priority: HIGH alerts while a NORMAL bulk load is in flight
        bulk_items = [{"message": {"row": i, "pad": "y" * 900}, "key": str(i)}
                      for i in range(5000)]
        start = time.monotonic()
        bulk_refs = [producer.publish_batch.remote(bulk_items, topic=bulk) for _ in range(4)]
        high_latency = []
        for i in range(3):
            t = time.monotonic()
            ray.get(producer.publish.remote(topic=alerts, message={"alert": i},
                                            priority=MessagePriority.HIGH))
            high_latency.append(time.monotonic() - t)
        bulk_pending = len(ray.wait(bulk_refs, num_returns=4, timeout=0)[1])
        ray.get(bulk_refs)
        bulk_s = time.monotonic() - start

        # read everything back with a plain Kafka consumer
        got_events = read_topic(bootstrap, events, 5)
        got_alerts = read_topic(bootstrap, alerts, 3)
        got_notes = read_topic(bootstrap, notes, len(delayed), timeout=40)
    finally:
        ProducerFactory.shutdown(settings.connection_name)
        ray.shutdown()
        if started:
            stop_kafka()

    first = next(r for r in got_events if r.key == b"user-1")
    user = decode_record(first, settings, model=UserCreated)
    logins = [decode_record(r, settings) for r in got_events if r.key != b"user-1"]
    zstd = sum(1 for r in got_events if dict(r.headers).get("content-encoding") == b"zstd")
    lateness = []
    for r in got_notes:
        h = dict(r.headers)
        lateness.append((r.timestamp - int(h["athomic-deliver-at"])) / 1000)
    hops = sorted({int(dict(r.headers)["athomic-hop"]) for r in got_notes})
    ms = 1000
    print()
    print(f"athomic demo: Apache Kafka at {bootstrap}, local Ray "
          f"(actors ready in {ready_s:.1f}s)")
    print("-" * 78)
    print(f"immediate  5 events -> {events}")
    print(f"           read back {len(got_events)}; user-1 decoded as {user!r}")
    print(f"           {len(logins)} login events decoded, {zstd} of 5 compressed (zstd); "
          f"headers: {', '.join(sorted(k for k, _ in first.headers))}")
    print(f"delayed    {len(delayed)} notifications -> {notes} (delays 1.5..9 s, one by "
          "deliver_at)")
    print(f"           read back {len(got_notes)}; early: "
          f"{sum(1 for x in lateness if x < 0)}; stamped after due by "
          f"{min(lateness) * ms:.0f}..{max(lateness) * ms:.0f} ms; hops {hops}")
    print("priority   3 HIGH alerts while 4 x 5000 NORMAL messages were in flight")
    print(f"           HIGH acknowledged in {max(high_latency) * ms:.0f} ms at most; the "
          f"bulk load took {bulk_s * ms:.0f} ms")
    print(f"           ({bulk_pending} of 4 bulk batches still in flight after the last "
          "alert)")
    print(f"           read back {len(got_alerts)} alerts")
    print("-" * 78)
    ok = (len(got_events) == 5 and len(got_notes) == len(delayed) and len(got_alerts) == 3
          and min(lateness) >= 0)
    print("all delivered, none early" if ok else "SOMETHING WENT WRONG (see above)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
