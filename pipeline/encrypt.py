"""The encrypt stage: AES-256-GCM with a key ring and associated data.

Value layout: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``, the nonce random per
message. The associated data (``associated_data``) binds the cipher, key id, topic, record
key, message id, content type and the codings applied before encryption, so the same bytes
under another topic, key or id, or with those headers changed, do not decrypt.

Keys never appear in errors, reprs or logs: errors name the key id only.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from athomic.errors import DecryptionError, EncryptionError
from athomic.messages import (
    H_BOUND_KEY,
    H_BOUND_TOPIC,
    H_ENCRYPTION,
    H_KEY_ID,
)

if TYPE_CHECKING:
    from . import StageContext

AES_256_GCM = "aes-256-gcm"
NONCE_BYTES = 12
TAG_BYTES = 16
AAD_LABEL = b"athomic-aad-v1"

_len = struct.Struct(">I").pack
_CIPHER = AES_256_GCM.encode()


def associated_data(*, cipher: bytes, key_id: bytes, topic: bytes, key: bytes | None,
                    message_id: bytes, content_type: bytes, codings: bytes) -> bytes:
    """The AES-GCM associated data of one message (wire format v1).

    ``AAD_LABEL`` then, each as a 4-byte big-endian length and the bytes: cipher, key id,
    topic; then the record key as ``0x00`` (null key) or ``0x01`` + length + bytes; then
    message id, content type, and the codings applied before encryption joined by ``", "``.
    """
    return _aad_head(cipher, key_id) + _aad_rest(topic, key, message_id, content_type,
                                                 codings)


def _aad_head(cipher: bytes, key_id: bytes) -> bytes:
    return b"".join((AAD_LABEL, _len(len(cipher)), cipher, _len(len(key_id)), key_id))


def _aad_rest(topic: bytes, key: bytes | None, message_id: bytes, content_type: bytes,
              codings: bytes) -> bytes:
    return b"".join((
        _len(len(topic)), topic,
        b"\x00" if key is None else b"\x01" + _len(len(key)) + key,
        _len(len(message_id)), message_id,
        _len(len(content_type)), content_type,
        _len(len(codings)), codings,
    ))


class AesGcmStage:
    """AES-256-GCM. ``primary`` encrypts new messages; any key id in ``keys`` decrypts."""

    name = AES_256_GCM

    def __init__(self, keys: dict[str, bytes], primary: str | None) -> None:
        if primary is not None and primary not in keys:
            raise ValueError(f"primary key id {primary!r} is not in the key ring")
        self._ring = {kid: AESGCM(key) for kid, key in keys.items()}
        self.primary = primary
        self._primary_id = primary.encode() if primary is not None else b""
        self._aad_prefix = _aad_head(_CIPHER, self._primary_id)
        self._heads = {kid.encode(): _aad_head(_CIPHER, kid.encode()) for kid in keys}

    def __repr__(self) -> str:
        return f"AesGcmStage(key_ids={sorted(self._ring)}, primary={self.primary!r})"

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._ring)

    def encode(self, data: bytes, ctx: StageContext) -> bytes:
        message_id = ctx.message_id or None
        if self.primary is None:
            raise EncryptionError("no primary key to encrypt with", stage="encrypt",
                                  message_id=message_id)
        topic = (ctx.topic or "").encode()
        aad = self._aad_prefix + _aad_rest(topic, ctx.key, ctx.message_id.encode(),
                                           ctx.content_type.encode(),
                                           ", ".join(ctx.applied).encode())
        nonce = os.urandom(NONCE_BYTES)
        try:
            sealed = self._ring[self.primary].encrypt(nonce, data, aad)
        except (OverflowError, ValueError, TypeError) as exc:
            raise EncryptionError(f"cannot encrypt: {type(exc).__name__}: {exc}",
                                  stage="encrypt", message_id=message_id) from None
        recorded = ctx.recorded
        recorded.append((H_ENCRYPTION, _CIPHER))
        recorded.append((H_KEY_ID, self._primary_id))
        recorded.append((H_BOUND_TOPIC, topic))
        if ctx.key is not None:
            recorded.append((H_BOUND_KEY, ctx.key))
        return nonce + sealed

    def decode(self, data: bytes, ctx: StageContext) -> bytes:
        message_id = ctx.message_id or None

        def fail(problem: str) -> DecryptionError:
            return DecryptionError(problem, stage="encrypt", message_id=message_id)

        headers = ctx.headers
        cipher = headers.get(H_ENCRYPTION)
        if cipher != b"aes-256-gcm":
            raise fail(f"header {H_ENCRYPTION} is {cipher!r}, expected b'aes-256-gcm'")
        key_id = headers.get(H_KEY_ID)
        if key_id is None:
            raise fail(f"no {H_KEY_ID} header")
        aead = self._ring.get(key_id.decode("utf-8", "replace"))
        if aead is None:
            raise fail(f"unknown key id {key_id.decode('utf-8', 'replace')!r}; this key "
                       f"ring has {self.key_ids}")
        bound_topic = headers.get(H_BOUND_TOPIC)
        if bound_topic is None:
            raise fail(f"no {H_BOUND_TOPIC} header")
        bound_key = headers.get(H_BOUND_KEY)
        topic, key = bound_topic, bound_key
        if ctx.topic is not None:
            # The caller knows where the record was read from: bind to that, so a record
            # copied to another topic fails even if its headers were rewritten to match.
            topic = ctx.topic.encode()
            if topic != bound_topic:
                raise fail(f"encrypted for topic {bound_topic.decode('utf-8', 'replace')!r}, "
                           f"read from {ctx.topic!r}")
        if ctx.key_known:
            key = ctx.key
            if key != bound_key:
                raise fail("encrypted for another record key than the record has")
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise fail(f"value of {len(data)} bytes is shorter than nonce and tag")
        aad = self._heads[key_id] + _aad_rest(topic, key, ctx.message_id.encode(),
                                              ctx.content_type.encode(),
                                              ", ".join(ctx.applied).encode())
        try:
            return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        except InvalidTag:
            raise fail("authentication failed: wrong key, or the value or a bound header "
                       "(topic, key, message id, content type, key id, codings) was "
                       "changed") from None
