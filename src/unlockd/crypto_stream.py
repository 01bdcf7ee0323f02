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
    from collections.abc import AsyncIterable, AsyncIterator

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
    "read_key_file",
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


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file written by ``unlockd keygen``."""
    try:
        with open(path, "rb") as f:  # noqa: PTH123
            text = f.read(4096)
    except OSError as exc:
        msg = f"cannot read key file {os.fspath(path)!r}: {exc.strerror}"
        raise InvalidKeyError(msg) from exc
    return decode_key(text)


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        msg = f"key must be {KEY_SIZE} bytes, got {len(key)}"
        raise InvalidKeyError(msg)


@dataclass(frozen=True, slots=True)
class SegmentRange:
    """The segments that hold a plaintext byte range, and where they lie in the ciphertext."""

    first_segment: int
    last_segment: int
    ciphertext_start: int
    ciphertext_end: int
    skip: int  # plaintext bytes to drop from the start of the first segment
    length: int  # plaintext bytes wanted


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
        return SegmentRange(
            first_segment=first,
            last_segment=last,
            ciphertext_start=self.segment_start(first),
            ciphertext_end=self.segment_bounds(last, ciphertext_size)[1],
            skip=start - self.plaintext_start(first),
            length=end - start,
        )


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

    def seal_into(
        self, index: int, last: bool, plaintext: memoryview | bytes, out: memoryview
    ) -> int:
        """Encrypt one segment into ``out``; return the bytes written (len(plaintext) + 16)."""
        n = len(plaintext) + TAG_SIZE
        self._aead.encrypt_into(self._nonce(index, last), plaintext, None, out[:n])
        return n

    def open_into(
        self, index: int, last: bool, ciphertext: memoryview | bytes, out: memoryview
    ) -> int:
        """Decrypt and authenticate one segment into ``out``; return the plaintext length."""
        n = len(ciphertext) - TAG_SIZE
        if n < 0:
            raise AuthenticationFailedError(_AUTH_FAILED)
        try:
            self._aead.decrypt_into(self._nonce(index, last), ciphertext, None, out[:n])
        except InvalidTag:
            raise AuthenticationFailedError(_AUTH_FAILED) from None
        return n

    def open(self, index: int, last: bool, ciphertext: memoryview | bytes) -> bytes:
        """Decrypt and authenticate one segment."""
        try:
            return self._aead.decrypt(self._nonce(index, last), ciphertext, None)
        except InvalidTag:
            raise AuthenticationFailedError(_AUTH_FAILED) from None

    def authentic(self, index: int, last: bool, ciphertext: memoryview | bytes) -> bool:
        """Tell whether a segment opens under the given position, releasing nothing."""
        try:
            self._aead.decrypt(self._nonce(index, last), ciphertext, None)
        except InvalidTag:
            return False
        return True


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
        self._layout = SegmentLayout(segment_size)
        self.header = header if header is not None else SegmentCipher.new_header()
        self._cipher = SegmentCipher(key, self.header, associated_data)
        ps = self._layout.plaintext_segment_size
        self._buf = bytearray(ps)
        self._out = bytearray(segment_size)
        self._filled = 0
        self._capacity = ps - HEADER_SIZE
        self._index = 0
        self._pending: bytes | None = self.header
        self._finished = False

    def _take_pending(self) -> list[bytes]:
        if self._pending is None:
            return []
        out, self._pending = [self._pending], None
        return out

    def _seal(self, last: bool) -> bytes:
        n = self._cipher.seal_into(
            self._index, last, memoryview(self._buf)[: self._filled], memoryview(self._out)
        )
        self._index += 1
        self._filled = 0
        self._capacity = self._layout.plaintext_segment_size
        return bytes(memoryview(self._out)[:n])

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed plaintext; return the ciphertext that is complete."""
        if self._finished:
            msg = "encryptor already finalized"
            raise RuntimeError(msg)
        out = self._take_pending()
        view = memoryview(data).cast("B")
        while view:
            if self._filled == self._capacity:
                out.append(self._seal(last=False))
            take = min(len(view), self._capacity - self._filled)
            self._buf[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        return b"".join(out) if len(out) != 1 else out[0]

    def finalize(self) -> bytes:
        """Seal the last segment and return the rest of the ciphertext."""
        if self._finished:
            msg = "encryptor already finalized"
            raise RuntimeError(msg)
        out = self._take_pending()
        out.append(self._seal(last=True))
        self._finished = True
        return b"".join(out)


class Decryptor:
    """Decrypts a stream given in chunks of any size, authenticating each segment first.

    ``update`` returns plaintext of every segment that is complete and authentic;
    ``finalize`` opens the last segment. A segment is only known to be the last one at
    the end of input, so one segment (plus a byte) is held back.
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
        self._layout = SegmentLayout(segment_size)
        self._cipher: SegmentCipher | None = None
        self._buf = bytearray(segment_size + 1)
        self._out = bytearray(segment_size)
        self._filled = 0
        # Segment 0 is shorter by the header, which is buffered in its place at first.
        self._want = HEADER_SIZE
        self._index = 0
        self._finished = False

    def _open(self, last: bool) -> bytes:
        assert self._cipher is not None
        segment = memoryview(self._buf)[: self._want]
        try:
            n = self._cipher.open_into(self._index, last, segment, memoryview(self._out))
        except AuthenticationFailedError:
            # Tell truncation and trailing data from tampering, as age does; only
            # authentic segments in the wrong place get the distinct errors.
            if self._cipher.authentic(self._index, not last, segment):
                if last:
                    raise TruncatedCiphertextError("ciphertext is truncated") from None
                raise TrailingDataError("data follows the last segment") from None
            raise
        self._index += 1
        return bytes(memoryview(self._out)[:n])

    def _start(self) -> None:
        self._cipher = SegmentCipher(self._key, bytes(self._buf[:HEADER_SIZE]), self._aad)
        self._filled = 0
        self._want = self._layout.segment_size - HEADER_SIZE

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed ciphertext; return the plaintext of every segment known to be complete."""
        if self._finished:
            msg = "decryptor already finalized"
            raise RuntimeError(msg)
        out: list[bytes] = []
        view = memoryview(data).cast("B")
        while view:
            if self._cipher is None:
                take = min(len(view), HEADER_SIZE - self._filled)
            else:
                take = min(len(view), self._want + 1 - self._filled)
            self._buf[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._cipher is None:
                if self._filled == HEADER_SIZE:
                    self._start()
            elif self._filled > self._want:
                # One byte beyond a full segment proves it is not the last one.
                extra = self._buf[self._want]
                out.append(self._open(last=False))
                self._buf[0] = extra
                self._filled = 1
                self._want = self._layout.segment_size
        return b"".join(out) if len(out) != 1 else out[0]

    def finalize(self) -> bytes:
        """Open the last segment; raise if the stream ended early."""
        if self._finished:
            msg = "decryptor already finalized"
            raise RuntimeError(msg)
        self._finished = True
        if self._cipher is None:
            raise TruncatedCiphertextError("ciphertext is truncated")
        if self._filled < TAG_SIZE:
            raise TruncatedCiphertextError("ciphertext is truncated")
        self._want = self._filled
        return self._open(last=True)


async def encrypt_stream(
    chunks: AsyncIterable[bytes],
    key: bytes,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Encrypt an async stream of plaintext chunks; yield ciphertext as segments complete."""
    encryptor = Encryptor(key, associated_data, segment_size=segment_size)
    async for chunk in chunks:
        if out := encryptor.update(chunk):
            yield out
    yield encryptor.finalize()


async def decrypt_stream(
    chunks: AsyncIterable[bytes],
    key: bytes,
    associated_data: bytes = b"",
    *,
    segment_size: int = SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Decrypt an async stream of ciphertext chunks; yield only authenticated plaintext."""
    decryptor = Decryptor(key, associated_data, segment_size=segment_size)
    async for chunk in chunks:
        if out := decryptor.update(chunk):
            yield out
    if out := decryptor.finalize():
        yield out
