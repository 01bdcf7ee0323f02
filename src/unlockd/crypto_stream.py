"""Tink's AES-GCM-HKDF streaming AEAD (``AES256_GCM_HKDF_1MB``), byte for byte.

Layout of a ciphertext::

    header (40 B): 0x28 | salt (32 B) | nonce prefix (7 B)
    segment 0:     AES-GCM(plaintext[0 : PS - 40]) + tag       (CS - 40 bytes when full)
    segment i:     AES-GCM(plaintext[i*PS - 40 : (i+1)*PS - 40]) + tag   (CS bytes when full)

with CS the ciphertext segment size, PS = CS - 16, the segment key
HKDF-SHA256(main key, salt, info=associated data) and the nonce of segment i
``nonce prefix | i (4 bytes, big-endian) | 1 if last else 0``.

The core is sans-I/O: :class:`SegmentLayout` does the arithmetic, :class:`SegmentCipher`
seals and opens single segments, :class:`Encryptor` and :class:`Decryptor` turn chunks
of any size into output bytes. :func:`encrypt_stream` and :func:`decrypt_stream` adapt
them to async iterators.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from unlockd.errors import (
    AuthenticationFailedError,
    InvalidKeyError,
    TrailingDataError,
    TruncatedCiphertextError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Sequence
    from typing import TypeAlias

    # Anything that exposes contiguous bytes; what cryptography's AEADs accept.
    Buffer: TypeAlias = bytes | bytearray | memoryview

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "SEGMENT_SIZE",
    "TAG_SIZE",
    "Decryptor",
    "Encryptor",
    "SegmentCipher",
    "SegmentLayout",
    "SegmentRange",
    "decode_key",
    "decrypt_stream",
    "encode_key",
    "encrypt_stream",
    "generate_key",
]

KEY_SIZE = 32
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE
TAG_SIZE = 16
SEGMENT_SIZE = 1 << 20
_MAX_SEGMENTS = 1 << 32
_AUTH_FAILED = "ciphertext failed authentication (wrong key or associated data, or corrupted)"


def generate_key() -> bytes:
    """Return a fresh random 32-byte main key."""
    return os.urandom(KEY_SIZE)


def encode_key(key: bytes) -> str:
    """Return the key-file form of ``key``: standard base64 of its 32 bytes."""
    _check_key(key)
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str | bytes) -> bytes:
    """Parse the key-file form (base64 of 32 bytes, surrounding whitespace allowed)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        msg = "key is not valid base64"
        raise InvalidKeyError(msg) from exc
    _check_key(key)
    return key


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        msg = f"key must be {KEY_SIZE} bytes, got {len(key)}"
        raise InvalidKeyError(msg)


@dataclass(frozen=True, slots=True)
class SegmentRange:
    """The first and last segment that hold a plaintext byte range."""

    first_segment: int
    last_segment: int


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """Segment arithmetic for one ciphertext segment size."""

    segment_size: int = SEGMENT_SIZE

    def __post_init__(self) -> None:
        if self.segment_size <= HEADER_SIZE + TAG_SIZE:
            msg = f"segment size must exceed {HEADER_SIZE + TAG_SIZE}"
            raise ValueError(msg)

    @property
    def plaintext_segment_size(self) -> int:
        return self.segment_size - TAG_SIZE

    def segment_count_for_plaintext(self, plaintext_size: int) -> int:
        """Number of segments of a ciphertext of ``plaintext_size`` bytes (at least one)."""
        ps = self.plaintext_segment_size
        return max(1, -(-(plaintext_size + HEADER_SIZE) // ps))

    def ciphertext_size(self, plaintext_size: int) -> int:
        """Ciphertext length of a plaintext of ``plaintext_size`` bytes."""
        if plaintext_size < 0:
            msg = "plaintext size must not be negative"
            raise ValueError(msg)
        n = self.segment_count_for_plaintext(plaintext_size)
        return HEADER_SIZE + plaintext_size + TAG_SIZE * n

    def segment_count(self, ciphertext_size: int) -> int:
        """Number of segments of a ciphertext of ``ciphertext_size`` bytes."""
        self.plaintext_size(ciphertext_size)
        return -(-ciphertext_size // self.segment_size)

    def plaintext_size(self, ciphertext_size: int) -> int:
        """Plaintext length of a ciphertext of ``ciphertext_size`` bytes.

        Raises :class:`TruncatedCiphertextError` for a length no ciphertext can have.
        """
        n = -(-ciphertext_size // self.segment_size)
        size = ciphertext_size - HEADER_SIZE - TAG_SIZE * n
        if n == 0 or size < 0 or self.ciphertext_size(size) != ciphertext_size:
            msg = f"no ciphertext is {ciphertext_size} bytes long"
            raise TruncatedCiphertextError(msg)
        return size

    def segment_start(self, index: int) -> int:
        """Offset of segment ``index`` in the ciphertext."""
        return HEADER_SIZE if index == 0 else index * self.segment_size

    def segment_bounds(self, index: int, ciphertext_size: int) -> tuple[int, int]:
        """``(start, end)`` of segment ``index`` in a ciphertext of ``ciphertext_size`` bytes."""
        return self.segment_start(index), min((index + 1) * self.segment_size, ciphertext_size)

    def plaintext_start(self, index: int) -> int:
        """Offset in the plaintext of the first byte of segment ``index``."""
        return max(0, index * self.plaintext_segment_size - HEADER_SIZE)

    def range(self, start: int, end: int, ciphertext_size: int) -> SegmentRange:
        """Map the plaintext range ``[start, end)`` to the segments that hold it."""
        total = self.plaintext_size(ciphertext_size)
        if not 0 <= start < end <= total:
            msg = f"range [{start}, {end}) is not within a plaintext of {total} bytes"
            raise ValueError(msg)
        ps = self.plaintext_segment_size
        first = (start + HEADER_SIZE) // ps
        last = (end - 1 + HEADER_SIZE) // ps
        return SegmentRange(first_segment=first, last_segment=last)


class SegmentCipher:
    """Seals and opens single segments of one stream (one salt, one nonce prefix)."""

    __slots__ = ("_aead", "_nonce_prefix")

    def __init__(self, key: bytes, header: bytes, associated_data: bytes = b"") -> None:
        _check_key(key)
        if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
            raise AuthenticationFailedError(_AUTH_FAILED)
        salt = bytes(header[1 : 1 + SALT_SIZE])
        self._nonce_prefix = bytes(header[1 + SALT_SIZE :])
        derived = HKDF(
            algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=associated_data
        ).derive(key)
        self._aead = AESGCM(derived)

    @staticmethod
    def new_header() -> bytes:
        """Return a fresh random header."""
        return bytes([HEADER_SIZE]) + os.urandom(SALT_SIZE + NONCE_PREFIX_SIZE)

    def _nonce(self, index: int, last: bool) -> bytes:
        if index >= _MAX_SEGMENTS:
            msg = "stream is too long"
            raise ValueError(msg)
        return self._nonce_prefix + struct.pack(">IB", index, last)

    def seal(self, index: int, last: bool, plaintext: Buffer) -> bytes:
        """Encrypt one segment; return its ciphertext (len(plaintext) + 16 bytes)."""
        return self._aead.encrypt(self._nonce(index, last), plaintext, None)

    def open(self, index: int, last: bool, ciphertext: Buffer) -> bytes:
        """Decrypt and authenticate one segment."""
        try:
            return self._aead.decrypt(self._nonce(index, last), ciphertext, None)
        except InvalidTag:
            raise AuthenticationFailedError(_AUTH_FAILED) from None

    def authentic(self, index: int, last: bool, ciphertext: Buffer) -> bool:
        """Tell whether a segment opens under the given position, releasing nothing."""
        try:
            self._aead.decrypt(self._nonce(index, last), ciphertext, None)
        except InvalidTag:
            return False
        return True


# Why the segments are gathered and each comes out as a fresh ``bytes``: docs/performance.md.


class Encryptor:
    """Encrypts a stream given in chunks of any size.

    ``update`` returns the ciphertext completed so far (the header with the first call);
    ``finalize`` seals the last segment. A full segment is held back until more input
    arrives, because only the end of input tells which segment is last.
    """

    def __init__(
        self,
        key: bytes,
        associated_data: bytes = b"",
        *,
        segment_size: int = SEGMENT_SIZE,
        header: bytes | None = None,
    ) -> None:
        self.header = header if header is not None else SegmentCipher.new_header()
        self._cipher = SegmentCipher(key, self.header, associated_data)
        self._segment = SegmentLayout(segment_size).plaintext_segment_size
        self._buf = memoryview(bytearray(self._segment))
        self._filled = 0
        # Segment 0 holds less plaintext: the header takes its place.
        self._capacity = self._segment - HEADER_SIZE
        self._index = 0
        self._header_sent = False
        self._finished = False

    def update(self, data: Buffer) -> bytes:
        """Feed plaintext; return the ciphertext that is complete."""
        return _join(self.feed(data))

    def feed(self, data: Buffer) -> list[bytes]:
        """Like :meth:`update`, but return the ciphertext as pieces (at most a segment each)."""
        view = _byte_view(data)
        end, filled = len(view), self._filled
        if end <= self._capacity - filled and self._header_sent:
            # The common case (chunks smaller than a segment), kept short: it runs per chunk.
            # A finalized encryptor has no capacity left, so it never gets here.
            self._buf[filled : filled + end] = view
            self._filled = filled + end
            return []
        out = self._start()
        pos = 0
        view = memoryview(view)  # slices below must not copy
        while pos < end:
            if self._filled == self._capacity:
                # More input proves that the buffered segment is not the last one.
                out.append(self._seal(self._buf[: self._filled], last=False))
            capacity = self._capacity
            if self._filled == 0 and end - pos > capacity:
                out.append(self._seal(view[pos : pos + capacity], last=False))
                pos += capacity
                continue
            take = min(end - pos, capacity - self._filled)
            self._buf[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
        return out

    def finalize(self) -> bytes:
        """Seal the last segment and return the rest of the ciphertext."""
        out = self._start()
        out.append(self._seal(self._buf[: self._filled], last=True))
        self._finished = True
        self._capacity = -1
        return _join(out)

    def _start(self) -> list[bytes]:
        if self._header_sent and not self._finished:
            return []
        if self._finished:
            msg = "encryptor already finalized"
            raise RuntimeError(msg)
        self._header_sent = True
        return [self.header]

    def _seal(self, plaintext: memoryview, last: bool) -> bytes:
        ciphertext = self._cipher.seal(self._index, last, plaintext)
        self._index += 1
        self._filled = 0
        self._capacity = self._segment
        return ciphertext


class Decryptor:
    """Decrypts a stream given in chunks of any size, authenticating each segment first.

    ``update`` returns the plaintext of every segment that is complete and authentic;
    ``finalize`` opens the last segment. Only the end of input tells which segment is the
    last, so a full segment is held back until more input arrives. A stream cut at a segment
    boundary, or too short to hold a segment, raises :class:`TruncatedCiphertextError`; an
    authentic last segment followed by more data raises :class:`TrailingDataError`; anything
    else (including a cut inside a segment, which cannot be told from tampering) raises
    :class:`AuthenticationFailedError`. After an error the decryptor is unusable.
    """

    def __init__(
        self,
        key: bytes,
        associated_data: bytes = b"",
        *,
        segment_size: int = SEGMENT_SIZE,
    ) -> None:
        _check_key(key)
        self._key = key
        self._aad = associated_data
        self._segment = SegmentLayout(segment_size).segment_size
        self._cipher: SegmentCipher | None = None
        self._buf = memoryview(bytearray(self._segment))
        self._held: memoryview | None = None  # a whole segment of the caller's bytes, uncopied
        self._filled = 0
        # The header is gathered first, then segment 0, which is shorter by the header.
        self._want = HEADER_SIZE
        self._index = 0
        self._finished = False

    def update(self, data: Buffer) -> bytes:
        """Feed ciphertext; return the plaintext of every segment known to be complete."""
        return _join(self.feed(data))

    def feed(self, data: Buffer) -> list[bytes]:
        """Like :meth:`update`, but return the plaintext as pieces (at most a segment each).

        When it raises, the authentic segments of this same call are lost with the list:
        feed at most a segment at a time to get every segment before a failing one.
        """
        if self._finished:
            msg = "decryptor already finalized"
            raise RuntimeError(msg)
        out: list[bytes] = []
        view = _byte_view(data)
        pos, end, filled = 0, len(view), self._filled
        if end < self._want - filled and self._cipher is not None:
            # The common case (chunks smaller than a segment), kept short: it runs per chunk.
            self._buf[filled : filled + end] = view
            self._filled = filled + end
            return out
        view = memoryview(view)  # slices below must not copy
        while pos < end:
            if self._filled == self._want:
                # More input proves that the buffered segment is not the last one.
                out.append(self._open(self._buffered(), last=False))
            want = self._want
            if self._filled == 0 and self._cipher is not None and end - pos >= want:
                # A whole segment in the input needs no copy: open it in place, or, when it
                # ends the chunk (reads of one segment size), keep it by reference until the
                # next input, which is only safe for immutable bytes.
                segment = view[pos : pos + want]
                if end - pos > want:
                    out.append(self._open(segment, last=False))
                    pos += want
                    continue
                if type(view.obj) is bytes:
                    self._held, self._filled = segment, want
                    break
            take = min(end - pos, want - self._filled)
            self._buf[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
            if self._cipher is None and self._filled == HEADER_SIZE:
                self._read_header()
        return out

    def finalize(self) -> bytes:
        """Open the last segment; raise if the stream ended early."""
        if self._finished:
            msg = "decryptor already finalized"
            raise RuntimeError(msg)
        self._finished = True
        if self._cipher is None or self._filled < TAG_SIZE:
            raise TruncatedCiphertextError("ciphertext is truncated")
        return self._open(self._buffered(), last=True)

    def _buffered(self) -> memoryview:
        return self._held if self._held is not None else self._buf[: self._filled]

    def _read_header(self) -> None:
        try:
            self._cipher = SegmentCipher(self._key, bytes(self._buf[:HEADER_SIZE]), self._aad)
        except AuthenticationFailedError:
            self._finished = True
            raise
        self._filled = 0
        self._want = self._segment - HEADER_SIZE

    def _open(self, segment: memoryview, last: bool) -> bytes:
        cipher = self._cipher
        assert cipher is not None
        try:
            plaintext = cipher.open(self._index, last, segment)
        except AuthenticationFailedError:
            self._finished = True
            # Tell truncation and trailing data from tampering, as age does; only an
            # authentic segment in the wrong place gets the distinct errors.
            if cipher.authentic(self._index, not last, segment):
                if last:
                    raise TruncatedCiphertextError("ciphertext is truncated") from None
                raise TrailingDataError("data follows the last segment") from None
            raise
        self._index += 1
        self._filled = 0
        self._want = self._segment
        self._held = None
        return plaintext


def _byte_view(data: Buffer) -> Buffer:
    # Runs once per chunk: the common types pass through without building a new view.
    if type(data) is bytes or type(data) is bytearray:
        return data
    if isinstance(data, memoryview) and data.format == "B" and data.ndim == 1:
        return data
    return memoryview(data).cast("B")


def _join(pieces: list[bytes]) -> bytes:
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)


def _pieces(chunk: Buffer, size: int) -> Sequence[Buffer]:
    # A chunk larger than a segment goes in pieces of one segment: the event loop then waits
    # for at most one segment's AES between yields, and a decryption error keeps (releases)
    # every segment before the failing one, since ``feed`` returns nothing when it raises.
    # No generator here: this runs once per chunk.
    if len(chunk) <= size:
        return (chunk,)
    view = memoryview(chunk).cast("B")
    return [view[start : start + size] for start in range(0, len(view), size)]


async def encrypt_stream(
    chunks: AsyncIterable[Buffer],
    key: bytes,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Encrypt an async stream of plaintext chunks; yield ciphertext as segments complete."""
    encryptor = Encryptor(key, associated_data, segment_size=segment_size)
    feed = encryptor.feed
    async for chunk in chunks:
        if len(chunk) <= segment_size:
            for ciphertext in feed(chunk):
                yield ciphertext
            continue
        for piece in _pieces(chunk, segment_size):
            for ciphertext in feed(piece):
                yield ciphertext
    yield encryptor.finalize()


async def decrypt_stream(
    chunks: AsyncIterable[Buffer],
    key: bytes,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Decrypt an async stream of ciphertext chunks; yield only authenticated plaintext."""
    decryptor = Decryptor(key, associated_data, segment_size=segment_size)
    feed = decryptor.feed
    async for chunk in chunks:
        if len(chunk) <= segment_size:
            for plaintext in feed(chunk):
                yield plaintext
            continue
        for piece in _pieces(chunk, segment_size):
            for plaintext in feed(piece):
                yield plaintext
    if plaintext := decryptor.finalize():
        yield plaintext
