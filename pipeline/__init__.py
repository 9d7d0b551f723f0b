"""The payload pipeline: serialize, then byte stages, each recorded in headers.

``Pipeline.serialize`` runs where ``publish`` is called and turns the message object into
bytes; ``Pipeline.encode`` / ``encode_batch`` run the byte stages (compress, encrypt,
custom) in the producer, or on a StageActor pool for stages placed there, and return the
headers that say how to read the value back. ``decode`` reverses it from those headers
alone, so a consumer with a different stage list still decodes, given the keys (and any
zstd dictionaries or custom codecs) the message needs.
"""

from .compose import (
    Encoded,
    EncodeItem,
    Pipeline,
    SegmentObserver,
    Stage,
    StageContext,
    StageRunner,
    StageWork,
)
from .compress import ZSTD
from .custom import ByteCodec
from .decode import decode_message, decode_record, pipeline_for
from .encrypt import AES_256_GCM, associated_data

__all__ = [
    "AES_256_GCM",
    "ZSTD",
    "ByteCodec",
    "EncodeItem",
    "Encoded",
    "Pipeline",
    "SegmentObserver",
    "Stage",
    "StageContext",
    "StageRunner",
    "StageWork",
    "associated_data",
    "decode_message",
    "decode_record",
    "pipeline_for",
]
