"""Damaged, cut, extended and reordered ciphertexts are rejected with the right error, and
no plaintext of the failing segment is ever released: what comes out before the error is
exactly the plaintext of the authentic segments before it."""

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
)
from unlockd.errors import (
    AuthenticationFailedError,
    CiphertextError,
    TrailingDataError,
    TruncatedCiphertextError,
)

KEY = bytes(range(32))
AAD = b"model.bin"
CS = 4096
PS = CS - TAG_SIZE
LAYOUT = SegmentLayout(CS)


def _encrypt(plaintext: bytes, key: bytes = KEY, aad: bytes = AAD) -> bytes:
    encryptor = Encryptor(key, aad, segment_size=CS)
    return encryptor.update(plaintext) + encryptor.finalize()


# Four segments, the last one partial; and three segments, the last one full.
PLAIN_PARTIAL = os.urandom(3 * PS - HEADER_SIZE + 1000)
CIPHER_PARTIAL = _encrypt(PLAIN_PARTIAL)
PLAIN_FULL = os.urandom(3 * PS - HEADER_SIZE)
CIPHER_FULL = _encrypt(PLAIN_FULL)


def _decrypt(ciphertext: bytes, *, key: bytes = KEY, aad: bytes = AAD, chunk: int = 1000):
    """Feed in chunks smaller than a segment; return (released plaintext, error)."""
    decryptor = Decryptor(key, aad, segment_size=CS)
    released = []
    try:
        for i in range(0, len(ciphertext), chunk):
            # A loop, not extend(): what came out before the error must be kept.
            released.append(decryptor.update(ciphertext[i : i + chunk]))  # noqa: PERF401
        released.append(decryptor.finalize())
    except CiphertextError as exc:
        return b"".join(released), exc
    return b"".join(released), None


def _decrypt_async(ciphertext: bytes, chunk: int):
    async def chunks():
        for i in range(0, len(ciphertext), chunk):
            yield ciphertext[i : i + chunk]

    async def run():
        released = []
        try:
            async for piece in decrypt_stream(chunks(), KEY, AAD, segment_size=CS):
                released.append(piece)  # noqa: PERF401 - keep what came before the error
        except CiphertextError as exc:
            return b"".join(released), exc
        return b"".join(released), None

    return asyncio.run(run())


def _segment(ciphertext: bytes, index: int) -> bytes:
    return ciphertext[LAYOUT.segment_start(index) : (index + 1) * CS]


def _expected_cut(cut: int) -> tuple[type[CiphertextError], int]:
    """Error type and released plaintext length for CIPHER_PARTIAL cut to ``cut`` bytes."""
    if cut < HEADER_SIZE + TAG_SIZE:
        return TruncatedCiphertextError, 0
    index = (cut - 1) // CS  # the segment holding the last byte that is left
    into = cut - LAYOUT.segment_start(index)
    if cut % CS == 0:
        # Cut at a segment boundary: segment `index` is authentic but not marked last.
        return TruncatedCiphertextError, LAYOUT.plaintext_start(index)
    if into < TAG_SIZE:
        # Too little left of the next segment to hold even a tag.
        return TruncatedCiphertextError, LAYOUT.plaintext_start(index)
    # A cut inside a segment cannot be told from tampering.
    return AuthenticationFailedError, LAYOUT.plaintext_start(index)


def test_rejections_every_cut_point_rejected_releasing_authentic_prefix_only():
    """Each of the ciphertext's proper prefixes fails with the right error and prefix."""
    for cut in range(len(CIPHER_PARTIAL)):
        released, error = _decrypt(CIPHER_PARTIAL[:cut])
        kind, good = _expected_cut(cut)
        assert type(error) is kind, cut
        assert released == PLAIN_PARTIAL[:good], cut


@pytest.mark.parametrize(
    ("plain", "cipher", "index"),
    [(PLAIN_PARTIAL, CIPHER_PARTIAL, i) for i in range(3)]
    + [(PLAIN_FULL, CIPHER_FULL, i) for i in range(2)],
)
def test_rejections_cut_at_segment_end_truncated(plain, cipher, index):
    """A stream that ends right after a segment not marked last is truncated, and that
    segment's plaintext is held back although it is authentic."""
    released, error = _decrypt(cipher[: (index + 1) * CS])
    assert isinstance(error, TruncatedCiphertextError)
    assert released == plain[: LAYOUT.plaintext_start(index)]


@pytest.mark.parametrize("extra", [b"\0", os.urandom(15), os.urandom(16), os.urandom(CS), None])
def test_rejections_bytes_after_full_last_segment_trailing_data(extra):
    """Anything after an authentic full last segment is trailing data (None = its own copy)."""
    extra = _segment(CIPHER_FULL, 2) if extra is None else extra
    released, error = _decrypt(CIPHER_FULL + extra)
    assert isinstance(error, TrailingDataError)
    assert released == PLAIN_FULL[: LAYOUT.plaintext_start(2)]


@pytest.mark.parametrize("extra", [b"\0", os.urandom(16), os.urandom(CS)])
def test_rejections_bytes_after_partial_last_segment_fail(extra):
    """Bytes appended to a partial last segment change that segment: it fails to open."""
    released, error = _decrypt(CIPHER_PARTIAL + extra)
    assert isinstance(error, AuthenticationFailedError)
    assert released == PLAIN_PARTIAL[: LAYOUT.plaintext_start(3)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_rejections_swapped_segments_fail_at_first_swapped(index):
    """Two neighbouring segments in each other's place fail where the first of them stands."""
    segments = [_segment(CIPHER_PARTIAL, i) for i in range(4)]
    segments[index], segments[index + 1] = segments[index + 1], segments[index]
    released, error = _decrypt(CIPHER_PARTIAL[:HEADER_SIZE] + b"".join(segments))
    assert isinstance(error, AuthenticationFailedError)
    assert released == PLAIN_PARTIAL[: LAYOUT.plaintext_start(index)]


@pytest.mark.parametrize("index", [1, 2])
def test_rejections_duplicated_segment_fails_at_copy(index):
    """A segment repeated right after itself fails at the copy's position."""
    segments = [_segment(CIPHER_PARTIAL, i) for i in range(4)]
    segments.insert(index + 1, segments[index])
    released, error = _decrypt(CIPHER_PARTIAL[:HEADER_SIZE] + b"".join(segments))
    assert isinstance(error, AuthenticationFailedError)
    assert released == PLAIN_PARTIAL[: LAYOUT.plaintext_start(index + 1)]


FLIPS = {
    "header-length": (0, 0),
    "salt": (5, 0),
    "nonce-prefix": (HEADER_SIZE - 1, 0),
    "body-0": (HEADER_SIZE + 100, 0),
    "tag-0": (CS - 1, 0),
    "body-1": (CS + 7, 1),
    "tag-1": (2 * CS - TAG_SIZE, 1),
    "body-3": (3 * CS + 500, 3),
    "tag-3": (len(CIPHER_PARTIAL) - 1, 3),
}


@pytest.mark.parametrize("bit", [0, 7])
@pytest.mark.parametrize("where", FLIPS)
def test_rejections_flipped_bit_fails_before_its_segment(where, bit):
    """A flipped bit anywhere fails authentication, releasing only earlier segments."""
    offset, failing = FLIPS[where]
    damaged = bytearray(CIPHER_PARTIAL)
    damaged[offset] ^= 1 << bit
    released, error = _decrypt(bytes(damaged))
    assert isinstance(error, AuthenticationFailedError)
    assert released == PLAIN_PARTIAL[: LAYOUT.plaintext_start(failing)]


def test_rejections_wrong_key_fails_releasing_nothing():
    """Another key opens nothing."""
    released, error = _decrypt(CIPHER_PARTIAL, key=bytes(32))
    assert isinstance(error, AuthenticationFailedError)
    assert released == b""


def test_rejections_wrong_associated_data_fails_releasing_nothing():
    """Other associated data derives another segment key: nothing opens."""
    released, error = _decrypt(CIPHER_PARTIAL, aad=b"other.bin")
    assert isinstance(error, AuthenticationFailedError)
    assert released == b""


@pytest.mark.parametrize("chunk", [1, 999, CS, CS + 1, 10 * CS])
def test_rejections_async_adapter_releases_authentic_prefix_for_any_chunking(chunk):
    """decrypt_stream yields every authentic segment before the failing one, even when a
    chunk spans several segments."""
    damaged = bytearray(CIPHER_PARTIAL)
    damaged[2 * CS + 10] ^= 1
    released, error = _decrypt_async(bytes(damaged), chunk)
    assert isinstance(error, AuthenticationFailedError)
    assert released == PLAIN_PARTIAL[: LAYOUT.plaintext_start(2)]


def test_rejections_decryptor_unusable_after_error():
    """After a failure the decryptor refuses more input instead of carrying on."""
    decryptor = Decryptor(KEY, b"wrong", segment_size=CS)
    with pytest.raises(AuthenticationFailedError):
        decryptor.update(CIPHER_PARTIAL)
    with pytest.raises(RuntimeError):
        decryptor.update(b"x")


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_rejections_segment_aligned_chunks_same_outcomes(kind):
    """Chunks of exactly one segment (kept uncopied when bytes) fail and succeed alike."""
    for cipher, plain in ((CIPHER_FULL, PLAIN_FULL), (CIPHER_PARTIAL, PLAIN_PARTIAL)):
        chunks = [kind(cipher[i : i + CS]) for i in range(0, len(cipher), CS)]
        for cut in range(1, len(chunks)):
            decryptor = Decryptor(KEY, AAD, segment_size=CS)
            released = [decryptor.update(c) for c in chunks[:cut]]
            with pytest.raises(TruncatedCiphertextError):
                decryptor.finalize()
            assert b"".join(released) == plain[: LAYOUT.plaintext_start(cut - 1)]
        decryptor = Decryptor(KEY, AAD, segment_size=CS)
        out = [decryptor.update(c) for c in chunks]
        assert b"".join([*out, decryptor.finalize()]) == plain
    decryptor = Decryptor(KEY, AAD, segment_size=CS)
    released = [decryptor.update(kind(CIPHER_FULL[i : i + CS])) for i in range(0, 3 * CS, CS)]
    with pytest.raises(TrailingDataError):
        decryptor.update(kind(b"x"))
    assert b"".join(released) == PLAIN_FULL[: LAYOUT.plaintext_start(2)]


def test_rejections_whole_segment_bytes_chunk_kept_by_reference():
    """A bytes chunk ending on a segment boundary is held uncopied; a bytearray is copied."""
    decryptor = Decryptor(KEY, AAD, segment_size=CS)
    decryptor.update(CIPHER_FULL[:CS])
    assert decryptor._held is not None
    decryptor = Decryptor(KEY, AAD, segment_size=CS)
    decryptor.update(bytearray(CIPHER_FULL[:CS]))
    assert decryptor._held is None
