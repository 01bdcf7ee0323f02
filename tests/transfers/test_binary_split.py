"""Small/big split of ciphertext streams."""

from __future__ import annotations

import pytest

from transfers.support import chunked
from unlockd.binary_split import split


@pytest.mark.parametrize("length", [0, 1, 39, 40, 41, 100, 4095, 4096, 4097, 20_000])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 65_536])
async def test_split_then_join_identical(length, chunk):
    """Splitting at S and concatenating gives the input back; the small part is min(S, L) bytes."""
    data = bytes(i % 251 for i in range(length))
    small, big = await split(chunked(data, chunk), 4096)
    assert small == data[:4096]
    assert small + b"".join([c async for c in big]) == data


async def test_split_small_size_below_header_rejected():
    """A small part that could not hold the ciphertext header is refused."""
    with pytest.raises(ValueError, match="at least 40"):
        await split(chunked(b"abc"), 39)
