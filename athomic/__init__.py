"""athomic: Ray-native event publishing to Apache Kafka.

Publish through a Ray actor handle; every message passes a declarative payload pipeline,
carries trace context and lineage in its headers, and can be delayed and prioritised.
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

from ._handle import ProducerFactory, ProducerHandle
from .context import MessageContext, extract_context, message_context, register_context_var
from .errors import (
    AthomicError,
    BackpressureTimeoutError,
    CompressionError,
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidTopicError,
    MalformedEnvelopeError,
    MessagingConnectionError,
    MessagingError,
    PipelineError,
    ProducerClosedError,
    PublishError,
    RecordTooLargeError,
    SerializationError,
    ValidationError,
)
from .messages import CancelOutcome, MessageHeaders, MessagePriority, PublishingOutcome
from .pipeline import decode_message, decode_record
from .settings import MessagingSettings
from .strategies import DelayedPublishStrategy, DirectPublishStrategy

try:
    __version__ = _version("athomic-ray")  # the one place: pyproject.toml
except _NotInstalled:  # pragma: no cover (a source tree that was not installed)
    __version__ = "0+unknown"

__all__ = [  # noqa: RUF022 (grouped by kind, sorted within each group)
    # clients
    "ProducerFactory",
    "ProducerHandle",
    "decode_message",
    "decode_record",
    # settings
    "MessagingSettings",
    # types
    "CancelOutcome",
    "DelayedPublishStrategy",
    "DirectPublishStrategy",
    "MessageContext",
    "MessageHeaders",
    "MessagePriority",
    "PublishingOutcome",
    # consumer side: the context a message carries
    "extract_context",
    "message_context",
    "register_context_var",
    # errors
    "AthomicError",
    "BackpressureTimeoutError",
    "CompressionError",
    "ConfigurationError",
    "DecryptionError",
    "EncryptionError",
    "InvalidDelayError",
    "InvalidHeaderError",
    "InvalidTopicError",
    "MalformedEnvelopeError",
    "MessagingConnectionError",
    "MessagingError",
    "PipelineError",
    "ProducerClosedError",
    "PublishError",
    "RecordTooLargeError",
    "SerializationError",
    "ValidationError",
]
