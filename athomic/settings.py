"""Settings: one ``MessagingSettings`` with a nested model per subsystem.

Sources, strongest first: keyword arguments, environment variables (``ATHOMIC_...``, nested
with ``__``, e.g. ``ATHOMIC_PRODUCER__LINGER_MS=10``), a TOML file (``from_toml``), defaults.
Settings are data, read once; library code receives them and never reads the environment.
"""

from __future__ import annotations

import contextvars
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigurationError, InvalidTopicError
from .messages import validate_topic

_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "athomic_toml_path", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecuritySettings(_Section):
    """How to reach the brokers: passed to the Kafka clients unchanged."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER",
                            "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _sasl_complete(self) -> SecuritySettings:
        if self.protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security.protocol={self.protocol} needs security.sasl_mechanism")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
                self.sasl_username is None or self.sasl_password is None):
            raise ValueError(f"sasl_mechanism={self.sasl_mechanism} needs sasl_username and "
                             "sasl_password")
        return self


class ProducerSettings(_Section):
    """Tuning of each ProducerActor's Kafka producer."""

    acks: Literal["all", 0, 1] = "all"
    enable_idempotence: bool = True
    linger_ms: int = Field(5, ge=0, le=60_000)
    max_batch_size: int = Field(256 * 1024, ge=1024)
    """Bytes per partition batch."""
    max_request_size: int = Field(1024 * 1024, ge=1024)
    """Largest record accepted; larger ones raise RecordTooLargeError before sending."""
    request_timeout_ms: int = Field(30_000, ge=100)
    retry_backoff_ms: int = Field(100, ge=0)
    delivery_timeout_ms: int = Field(120_000, ge=1000)
    """Longest wait for a broker acknowledgement, retries included; then PublishError.
    The message may still arrive later (with the same message id): PublishError means
    "not acknowledged", so a caller may retry and consumers deduplicate on the id."""
    connect_timeout_s: float = Field(15.0, gt=0)
    """How long a producer waits for the brokers before raising MessagingConnectionError."""
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    """Kafka's own batch compression (independent of the pipeline's compress stage)."""
    max_headers: int = Field(64, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=64)

    @model_validator(mode="after")
    def _idempotence_needs_acks_all(self) -> ProducerSettings:
        if self.enable_idempotence and self.acks != "all":
            raise ValueError("producer.enable_idempotence requires producer.acks='all'")
        return self


class LaneSettings(_Section):
    """ProducerActors per priority lane, and the handle's in-flight window per lane."""

    high: int = Field(1, ge=1)
    normal: int = Field(1, ge=1)
    low: int = Field(0, ge=0)
    """0 means LOW shares the NORMAL lane's actors."""
    max_in_flight: int = Field(10_000, ge=1)
    """Messages a handle keeps in flight per lane; ``publish.remote`` waits beyond that."""
    actor_num_cpus: float = Field(0.0, ge=0)
    """CPUs reserved per ProducerActor (0: they are I/O-bound and need no reservation)."""


class LineageSettings(_Section):
    """Lineage headers stamped on every message."""

    enabled: bool = True
    service_name: str = "athomic"


class SerializeStageSpec(_Section):
    """Turns the message object into bytes and records its content type."""

    stage: Literal["serialize"] = "serialize"
    codec: Literal["orjson", "pydantic"] = "orjson"
    """orjson: dicts, lists, scalars, pydantic models, dataclasses; bytes and str pass as
    octet-stream / text. pydantic: only pydantic models (anything else is an error)."""


StageSpec = Annotated[SerializeStageSpec, Field(discriminator="stage")]


class MessagingSettings(BaseSettings):
    """Everything athomic needs for one Kafka connection."""

    model_config = SettingsConfigDict(
        env_prefix="ATHOMIC_", env_nested_delimiter="__", extra="forbid", frozen=True,
        validate_default=True)

    connection_name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Names the actors: the same name from any process gives the same actors."""
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str | None = None
    security: SecuritySettings = SecuritySettings()
    producer: ProducerSettings = ProducerSettings()
    lanes: LaneSettings = LaneSettings()
    lineage: LineageSettings = LineageSettings()
    priority_topics: bool = False
    """Route HIGH to ``<topic>.high`` and LOW to ``<topic>.low`` (NORMAL keeps ``<topic>``)."""
    delay_topics: dict[float, str] = Field(default_factory=dict)
    """Delay buckets: seconds -> delay topic. Empty: a delayed publish raises
    NotImplementedError."""
    max_delay_seconds: float | None = Field(None, gt=0)
    """Optional cap; a longer delay raises InvalidDelayError (catches typos)."""
    pipeline: list[StageSpec] = Field(
        default_factory=lambda: [SerializeStageSpec()])

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _join_servers(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_present(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("bootstrap_servers must name at least one host:port")
        for s in servers:
            host, sep, port = s.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap server {s!r} is not host:port")
        return ",".join(servers)

    @field_validator("delay_topics")
    @classmethod
    def _check_delay_topics(cls, value: dict[float, str]) -> dict[float, str]:
        seen: set[str] = set()
        for seconds, topic in value.items():
            if not seconds > 0:
                raise ValueError(f"delay bucket {seconds!r}: seconds must be > 0")
            try:
                validate_topic(topic)
            except InvalidTopicError as exc:
                raise ValueError(f"delay bucket {seconds}: {exc}") from None
            if topic in seen:
                raise ValueError(f"delay topic {topic!r} is used by more than one bucket")
            seen.add(topic)
        return dict(sorted(value.items()))

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, value: list[Any]) -> list[Any]:
        names = [spec.stage for spec in value]
        if names.count("serialize") != 1 or names[0] != "serialize":
            raise ValueError("pipeline must start with exactly one 'serialize' stage")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> MessagingSettings:
        """Settings from a TOML file; environment variables and ``overrides`` win over it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"settings file {path} does not exist")
        token = _toml_path.set(path)
        try:
            return cls(**overrides)
        finally:
            _toml_path.reset(token)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except PydanticValidationError as exc:
            raise ConfigurationError(_explain(exc)) from None

    # --- derived -------------------------------------------------------------------------
    @property
    def servers(self) -> list[str]:
        return self.bootstrap_servers.split(",")

    def fingerprint(self) -> str:
        """Digest of everything that shapes the producer actors (secrets included, hashed)."""
        data = self.model_dump_json(
            exclude={"lanes": {"max_in_flight"}}, round_trip=True,
            context={"reveal": True})
        secrets = [
            s.get_secret_value() for s in (self.security.sasl_password,
                                           self.security.ssl_password) if s is not None]
        digest = hashlib.sha256(data.encode())
        for s in secrets:
            digest.update(s.encode())
        return digest.hexdigest()[:16]

    def kafka_client_options(self) -> dict[str, Any]:
        """Connection options shared by every Kafka client athomic creates."""
        sec = self.security
        opts: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "security_protocol": sec.protocol,
            "request_timeout_ms": self.producer.request_timeout_ms,
            "retry_backoff_ms": self.producer.retry_backoff_ms,
        }
        if self.client_id:
            opts["client_id"] = self.client_id
        if sec.sasl_mechanism:
            opts["sasl_mechanism"] = sec.sasl_mechanism
            if sec.sasl_username is not None:
                opts["sasl_plain_username"] = sec.sasl_username
            if sec.sasl_password is not None:
                opts["sasl_plain_password"] = sec.sasl_password.get_secret_value()
        if sec.protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(
                cafile=sec.ssl_cafile, certfile=sec.ssl_certfile, keyfile=sec.ssl_keyfile,
                password=sec.ssl_password.get_secret_value() if sec.ssl_password else None)
            opts["ssl_context"].check_hostname = sec.ssl_check_hostname
        return opts


def _explain(exc: PydanticValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"{where}: {err['msg']}")
    return "invalid athomic settings:\n  " + "\n  ".join(lines)
