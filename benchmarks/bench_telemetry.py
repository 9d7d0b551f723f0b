"""Telemetry overhead benchmark.

    python benchmarks/bench_telemetry.py [--runs 31] [--messages 1000] [--batches 5]

``publish_batch`` of ``--messages`` 1 KiB JSON messages through ProducerFactory -> real
Kafka, with the actors' telemetry off (``traces=False, metrics=False``) and on (traces and
metrics, ``exporter="file"``: every span and metric point is serialised to JSON and
appended to a file by the SDK's batch span processor and periodic metric reader, 1 s
export interval), in the same run, alternating which mode goes first so drift hits both
alike (each mode writes its own topic).

The caller has an active span in both modes (the handle captures ``traceparent`` either
way: propagation is not the part being switched). Each sample times ``--batches``
consecutive ``publish_batch`` calls (submit to last acknowledgement); the figure per mode
is the median of ``--runs`` samples, after one warm-up sample each. The overhead is given
two ways: the ratio of the two medians, and the median of the per-run ratios (each run
times both modes back to back, so this one cancels drift better).

First, in process (no Kafka, no Ray actors): the actor-side cost per message of building
the records with the recorder off, on (one span per batch), and with one SDK span per
message instead, which is what the design rejected (``--micro`` runs only this part).

Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local on
ATHOMIC_BENCH_KAFKA_PORT (default 49292) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from _bench import start_kafka


def event(i: int) -> dict[str, Any]:
    """A ~1 KiB JSON event."""
    doc: dict[str, Any] = {"id": uuid.UUID(int=i).hex, "type": "order.paid", "user": f"u-{i}",
                           "amount": i * 1.25, "items": [], "note": ""}
    while len(orjson.dumps(doc)) < 1000:
        doc["items"].append({"sku": f"sku-{len(doc['items'])}", "qty": 1, "price": 9.99})
    doc["note"] = "x" * (1024 - len(orjson.dumps(doc)))
    return doc


def micro(messages: int, runs: int) -> dict[str, float]:
    """In-process µs per message of the actor-side work, on the same 1 KiB requests: the
    recorder off and on (one span per batch), and the alternative design of one SDK span
    per message (start, inject into the headers, set partition/offset, end)."""
    import pickle
    from concurrent.futures import Future

    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from athomic import MessagingSettings
    from athomic._handle import ProducerHandle
    from athomic.context import HEADERS_GETTER, HEADERS_SETTER
    from athomic.messages import MessageHeaders, PublishingOutcome
    from athomic.pipeline import Encoded
    from athomic.settings import TelemetrySettings
    from athomic.strategies import DirectPublishStrategy
    from athomic.telemetry import Telemetry

    class Lane:  # a fake actor: keeps the requests the handle builds
        def __init__(self) -> None:
            self.calls: list[Any] = []
            self.publish_batch = self

        def remote(self, payload: Any) -> Any:
            self.calls.append(payload)
            return self

        def future(self) -> Future[Any]:
            return Future()

        def _get_local_state(self) -> None:
            return None

    lane = Lane()
    settings = MessagingSettings()
    handle = ProducerHandle(settings, {"high": [lane], "normal": [lane]})
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter(),
                                                   max_queue_size=100_000))
    with provider.get_tracer("caller").start_as_current_span("caller"):
        handle.publish_batch.remote([{"message": event(i), "key": f"k{i}"}
                                     for i in range(messages)], topic="bench")
    blob = pickle.dumps(lane.calls[0])
    direct = DirectPublishStrategy()
    meter = MeterProvider(metric_readers=[InMemoryMetricReader()])
    on = Telemetry(TelemetrySettings(), tracer_provider=provider, meter_provider=meter)
    off = Telemetry(TelemetrySettings(traces=False, metrics=False))
    tracer = provider.get_tracer("per-message")

    class Meta:
        partition, offset = 0, 1

    def recorder(tel: Telemetry) -> Callable[[list[Any]], None]:
        def run(requests: list[Any]) -> None:
            rec = tel.publishing(requests, [r.topic for r in requests], batch=True)
            prepared = [(direct.build(r, Encoded(r.value, []), r.topic),
                         PublishingOutcome.SUCCESS_DIRECT) for r in requests]
            rec.done(prepared, [Meta] * len(requests))
        return run

    def span_per_message(requests: list[Any]) -> None:
        spans = []
        for i, r in enumerate(requests):
            parent = propagate.extract(MessageHeaders(r.headers),
                                       getter=HEADERS_GETTER)
            span = tracer.start_span("publish bench", context=parent,
                                     kind=trace.SpanKind.PRODUCER,
                                     attributes={"messaging.system": "kafka",
                                                 "messaging.message.id": r.message_id})
            carrier = MessageHeaders()
            propagate.inject(carrier, context=trace.set_span_in_context(span, Context()),
                             setter=HEADERS_SETTER)
            keys = {k for k, _ in carrier.items()}
            requests[i] = r._replace(
                headers=[h for h in r.headers if h[0] not in keys] + carrier.items())
            spans.append(span)
        for r in requests:
            direct.build(r, Encoded(r.value, []), r.topic)
        for span in spans:
            span.set_attribute("messaging.destination.partition.id", "0")
            span.set_attribute("messaging.kafka.offset", 1)
            span.end()

    variants = {"recorder off": recorder(off), "recorder on (span per batch)": recorder(on),
                "span per message": span_per_message}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            requests = pickle.loads(blob)
            start = time.perf_counter()
            fn(requests)
            samples[name].append((time.perf_counter() - start) / messages * 1e6)
            provider.force_flush()
    provider.shutdown()
    meter.shutdown()
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="athomic telemetry overhead benchmark")
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--micro", action="store_true", help="only the in-process part")
    args = parser.parse_args()

    import ray
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from athomic import MessagingSettings, ProducerFactory

    items = [{"message": event(i), "key": f"user-{i % 97}"} for i in range(args.messages)]
    size = len(orjson.dumps(items[0]["message"]))
    print(f"python {sys.version.split()[0]}, ray {ray.__version__}, opentelemetry "
          f"{metadata.version('opentelemetry-sdk')}, cpus {os.cpu_count()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"In process, actor-side work per message (encode excluded), median of "
          f"{args.runs * 3} runs of {args.messages}:")
    for name, us in micro(args.messages, args.runs * 3).items():
        print(f"  {name:30} {us:6.2f} µs / message")
    if args.micro:
        return
    print(f"\npublish_batch of {args.messages} x {size} B JSON, {args.batches} batches per "
          f"sample, median of {args.runs} samples per mode\n")

    bootstrap, stop_kafka = start_kafka()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    out_dir = Path(tempfile.mkdtemp(prefix="athomic-bench-telemetry-"))
    telemetry_file = out_dir / "telemetry.jsonl"
    modes = {
        "off": {"traces": False, "metrics": False},
        "on": {"traces": True, "metrics": True, "exporter": "file",
               "file_path": str(telemetry_file), "metric_export_interval_s": 1.0},
    }
    handles: dict[str, tuple[str, Any]] = {}
    samples: dict[str, list[float]] = {m: [] for m in modes}
    caller = TracerProvider()
    caller.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    tracer = caller.get_tracer("bench")
    try:
        for mode, telemetry in modes.items():
            conn = f"bench-tel-{mode}-{uuid.uuid4().hex[:6]}"
            settings = MessagingSettings(bootstrap_servers=bootstrap, connection_name=conn,
                                         telemetry=telemetry)
            handles[mode] = (conn, ProducerFactory.create(settings))
        topics = {mode: f"bench.telemetry.{mode}.{uuid.uuid4().hex[:6]}" for mode in modes}
        order = list(handles)
        for run in range(args.runs + 1):  # run 0 warms up (topic, producers, JIT caches)
            for mode in order if run % 2 else order[::-1]:  # alternate who goes first
                handle, topic = handles[mode][1], topics[mode]
                with tracer.start_as_current_span("caller"):
                    start = time.perf_counter()
                    for _ in range(args.batches):
                        ray.get(handle.publish_batch.remote(items, topic=topic))
                    elapsed = time.perf_counter() - start
                if run:
                    samples[mode].append(elapsed)
                    rate = args.messages * args.batches / elapsed
                    print(f"  run {run} {mode:3} {elapsed * 1000 / args.batches:7.1f} ms "
                          f"per batch  {rate:8.0f} msg/s", flush=True)
        for conn, _ in handles.values():
            ProducerFactory.shutdown(conn)  # flushes the file exporter
    finally:
        ray.shutdown()
        stop_kafka()

    off = statistics.median(samples["off"]) / args.batches
    on = statistics.median(samples["on"]) / args.batches
    # Each run times both modes back to back: the ratio within a run cancels slow drift
    # (other load on the machine) better than the ratio of the two medians.
    paired = statistics.median(b / a for a, b in zip(samples["off"], samples["on"],
                                                       strict=True))
    lines = [json.loads(line) for line in telemetry_file.read_text().splitlines()]
    spans = sum(1 for line in lines if line["signal"] == "span")
    points = sum(1 for line in lines if line["signal"] == "metric")
    print(f"\n{'telemetry':10} {'ms / batch':>10} {'msg/s':>8}")
    print(f"{'off':10} {off * 1000:>10.1f} {args.messages / off:>8.0f}")
    print(f"{'on':10} {on * 1000:>10.1f} {args.messages / on:>8.0f}")
    print(f"overhead (median on / median off - 1): {(on / off - 1) * 100:+.1f}%")
    print(f"overhead (median of per-run on/off ratios - 1): {(paired - 1) * 100:+.1f}%")
    print(f"exported: {spans} spans, {points} metric points ({telemetry_file})")


if __name__ == "__main__":
    main()
