"""Pipeline settings: the stage union, ordering, key rings, secrets kept secret. No broker."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from athomic import ConfigurationError, MessagingSettings, SerializationError
from athomic.pipeline import Pipeline
from athomic.settings import CompressStageSpec, EncryptStageSpec


def b64key(seed: int | None = None) -> str:
    raw = os.urandom(32) if seed is None else bytes([seed]) * 32
    return base64.b64encode(raw).decode()


KEY1 = b64key()
KEY2 = b64key()


def settings(*stages: dict[str, Any], **extra: Any) -> MessagingSettings:
    return MessagingSettings(pipeline=[{"stage": "serialize"}, *stages], **extra)


def test_design_example_builds() -> None:
    s = settings({"stage": "compress", "codec": "zstd", "level": 3, "min_size": 512},
                 {"stage": "encrypt", "cipher": "aes-256-gcm", "keys": {"k1": KEY1},
                  "primary": "k1"})
    compress, encrypt = s.pipeline[1], s.pipeline[2]
    assert isinstance(compress, CompressStageSpec) and compress.level == 3
    assert isinstance(encrypt, EncryptStageSpec) and encrypt.primary == "k1"
    assert encrypt.key_ring() == {"k1": base64.b64decode(KEY1)}
    assert [st.name for st in Pipeline.from_settings(s).stages] == ["zstd", "aes-256-gcm"]


def test_toml_pipeline_tables(tmp_path: Path) -> None:
    path = tmp_path / "athomic.toml"
    path.write_text(f"""
bootstrap_servers = "127.0.0.1:9092"

[[pipeline]]
stage = "serialize"
codec = "orjson"

[[pipeline]]
stage = "compress"
level = 5
min_size = 100
placement = "actors"
replicas = 2

[[pipeline]]
stage = "encrypt"
primary = "k2"
keys = {{ k1 = "{KEY1}", k2 = "{KEY2}" }}
""")
    s = MessagingSettings.from_toml(path)
    assert [st.stage for st in s.pipeline] == ["serialize", "compress", "encrypt"]
    assert s.pipeline[1].placement == "actors" and s.pipeline[1].replicas == 2
    assert Pipeline.from_settings(s).segments == [("actors", 0, 1), ("inline", 1, 2)]


@pytest.mark.parametrize(("stages", "problem"), [
    ([{"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k1"}, {"stage": "compress"}],
     "puts 'encrypt' before 'compress'"),
    ([{"stage": "compress"}, {"stage": "compress"}], "more than one 'compress'"),
    ([{"stage": "encrypt", "keys": {"k1": "!!not base64!!"}, "primary": "k1"}],
     "key 'k1' is not valid base64"),
    ([{"stage": "encrypt", "keys": {"k1": base64.b64encode(b"x" * 16).decode()},
       "primary": "k1"}], "decodes to 16 bytes; aes-256-gcm needs 32"),
    ([{"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k9"}],
     "primary 'k9' is not a key id in the ring"),
    ([{"stage": "encrypt", "keys": {}, "primary": "k1"}], "at least one key"),
    ([{"stage": "encrypt", "keys": {"bad id!": KEY1}, "primary": "bad id!"}],
     "key id 'bad id!'"),
    ([{"stage": "encrypt", "cipher": "fernet", "keys": {"k1": KEY1}, "primary": "k1"}],
     "aes-256-gcm"),
    ([{"stage": "compress", "codec": "gzip"}], "zstd"),
    ([{"stage": "custom", "name": "zstd", "path": "x:y"}], "reserved"),
    ([{"stage": "custom", "name": "armor", "path": "not a path"}], "must look like"),
    ([{"stage": "custom", "name": "a", "path": "m:A"}, {"stage": "custom", "name": "a",
                                                         "path": "m:B"}], "unique"),
    ([{"stage": "compress", "placement": "actors", "replicas": 2},
      {"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k1", "placement": "actors",
       "replicas": 3}], "same replicas"),
    ([{"stage": "compress", "max_output_size": 0}], "max_output_size"),
])
def test_bad_pipelines_are_refused_clearly(stages: list[dict[str, Any]], problem: str
                                           ) -> None:
    with pytest.raises(ConfigurationError) as info:
        settings(*stages)
    text = str(info.value)
    assert problem in text
    for key in (KEY1, base64.b64decode(KEY1).hex()):
        assert key not in text
    # pydantic's own error holds the raw input: it must not ride along
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_serialize_must_come_first() -> None:
    with pytest.raises(ConfigurationError, match="exactly one 'serialize'"):
        MessagingSettings(pipeline=[{"stage": "compress"}, {"stage": "serialize"}])


def test_keys_never_echoed_in_repr_dump_or_pickle_repr() -> None:
    s = settings({"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k1"})
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump()),
                 repr(Pipeline.from_settings(s).stages)):
        assert KEY1 not in text
    clone = pickle.loads(pickle.dumps(s))  # actors receive settings by pickling
    assert clone.pipeline[1].key_ring() == {"k1": base64.b64decode(KEY1)}


def test_key_ring_from_file_and_env_merges(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    key3 = b64key()
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"k2": KEY2}))
    monkeypatch.setenv("TEST_ATHOMIC_KEYS", json.dumps({"k3": key3, "k1": KEY1}))
    s = settings({"stage": "encrypt", "keys": {"k1": KEY1}, "keys_file": str(keys_file),
                  "keys_env": "TEST_ATHOMIC_KEYS", "primary": "k3"})
    spec = s.pipeline[1]
    assert isinstance(spec, EncryptStageSpec)
    assert sorted(spec.key_ring()) == ["k1", "k2", "k3"]
    monkeypatch.delenv("TEST_ATHOMIC_KEYS")
    # read once, at construction: the env var is no longer needed (actors never read it)
    assert pickle.loads(pickle.dumps(s)).pipeline[1].key_ring()["k3"] == \
        base64.b64decode(key3)


def test_key_ring_conflicts_and_missing_sources(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"k1": KEY2}))
    with pytest.raises(ConfigurationError, match=r"'k1' from keys_file .* differs") as info:
        settings({"stage": "encrypt", "keys": {"k1": KEY1}, "keys_file": str(keys_file),
                  "primary": "k1"})
    assert KEY1 not in str(info.value) and KEY2 not in str(info.value)
    with pytest.raises(ConfigurationError, match="cannot read keys_file"):
        settings({"stage": "encrypt", "keys_file": str(tmp_path / "nope.json"),
                  "primary": "k1"})
    monkeypatch.delenv("NO_SUCH_ATHOMIC_KEYS", raising=False)
    with pytest.raises(ConfigurationError, match="NO_SUCH_ATHOMIC_KEYS is not set"):
        settings({"stage": "encrypt", "keys_env": "NO_SUCH_ATHOMIC_KEYS", "primary": "k1"})
    monkeypatch.setenv("BAD_ATHOMIC_KEYS", "k1=abc")
    with pytest.raises(ConfigurationError, match="not a JSON object"):
        settings({"stage": "encrypt", "keys_env": "BAD_ATHOMIC_KEYS", "primary": "k1"})


def test_pipeline_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATHOMIC_PIPELINE", json.dumps([
        {"stage": "serialize"}, {"stage": "compress", "level": 1},
        {"stage": "encrypt", "keys": {"k1": KEY1}, "primary": "k1"}]))
    s = MessagingSettings()
    assert [st.stage for st in s.pipeline] == ["serialize", "compress", "encrypt"]


def test_fingerprint_follows_key_material_without_exposing_it() -> None:
    def fp(key: str) -> str:
        return settings({"stage": "encrypt", "keys": {"k1": key},
                         "primary": "k1"}).fingerprint()

    assert fp(KEY1) == fp(KEY1)
    assert fp(KEY1) != fp(KEY2)
    assert KEY1 not in fp(KEY1)


def test_custom_stage_resolution_errors() -> None:
    with pytest.raises(ConfigurationError, match="cannot be imported"):
        Pipeline.from_settings(settings(
            {"stage": "custom", "name": "x", "path": "pipeline_codecs:Missing"}))
    with pytest.raises(ConfigurationError, match="no encode"):
        Pipeline.from_settings(settings(
            {"stage": "custom", "name": "x", "path": "pipeline_codecs:NotACodec"}))
    with pytest.raises(ConfigurationError, match="could not be built"):
        Pipeline.from_settings(settings(
            {"stage": "custom", "name": "x", "path": "pipeline_codecs:XorCodec",
             "options": {"nope": 1}}))


def test_dictionary_file_is_loaded_at_construction(tmp_path: Path) -> None:
    import zstandard

    samples = [json.dumps({"user": f"u{i}", "event": "login", "n": i}).encode()
               for i in range(400)]
    dict_path = tmp_path / "events.zdict"
    dict_path.write_bytes(zstandard.train_dictionary(2048, samples).as_bytes())
    s = settings({"stage": "compress", "dictionary": str(dict_path)})
    spec = s.pipeline[1]
    assert isinstance(spec, CompressStageSpec) and spec.dictionary_id
    assert set(spec.dictionaries) == {spec.dictionary_id}
    not_a_dict = tmp_path / "plain.bin"
    not_a_dict.write_bytes(b"just some bytes, not a trained dictionary")
    with pytest.raises(ConfigurationError, match="not a trained zstd dictionary"):
        settings({"stage": "compress", "dictionary": str(not_a_dict)})


@pytest.mark.parametrize(("codec", "good", "bad"), [
    ("bytes", b"\x00raw", "text"),
    ("str", "text", b"raw"),
    ("pydantic", None, {"a": 1}),
])
def test_strict_serialize_codecs(codec: str, good: Any, bad: Any) -> None:
    pipe = Pipeline.from_settings(MessagingSettings(pipeline=[{"stage": "serialize",
                                                                "codec": codec}]))
    if good is not None:
        assert pipe.serialize(good)[0] == (good if isinstance(good, bytes) else good.encode())
    with pytest.raises(SerializationError, match=f"the {codec} codec accepts only"):
        pipe.serialize(bad)
