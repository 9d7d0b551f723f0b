"""Every error athomic raises.

The tree::

    AthomicError
    ├── ConfigurationError             settings that cannot work
    ├── ValidationError                bad input, raised before anything is sent
    │   ├── InvalidTopicError
    │   ├── InvalidDelayError
    │   ├── InvalidHeaderError
    │   ├── RecordTooLargeError
    │   └── MalformedEnvelopeError
    ├── PipelineError                  a payload stage failed (carries stage and message id)
    │   ├── SerializationError
    │   ├── CompressionError
    │   ├── EncryptionError
    │   └── DecryptionError
    ├── MessagingError                 the broker side failed
    │   ├── MessagingConnectionError   (retriable) broker unreachable
    │   ├── PublishError               send failed after every retry
    │   └── BackpressureTimeoutError   (retriable) a lane stayed full too long; nothing sent
    └── ProducerClosedError            the producer was shut down

``NotImplementedError`` (the builtin) is raised for a delayed publish when no delay topics are
configured, as the producer documentation specifies.

Errors from aiokafka are translated in one place, ``athomic._kafka``; errors from Ray,
cryptography and zstandard at the edge where they occur (``raise ... from exc``). None
reaches a caller untranslated.
"""

from __future__ import annotations

from typing import Any, TypeVar

_E = TypeVar("_E", bound="AthomicError")


class AthomicError(Exception):
    """Root of every error raised by athomic."""

    retriable: bool = False
    index: int | None = None
    """Position of the failing message in the caller's batch, when there was a batch."""

    def at_index(self: _E, index: int, *, replace: bool = False) -> _E:
        """Name the failing message's position in the caller's batch: sets ``index`` and
        prefixes the message with ``message #<index>:``. Only once, unless ``replace``
        (a sub-batch's position mapped back to the caller's list)."""
        if self.index is not None and not replace:
            return self
        text = str(self.args[0]) if self.args else ""
        if self.index is not None:
            text = text.removeprefix(f"message #{self.index}: ")
        self.index = index
        self.args = (f"message #{index}: {text}", *self.args[1:])
        return self

    def __reduce__(self) -> Any:
        # Errors cross process boundaries (Ray actors -> callers) by pickling; keep every
        # attribute, whatever the subclass's constructor signature.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[AthomicError], args: tuple[Any, ...],
             state: dict[str, Any]) -> AthomicError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ConfigurationError(AthomicError):
    """Raised when settings are invalid or inconsistent (e.g. encrypt before compress)."""


class ValidationError(AthomicError, ValueError):
    """Raised when a publish request is invalid; nothing has been sent."""

    def __init__(self, message: str, *, value: Any = None, index: int | None = None) -> None:
        super().__init__(message)
        self.value = value
        if index is not None:
            self.at_index(index)


class InvalidTopicError(ValidationError):
    """Raised when a topic name is empty, too long or has characters Kafka refuses."""


class InvalidDelayError(ValidationError):
    """Raised when a delay is negative, not a number, or beyond the configured maximum."""


class InvalidHeaderError(ValidationError):
    """Raised when a header key or value is of the wrong type, or headers are too large."""


class RecordTooLargeError(ValidationError):
    """Raised when an encoded record exceeds the producer's maximum request size."""

    def __init__(self, message: str, *, size: int, limit: int, index: int | None = None) -> None:
        super().__init__(message, value=size, index=index)
        self.size = size
        self.limit = limit


class MalformedEnvelopeError(ValidationError):
    """Raised when a delay envelope cannot be decoded (bad magic, version, length, fields)."""


class PipelineError(AthomicError):
    """Raised when a payload stage fails; names the stage and the message id, never a key."""

    def __init__(self, message: str, *, stage: str, message_id: str | None = None,
                 index: int | None = None) -> None:
        detail = f"{stage} stage: {message}"
        if message_id:
            detail += f" (message {message_id})"
        super().__init__(detail)
        self.stage = stage
        self.message_id = message_id
        if index is not None:
            self.at_index(index)


class SerializationError(PipelineError, ValueError):
    """Raised when a payload cannot be serialised or deserialised; nothing has been sent."""

    def __init__(self, message: str, *, stage: str = "serialize",
                 message_id: str | None = None, index: int | None = None) -> None:
        super().__init__(message, stage=stage, message_id=message_id, index=index)


class CompressionError(PipelineError):
    """Raised when compression or decompression fails, or output exceeds the size bound."""


class EncryptionError(PipelineError):
    """Raised when a payload cannot be encrypted (e.g. no usable primary key)."""


class DecryptionError(PipelineError):
    """Raised when a payload cannot be decrypted: wrong key, unknown key id, tampered bytes."""


class MessagingError(AthomicError):
    """Raised when talking to the broker fails."""


class MessagingConnectionError(MessagingError):
    """Raised when the broker cannot be reached within the configured timeout."""

    retriable = True


class PublishError(MessagingError):
    """Raised when a message (or part of a batch) is not acknowledged after every retry.

    For a batch, ``failures`` maps the index of each failed message to its error and
    ``outcomes`` holds the outcome of every message (``None`` where it failed); messages with
    an outcome were acknowledged by the broker.
    """

    def __init__(self, message: str, *, topic: str | None = None,
                 failures: dict[int, str] | None = None,
                 outcomes: list[Any] | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.failures = failures or {}
        self.outcomes = outcomes


class BackpressureTimeoutError(MessagingError):
    """Raised when a lane's in-flight window stays full for ``lanes.acquire_timeout_s``;
    the message was not sent."""

    retriable = True


class ProducerClosedError(AthomicError):
    """Raised when publishing through a producer that has been shut down."""
