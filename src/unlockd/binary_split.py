"""Small part / big part of a ciphertext: split a stream in two.

The small part is the first ``min(S, L)`` bytes of a ciphertext of ``L`` bytes and stays
with the authenticated upstream API; the big part is the rest and lives on the CDN. The
ciphertext is their concatenation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from unlockd.crypto_stream import HEADER_SIZE

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator

__all__ = ["DEFAULT_SMALL_SIZE", "MIN_SMALL_SIZE", "check_small_size", "split"]

DEFAULT_SMALL_SIZE = 4096
# The small part holds at least the ciphertext header, so the API alone can tell a bad key.
MIN_SMALL_SIZE = HEADER_SIZE


def check_small_size(small_size: int) -> int:
    """Return ``small_size`` if the small part can hold at least the ciphertext header."""
    if small_size < MIN_SMALL_SIZE:
        msg = f"small part size must be at least {MIN_SMALL_SIZE} bytes, got {small_size}"
        raise ValueError(msg)
    return small_size


async def split(
    chunks: AsyncIterable[bytes], small_size: int = DEFAULT_SMALL_SIZE
) -> tuple[bytes, AsyncIterator[bytes]]:
    """Read the first ``small_size`` bytes of ``chunks``; return them and the rest as a stream.

    The returned small part is shorter only when the whole stream is; the big-part stream
    then yields nothing. It must be consumed (or closed) by the caller.
    """
    check_small_size(small_size)
    iterator = aiter(chunks)
    small = bytearray()
    rest = b""
    async for chunk in iterator:
        need = small_size - len(small)
        small += chunk[:need]
        if len(chunk) >= need:
            rest = chunk[need:]
            break
    return bytes(small), _chain(rest, iterator)


async def _chain(first: bytes, iterator: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for chunk in iterator:
            if chunk:
                yield chunk
    finally:
        # Close the source with us, so an abandoned upload lets go of the client's body.
        if isinstance(iterator, AsyncGenerator):
            await iterator.aclose()
