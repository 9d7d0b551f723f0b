"""The compress stage: zstd, skipped when it does not pay, decoded with a size bound.

Decoding never allocates more than ``max_output_size``: a frame that declares a larger
content size is refused from its header alone, and a frame that does not declare its size
is read in bounded steps and refused as soon as its output passes the bound.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import zstandard

from athomic.errors import CompressionError
from athomic.settings import MAX_OUTPUT_DEFAULT

if TYPE_CHECKING:
    from . import StageContext

ZSTD = "zstd"

# Unknown-size frames are fed this many compressed bytes at a time. A zstd block of RLE
# type takes 4 bytes and yields up to 128 KiB, so one step yields at most
# 32 * 128 KiB = 4 MiB: the overshoot past the bound is at most that.
_UNKNOWN_SIZE_STEP = 128


class ZstdStage:
    """zstd compression. ``encode`` returns None (stage skipped, nothing recorded) for
    payloads under ``min_size`` or when the frame would not be smaller than the input."""

    name = ZSTD

    def __init__(self, *, level: int = 3, min_size: int = 512,
                 max_output_size: int = MAX_OUTPUT_DEFAULT,
                 dictionaries: dict[int, bytes] | None = None,
                 dictionary_id: int | None = None) -> None:
        self.level = level
        self.min_size = min_size
        self.max_output_size = max_output_size
        self._dicts = {i: zstandard.ZstdCompressionDict(d)
                       for i, d in (dictionaries or {}).items()}
        if dictionary_id is not None and dictionary_id not in self._dicts:
            raise ValueError(f"zstd dictionary {dictionary_id} is not among the dictionaries")
        self.dictionary_id = dictionary_id
        # A frame may ask for a window as large as it likes; never more than the bound
        # (rounded up to a power of two, as zstd window sizes are).
        self._max_window = 1 << max(10, min(31, (max_output_size - 1).bit_length()))
        # zstd contexts are not thread-safe; a consumer may decode from many threads.
        self._local = threading.local()

    # --- contexts ------------------------------------------------------------------------
    def _compressor(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            d = self._dicts[self.dictionary_id] if self.dictionary_id is not None else None
            c = zstandard.ZstdCompressor(level=self.level, dict_data=d)
            self._local.c = c
        return c

    def _decompressor(self, dict_id: int) -> zstandard.ZstdDecompressor:
        cache: dict[int, zstandard.ZstdDecompressor] | None = getattr(self._local, "d", None)
        if cache is None:
            cache = self._local.d = {}
        d = cache.get(dict_id)
        if d is None:
            d = cache[dict_id] = zstandard.ZstdDecompressor(
                dict_data=self._dicts[dict_id] if dict_id else None,
                max_window_size=self._max_window)
        return d

    # --- the stage -----------------------------------------------------------------------
    def encode(self, data: bytes, ctx: StageContext) -> bytes | None:
        if len(data) < self.min_size:
            return None
        try:
            out: bytes = self._compressor().compress(data)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd compression failed: {exc}", stage="compress",
                                   message_id=ctx.message_id or None) from exc
        return out if len(out) < len(data) else None

    def decode(self, data: bytes, ctx: StageContext) -> bytes:
        return self.decompress(data, message_id=ctx.message_id or None)

    def decompress(self, data: bytes, *, message_id: str | None = None) -> bytes:
        """One zstd frame -> its content, never more than ``max_output_size`` bytes."""
        limit = self.max_output_size
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise _error(f"not a zstd frame: {exc}", message_id) from None
        if params.dict_id and params.dict_id not in self._dicts:
            raise _error(f"frame needs zstd dictionary {params.dict_id}, which is not "
                         "configured (compress.dictionary / decode_dictionaries)", message_id)
        size = params.content_size
        known = size not in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR)
        if known and size > limit:
            raise _error(f"frame declares {size} bytes of content, over the bound of {limit} "
                         "(compress.max_output_size)", message_id)
        if params.window_size > self._max_window:
            raise _error(f"frame asks for a {params.window_size}-byte window, over the "
                         f"{limit}-byte bound", message_id)
        dctx = self._decompressor(params.dict_id)
        if not known:
            return _read_bounded(dctx, data, limit, message_id)
        try:
            # Known size: zstd writes into one buffer of exactly that size and fails if the
            # frame holds more; trailing bytes (a second frame) are refused.
            out: bytes = dctx.decompress(data, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise _error(f"corrupt zstd frame: {exc}", message_id) from None
        return out


def _error(problem: str, message_id: str | None) -> CompressionError:
    return CompressionError(problem, stage="compress", message_id=message_id)


def _read_bounded(dctx: zstandard.ZstdDecompressor, data: bytes, limit: int,
                  message_id: str | None) -> bytes:
    """Decompress a frame of undeclared size a few compressed bytes at a time, stopping as
    soon as the output passes ``limit``."""
    obj = dctx.decompressobj()
    parts: list[bytes] = []
    total = 0
    view = memoryview(data)
    pos = 0
    try:
        while pos < len(view) and not obj.eof:
            chunk: bytes = obj.decompress(view[pos:pos + _UNKNOWN_SIZE_STEP])
            pos += _UNKNOWN_SIZE_STEP
            total += len(chunk)
            if total > limit:
                raise _error(f"frame of undeclared size produces over {limit} bytes "
                             "(compress.max_output_size)", message_id)
            parts.append(chunk)
    except zstandard.ZstdError as exc:
        raise _error(f"corrupt zstd frame: {exc}", message_id) from None
    if not obj.eof:
        raise _error("truncated zstd frame", message_id)
    if obj.unused_data or pos < len(view):
        raise _error("bytes after the zstd frame", message_id)
    return b"".join(parts)
