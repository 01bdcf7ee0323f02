"""Upload then download through the real hub: bytes, ranges and errors."""

from __future__ import annotations

import pytest

from transfers.support import download, random_bytes, settled, upload
from unlockd.errors import RangeNotSatisfiableError

PS = (1 << 20) - 16  # plaintext bytes per full segment
S0 = PS - 40  # plaintext bytes in segment 0
SMALL_PLAINTEXT = 4096 - 56  # the plaintext whose ciphertext is exactly one small part

SIZES = [
    0,
    1,
    SMALL_PLAINTEXT - 1,
    SMALL_PLAINTEXT,
    SMALL_PLAINTEXT + 1,
    S0 - 1,
    S0,
    S0 + 1,
    S0 + PS - 1,
    S0 + PS,
    S0 + PS + 1,
]


@pytest.mark.parametrize("size", SIZES)
async def test_roundtrip_size_identical(sidecar, size):
    """A file uploaded and downloaded again is identical, at every boundary size."""
    data = random_bytes(size)
    result = await upload(sidecar, "model.bin", data, chunk=7_777)
    assert result["size"] == size
    assert result["folder"] == "models"
    assert await download(sidecar, "model.bin") == data


async def test_roundtrip_tens_of_megabytes_identical(sidecar):
    """A 24 MiB file survives the round trip; a second load comes from the cache."""
    data = random_bytes(24 << 20)
    await upload(sidecar, "big.bin", data, chunk=1 << 20)
    assert await download(sidecar, "big.bin") == data
    await settled(sidecar)  # published: joining the download still in flight is no cache hit
    assert await download(sidecar, "big.bin") == data
    assert sidecar.metrics.cache_hits._value.get() == 1


# Resolved by the caller (httputil.parse_range) before open_download sees them.
RANGES = [
    slice(0, 1),
    slice(-1, None),
    slice(S0 - 10, S0 + PS + 10),
    slice(S0 + 5, None),
    slice(-(PS + 3), None),
    slice(100, None),
    slice(S0, S0 + 1),
]


async def test_download_ranges_equal_plaintext_slices(sidecar):
    """Ranges (first/last byte, across segments, to the end, suffix) give the plaintext slice."""
    data = random_bytes(3 * PS + 12_345)
    await upload(sidecar, "ranged.bin", data)
    for expected in RANGES:
        start, end, _ = expected.indices(len(data))
        assert await download(sidecar, "ranged.bin", (start, end)) == data[expected], expected


async def test_download_range_past_end_not_satisfiable(sidecar):
    """A range that starts at or past the end raises RangeNotSatisfiableError with the size."""
    await upload(sidecar, "short.bin", b"0123456789")
    with pytest.raises(RangeNotSatisfiableError) as info:
        await sidecar.transfers.open_download("models", "short.bin", (10, 11))
    assert info.value.size == 10
