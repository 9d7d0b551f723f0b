"""The pipeline composer: the serializer and the byte stages, applied forward to encode
and in reverse to decode, each recorded in headers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from athomic.errors import DecryptionError, PipelineError, SerializationError
from athomic.messages import (
    H_CONTENT_ENCODING,
    H_CONTENT_TYPE,
    H_KEY_ID,
    H_MESSAGE_ID,
    MessageHeaders,
)
from athomic.settings import ByteStageSpec, CompressStageSpec, MessagingSettings

from .compress import ZSTD, ZstdStage
from .custom import ByteCodec, CustomStage, load_codec
from .encrypt import AES_256_GCM, AesGcmStage
from .serialize import Serializer


@dataclass(slots=True)
class StageContext:
    """One message as a byte stage sees it.

    ``topic`` is the final (physical) topic, ``applied`` the codings applied before this
    stage. Encoding, a stage appends the headers it records to ``recorded``; decoding, it
    reads the record's headers from ``headers`` (last value per name). On decode ``topic``
    is None and ``key_known`` False when the caller did not say where the record was read
    from.
    """

    topic: str | None
    key: bytes | None
    message_id: str
    content_type: str = ""
    applied: list[str] = field(default_factory=list)
    recorded: list[tuple[str, bytes]] = field(default_factory=list)
    headers: Mapping[str, bytes] = field(default_factory=dict)
    key_known: bool = True


class Stage(Protocol):
    """A symmetric byte stage. ``encode`` may return None to mean "skipped for this
    message" (nothing recorded); ``decode`` reverses a recorded encode. ``name`` is the
    coding recorded in ``content-encoding``."""

    @property
    def name(self) -> str: ...

    def encode(self, data: bytes, ctx: StageContext) -> bytes | None: ...

    def decode(self, data: bytes, ctx: StageContext) -> bytes: ...


@dataclass(slots=True)
class Encoded:
    """A pipeline's output: the record value and the headers describing it."""

    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(slots=True)
class EncodeItem:
    """One message for ``encode_batch``: serialised bytes and what the stages bind to."""

    value: bytes | None
    topic: str
    key: bytes | None
    message_id: str
    content_type: str = ""


@dataclass(slots=True)
class StageWork:
    """A message between byte stages (what travels to and from a StageActor)."""

    data: bytes
    ctx: StageContext

    def finish(self) -> Encoded:
        headers = self.ctx.recorded
        if self.ctx.applied:
            headers.append((H_CONTENT_ENCODING, ", ".join(self.ctx.applied).encode()))
        return Encoded(self.data, headers)


SegmentObserver = Callable[[str, Sequence[str], int], AbstractContextManager[Any]]
"""``observe(placement, stage_names, message_count)``: a context manager around one run of
stages with the same placement over a batch (how pipeline spans are made)."""


class StageRunner(Protocol):
    """Runs one segment of actor-placed stages over a batch, elsewhere (a StageActor pool).

    Returns, per message in order, the advanced work or the PipelineError it raised."""

    async def run(self, segment: int, batch: list[StageWork]
                  ) -> list[StageWork | PipelineError]: ...


class Pipeline:
    """Composes the serializer and the byte stages; decodes in reverse order."""

    def __init__(self, serializer: Serializer, stages: Sequence[Stage] | None = None, *,
                 placement: Sequence[str] | None = None,
                 decoders: Sequence[Stage] = (), require_encryption: bool = False) -> None:
        self.serializer = serializer
        self.require_encryption = require_encryption
        """Decoding refuses a record that is not encrypted (a consumer whose settings
        encrypt, unless its encrypt stage allows plaintext)."""
        self.stages = list(stages or [])
        self.placement = list(placement or ["inline"] * len(self.stages))
        if len(self.placement) != len(self.stages):
            raise ValueError("placement must name one place per stage")
        # Decoders: every coding this process can reverse. zstd is always there (with the
        # default bound) so a consumer without a compress stage still reads compressed
        # messages; the configured stages and extra decoders override it.
        self._decoders: dict[str, Stage] = {ZSTD: ZstdStage()}
        self._decoders.update({s.name: s for s in decoders})
        self._decoders.update({s.name: s for s in self.stages})
        self.segments: list[tuple[str, int, int]] = []
        """Runs of consecutive stages with the same placement: (placement, start, end)."""
        for i, place in enumerate(self.placement):
            if self.segments and self.segments[-1][0] == place:
                self.segments[-1] = (place, self.segments[-1][1], i + 1)
            else:
                self.segments.append((place, i, i + 1))

    @classmethod
    def from_settings(cls, settings: MessagingSettings, *,
                      byte_stages: bool = True) -> Pipeline:
        """The pipeline the settings declare. ``byte_stages=False`` builds only the
        serializer (what a ProducerHandle needs: no keys parsed, no custom stage imported
        in every task the handle travels to)."""
        serializer = Serializer()
        stages: list[Stage] = []
        placement: list[str] = []
        require_encryption = False
        for spec in settings.pipeline:
            if spec.stage == "serialize":
                serializer = Serializer(spec.codec)
                continue
            if spec.stage == "encrypt":
                require_encryption = not spec.allow_plaintext
            if not byte_stages:
                continue
            stages.append(_build_stage(spec))
            placement.append(spec.placement)
        return cls(serializer, stages, placement=placement,
                   require_encryption=require_encryption)

    # --- caller side -------------------------------------------------------------------
    def serialize(self, message: Any) -> tuple[bytes | None, str | None, str | None]:
        """Message object -> ``(bytes, content type, schema)``; runs where ``publish`` is
        called. ``None`` stays a null value (a tombstone, as Kafka compaction expects)."""
        if message is None:
            return None, None, None
        return self.serializer.dumps(message)

    # --- producer side -----------------------------------------------------------------
    def encode(self, value: bytes | None, *, topic: str, key: bytes | None,
               message_id: str, content_type: str = "") -> Encoded:
        """Serialised bytes -> record value, through every byte stage here, in order; the
        headers returned record which stages ran. ``topic`` is the final topic."""
        if value is None or not self.stages:
            return Encoded(value, [])
        work = StageWork(value, StageContext(topic, key, message_id, content_type))
        self._apply(work, 0, len(self.stages))
        return work.finish()

    async def encode_batch(self, items: Sequence[EncodeItem],
                           runner: StageRunner | None = None, *,
                           observe: SegmentObserver | None = None) -> list[Encoded]:
        """Encode many messages. Stages placed on actors run through ``runner`` (one call
        per segment for the whole batch); without a runner every stage runs here.
        ``observe(placement, stage_names, count)``, when given, is a context manager
        wrapped around each segment (pipeline spans).

        Raises the first message's PipelineError (with its batch index when there are
        several); then nothing of the batch is usable."""
        results: list[Encoded | None] = [None] * len(items)
        works: list[tuple[int, StageWork]] = []
        for i, item in enumerate(items):
            if item.value is None or not self.stages:
                results[i] = Encoded(item.value, [])
            else:
                works.append((i, StageWork(item.value, StageContext(
                    item.topic, item.key, item.message_id, item.content_type))))
        many = len(items) > 1
        for segment, (place, lo, hi) in enumerate(self.segments):
            if not works:
                break
            if observe is None:
                works = await self._run_segment(segment, place, lo, hi, works, runner, many)
            else:
                names = [stage.name for stage in self.stages[lo:hi]]
                with observe(place, names, len(works)):
                    works = await self._run_segment(segment, place, lo, hi, works, runner,
                                                    many)
        for i, work in works:
            results[i] = work.finish()
        return results  # type: ignore[return-value]

    async def _run_segment(self, segment: int, place: str, lo: int, hi: int,
                           works: list[tuple[int, StageWork]], runner: StageRunner | None,
                           many: bool) -> list[tuple[int, StageWork]]:
        if place == "actors" and runner is not None:
            outs = await runner.run(segment, [w for _, w in works])
            advanced: list[tuple[int, StageWork]] = []
            for (i, _), out in zip(works, outs, strict=True):
                if isinstance(out, PipelineError):
                    raise (out.at_index(i) if many else out)
                advanced.append((i, out))
            return advanced
        for i, work in works:
            try:
                self._apply(work, lo, hi)
            except PipelineError as exc:
                if many:
                    exc.at_index(i)
                raise
        return works

    def run_segment(self, segment: int, batch: list[StageWork]
                    ) -> list[StageWork | PipelineError]:
        """Run one segment's stages over a batch, returning errors instead of raising
        (what a StageActor does with a call)."""
        _, lo, hi = self.segments[segment]
        out: list[StageWork | PipelineError] = []
        for work in batch:
            try:
                self._apply(work, lo, hi)
                out.append(work)
            except PipelineError as exc:
                out.append(exc)
        return out

    def _apply(self, work: StageWork, lo: int, hi: int) -> None:
        ctx = work.ctx
        for stage in self.stages[lo:hi]:
            try:
                out = stage.encode(work.data, ctx)
            except PipelineError:
                raise
            except Exception as exc:  # a stage's own bug must still name stage and message
                raise PipelineError(f"{type(exc).__name__}: {exc}", stage=stage.name,
                                    message_id=ctx.message_id or None) from exc
            if out is not None:
                work.data = out
                ctx.applied.append(stage.name)

    # --- consumer side -----------------------------------------------------------------
    def decode(self, value: bytes | None, headers: MessageHeaders | Mapping[str, bytes], *,
               topic: str | None = None, key: bytes | None = None, key_known: bool = False,
               model: type[Any] | None = None) -> Any:
        """Record value -> the published object, reversing the codings the headers list.

        ``headers``: MessageHeaders, or a mapping of name -> last value. With ``topic``
        (and ``key_known``) the ciphertext must be bound to that topic (and ``key``);
        otherwise the topic and key recorded in the headers are used."""
        if value is None:
            return None
        hmap = headers.last_values() if isinstance(headers, MessageHeaders) else headers
        encoding = hmap.get(H_CONTENT_ENCODING)
        message_id = hmap.get(H_MESSAGE_ID, b"").decode("utf-8", "replace")
        codings = parse_codings(encoding, message_id) if encoding else ()
        content_type = hmap.get(H_CONTENT_TYPE, b"").decode("utf-8", "replace")
        if self.require_encryption and AES_256_GCM not in codings:
            raise DecryptionError(
                "record is not encrypted, and these settings encrypt: refused (set the "
                "encrypt stage's allow_plaintext while turning encryption on)",
                stage="encrypt", message_id=message_id or None)
        ctx = StageContext(topic, key, message_id, content_type, [], [], hmap, key_known)
        data = value
        for i in range(len(codings) - 1, -1, -1):
            name = codings[i]
            stage = self._decoders.get(name)
            if stage is None:
                if name == AES_256_GCM:
                    raise DecryptionError(
                        f"message is encrypted (key id {hmap.get(H_KEY_ID)!r}) but these "
                        "settings have no encrypt stage with keys", stage="encrypt",
                        message_id=message_id or None)
                raise PipelineError(f"unknown content encoding {name!r}", stage=name,
                                    message_id=message_id or None)
            ctx.applied = list(codings[:i])
            try:
                data = stage.decode(data, ctx)
            except PipelineError:
                raise
            except Exception as exc:
                raise PipelineError(f"{type(exc).__name__}: {exc}", stage=name,
                                    message_id=message_id or None) from exc
        try:
            return self.serializer.loads(data, content_type or None, model)
        except SerializationError as exc:
            exc.message_id = message_id or None
            raise


MAX_CODINGS = 8
"""Codings a record may list in ``content-encoding``; each at most once."""
_MAX_CODINGS_HEADER = 256
_codings_cache: dict[bytes, tuple[str, ...]] = {}


def parse_codings(header: bytes, message_id: str = "") -> tuple[str, ...]:
    """The codings a ``content-encoding`` header lists, in the order applied.

    The header comes from whoever wrote the record, so it is bounded before anything is
    kept: at most ``MAX_CODINGS`` distinct codings in a short header, and the cache of
    parsed headers holds at most 64 short entries."""
    hit = _codings_cache.get(header)
    if hit is not None:
        return hit
    if len(header) > _MAX_CODINGS_HEADER:
        raise PipelineError(f"content-encoding header of {len(header)} bytes (at most "
                            f"{_MAX_CODINGS_HEADER})", stage="decode",
                            message_id=message_id or None)
    codings = tuple(c.strip() for c in header.decode("utf-8", "replace").split(",")
                    if c.strip())
    if len(codings) > MAX_CODINGS or len(set(codings)) != len(codings):
        raise PipelineError(f"content-encoding {header[:64]!r} lists more than "
                            f"{MAX_CODINGS} codings or one coding twice", stage="decode",
                            message_id=message_id or None)
    if len(_codings_cache) >= 64:
        _codings_cache.clear()
    _codings_cache[header] = codings
    return codings


def _build_stage(spec: ByteStageSpec) -> Stage:
    if spec.stage == "compress":
        return _zstd(spec)
    if spec.stage == "encrypt":
        return AesGcmStage(spec.key_ring(), spec.primary)
    codec: ByteCodec = load_codec(spec.path, dict(spec.options))
    return CustomStage(spec.name, codec)


def _zstd(spec: CompressStageSpec) -> ZstdStage:
    return ZstdStage(level=spec.level, min_size=spec.min_size,
                     max_output_size=spec.max_output_size, dictionaries=spec.dictionaries,
                     dictionary_id=spec.dictionary_id)
