"""Byte compatibility with Google Tink's AES-GCM-HKDF streaming AEAD, both ways."""

from __future__ import annotations

import asyncio
import os

import pytest

from unlockd.crypto_stream import (
    HEADER_SIZE,
    TAG_SIZE,
    Decryptor,
    Encryptor,
    SegmentLayout,
    decrypt_stream,
    encrypt_stream,
)

KEY = bytes(range(32))
SEGMENT_SIZES = [4096, 1 << 20]


def _sizes(cs: int) -> list[int]:
    ps = cs - TAG_SIZE
    first, second = ps - HEADER_SIZE, 2 * ps - HEADER_SIZE  # end of segment 0 and of segment 1
    return sorted({0, 1, first - 1, first, first + 1, second - 1, second, second + 1, 10_000_019})


CASES = [
    pytest.param(cs, size, aad, id=f"cs{cs}-p{size}-{'aad' if aad else 'noaad'}")
    for cs in SEGMENT_SIZES
    for size in _sizes(cs)
    for aad in (b"", b"model.bin")
]


def _ours_encrypt(plaintext: bytes, aad: bytes, cs: int, chunk: int = 65536) -> bytes:
    encryptor = Encryptor(KEY, aad, segment_size=cs)
    out = [encryptor.update(plaintext[i : i + chunk]) for i in range(0, len(plaintext), chunk)]
    return b"".join([*out, encryptor.finalize()])


def _ours_decrypt(ciphertext: bytes, aad: bytes, cs: int, chunk: int = 65536) -> bytes:
    decryptor = Decryptor(KEY, aad, segment_size=cs)
    out = [decryptor.update(ciphertext[i : i + chunk]) for i in range(0, len(ciphertext), chunk)]
    return b"".join([*out, decryptor.finalize()])


@pytest.mark.parametrize(("cs", "size", "aad"), CASES)
def test_interop_ours_encrypted_tink_decrypts(tink_stream, cs, size, aad):
    """Tink decrypts what we encrypt, and the length follows the layout formula."""
    plaintext = os.urandom(size)
    ciphertext = _ours_encrypt(plaintext, aad, cs)
    assert len(ciphertext) == SegmentLayout(cs).ciphertext_size(size)
    assert tink_stream(KEY, cs).decrypt(ciphertext, aad) == plaintext


@pytest.mark.parametrize(("cs", "size", "aad"), CASES)
def test_interop_tink_encrypted_ours_decrypts(tink_stream, cs, size, aad):
    """We decrypt what Tink encrypts, and its length is the one our layout predicts."""
    plaintext = os.urandom(size)
    ciphertext = tink_stream(KEY, cs).encrypt(plaintext, aad)
    layout = SegmentLayout(cs)
    assert len(ciphertext) == layout.ciphertext_size(size)
    assert layout.plaintext_size(len(ciphertext)) == size
    assert _ours_decrypt(ciphertext, aad, cs) == plaintext


async def _agen(data: bytes, chunk: int):
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


async def _collect(chunks) -> bytes:
    return b"".join([piece async for piece in chunks])


@pytest.mark.parametrize("cs", SEGMENT_SIZES)
def test_interop_async_adapters_roundtrip_with_tink(tink_stream, cs):
    """The async adapters' output decrypts with Tink, and they decrypt Tink's output."""
    plaintext = os.urandom(3 * cs + 12345)
    tink = tink_stream(KEY, cs)
    ours = asyncio.run(
        _collect(encrypt_stream(_agen(plaintext, 10_000), KEY, b"a", segment_size=cs))
    )
    assert tink.decrypt(ours, b"a") == plaintext
    theirs = tink.encrypt(plaintext, b"a")
    chunks = _agen(theirs, 3 * cs)  # chunks larger than a segment go through in pieces
    assert asyncio.run(_collect(decrypt_stream(chunks, KEY, b"a", segment_size=cs))) == plaintext
