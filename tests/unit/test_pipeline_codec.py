"""Pipeline encode/decode without a broker: round trips, tampering, keys, bombs, batches."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from athomic import (
    CompressionError,
    DecryptionError,
    MessagingSettings,
    PipelineError,
    decode_message,
    decode_record,
)
from athomic.actors.stage import StageActor
from athomic.messages import (
    H_BOUND_KEY,
    H_BOUND_TOPIC,
    H_CONTENT_ENCODING,
    H_CONTENT_TYPE,
    H_ENCRYPTION,
    H_KEY_ID,
    H_MESSAGE_ID,
    MessagePriority,
    PublishRequest,
    new_message_id,
)
from athomic.pipeline import EncodeItem, Pipeline, StageWork
from athomic.strategies import DirectPublishStrategy

KEY1 = base64.b64encode(os.urandom(32)).decode()
KEY2 = base64.b64encode(os.urandom(32)).decode()
COMPRESS = {"stage": "compress", "level": 3, "min_size": 64}
ENCRYPT = {"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k1"}
ARMOR = {"stage": "custom", "name": "b64", "path": "pipeline_codecs:Base64Codec"}
XOR = {"stage": "custom", "name": "xor", "path": "pipeline_codecs:XorCodec",
       "options": {"mask": 7}}


def make(*stages: dict[str, Any]) -> MessagingSettings:
    return MessagingSettings(pipeline=[{"stage": "serialize"}, *stages])


class Record:
    """What a consumer gets: topic, key, value, headers (as aiokafka gives them)."""

    def __init__(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]]) -> None:
        self.topic, self.key, self.value, self.headers = topic, key, value, tuple(headers)


def publish(s: MessagingSettings, message: Any, *, topic: str = "orders.v1",
            key: bytes | None = b"user-1") -> Record:
    """What ProducerHandle + ProducerActor do to a message, minus the network."""
    pipe = Pipeline.from_settings(s)
    value, content_type, schema = pipe.serializer.dumps(message)
    request = PublishRequest(topic=topic, value=value, key=key, headers=[],
                             content_type=content_type, schema=schema,
                             priority=MessagePriority.NORMAL, deliver_at=None,
                             message_id=new_message_id(), published_at=0.0)
    direct = DirectPublishStrategy()
    encoded = pipe.encode(value, topic=request.topic, key=key,
                          message_id=request.message_id, content_type=content_type)
    record = direct.build(request, encoded, request.topic)
    return Record(record.topic, record.key, record.value, record.headers)


def header(record: Record, name: str) -> bytes | None:
    return dict(record.headers).get(name)


def with_header(record: Record, name: str, value: bytes | None) -> Record:
    headers = [(k, v) for k, v in record.headers if k != name]
    if value is not None:
        headers.append((name, value))
    return Record(record.topic, record.key, record.value, headers)


# --- round trips ---------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=6),
    max_leaves=40)
payloads = (json_values.filter(lambda v: not isinstance(v, str) and v is not None)
            | st.binary(max_size=3000)
            | st.text(max_size=2000)
            | st.builds(lambda n, c: {"blob": c * n}, st.integers(0, 3000),
                        st.sampled_from(["a", "xyz", "\u00e9"])))
STAGE_CHOICES = [(), (COMPRESS,), (ENCRYPT,), (COMPRESS, ENCRYPT), (XOR,),
                 (COMPRESS, XOR, ENCRYPT, ARMOR), (COMPRESS, ENCRYPT, ARMOR)]
PIPELINES = [make(*stages) for stages in STAGE_CHOICES]


@hsettings(max_examples=150, deadline=None,
           suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads, which=st.integers(0, len(PIPELINES) - 1),
       key=st.none() | st.binary(max_size=20), topic=st.from_regex(r"[a-z][a-z0-9._-]{0,30}",
                                                                   fullmatch=True))
def test_round_trip_any_payload_any_stages(payload: Any, which: int, key: bytes | None,
                                          topic: str) -> None:
    s = PIPELINES[which]
    record = publish(s, payload, topic=topic, key=key)
    assert decode_message(record.value, record.headers, s) == payload
    assert decode_record(record, s) == payload
    assert decode_message(record.value, record.headers, s, topic=topic, key=key) == payload
    applied = [c.strip() for c in (header(record, H_CONTENT_ENCODING) or b"").decode()
               .split(",") if c.strip()]
    configured = [st_.name for st_ in Pipeline.from_settings(s).stages]
    assert all(c in configured for c in applied)
    assert [c for c in configured if c in applied] == applied  # in pipeline order
    if "aes-256-gcm" in configured:
        assert "aes-256-gcm" in applied and header(record, H_KEY_ID) == b"k1"
        assert header(record, H_BOUND_TOPIC) == topic.encode()
        assert header(record, H_BOUND_KEY) == key


def test_consumer_with_another_stage_list_decodes() -> None:
    producer = make(COMPRESS, ENCRYPT)
    consumer = make({"stage": "encrypt", "keys": {"k1": KEY1, "k0": KEY2},
                     "primary": "k0"})  # no compress stage, other primary: still decodes
    payload = {"text": "hello " * 500}
    record = publish(producer, payload)
    assert header(record, H_CONTENT_ENCODING) == b"zstd, aes-256-gcm"
    assert decode_message(record.value, record.headers, consumer) == payload
    assert decode_message(publish(make(COMPRESS), payload).value,
                          publish(make(COMPRESS), payload).headers, make()) == payload


def test_compression_skipped_when_small_or_not_smaller() -> None:
    s = make({"stage": "compress", "min_size": 512})
    small = publish(s, {"a": "b" * 100})
    assert header(small, H_CONTENT_ENCODING) is None
    noise = publish(s, os.urandom(4000))  # incompressible: the frame would be larger
    assert header(noise, H_CONTENT_ENCODING) is None
    big = publish(s, {"a": "b" * 4000})
    assert header(big, H_CONTENT_ENCODING) == b"zstd"
    assert len(big.value or b"") < 200


def test_pipeline_headers_from_caller_are_dropped() -> None:
    s = make(COMPRESS)
    pipe = Pipeline.from_settings(s)
    value, content_type, schema = pipe.serializer.dumps({"small": 1})
    request = PublishRequest(
        topic="t", value=value, key=None,
        headers=[(H_CONTENT_ENCODING, b"gzip"), (H_KEY_ID, b"forged"), ("x-mine", b"kept")],
        content_type=content_type, schema=schema, priority=MessagePriority.NORMAL,
        deliver_at=None, message_id=new_message_id(), published_at=0.0)
    record = DirectPublishStrategy().build(request, pipe.encode(value, topic="t", key=None,
                                                                message_id="m"), request.topic)
    names = [k for k, _ in record.headers]
    assert H_CONTENT_ENCODING not in names and H_KEY_ID not in names and "x-mine" in names


# --- tampering -----------------------------------------------------------------------------
def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_every_bit_flip_in_nonce_ciphertext_and_tag_is_refused() -> None:
    s = make(COMPRESS, ENCRYPT)
    record = publish(s, {"amount": 125, "to": "acct-9", "memo": "x" * 40})
    value = record.value or b""
    assert len(value) > 12 + 16
    for bit in range(len(value) * 8):  # nonce, ciphertext and tag, every single bit
        bad = Record(record.topic, record.key, flip(value, bit), list(record.headers))
        with pytest.raises(DecryptionError):
            decode_message(bad.value, bad.headers, s)
    with pytest.raises(DecryptionError):
        decode_message(value[:-1], record.headers, s)  # truncated tag
    with pytest.raises(DecryptionError, match="shorter than nonce and tag"):
        decode_message(value[:20], record.headers, s)


@pytest.mark.parametrize("name", [H_BOUND_TOPIC, H_BOUND_KEY, H_MESSAGE_ID, H_CONTENT_TYPE,
                                  H_KEY_ID, H_ENCRYPTION])
def test_every_bit_flip_in_bound_headers_is_refused(name: str) -> None:
    s = make(COMPRESS, ENCRYPT)
    record = publish(s, {"amount": 125, "memo": "y" * 100})
    original = header(record, name)
    assert original
    for bit in range(len(original) * 8):
        bad = with_header(record, name, flip(original, bit))
        with pytest.raises(DecryptionError):
            decode_message(bad.value, bad.headers, s)
    with pytest.raises(DecryptionError):  # removing it does not help either
        bad = with_header(record, name, None)
        decode_message(bad.value, bad.headers, s)


def test_tampered_codings_are_refused() -> None:
    s = make(XOR, ENCRYPT)
    record = publish(s, {"memo": "z" * 100})
    assert header(record, H_CONTENT_ENCODING) == b"xor, aes-256-gcm"
    for forged in (b"aes-256-gcm", b"zstd, aes-256-gcm", b"b64, aes-256-gcm",
                   b"xor, xor, aes-256-gcm"):
        bad = with_header(record, H_CONTENT_ENCODING, forged)
        with pytest.raises(PipelineError):
            decode_message(bad.value, bad.headers, s)


def test_bound_key_presence_is_authenticated() -> None:
    s = make(ENCRYPT)
    keyless = publish(s, {"a": 1}, key=None)
    assert header(keyless, H_BOUND_KEY) is None
    forged = with_header(keyless, H_BOUND_KEY, b"")
    with pytest.raises(DecryptionError):
        decode_message(forged.value, forged.headers, s)
    empty_key = publish(s, {"a": 1}, key=b"")
    assert header(empty_key, H_BOUND_KEY) == b""
    assert decode_record(empty_key, s) == {"a": 1}


def test_record_moved_to_another_topic_or_key_is_refused() -> None:
    s = make(COMPRESS, ENCRYPT)
    record = publish(s, {"a": 1}, topic="payments.v1", key=b"acct-1")
    moved_topic = Record("audit.v1", record.key, record.value, list(record.headers))
    moved_key = Record(record.topic, b"acct-2", record.value, list(record.headers))
    keyless = Record(record.topic, None, record.value, list(record.headers))
    for bad in (moved_topic, moved_key, keyless):
        with pytest.raises(DecryptionError):
            decode_record(bad, s)
    with pytest.raises(DecryptionError, match=r"encrypted for topic 'payments\.v1'"):
        decode_message(record.value, record.headers, s, topic="audit.v1")
    with pytest.raises(DecryptionError):
        decode_message(record.value, record.headers, s, key="acct-2")
    # Rewriting the bound headers to match the new place does not help: the AAD differs.
    rewritten = with_header(with_header(moved_topic, H_BOUND_TOPIC, b"audit.v1"),
                            H_BOUND_KEY, record.key)
    with pytest.raises(DecryptionError, match="authentication failed"):
        decode_record(rewritten, s)
    # The documented trade-off: the 3-argument form trusts the (authenticated) bound
    # headers, so a record copied whole to another topic still decodes there.
    assert decode_message(moved_topic.value, moved_topic.headers, s) == {"a": 1}


# --- keys ----------------------------------------------------------------------------------
def test_wrong_key_and_unknown_key_id_and_no_keys() -> None:
    producer = make(ENCRYPT)
    record = publish(producer, {"secret": "s3cr3t"})
    same_id_other_key = make({"stage": "encrypt", "keys": {"k1": KEY2}, "primary": "k1"})
    with pytest.raises(DecryptionError, match="authentication failed") as info:
        decode_message(record.value, record.headers, same_id_other_key)
    unknown = make({"stage": "encrypt", "keys": {"k2": KEY2}, "primary": "k2"})
    with pytest.raises(DecryptionError, match="unknown key id 'k1'") as info2:
        decode_message(record.value, record.headers, unknown)
    with pytest.raises(DecryptionError, match="no encrypt stage with keys"):
        decode_message(record.value, record.headers, make())
    for exc in (info.value, info2.value):
        assert exc.stage == "encrypt"
        assert exc.message_id == header(record, H_MESSAGE_ID).decode()  # type: ignore[union-attr]
        text = f"{exc} {exc!r} {exc.args}"
        for secret in (KEY1, KEY2, base64.b64decode(KEY1).hex(), base64.b64decode(KEY2).hex()):
            assert secret not in text


def test_key_rotation() -> None:
    before = make({"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k1"})
    after = make({"stage": "encrypt", "keys": {"k1": KEY1, "k2": KEY2}, "primary": "k2"})
    only_new = make({"stage": "encrypt", "keys": {"k2": KEY2}, "primary": "k2"})
    old = publish(before, {"n": "old"})
    new = publish(after, {"n": "new"})
    assert header(old, H_KEY_ID) == b"k1" and header(new, H_KEY_ID) == b"k2"
    assert decode_record(old, after) == {"n": "old"}  # old key id still decrypts
    assert decode_record(new, after) == {"n": "new"}
    assert decode_record(new, only_new) == {"n": "new"}
    with pytest.raises(DecryptionError, match="unknown key id 'k1'"):
        decode_record(old, only_new)  # once k1 is retired, its messages are unreadable


# --- bounded decompression -----------------------------------------------------------------
def zstd_frame_declaring(size: int, blocks: int = 1, declare: bool = True) -> bytes:
    """A zstd frame (RFC 8878) made by hand: single-segment with an 8-byte content size
    field when ``declare``, else a 1 MiB window and no size; then ``blocks`` RLE blocks of
    128 KiB zeros each (4 bytes per block)."""
    # declared: FCS field of 8 bytes, single segment; else a window descriptor of 2^20
    header = (bytes([0b1110_0000]) + struct.pack("<Q", size) if declare
              else bytes([0b0000_0000, (20 - 10) << 3]))
    block_size = 128 * 1024
    out = bytearray(struct.pack("<I", 0xFD2FB528) + header)
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        out += (last | (1 << 1) | (block_size << 3)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


def compressed_record(frame: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    return frame, [(H_CONTENT_ENCODING, b"zstd"), (H_CONTENT_TYPE,
                                                   b"application/octet-stream")]


def test_frame_declaring_1_gib_is_refused_without_allocating() -> None:
    frame = zstd_frame_declaring(1 << 30)
    assert zstandard.get_frame_parameters(frame).content_size == 1 << 30
    value, headers = compressed_record(frame)
    tracemalloc.start()
    try:
        with pytest.raises(CompressionError, match="declares 1073741824 bytes"):
            decode_message(value, headers, make())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_frame_of_undeclared_size_is_read_in_bounded_steps() -> None:
    limit = 4 << 20
    s = make({"stage": "compress", "max_output_size": limit})
    bomb = zstd_frame_declaring(0, blocks=8192, declare=False)  # 1 GiB of zeros in 32 KiB
    assert len(bomb) < 40_000
    value, headers = compressed_record(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(CompressionError, match="undeclared size produces over"):
            decode_message(value, headers, s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit
    # the same construction under the bound decodes
    small = zstd_frame_declaring(0, blocks=8, declare=False)
    assert decode_message(*compressed_record(small), s) == b"\x00" * (8 * 128 * 1024)


def test_default_bound_is_64_mib_and_configurable() -> None:
    at_limit = zstd_frame_declaring(64 << 20)
    with pytest.raises(CompressionError, match="declares 67108865"):
        decode_message(*compressed_record(zstd_frame_declaring((64 << 20) + 1)), make())
    # a frame that lies about its size is corrupt, not a way past the bound
    with pytest.raises(CompressionError, match="corrupt"):
        decode_message(*compressed_record(at_limit), make())
    tight = make({"stage": "compress", "max_output_size": 1000})
    data = zstandard.ZstdCompressor().compress(b"a" * 1001)
    with pytest.raises(CompressionError, match="over the bound of 1000"):
        decode_message(*compressed_record(data), tight)


def test_corrupt_trailing_and_garbage_frames() -> None:
    good = zstandard.ZstdCompressor().compress(b"hello world " * 100)
    for bad, problem in [(b"not zstd at all", "not a zstd frame"),
                         (good + good, "corrupt"),
                         (good[:-3], "corrupt"),
                         (zstd_frame_declaring(0, blocks=2, declare=False) + b"xx",
                          "bytes after")]:
        with pytest.raises(CompressionError, match=problem) as info:
            decode_message(*compressed_record(bad), make())
        assert info.value.stage == "compress"


def test_trained_dictionary_by_id(tmp_path: Path) -> None:
    samples = [f'{{"user":"u{i}","event":"login","region":"eu-west-{i % 3}"}}'.encode()
               for i in range(500)]
    dict_path = tmp_path / "events.zdict"
    dict_path.write_bytes(zstandard.train_dictionary(4096, samples).as_bytes())
    with_dict = make({"stage": "compress", "min_size": 16, "dictionary": str(dict_path)})
    plain = make({"stage": "compress", "min_size": 16})
    payload = {"user": "u77", "event": "login", "region": "eu-west-1"}
    record = publish(with_dict, payload)
    assert header(record, H_CONTENT_ENCODING) == b"zstd"
    dict_id = with_dict.pipeline[1].dictionary_id  # type: ignore[union-attr]
    assert zstandard.get_frame_parameters(record.value).dict_id == dict_id
    assert decode_record(record, with_dict) == payload
    with pytest.raises(CompressionError, match=f"needs zstd dictionary {dict_id}"):
        decode_record(record, plain)
    reader = make({"stage": "compress", "decode_dictionaries": [str(dict_path)]})
    assert decode_record(record, reader) == payload


# --- batches, errors, StageActor placement -------------------------------------------------
def items_for(values: list[bytes], topic: str = "t") -> list[EncodeItem]:
    return [EncodeItem(v, topic, f"k{i}".encode(), f"m{i}", "application/json")
            for i, v in enumerate(values)]


class InProcessPool:
    """A StageRunner over plain StageActor objects: what StagePool does, without Ray."""

    def __init__(self, s: MessagingSettings, replicas: int) -> None:
        self.actors = [StageActor(s, i) for i in range(replicas)]
        self.calls = 0

    async def run(self, segment: int, batch: list[StageWork]) -> list[Any]:
        import pickle

        half = (len(batch) + 1) // 2
        out: list[Any] = []
        for actor, chunk in zip(self.actors, (batch[:half], batch[half:]), strict=False):
            self.calls += 1
            # a round trip through pickle, as a Ray call makes
            out += pickle.loads(pickle.dumps(actor.encode(segment, pickle.loads(
                pickle.dumps(chunk)))))
        return out


def test_actor_placement_gives_identical_bytes() -> None:
    stages = [{**COMPRESS, "placement": "actors", "replicas": 2}, XOR, ARMOR]
    placed = make(*stages)
    inline = make(COMPRESS, XOR, ARMOR)
    values = [os.urandom(50), b'{"a":"' + b"q" * 3000 + b'"}', b"", b"x" * 200]
    pool = InProcessPool(placed, 2)
    via_actors = asyncio.run(Pipeline.from_settings(placed).encode_batch(
        items_for(values), pool))
    direct = asyncio.run(Pipeline.from_settings(inline).encode_batch(items_for(values)))
    assert pool.calls == 2  # one call per replica for the whole batch
    assert [(e.value, e.headers) for e in via_actors] == [(e.value, e.headers)
                                                          for e in direct]


def test_actor_placement_of_encryption_decodes_the_same() -> None:
    placed = make({**COMPRESS, "placement": "actors", "replicas": 2},
                  {**ENCRYPT, "placement": "actors", "replicas": 2})
    values = [b'{"n":%d,"pad":"%s"}' % (i, b"p" * (i * 50)) for i in range(9)]
    pipe = Pipeline.from_settings(placed)
    assert pipe.segments == [("actors", 0, 2)]
    encoded = asyncio.run(pipe.encode_batch(items_for(values, "final.topic"),
                                            InProcessPool(placed, 2)))
    for i, e in enumerate(encoded):
        headers = [*e.headers, (H_MESSAGE_ID, f"m{i}".encode()),
                   (H_CONTENT_TYPE, b"application/json")]
        record = Record("final.topic", f"k{i}".encode(), e.value, headers)
        assert decode_record(record, placed) == {"n": i, "pad": "p" * (i * 50)}


def test_batch_error_names_index_stage_and_message() -> None:
    s = make({"stage": "custom", "name": "picky", "path": "pipeline_codecs:FailOn"})
    values = [b'"ok"', b'"ok"', b'"boom"', b'"boom"']
    with pytest.raises(PipelineError) as info:
        asyncio.run(Pipeline.from_settings(s).encode_batch(items_for(values)))
    exc = info.value
    assert (exc.index, exc.stage, exc.message_id) == (2, "picky", "m2")
    assert str(exc).startswith("message #2: picky stage: encode failed: RuntimeError: refused")
    placed = make({"stage": "custom", "name": "picky", "path": "pipeline_codecs:FailOn",
                   "placement": "actors"})
    with pytest.raises(PipelineError) as info:
        asyncio.run(Pipeline.from_settings(placed).encode_batch(
            items_for(values), InProcessPool(placed, 2)))
    assert (info.value.index, info.value.stage) == (2, "picky")


def test_tombstones_and_empty_values() -> None:
    s = make(COMPRESS, ENCRYPT)
    out = asyncio.run(Pipeline.from_settings(s).encode_batch(
        [EncodeItem(None, "t", b"k", "m0"), EncodeItem(b"", "t", b"k", "m1")]))
    assert out[0].value is None and out[0].headers == []
    assert out[1].value is not None and len(out[1].value) == 28  # nonce + tag
    assert decode_message(None, [], s) is None


# --- hostile records at the consumer ---------------------------------------------------------
def test_an_encrypting_consumer_refuses_plaintext_unless_migrating() -> None:
    """Downgrade: someone who can write to the topic but has no key writes plaintext with
    no content-encoding; a consumer whose settings encrypt must not take it."""
    forged = Record("payments", b"u1", b'{"amount": 1000000}',
                    [("content-type", b"application/json")])
    with pytest.raises(DecryptionError, match="not encrypted"):
        decode_message(forged.value, forged.headers, make(COMPRESS, ENCRYPT))
    with pytest.raises(DecryptionError, match="not encrypted"):
        decode_record(forged, make(COMPRESS, ENCRYPT))
    migrating = make(COMPRESS, {**ENCRYPT, "allow_plaintext": True})
    assert decode_record(forged, migrating) == {"amount": 1000000}
    real = publish(make(COMPRESS, ENCRYPT), {"amount": 1})
    assert decode_record(real, migrating) == {"amount": 1}  # encrypted ones still decrypt


def test_coding_chains_are_bounded_and_parsed_headers_are_not_kept() -> None:
    from athomic.pipeline import compose

    inner = zstandard.ZstdCompressor().compress(b"x" * 1000)
    outer = zstandard.ZstdCompressor().compress(inner)
    with pytest.raises(PipelineError, match="twice"):
        decode_message(outer, [("content-encoding", b"zstd, zstd")], make())
    many = ", ".join(f"c{i}" for i in range(9)).encode()
    with pytest.raises(PipelineError, match="more than 8"):
        decode_message(b"x", [("content-encoding", many)], make())
    body = ",".join(f"c{j}" for j in range(60000)).encode()
    tracemalloc.start()
    for i in range(256):  # 0.4 MB headers an attacker writes
        header = f"{i:03d},".encode() + body
        with pytest.raises(PipelineError):
            decode_message(b"x", [("content-encoding", header)], make())
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert current < 2 * 2**20
    assert len(compose._codings_cache) <= 64
