"""Custom stages: your own bytes -> bytes codec, named in settings by import path."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from athomic.errors import ConfigurationError, PipelineError

if TYPE_CHECKING:
    from . import StageContext


@runtime_checkable
class ByteCodec(Protocol):
    """What a custom stage implements: ``decode(encode(b)) == b`` for every ``b``."""

    def encode(self, data: bytes) -> bytes: ...

    def decode(self, data: bytes) -> bytes: ...


def load_codec(path: str, options: dict[str, Any]) -> ByteCodec:
    """Import ``package.module:Name`` (or ``package.module.Name``) and call it with
    ``options`` as keyword arguments."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"custom stage {path!r} cannot be imported: {exc}") from None
    try:
        codec = factory(**options)
    except Exception as exc:
        raise ConfigurationError(
            f"custom stage {path!r} could not be built from its options: {exc}") from None
    if not isinstance(codec, ByteCodec):
        raise ConfigurationError(
            f"custom stage {path!r} has no encode(bytes) -> bytes / decode(bytes) -> bytes")
    return codec


class CustomStage:
    """Adapts a ByteCodec to the pipeline: errors become PipelineError naming the stage."""

    def __init__(self, name: str, codec: ByteCodec) -> None:
        self.name = name
        self.codec = codec

    def encode(self, data: bytes, ctx: StageContext) -> bytes:
        return self._call(self.codec.encode, data, ctx, "encode")

    def decode(self, data: bytes, ctx: StageContext) -> bytes:
        return self._call(self.codec.decode, data, ctx, "decode")

    def _call(self, fn: Any, data: bytes, ctx: StageContext, what: str) -> bytes:
        try:
            out = fn(data)
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(f"{what} failed: {type(exc).__name__}: {exc}",
                                stage=self.name, message_id=ctx.message_id or None
                                ) from exc
        if not isinstance(out, (bytes, bytearray, memoryview)):
            raise PipelineError(f"{what} returned {type(out).__name__}, not bytes",
                                stage=self.name, message_id=ctx.message_id or None)
        return bytes(out)
