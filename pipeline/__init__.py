"""The payload pipeline: serialize, then byte stages, each recorded in headers.

``Pipeline.serialize`` runs where ``publish`` is called and turns the message object into
bytes; ``Pipeline.encode`` runs the byte stages in the producer and returns the headers that
say how to read the value back. ``decode`` reverses it from those headers alone, so a
consumer with a different stage list still decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from athomic.errors import PipelineError, SerializationError
from athomic.messages import (
    H_CONTENT_ENCODING,
    H_CONTENT_TYPE,
    H_MESSAGE_ID,
    H_SCHEMA,
    MessageHeaders,
)
from athomic.settings import MessagingSettings

from .serialize import Serializer

__all__ = ["Encoded", "Pipeline", "Stage", "StageContext", "decode_message"]


@dataclass(slots=True)
class StageContext:
    """What a byte stage may bind to or record: the final topic, key, message id, headers."""

    topic: str
    key: bytes | None
    message_id: str
    headers: MessageHeaders = field(default_factory=MessageHeaders)


class Stage(Protocol):
    """A symmetric byte stage. ``encode`` may return None to mean "skipped for this
    message" (nothing recorded); ``decode`` reverses a recorded encode."""

    name: str

    def encode(self, data: bytes, ctx: StageContext) -> bytes | None: ...

    def decode(self, data: bytes, ctx: StageContext) -> bytes: ...


@dataclass(slots=True)
class Encoded:
    """A pipeline's output: the record value and the headers describing it."""

    value: bytes | None
    headers: list[tuple[str, bytes]]


class Pipeline:
    """Composes the serializer and the byte stages; decodes in reverse order."""

    def __init__(self, serializer: Serializer, stages: list[Stage] | None = None) -> None:
        self.serializer = serializer
        self.stages = list(stages or [])
        self._by_name = {s.name: s for s in self.stages}

    @classmethod
    def from_settings(cls, settings: MessagingSettings) -> Pipeline:
        serializer = Serializer()
        for spec in settings.pipeline:
            if spec.stage == "serialize":
                serializer = Serializer(spec.codec)
        return cls(serializer)

    def serialize(self, message: Any) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """Message object -> bytes and the headers naming its content type (and schema).

        ``None`` stays a null value (a tombstone, as Kafka compaction expects)."""
        if message is None:
            return None, []
        data, content_type, schema = self.serializer.dumps(message)
        headers = [(H_CONTENT_TYPE, content_type.encode())]
        if schema:
            headers.append((H_SCHEMA, schema.encode()))
        return data, headers

    def encode(self, value: bytes | None, *, topic: str, key: bytes | None,
               message_id: str) -> Encoded:
        """Serialised bytes -> record value, through the byte stages in order; the headers
        returned record which stages ran."""
        if value is None or not self.stages:
            return Encoded(value, [])
        ctx = StageContext(topic, key, message_id, MessageHeaders())
        applied = []
        data = value
        for stage in self.stages:
            out = stage.encode(data, ctx)
            if out is not None:
                data = out
                applied.append(stage.name)
        if applied:
            ctx.headers.set(H_CONTENT_ENCODING, ", ".join(applied))
        return Encoded(data, ctx.headers.items())

    def decode(self, value: bytes | None, headers: MessageHeaders, *, topic: str | None = None,
               key: bytes | None = None, model: type[Any] | None = None) -> Any:
        if value is None:
            return None
        codings = [c.strip() for c in (headers.get_str(H_CONTENT_ENCODING) or "").split(",")
                   if c.strip()]
        ctx = StageContext(topic or "", key, headers.get_str(H_MESSAGE_ID) or "", headers)
        data = value
        for name in reversed(codings):
            stage = self._by_name.get(name)
            if stage is None:
                raise PipelineError(f"unknown content encoding {name!r}", stage=name,
                                    message_id=ctx.message_id or None)
            data = stage.decode(data, ctx)
        try:
            return self.serializer.loads(data, headers.get_str(H_CONTENT_TYPE), model)
        except SerializationError as exc:
            exc.message_id = ctx.message_id or None
            raise


def decode_message(value: bytes | None, headers: Any, settings: MessagingSettings, *,
                   topic: str | None = None, key: bytes | str | None = None,
                   model: type[Any] | None = None) -> Any:
    """Decode a consumed record's value back to what was published.

    ``headers`` is the record's headers (aiokafka's tuple of pairs, a list, or
    MessageHeaders). ``model`` turns a JSON payload into that pydantic model or class.
    """
    hdrs = headers if isinstance(headers, MessageHeaders) else MessageHeaders.from_kafka(
        headers)
    if isinstance(key, str):
        key = key.encode()
    return Pipeline.from_settings(settings).decode(value, hdrs, topic=topic, key=key,
                                                   model=model)
