"""The consumer's side of the pipeline: decode a record from its headers and keys."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from athomic.messages import MessageHeaders
from athomic.settings import MessagingSettings

from .compose import Pipeline

# Consumers call decode_message per record: build each settings object's pipeline once
# (keys parsed, zstd contexts made), not per message.
_cache_lock = threading.Lock()
_cache: dict[int, tuple[weakref.ref[MessagingSettings], Pipeline]] = {}


def pipeline_for(settings: MessagingSettings) -> Pipeline:
    """The (cached) Pipeline of a settings object."""
    with _cache_lock:
        hit = _cache.get(id(settings))
        if hit is not None and hit[0]() is settings:
            return hit[1]
    built = Pipeline.from_settings(settings)
    with _cache_lock:
        if len(_cache) > 64:
            _cache.clear()
        _cache[id(settings)] = (weakref.ref(settings), built)
    return built


def _as_bytes(key: bytes | str | None) -> bytes | None:
    return key.encode("utf-8") if isinstance(key, str) else key


def decode_message(value: bytes | None, headers: Any, settings: MessagingSettings, *,
                   topic: str | None = None, key: bytes | str | None = None,
                   model: type[Any] | None = None) -> Any:
    """Decode a consumed record's value back to what was published.

    ``headers`` is the record's headers (aiokafka's tuple of pairs, a list, or
    MessageHeaders). ``model`` turns a JSON payload into that pydantic model or class.

    Encrypted messages: without ``topic``/``key`` the ciphertext is checked against the
    topic and key recorded in its (authenticated) headers, so tampering is caught but a
    record copied whole to another topic still decodes. Pass ``topic`` (and ``key``), or
    use ``decode_record``, to also refuse a record read from another topic or key than it
    was published to. ``key=None`` here means "do not check the key"; ``decode_record``
    checks a null key too.
    """
    return pipeline_for(settings).decode(value, MessageHeaders.of(headers).last_values(),
                                         topic=topic, key=_as_bytes(key),
                                         key_known=key is not None, model=model)


def decode_record(record: Any, settings: MessagingSettings, *,
                  model: type[Any] | None = None) -> Any:
    """Decode a consumed record (anything with ``topic``, ``key``, ``value``, ``headers``,
    e.g. an aiokafka ConsumerRecord), binding decryption to the record's own topic and key:
    a record moved to another topic or key raises DecryptionError."""
    headers = MessageHeaders.of(record.headers).last_values()
    return pipeline_for(settings).decode(record.value, headers, topic=record.topic,
                                         key=_as_bytes(record.key), key_known=True,
                                         model=model)

