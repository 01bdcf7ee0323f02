"""Small/big split of ciphertext streams, range mapping and joining."""

from __future__ import annotations

import pytest

from transfers.support import chunked
from unlockd.binary_split import PartRanges, join, map_range, split


@pytest.mark.parametrize("length", [0, 1, 39, 40, 41, 100, 4095, 4096, 4097, 20_000])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 65_536])
async def test_split_then_join_identical(length, chunk):
    """Splitting at S and joining gives the input back; the small part is min(S, L) bytes."""
    data = bytes(i % 251 for i in range(length))
    small, big = await split(chunked(data, chunk), 4096)
    assert small == data[:4096]
    assert b"".join([c async for c in join(small, big)]) == data


def test_map_range_covers_parts():
    """A ciphertext range maps to the small part, the big part, or both."""
    assert map_range(0, 10, 4096) == PartRanges(small=(0, 10), big=None)
    assert map_range(4000, 5000, 4096) == PartRanges(small=(4000, 4096), big=(0, 904))
    assert map_range(5000, 6000, 4096) == PartRanges(small=None, big=(904, 1904))
    assert map_range(4096, 4096, 4096) == PartRanges(small=None, big=None)


async def test_split_small_size_below_header_rejected():
    """A small part that could not hold the ciphertext header is refused."""
    with pytest.raises(ValueError, match="at least 40"):
        await split(chunked(b"abc"), 39)
