"""Settings: sources, nesting, validation (pure, no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from athomic import ConfigurationError, MessagingSettings


def test_defaults_and_contract_fields() -> None:
    s = MessagingSettings()
    assert s.connection_name == "default"
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.delay_topics == {}
    assert s.producer.acks == "all" and s.producer.enable_idempotence
    assert [spec.stage for spec in s.pipeline] == ["serialize"]


def test_delay_topics_sorted_and_checked() -> None:
    s = MessagingSettings(delay_topics={60: "athomic.delay.1m", 1: "athomic.delay.1s"})
    assert list(s.delay_topics) == [1, 60]
    for bad in ({0: "t"}, {-1: "t"}, {1: "bad topic"}, {1: "same", 2: "same"}):
        with pytest.raises(ConfigurationError, match="delay_topics"):
            MessagingSettings(delay_topics=bad)


def test_env_vars_with_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATHOMIC_CONNECTION_NAME", "envconn")
    monkeypatch.setenv("ATHOMIC_PRODUCER__LINGER_MS", "12")
    monkeypatch.setenv("ATHOMIC_DELAY_TOPICS", '{"5": "d5"}')
    s = MessagingSettings()
    assert (s.connection_name, s.producer.linger_ms, s.delay_topics) == ("envconn", 12,
                                                                         {5.0: "d5"})
    assert MessagingSettings(connection_name="kw").connection_name == "kw"  # kwargs win


def test_from_toml_with_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "athomic.toml"
    path.write_text(
        'connection_name = "fromfile"\nbootstrap_servers = "h1:9092,h2:9092"\n'
        '[producer]\nlinger_ms = 3\n[lanes]\nhigh = 2\n'
        '[delay_topics]\n1 = "athomic.delay.1s"\n10 = "athomic.delay.10s"\n'
        '[[pipeline]]\nstage = "serialize"\ncodec = "orjson"\n')
    s = MessagingSettings.from_toml(path)
    assert s.connection_name == "fromfile"
    assert s.servers == ["h1:9092", "h2:9092"]
    assert s.lanes.high == 2 and s.producer.linger_ms == 3
    assert s.delay_topics == {1: "athomic.delay.1s", 10: "athomic.delay.10s"}
    monkeypatch.setenv("ATHOMIC_PRODUCER__LINGER_MS", "9")
    assert MessagingSettings.from_toml(path).producer.linger_ms == 9
    assert MessagingSettings.from_toml(path, connection_name="x").connection_name == "x"
    with pytest.raises(ConfigurationError, match="does not exist"):
        MessagingSettings.from_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize("kwargs, where", [
    ({"bootstrap_servers": ""}, "bootstrap_servers"),
    ({"bootstrap_servers": "nohostport"}, "bootstrap_servers"),
    ({"connection_name": "has space"}, "connection_name"),
    ({"producer": {"acks": 1}}, "producer"),
    ({"producer": {"linger_ms": -1}}, "producer.linger_ms"),
    ({"lanes": {"high": 0}}, "lanes.high"),
    ({"security": {"protocol": "SASL_SSL"}}, "security"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"pipeline": []}, "pipeline"),
])
def test_invalid_settings_name_the_field(kwargs: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        MessagingSettings(**kwargs)
    assert where in str(info.value)


def test_secrets_are_hidden_but_fingerprinted() -> None:
    a = MessagingSettings(security={"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                    "sasl_username": "u", "sasl_password": "hunter2"})
    b = MessagingSettings(security={"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                    "sasl_username": "u", "sasl_password": "other"})
    assert "hunter2" not in repr(a) and "hunter2" not in a.model_dump_json()
    assert a.fingerprint() != b.fingerprint()
    assert a.kafka_client_options()["sasl_plain_password"] == "hunter2"
    assert MessagingSettings().fingerprint() == MessagingSettings().fingerprint()


def test_a_toml_syntax_error_is_one_clear_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "athomic.toml"
    bad.write_text('connection_name = "orders"\n[republisher\nreplicas = 2\n')
    with pytest.raises(ConfigurationError, match="not valid TOML") as caught:
        MessagingSettings.from_toml(bad)
    assert "line 2" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_dotenv_and_a_secrets_directory_are_sources(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """How Kubernetes hands settings to a pod: a Secret mounted as a directory, one file per
    setting (the file name is the environment variable's)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "ATHOMIC_BOOTSTRAP_SERVERS").write_text("kafka-0:9092,kafka-1:9092")
    (secrets / "ATHOMIC_SECURITY").write_text(
        '{"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "svc", '
        '"sasl_password": "pw"}')
    env_file = tmp_path / ".env"
    env_file.write_text("ATHOMIC_CONNECTION_NAME=orders\nATHOMIC_BOOTSTRAP_SERVERS=x:1\n")
    s = MessagingSettings(_secrets_dir=secrets, _env_file=env_file)
    assert s.connection_name == "orders"  # from .env
    assert s.bootstrap_servers == "x:1"  # .env wins over the secrets directory
    assert s.security.sasl_password is not None
    assert s.security.sasl_password.get_secret_value() == "pw"
    monkeypatch.setenv("ATHOMIC_BOOTSTRAP_SERVERS", "from-env:9092")
    assert MessagingSettings(_secrets_dir=secrets).bootstrap_servers == "from-env:9092"
    monkeypatch.delenv("ATHOMIC_BOOTSTRAP_SERVERS")
    assert MessagingSettings(_secrets_dir=secrets).bootstrap_servers == \
        "kafka-0:9092,kafka-1:9092"


def test_keys_from_a_mounted_secret_directory(tmp_path: Path) -> None:
    import base64
    import os

    keys = tmp_path / "keys"
    keys.mkdir()
    raw = {kid: os.urandom(32) for kid in ("k1", "k2")}
    for kid, key in raw.items():
        (keys / kid).write_text(base64.b64encode(key).decode() + "\n")
    (keys / "..data").mkdir()  # what Kubernetes adds beside the files
    s = MessagingSettings(pipeline=[{"stage": "serialize"}, {
        "stage": "encrypt", "keys_dir": str(keys), "primary": "k2"}])
    spec = s.pipeline[1]
    assert spec.stage == "encrypt" and spec.key_ring() == raw  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="holds no key files"):
        MessagingSettings(pipeline=[{"stage": "serialize"}, {
            "stage": "encrypt", "keys_dir": str(keys / "..data"), "primary": "k1"}])
