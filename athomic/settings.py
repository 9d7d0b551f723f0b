"""Settings: one ``MessagingSettings`` with a nested model per subsystem.

Sources, strongest first: keyword arguments, environment variables (``ATHOMIC_...``, nested
with ``__``, e.g. ``ATHOMIC_PRODUCER__LINGER_MS=10``), a dotenv file (``_env_file=``), a
secrets directory (``_secrets_dir=``), a TOML file (``from_toml``), defaults. Settings are
data, read once; library code receives them and never reads the environment.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
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
    linger_ms: int = Field(0, ge=0, le=60_000)
    """0: send at once; batches still form while a request is in flight."""
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
    connections: int = Field(2, ge=1, le=16)
    """Kafka producers (each its own connection) per ProducerActor; partition ``p`` always
    goes through producer ``p % connections``, so each partition keeps its order. The
    client has one request in flight per connection: with two, the broker works on one
    while the next is sent (batches with several calls in flight, BENCHMARKS.md)."""
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
    """Messages a handle keeps in flight per lane; ``publish.remote`` waits beyond that
    (``await handle.publish(...)`` waits without blocking the event loop)."""
    acquire_timeout_s: float = Field(120.0, gt=0)
    """Longest wait for room in a full lane; then BackpressureTimeoutError (nothing was
    sent)."""
    actor_num_cpus: float = Field(0.0, ge=0)
    """CPUs reserved per ProducerActor (0: they are I/O-bound and need no reservation)."""
    nice: int = Field(4, ge=0, le=19)
    """How much lower the NORMAL and LOW lanes' actor processes run than the HIGH lane's
    (an ``os.nice`` increment; Ray starts workers at niceness 15, the most is 19): on a
    busy node the HIGH lane's actors get the CPU first. 0 runs every lane alike."""


class LineageSettings(_Section):
    """Lineage headers stamped on every message."""

    enabled: bool = True
    service_name: str = "athomic"


class TelemetrySettings(_Section):
    """OpenTelemetry traces and metrics of the actors (see docs/observability.md).

    ``exporter="none"`` (the default) instruments through the global OpenTelemetry API: the
    spans and metrics go wherever the process's own SDK setup sends them (e.g. one made in a
    Ray ``worker_process_setup_hook``), and cost next to nothing when there is none. Any
    other exporter makes athomic build its own tracer and meter providers in each actor
    process, never installed as the global ones.
    """

    traces: bool = True
    """PRODUCER spans around publishing (and around republishing, in the republisher)."""
    metrics: bool = True
    """Counters and histograms of publishing, delays, DLQ and errors."""
    exporter: Literal["none", "console", "otlp", "file"] = "none"
    """none: the global OpenTelemetry API. console: stdout of each actor. otlp: an OTLP
    collector (needs ``pip install 'athomic-ray[otlp]'``). file: JSON lines appended to
    ``file_path`` (one line per span or metric point; for tests and debugging)."""
    otlp_endpoint: str | None = None
    """Collector URL; None leaves it to the exporter's own default."""
    otlp_protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    """Unset: ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL``, else http/protobuf."""
    file_path: Path | None = None
    """Required with ``exporter="file"``; every process appends to it."""
    service_name: str | None = None
    """``service.name`` of athomic's own providers; None: ``OTEL_SERVICE_NAME`` /
    ``OTEL_RESOURCE_ATTRIBUTES``, else ``lineage.service_name``."""
    pipeline_spans: bool = False
    """INTERNAL spans around the byte stages of each batch (one per run of stages with the
    same placement)."""
    metric_export_interval_s: float = Field(60.0, gt=0, le=3600)
    """How often athomic's own metric reader exports (flush and shutdown export too);
    unset: ``OTEL_METRIC_EXPORT_INTERVAL``, else 60 s."""
    ray_metrics: bool = False
    """Also record the metrics through ``ray.util.metrics`` (Ray's Prometheus endpoint
    and dashboard), with no exporter to set up."""

    @model_validator(mode="after")
    def _file_needs_path(self) -> TelemetrySettings:
        if self.exporter == "file" and self.file_path is None:
            raise ValueError("telemetry.exporter='file' needs telemetry.file_path")
        return self


class SerializeStageSpec(_Section):
    """Turns the message object into bytes and records its content type."""

    stage: Literal["serialize"] = "serialize"
    codec: Literal["orjson", "pydantic", "bytes", "str"] = "orjson"
    """orjson: dicts, lists, scalars, pydantic models, dataclasses; bytes and str pass as
    octet-stream / text. pydantic: only pydantic models. bytes: only bytes-like values.
    str: only str. (The last three refuse anything else with SerializationError.)"""


class _ByteStageSpec(_Section):
    """Fields every byte stage has: where it runs."""

    placement: Literal["inline", "actors"] = "inline"
    """inline: in the ProducerActor. actors: on the connection's StageActor pool (one call
    per batch, split over the replicas), before the ProducerActor sends."""
    replicas: int = Field(1, ge=1, le=256)
    """StageActors in the pool (one CPU each); stages placed on actors share one pool, so
    they must agree on this number."""


MAX_OUTPUT_DEFAULT = 64 * 1024 * 1024


class CompressStageSpec(_ByteStageSpec):
    """zstd compression; skipped below ``min_size`` and when the output is not smaller."""

    stage: Literal["compress"] = "compress"
    codec: Literal["zstd"] = "zstd"
    level: int = Field(3, ge=-7, le=22)
    min_size: int = Field(512, ge=0)
    """Payloads shorter than this (bytes) are sent uncompressed."""
    max_output_size: int = Field(MAX_OUTPUT_DEFAULT, ge=1, le=2**31)
    """Decoding refuses a frame that declares or produces more than this many bytes."""
    dictionary: Path | None = None
    """A trained zstd dictionary (file) used to compress; its zstd dictionary id is written
    in each frame, and decoders pick the dictionary by that id."""
    decode_dictionaries: list[Path] = Field(default_factory=list)
    """More dictionaries accepted when decoding (e.g. the previous one after retraining)."""
    _dictionaries: dict[int, bytes] = PrivateAttr(default_factory=dict)
    _primary_dict_id: int | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _load_dictionaries(self) -> CompressStageSpec:
        # Read once here: actors on other nodes get the bytes with the settings, not a path.
        import zstandard

        paths = ([self.dictionary] if self.dictionary else []) + list(self.decode_dictionaries)
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read zstd dictionary {path}: {exc.strerror}"
                                 ) from None
            dict_id = zstandard.ZstdCompressionDict(data).dict_id()
            if not dict_id:
                raise ValueError(f"{path} is not a trained zstd dictionary (no dictionary id)")
            self._dictionaries[dict_id] = data
            if path == self.dictionary:
                self._primary_dict_id = dict_id
        return self

    @property
    def dictionaries(self) -> dict[int, bytes]:
        """Dictionary id -> dictionary bytes, loaded from the files at construction."""
        return dict(self._dictionaries)

    @property
    def dictionary_id(self) -> int | None:
        """The zstd dictionary id used to compress, if any."""
        return self._primary_dict_id


_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
AES_KEY_BYTES = 32


def _decode_key(key_id: str, text: str) -> bytes:
    """A base64 (standard or URL-safe) key -> bytes. Errors name the key id, never the key."""
    compact = "".join(text.split())
    try:
        raw = base64.b64decode(compact + "=" * (-len(compact) % 4),
                               altchars=b"-_" if ("-" in compact or "_" in compact) else None,
                               validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"key {key_id!r} is not valid base64") from None
    if len(raw) != AES_KEY_BYTES:
        raise ValueError(f"key {key_id!r} decodes to {len(raw)} bytes; aes-256-gcm "
                         f"needs {AES_KEY_BYTES}")
    return raw


def _key_map(source: str, data: Any) -> dict[str, str]:
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{source} must hold an object of key id -> base64 key")
    return data


class KeyRing(_Section):
    """A ring of 32-byte keys: ``primary`` is used for new messages, every listed id is
    accepted. Keys come from ``keys``, from ``keys_file`` (a JSON object
    ``{"k1": "<base64>"}``) and from the environment variable named by ``keys_env`` (same
    JSON), merged, all read once when the settings are built. Key values are SecretStr:
    never in reprs, dumps or errors."""

    keys: dict[str, SecretStr] = Field(default_factory=dict)
    keys_file: Path | None = None
    keys_env: str | None = None
    keys_dir: Path | None = None
    """A directory holding one file per key: the file name is the key id, its content the
    base64 key (how Kubernetes mounts a Secret)."""
    primary: str

    @model_validator(mode="before")
    @classmethod
    def _gather_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged: dict[str, Any] = {}
        raw_keys = data.get("keys") or {}
        if not isinstance(raw_keys, dict):
            raise ValueError("keys must be a table of key id -> base64 key")
        sources: list[tuple[str, dict[str, Any]]] = [("keys", raw_keys)]
        if data.get("keys_file"):
            path = Path(data["keys_file"])
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read keys_file {path}: {exc.strerror}") from None
            try:
                parsed = json.loads(text)
            except ValueError:
                raise ValueError(f"keys_file {path} is not a JSON object") from None
            sources.append((f"keys_file {path}", _key_map(f"keys_file {path}", parsed)))
        if data.get("keys_dir"):
            folder = Path(data["keys_dir"])
            if not folder.is_dir():
                raise ValueError(f"keys_dir {folder} is not a directory")
            ring = {entry.name: entry.read_text().strip() for entry in sorted(folder.iterdir())
                    if not entry.name.startswith(".") and entry.is_file()}
            if not ring:
                raise ValueError(f"keys_dir {folder} holds no key files")
            sources.append((f"keys_dir {folder}", ring))
        if data.get("keys_env"):
            name = str(data["keys_env"])
            env_text = os.environ.get(name)  # settings are the one place reading the env
            if env_text is None:
                raise ValueError(f"keys_env: environment variable {name} is not set")
            try:
                parsed = json.loads(env_text)
            except ValueError:
                raise ValueError(f"environment variable {name} is not a JSON object") from None
            sources.append((f"environment variable {name}", _key_map(name, parsed)))
        for source, ring in sources:
            for key_id, value in ring.items():
                secret = value.get_secret_value() if isinstance(value, SecretStr) else value
                if key_id in merged and merged[key_id] != secret:
                    raise ValueError(f"key {key_id!r} from {source} differs from "
                                     "the one given elsewhere")
                merged[key_id] = secret
        return {**data, "keys": merged}

    @model_validator(mode="after")
    def _check_ring(self) -> KeyRing:
        if not self.keys:
            raise ValueError("a key ring needs at least one key (keys, keys_file or keys_env)")
        for key_id, secret in self.keys.items():
            if not _KEY_ID.match(key_id):
                raise ValueError(f"key id {key_id!r}: use 1-64 ASCII letters, "
                                 "digits, '.', '_' or '-'")
            _decode_key(key_id, secret.get_secret_value())
        if self.primary not in self.keys:
            raise ValueError(f"primary {self.primary!r} is not a key id in the ring "
                             f"(ids: {sorted(self.keys)})")
        return self

    def key_ring(self) -> dict[str, bytes]:
        """Key id -> raw 32-byte key. Keep the result out of logs."""
        return {kid: _decode_key(kid, s.get_secret_value()) for kid, s in self.keys.items()}


class EncryptStageSpec(KeyRing, _ByteStageSpec):
    """AES-256-GCM with a key ring (``KeyRing``): ``primary`` encrypts, every listed id
    decrypts."""

    stage: Literal["encrypt"] = "encrypt"
    cipher: Literal["aes-256-gcm"] = "aes-256-gcm"
    allow_plaintext: bool = False
    """Decoding: accept records that are not encrypted (while turning encryption on).
    Off, a record without the encryption coding is refused: an encrypting consumer never
    takes plaintext someone else wrote for the real thing."""


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")
RESERVED_CODINGS = frozenset({"zstd", "aes-256-gcm", "identity"})


class CustomStageSpec(_ByteStageSpec):
    """A stage of your own: ``path`` imports a class (or factory) called with ``options``
    whose result has ``encode(bytes) -> bytes`` and ``decode(bytes) -> bytes``. Its ``name``
    is what ``content-encoding`` records; decoders need the same spec to reverse it."""

    stage: Literal["custom"] = "custom"
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    path: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_CODINGS:
            raise ValueError(f"custom stage name {value!r} is reserved for a built-in stage")
        return value

    @field_validator("path")
    @classmethod
    def _import_path(cls, value: str) -> str:
        if not _IMPORT_PATH.match(value):
            raise ValueError(f"custom stage path {value!r} must look like 'package.module:Name'")
        return value


StageSpec = Annotated[
    SerializeStageSpec | CompressStageSpec | EncryptStageSpec | CustomStageSpec,
    Field(discriminator="stage")]
ByteStageSpec = CompressStageSpec | EncryptStageSpec | CustomStageSpec


def _default_pipeline() -> list[StageSpec]:
    return [SerializeStageSpec()]


class RepublisherSettings(_Section):
    """The republisher: DelayBucketActors that deliver delayed messages when due."""

    enabled: bool = True
    """Start the DelayBucketActors from ProducerFactory.create when delay topics are set
    (False: run them elsewhere, e.g. ``athomic republisher run``)."""
    replicas: int = Field(1, ge=1, le=64)
    """DelayBucketActors per delay topic; they split its partitions and are spread over
    the cluster's nodes."""
    partitions: int | None = Field(None, ge=1)
    """Partitions of a delay topic (and of the ids and released-ids topics) created by
    athomic; default one per replica. Each partition is a stream of transactions of its
    own (under its own transactional id: what fences an older owner), so partitions
    beyond the replicas cost the brokers work and add lateness. A replica beyond the
    partition count owns nothing until partitions are added (they are picked up)."""
    replication_factor: int | None = Field(None, ge=1)
    """Replication of created topics (None: the brokers' default)."""
    retention_margin_s: float = Field(86_400.0, ge=0)
    """A delay topic must keep records at least bucket + this long; a shorter retention
    is refused at start. Created topics keep them max(7 days, 2 x (bucket + margin))."""
    near_window_s: float = Field(2.0, gt=0, le=60)
    """Messages leaving a delay topic within this window are read ahead, and messages due
    within it after leaving one are held in memory until due instead of taking one more
    hop; further ones wait in Kafka (their partition paused). Larger: fewer hops and
    transactions, more memory (about rate x window messages)."""
    max_held: int = Field(100_000, ge=100)
    """Messages a DelayBucketActor holds in memory at most; it pauses reading beyond."""
    compact_after_s: float | None = Field(5.0, ge=0)
    """A message read more than this before it is due waits compactly (its record
    compressed in an arena: 1.36 x a 1 KiB payload in RSS instead of about 2.2 x) and is
    decoded again when it leaves; ``None`` keeps every held message as objects (more memory,
    less CPU). Messages that leave within moments (the default near window is 2 s) do not
    pay for compression; long waits (a large near window) do."""
    max_batch: int = Field(5_000, ge=1)
    """Messages republished per Kafka transaction at most."""
    linger_ms: int = Field(50, ge=0, le=1000)
    """A republish transaction starts at most every ``linger_ms``: messages falling due in
    between go out together, at most that much after their due time, so the brokers handle
    fewer, larger transactions (each costs a commit marker on every partition it wrote)."""
    dead_letter_topic: str = "athomic.delay.dlq"
    """Where envelopes that cannot be decoded, and messages that cannot be delivered for a
    permanent reason, go (with the error in a header); ``athomic dlq replay`` sends them
    back into delivery."""
    group_id: str | None = None
    """Consumer group storing the delay topics' progress (default ``athomic.republisher``,
    shared by every connection, so a delay topic has one owner whatever the layout)."""
    max_attempts: int = Field(5, ge=1)
    """Attempts at a final publish failing for a permanent reason (record too large,
    topic missing or invalid, not authorised) before the message goes to the
    dead-letter topic."""
    retry_window_s: float = Field(3600.0, gt=0)
    """How long a message failing for transient reasons (brokers away, leaders moving, an
    in-sync quorum short) is retried before it goes to the dead-letter topic."""
    retry_backoff_max_s: float = Field(5.0, gt=0)
    txn_retry_backoff_ms: int = Field(20, ge=0, le=1000)
    """How soon a republish producer asks its coordinators again when they are busy. A
    transaction begun right after the previous one is refused (``CONCURRENT_TRANSACTIONS``)
    until the brokers have written the previous one's commit markers, a few milliseconds;
    the client's usual 100 ms retry backoff would add up to 100 ms to every such
    republish."""
    ack_timeout_s: float = Field(30.0, gt=0)
    """Longest wait for any one step of a republish transaction (acknowledgements, offsets,
    commit, abort); beyond it the transaction is given up and the partition resumes from
    its committed progress."""
    transaction_timeout_ms: int = Field(60_000, ge=1000)
    partition_refresh_s: float = Field(30.0, gt=0)
    """How often a republisher looks for partitions added to its delay topic, renews its
    ownership of idle partitions, and retries partitions it does not hold."""
    dedupe_window_s: float = Field(600.0, ge=0)
    """A message id released within this window is not released again (a publish retried
    by Ray after an actor died, or by the caller with the same message id)."""
    released_topic: str | None = None
    """Records of the ids each partition released (default
    ``athomic.released.<connection_name>``), kept ``dedupe_window_s``: what a restarted
    republisher reads to keep deduplicating."""
    ids_topic: str | None = None
    """The compacted topic recording what happened to caller-chosen message ids
    (scheduled, cancelled, released; default ``athomic.ids.<connection_name>``): how a
    cancel or a replacing publish reaches every republisher."""
    cancel_horizon_s: float = Field(30 * 86_400.0, gt=0)
    """How long the ids topic remembers a message id (plus ``retention_margin_s``): a
    delayed publish with a caller-chosen ``message_id`` may be due at most this far ahead
    (so it can always be cancelled or replaced), and a released id is not released again
    within it."""
    id_sync_margin_ms: int = Field(20, ge=0)
    """Before releasing a message with a caller-chosen id, the republisher has read the
    ids topic up to its end as of the due time plus this margin (what a fetch's round trip
    may hide)."""
    max_clock_skew_ms: int = Field(1000, ge=0)
    """The republisher measures its clock against the brokers' and warns (and reports
    itself unhealthy) beyond this."""
    auth: KeyRing | None = None
    """Keys authenticating envelopes when the pipeline does not encrypt (when it does,
    keys derived from the encrypt stage's ring are used)."""
    accept_unauthenticated: bool = False
    """Accept envelopes without authentication although keys are set: only while turning
    authentication on, until the envelopes written before have been delivered."""
    actor_num_cpus: float = Field(0.0, ge=0)

    @property
    def topic_partitions(self) -> int:
        """Partitions of the topics athomic creates: ``partitions``, else ``replicas``."""
        return self.partitions or self.replicas

    @field_validator("dead_letter_topic", "released_topic", "ids_topic")
    @classmethod
    def _topic_name(cls, value: str | None) -> str | None:
        try:
            return None if value is None else validate_topic(value)
        except InvalidTopicError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _waits_fit_the_transaction(self) -> RepublisherSettings:
        if self.ack_timeout_s * 1000 >= self.transaction_timeout_ms:
            raise ValueError("republisher.ack_timeout_s must be shorter than "
                             "republisher.transaction_timeout_ms")
        return self


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
    telemetry: TelemetrySettings = TelemetrySettings()
    priority_topics: bool = False
    """Route HIGH to ``<topic>.high`` and LOW to ``<topic>.low`` (NORMAL keeps ``<topic>``)."""
    delay_topics: dict[float, str] = Field(default_factory=dict)
    """Delay buckets: seconds -> delay topic. Empty: a delayed publish raises
    NotImplementedError."""
    republisher: RepublisherSettings = RepublisherSettings()
    max_delay_seconds: float | None = Field(None, gt=0)
    """Optional cap; a longer delay raises InvalidDelayError (catches typos)."""
    pipeline: list[StageSpec] = Field(default_factory=_default_pipeline)
    """Ordered stages; see docs/pipeline.md."""

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
        for stage in ("compress", "encrypt"):
            if names.count(stage) > 1:
                raise ValueError(f"pipeline has more than one {stage!r} stage")
        if "compress" in names and "encrypt" in names and (
                names.index("encrypt") < names.index("compress")):
            raise ValueError(
                "pipeline puts 'encrypt' before 'compress': ciphertext does not compress, so "
                "compress first (serialize -> compress -> encrypt)")
        custom = [spec.name for spec in value if spec.stage == "custom"]
        if len(custom) != len(set(custom)):
            raise ValueError("custom stage names must be unique in the pipeline")
        replicas = {spec.replicas for spec in value
                    if spec.stage != "serialize" and spec.placement == "actors"}
        if len(replicas) > 1:
            raise ValueError(
                "stages placed on actors share one StageActor pool: give them the same "
                f"replicas (got {sorted(replicas)})")
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
        # Strongest first: what the code passes, the environment, a dotenv file
        # (``_env_file=``), a secrets directory (``_secrets_dir=``, one file per setting,
        # as Kubernetes mounts Secrets), then the TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings,
                                                     dotenv_settings, file_secret_settings]
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
        try:
            tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read settings file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"settings file {path} is not valid TOML: {exc}"
                                     ) from None
        token = _toml_path.set(path)
        try:
            return cls(**overrides)
        finally:
            _toml_path.reset(token)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
            return
        except PydanticValidationError as exc:
            problem = _explain(exc)
        # Raised outside the except block: pydantic's error holds the raw input (key
        # material included), so it must not even ride along as __context__.
        raise ConfigurationError(problem)

    # --- derived -------------------------------------------------------------------------
    @property
    def republisher_group(self) -> str:
        return self.republisher.group_id or "athomic.republisher"

    @property
    def legacy_republisher_group(self) -> str:
        """Where versions before the shared group committed a connection's progress: read
        once, when the shared group has nothing for a partition."""
        return f"athomic.republisher.{self.connection_name}"

    @property
    def released_topic(self) -> str:
        return self.republisher.released_topic or f"athomic.released.{self.connection_name}"

    @property
    def ids_topic(self) -> str:
        return self.republisher.ids_topic or f"athomic.ids.{self.connection_name}"

    def envelope_ring(self) -> tuple[dict[str, bytes], str] | None:
        """(key id -> raw key, primary) authenticating envelopes: ``republisher.auth``,
        else the encrypt stage's ring; None when neither is set."""
        if self.republisher.auth is not None:
            return self.republisher.auth.key_ring(), self.republisher.auth.primary
        for spec in self.pipeline:
            if spec.stage == "encrypt":
                return spec.key_ring(), spec.primary
        return None

    def reserved_topics(self) -> frozenset[str]:
        """Topics athomic uses itself: never a final topic."""
        return frozenset({*self.delay_topics.values(), self.republisher.dead_letter_topic,
                          self.released_topic, self.ids_topic})

    @property
    def servers(self) -> list[str]:
        return self.bootstrap_servers.split(",")

    def fingerprint(self) -> str:
        """Digest of everything that shapes the producer actors (secrets included, hashed)."""
        data = self.model_dump_json(
            exclude={"lanes": {"max_in_flight", "acquire_timeout_s"}}, round_trip=True,
            context={"reveal": True})
        secrets = [
            s.get_secret_value() for s in (self.security.sasl_password,
                                           self.security.ssl_password) if s is not None]
        for spec in self.pipeline:
            # Key material and dictionary contents shape the actors too; only digests of
            # them enter the fingerprint.
            if spec.stage == "encrypt":
                secrets.extend(f"{kid}={s.get_secret_value()}" for kid, s in spec.keys.items())
            elif spec.stage == "compress":
                secrets.extend(hashlib.sha256(d).hexdigest()
                               for d in spec.dictionaries.values())
        if self.republisher.auth is not None:
            secrets.extend(f"auth:{kid}={s.get_secret_value()}"
                           for kid, s in self.republisher.auth.keys.items())
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
