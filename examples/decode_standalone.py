"""Decode athomic messages with nothing but zstandard and cryptography (and aiokafka to read
the records): an independent check of the wire format documented in docs/pipeline.md.

    python examples/decode_standalone.py --bootstrap 127.0.0.1:9092 --topic orders.v1 \
        --keys '{"k1": "<base64 key>"}' --count 10

Prints one JSON line per record: topic, key, message id, content type and the value
(a JSON value for application/json, a string for text/*, base64 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import sys
from typing import Any

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAX_OUTPUT = 64 * 1024 * 1024


def length_prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def aad_v1(cipher: bytes, key_id: bytes, topic: bytes, key: bytes | None, message_id: bytes,
           content_type: bytes, codings: bytes) -> bytes:
    """The associated data, exactly as the wire-format table lays it out."""
    return (b"athomic-aad-v1" + length_prefixed(cipher) + length_prefixed(key_id)
            + length_prefixed(topic)
            + (b"\x00" if key is None else b"\x01" + length_prefixed(key))
            + length_prefixed(message_id) + length_prefixed(content_type)
            + length_prefixed(codings))


def decode(topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
           keys: dict[str, bytes], max_output: int = MAX_OUTPUT) -> tuple[str, bytes]:
    """Return (content type, payload bytes) of one record."""
    h = {}
    for name, val in headers:  # Kafka allows repeats: the last one counts
        h[name] = val if val is not None else b""
    codings = [c.strip() for c in h.get("content-encoding", b"").decode().split(",")
               if c.strip()]
    content_type = h.get("content-type", b"")
    data = value
    for i in range(len(codings) - 1, -1, -1):
        coding = codings[i]
        if coding == "aes-256-gcm":
            if h.get("athomic-encryption") != b"aes-256-gcm":
                raise ValueError("athomic-encryption header does not say aes-256-gcm")
            key_id = h["athomic-key-id"]
            aad = aad_v1(b"aes-256-gcm", key_id, topic.encode(), key, h["message-id"],
                         content_type, ", ".join(codings[:i]).encode())
            data = AESGCM(keys[key_id.decode()]).decrypt(data[:12], data[12:], aad)
        elif coding == "zstd":
            size = zstandard.frame_content_size(data)
            if size > max_output:  # -1: unknown size; then max_output bounds the output
                raise ValueError(f"zstd frame declares {size} bytes")
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_output)
        else:
            raise ValueError(f"unknown content encoding {coding!r}")
    return content_type.decode(), data


def render(content_type: str, data: bytes) -> Any:
    base = content_type.split(";")[0].strip()
    if base == "application/json":
        return json.loads(data)
    if base.startswith("text/"):
        return data.decode("utf-8")
    return base64.b64encode(data).decode()


async def main() -> None:
    from aiokafka import AIOKafkaConsumer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--keys", default="{}", help='JSON: {"key id": "base64 key"}')
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    keys = {kid: base64.b64decode(k) for kid, k in json.loads(args.keys).items()}
    consumer = AIOKafkaConsumer(args.topic, bootstrap_servers=args.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None)
    await consumer.start()
    seen = 0
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while seen < args.count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    content_type, data = decode(r.topic, r.key, r.value, list(r.headers), keys)
                    h = dict(r.headers)
                    print(json.dumps({
                        "topic": r.topic, "key": None if r.key is None else r.key.decode(),
                        "message_id": h.get("message-id", b"").decode(),
                        "content_type": content_type, "value": render(content_type, data)}))
                    seen += 1
    finally:
        await consumer.stop()
    if seen < args.count:
        sys.exit(f"only {seen} of {args.count} records arrived")


if __name__ == "__main__":
    asyncio.run(main())
    # Independent means independent: athomic itself must not have been imported.
    assert not any(m == "athomic" or m.startswith("athomic.") for m in sys.modules)
