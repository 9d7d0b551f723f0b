"""The serialize stage: message object <-> bytes, recorded in a content-type header."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel

from athomic.errors import SerializationError

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"

_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_PLAIN_JSON = frozenset({dict, list})
"""Types serialised as JSON with no model or dataclass to name (checked by exact type)."""


def _default(obj: Any) -> Any:
    # Nested models and the odd types Ray Data rows carry (numpy scalars are handled by
    # orjson itself); anything else is an error rather than a silent str().
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raise TypeError("bytes nested inside a JSON payload cannot be serialised")
    raise TypeError(f"type {type(obj).__name__} is not JSON serialisable")


def _json(obj: Any) -> bytes:
    try:
        data = orjson.dumps(obj, default=_default, option=_ORJSON_OPTS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise SerializationError(f"cannot serialise {type(obj).__name__}: {exc}") from exc
    # An exact-size copy, and orjson's own object freed at once: orjson grows its output
    # in a larger buffer and shrinks it at the end, and a batch's outputs all kept alive
    # (they travel to the actor together) leave the C heap fragmented and trimmed back
    # after each batch, a fresh page fault every few messages. The copy is several times
    # cheaper than that (BENCHMARKS.md, Publishing).
    return bytes(memoryview(data))


def schema_name(model: type[Any]) -> str:
    return f"{model.__module__}:{model.__qualname__}"


class Serializer:
    """orjson for JSON-able objects and pydantic models, bytes passthrough, str as UTF-8.

    With ``codec="pydantic"`` only pydantic models are accepted (a guard for pipelines whose
    every message must match a schema); ``"bytes"`` and ``"str"`` accept only that type.
    """

    def __init__(self, codec: str = "orjson") -> None:
        self.codec = codec

    def json_of_plain(self) -> Callable[[Any], bytes] | None:
        """The function that gives a ``dict`` or ``list`` message's bytes (content type
        ``JSON``, no schema) as ``dumps`` does, when this serializer takes them as JSON:
        for a caller serialising many at once, without ``dumps``' dispatch per message."""
        return _json if self.codec == "orjson" else None

    def dumps(self, obj: Any) -> tuple[bytes, str, str | None]:
        """Return ``(data, content_type, schema)``; schema names the pydantic model, if any."""
        if type(obj) in _PLAIN_JSON and self.codec == "orjson":  # the common case, first
            return _json(obj), JSON, None
        if self.codec == "bytes" and not isinstance(obj, (bytes, bytearray, memoryview)):
            raise SerializationError(
                f"the bytes codec accepts only bytes, got {type(obj).__name__}")
        if self.codec == "str" and not isinstance(obj, str):
            raise SerializationError(f"the str codec accepts only str, got {type(obj).__name__}")
        if isinstance(obj, BaseModel):
            try:
                return obj.model_dump_json().encode(), JSON, schema_name(type(obj))
            except Exception as exc:  # pydantic raises several types here
                raise SerializationError(f"cannot serialise {type(obj).__name__}: {exc}"
                                         ) from exc
        if self.codec == "pydantic":
            raise SerializationError(
                f"the pydantic codec accepts only pydantic models, got {type(obj).__name__}")
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return bytes(obj), OCTET_STREAM, None
        if isinstance(obj, str):
            return obj.encode("utf-8"), TEXT, None
        data = _json(obj)
        schema = (schema_name(type(obj))
                  if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else None)
        return data, JSON, schema

    @staticmethod
    def loads(data: bytes, content_type: str | None, model: type[Any] | None = None) -> Any:
        """Reverse ``dumps``: JSON -> Python objects (or ``model`` when given)."""
        base = (content_type or OCTET_STREAM).split(";")[0].strip().lower()
        if base == "application/json":
            if model is not None and issubclass(model, BaseModel):
                try:
                    return model.model_validate_json(data)
                except Exception as exc:
                    raise SerializationError(
                        f"payload does not match {model.__name__}: {exc}") from exc
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise SerializationError(f"invalid JSON payload: {exc}") from exc
            return model(**obj) if model is not None else obj
        if base.startswith("text/"):
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SerializationError(f"payload is not UTF-8 text: {exc}") from exc
        return data

