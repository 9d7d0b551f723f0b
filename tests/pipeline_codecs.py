"""Custom stages used by the pipeline tests (importable by path, as settings name them)."""

from __future__ import annotations

import base64


class Base64Codec:
    """Armour: bytes -> base64 text bytes (a stage that may sit after encryption)."""

    def encode(self, data: bytes) -> bytes:
        return base64.b64encode(data)

    def decode(self, data: bytes) -> bytes:
        return base64.b64decode(data, validate=True)


class XorCodec:
    """Not security: a cheap reversible transform with an option, to test options."""

    def __init__(self, mask: int = 0x5A) -> None:
        self.mask = mask

    def encode(self, data: bytes) -> bytes:
        return bytes(b ^ self.mask for b in data)

    decode = encode


class FailOn:
    """Raises on a marker payload, to test error reporting by index."""

    def __init__(self, marker: str = "boom") -> None:
        self.marker = marker.encode()

    def encode(self, data: bytes) -> bytes:
        if self.marker in data:
            raise RuntimeError("refused the marker payload")
        return data

    def decode(self, data: bytes) -> bytes:
        return data


class NotACodec:
    def encode(self, data: bytes) -> bytes:
        return data
