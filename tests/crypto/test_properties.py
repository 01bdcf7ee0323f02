"""Chunking never matters: any split of the input gives the same output, sync or async."""

from __future__ import annotations

import asyncio
import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from unlockd.crypto_stream import (
    Decryptor,
    Encryptor,
    SegmentLayout,
    decrypt_stream,
    encrypt_stream,
)

KEY = bytes(range(32))
CS = 4096
HEADER = bytes([40]) + os.urandom(39)
PLAINTEXT = os.urandom(5 * CS + 77)


def _reference() -> bytes:
    encryptor = Encryptor(KEY, b"p", segment_size=CS, header=HEADER)
    return encryptor.update(PLAINTEXT) + encryptor.finalize()


CIPHERTEXT = _reference()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    return [b"", *pieces, b""]  # empty chunks must be harmless too


cuts = st.lists(st.integers(0, 1 << 20), max_size=30)


@settings(max_examples=60, deadline=None)  # shared CI machines: no time limit
@given(cuts=cuts, size=st.integers(0, len(PLAINTEXT)))
def test_properties_encryptor_any_chunking_same_ciphertext(cuts, size):
    """Encrypting a prefix in any chunks gives the ciphertext of encrypting it whole."""
    plaintext = PLAINTEXT[:size]
    whole = Encryptor(KEY, b"p", segment_size=CS, header=HEADER)
    expected = whole.update(plaintext) + whole.finalize()
    encryptor = Encryptor(KEY, b"p", segment_size=CS, header=HEADER)
    out = [encryptor.update(chunk) for chunk in _split(plaintext, cuts)]
    assert b"".join([*out, encryptor.finalize()]) == expected


@settings(max_examples=60, deadline=None)  # shared CI machines: no time limit
@given(cuts=cuts)
def test_properties_decryptor_any_chunking_same_plaintext(cuts):
    """Decrypting in any chunks (bytes, bytearray or memoryview) gives the plaintext."""
    decryptor = Decryptor(KEY, b"p", segment_size=CS)
    out = []
    for i, chunk in enumerate(_split(CIPHERTEXT, cuts)):
        kind = (bytes, bytearray, memoryview)[i % 3]
        out.append(decryptor.update(kind(chunk)))
    assert b"".join([*out, decryptor.finalize()]) == PLAINTEXT


async def _agen(chunks):
    for chunk in chunks:
        yield chunk


async def _collect(stream) -> bytes:
    return b"".join([piece async for piece in stream])


@settings(max_examples=40, deadline=None)  # shared CI machines: no time limit
@given(cuts=cuts)
def test_properties_async_adapters_any_chunking_round_trip(cuts):
    """encrypt_stream then decrypt_stream, each fed any chunking, gives the plaintext back."""
    encrypted = asyncio.run(
        _collect(encrypt_stream(_agen(_split(PLAINTEXT, cuts)), KEY, b"p", segment_size=CS))
    )
    assert len(encrypted) == len(CIPHERTEXT)
    chunks = _split(encrypted, [c * 7 for c in cuts])
    decrypted = asyncio.run(_collect(decrypt_stream(_agen(chunks), KEY, b"p", segment_size=CS)))
    assert decrypted == PLAINTEXT


@settings(max_examples=40, deadline=None)  # shared CI machines: no time limit
@given(cuts=cuts)
def test_properties_decrypt_stream_yields_whole_segments(cuts):
    """The adapter yields one piece per segment whatever the input chunking."""
    pieces = asyncio.run(_pieces(_split(CIPHERTEXT, cuts)))
    layout = SegmentLayout(CS)
    bounds = [layout.plaintext_start(i) for i in range(layout.segment_count(len(CIPHERTEXT)))]
    assert [len(p) for p in pieces] == [
        b - a for a, b in zip(bounds, [*bounds[1:], len(PLAINTEXT)], strict=True)
    ]


async def _pieces(chunks) -> list[bytes]:
    return [p async for p in decrypt_stream(_agen(chunks), KEY, b"p", segment_size=CS)]
