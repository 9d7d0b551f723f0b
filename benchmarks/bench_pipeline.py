"""Payload pipeline benchmark.

    python benchmarks/bench_pipeline.py            # micro + end to end (starts Kafka, Ray)
    python benchmarks/bench_pipeline.py --micro    # only the per-stage comparison

Part 1, per stage: MB/s of athomic's pipeline against calling orjson / zstandard / AESGCM
directly on the same data in the same run, and the overhead (pipeline time / direct time
- 1). The direct AES-GCM baseline includes what any caller must do too: a random nonce,
associated data of the same size, and nonce || ciphertext. Decode goes through the public
``decode_message`` (headers parsed, pipeline looked up), with octet-stream payloads for
the byte stages so JSON parsing is not counted twice.

Part 2, end to end: 64 KiB JSON messages through ProducerFactory -> Kafka with
compress + encrypt, inline vs on a StageActor pool of 2 replicas; messages/s and the
ratio. Uses KAFKA_BOOTSTRAP when set, else starts deploy/kafka/kafka-local on
ATHOMIC_BENCH_KAFKA_PORT (default 29192) and stops it afterwards.

Every figure is the median of --runs runs (default 5 for part 1, 3 for part 2).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import zstandard
from _bench import start_kafka
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from athomic import MessagingSettings, decode_message
from athomic.messages import H_CONTENT_TYPE, H_MESSAGE_ID
from athomic.pipeline import Pipeline, associated_data
from athomic.pipeline.serialize import _ORJSON_OPTS, _default

ROOT = Path(__file__).resolve().parent.parent
KEY = os.urandom(32)
KEY_B64 = base64.b64encode(KEY).decode()
WORDS = ('alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta', 'iota', 'kappa',
         'lambda', 'mu', 'nu', 'xi', 'omicron', 'pi', 'rho', 'sigma', 'tau', 'upsilon', 'phi',
         'chi', 'psi', 'omega', 'order', 'paid', 'shipped', 'refunded')
OCTET = "application/octet-stream"
PLAIN = MessagingSettings()
P_PLAIN = Pipeline.from_settings(PLAIN)


def json_payload(target: int, seed: int = 7) -> dict[str, Any]:
    """A realistic event batch of about ``target`` bytes of JSON (compresses ~3-5x)."""
    rnd = random.Random(seed)
    events: list[dict[str, Any]] = []
    doc = {"source": "bench", "events": events}
    while len(orjson.dumps(doc)) < target:
        events.append({
            "id": uuid.UUID(int=rnd.getrandbits(128)).hex,
            "user": f"user-{rnd.randrange(100_000)}",
            "amount": round(rnd.uniform(0, 1000), 2),
            "status": rnd.choice(WORDS[-4:]),
            "tags": rnd.sample(WORDS, 3),
            "note": " ".join(rnd.choice(WORDS) for _ in range(rnd.randrange(4, 16))),
        })
    return doc


def settings_with(*stages: dict[str, Any], **extra: Any) -> MessagingSettings:
    return MessagingSettings(pipeline=[{"stage": "serialize"}, *stages], **extra)


COMPRESS = {"stage": "compress", "level": 3, "min_size": 512}
ENCRYPT = {"stage": "encrypt", "keys": {"k1": KEY_B64}, "primary": "k1"}


def timed(fn: Callable[[], Any], min_time: float) -> float:
    """Seconds per call, calling ``fn`` for at least ``min_time``."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def compare(direct: Callable[[], Any], ours: Callable[[], Any], runs: int,
            min_time: float) -> tuple[float, float]:
    """Median seconds per call of each, runs interleaved so drift hits both alike."""
    d, o = [], []
    for _ in range(runs):
        d.append(timed(direct, min_time))
        o.append(timed(ours, min_time))
    return statistics.median(d), statistics.median(o)


def micro(runs: int, min_time: float) -> list[tuple[str, int, float, float]]:
    rows = []
    zc = zstandard.ZstdCompressor(level=3)
    zd = zstandard.ZstdDecompressor()
    aead = AESGCM(KEY)
    topic, key, mid = "orders.v1", b"user-12345", "0190a5d4-3c1e-7a2b-9c3d-4e5f60718293"
    for size in (64 * 1024, 1024 * 1024):
        obj = json_payload(size)
        data = orjson.dumps(obj, default=_default, option=_ORJSON_OPTS)
        n = len(data)
        json_hdrs = [(H_CONTENT_TYPE, b"application/json"), (H_MESSAGE_ID, mid.encode())]
        octet_hdrs = [(H_CONTENT_TYPE, OCTET.encode()), (H_MESSAGE_ID, mid.encode())]

        # serialize
        d, o = compare(lambda obj=obj: orjson.dumps(obj, default=_default,
                                                     option=_ORJSON_OPTS),
                       lambda obj=obj: P_PLAIN.serialize(obj), runs, min_time)
        rows.append(("serialize (orjson) encode", n, d, o))
        d, o = compare(lambda data=data: orjson.loads(data),
                       lambda data=data, h=json_hdrs: decode_message(data, h, PLAIN),
                       runs, min_time)
        rows.append(("serialize (orjson) decode", n, d, o))

        # compress
        s_z = settings_with(COMPRESS)
        p_z = Pipeline.from_settings(s_z)

        def z_ours(data: bytes = data, p: Pipeline = p_z) -> Any:
            return p.encode(data, topic=topic, key=key, message_id=mid, content_type=OCTET)

        d, o = compare(lambda data=data: zc.compress(data), z_ours, runs, min_time)
        rows.append(("compress (zstd -3) encode", n, d, o))
        enc = z_ours()
        frame = enc.value
        z_hdrs = octet_hdrs + enc.headers
        d, o = compare(lambda f=frame: zd.decompress(f),
                       lambda f=frame, h=z_hdrs, s=s_z: decode_message(f, h, s),
                       runs, min_time)
        rows.append(("compress (zstd -3) decode", n, d, o))

        # encrypt
        s_e = settings_with(ENCRYPT)
        p_e = Pipeline.from_settings(s_e)
        aad = associated_data(cipher=b"aes-256-gcm", key_id=b"k1", topic=topic.encode(),
                              key=key, message_id=mid.encode(), content_type=OCTET.encode(),
                              codings=b"")

        def e_direct(data: bytes = data, aad: bytes = aad) -> bytes:
            nonce = os.urandom(12)
            return nonce + aead.encrypt(nonce, data, aad)

        def e_ours(data: bytes = data, p: Pipeline = p_e) -> Any:
            return p.encode(data, topic=topic, key=key, message_id=mid, content_type=OCTET)

        d, o = compare(e_direct, e_ours, runs, min_time)
        rows.append(("encrypt (aes-256-gcm) encode", n, d, o))
        enc = e_ours()
        sealed = enc.value or b""
        e_hdrs = octet_hdrs + enc.headers
        d, o = compare(lambda v=sealed, aad=aad: aead.decrypt(v[:12], v[12:], aad),
                       lambda v=sealed, h=e_hdrs, s=s_e: decode_message(v, h, s),
                       runs, min_time)
        rows.append(("encrypt (aes-256-gcm) decode", n, d, o))

        # the whole chain, as configured in production
        s_ze = settings_with(COMPRESS, ENCRYPT)
        p_ze = Pipeline.from_settings(s_ze)
        aad_z = associated_data(cipher=b"aes-256-gcm", key_id=b"k1", topic=topic.encode(),
                                key=key, message_id=mid.encode(),
                                content_type=OCTET.encode(), codings=b"zstd")

        def ze_direct(data: bytes = data, aad: bytes = aad_z) -> bytes:
            nonce = os.urandom(12)
            return nonce + aead.encrypt(nonce, zc.compress(data), aad)

        def ze_ours(data: bytes = data, p: Pipeline = p_ze) -> Any:
            return p.encode(data, topic=topic, key=key, message_id=mid, content_type=OCTET)

        d, o = compare(ze_direct, ze_ours, runs, min_time)
        rows.append(("compress+encrypt encode", n, d, o))
        enc = ze_ours()
        ze_value = enc.value or b""
        ze_hdrs = octet_hdrs + enc.headers
        d, o = compare(
            lambda v=ze_value, aad=aad_z: zd.decompress(aead.decrypt(v[:12], v[12:], aad)),
            lambda v=ze_value, h=ze_hdrs, s=s_ze: decode_message(v, h, s), runs, min_time)
        rows.append(("compress+encrypt decode", n, d, o))
    return rows


def print_micro(rows: list[tuple[str, int, float, float]]) -> None:
    print(f"{'stage':32} {'payload':>9} {'direct MB/s':>12} {'athomic MB/s':>13} "
          f"{'overhead':>9} {'extra us':>9}")
    for name, n, d, o in rows:
        print(f"{name:32} {n / 1024:>7.0f}Ki {n / d / 1e6:>12.0f} {n / o / 1e6:>13.0f} "
              f"{(o / d - 1) * 100:>8.1f}% {(o - d) * 1e6:>9.1f}")


# --- end to end ------------------------------------------------------------------------------
def end_to_end(runs: int, messages: int, batch: int, in_flight: int
               ) -> dict[str, list[float]]:
    import ray

    from athomic import ProducerFactory

    bootstrap, stop_kafka = start_kafka()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    results: dict[str, list[float]] = {"inline": [], "actors x2": []}
    try:
        payloads = [json_payload(64 * 1024, seed=i) for i in range(16)]
        configs = {
            "inline": [COMPRESS, ENCRYPT],
            "actors x2": [{**COMPRESS, "placement": "actors", "replicas": 2},
                          {**ENCRYPT, "placement": "actors", "replicas": 2}],
        }
        handles = {}
        for name, stages in configs.items():
            conn = f"bench-{name.replace(' ', '')}-{uuid.uuid4().hex[:6]}"
            s = settings_with(*stages, bootstrap_servers=bootstrap, connection_name=conn,
                              producer={"max_request_size": 2 * 1024 * 1024})
            handles[name] = (conn, ProducerFactory.create(s))
        for run in range(runs + 1):  # run 0 warms up (topic creation, actor start)
            for name, (_, handle) in handles.items():
                topic = f"bench.pipeline.{name.replace(' ', '')}.{uuid.uuid4().hex[:6]}"
                ray.get(handle.publish.remote(topic=topic, message=payloads[0]))
                items = [{"topic": topic, "message": payloads[i % len(payloads)],
                          "key": f"k{i}"} for i in range(messages)]
                start = time.perf_counter()
                pending: list[Any] = []
                for lo in range(0, messages, batch):
                    if len(pending) >= in_flight:
                        ray.get(pending.pop(0))
                    pending.append(handle.publish_batch.remote(items[lo:lo + batch]))
                ray.get(pending)
                elapsed = time.perf_counter() - start
                if run:
                    results[name].append(messages / elapsed)
                    print(f"  run {run} {name:10} {messages / elapsed:8.0f} msg/s", flush=True)
        for conn, _ in handles.values():
            ProducerFactory.shutdown(conn)
    finally:
        ray.shutdown()
        stop_kafka()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="athomic payload pipeline benchmark")
    parser.add_argument("--micro", action="store_true", help="only the per-stage part")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--e2e-runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, zstandard {zstandard.__version__}, "
          f"orjson {orjson.__version__}, cpus {os.cpu_count()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print(f"Per stage (median of {args.runs} runs, >= {args.min_time}s each)")
    print_micro(micro(args.runs, args.min_time))
    if args.micro:
        return
    print(f"\nEnd to end: {args.messages} x 64 KiB JSON, compress+encrypt, publish_batch of "
          f"{args.batch}, {args.in_flight} batches in flight (median of {args.e2e_runs})")
    res = end_to_end(args.e2e_runs, args.messages, args.batch, args.in_flight)
    inline = statistics.median(res["inline"])
    actors = statistics.median(res["actors x2"])
    mb = 64 * 1024 / 1e6
    print(f"{'placement':12} {'msg/s':>8} {'MB/s (raw JSON)':>16}")
    print(f"{'inline':12} {inline:>8.0f} {inline * mb:>16.1f}")
    print(f"{'actors x2':12} {actors:>8.0f} {actors * mb:>16.1f}")
    print(f"ratio actors x2 / inline: {actors / inline:.2f}")


if __name__ == "__main__":
    main()
