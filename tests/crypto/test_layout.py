"""Segment arithmetic: sizes both ways, impossible lengths, and plaintext ranges."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unlockd.crypto_stream import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    Encryptor,
    SegmentCipher,
    SegmentLayout,
)
from unlockd.errors import TruncatedCiphertextError

KEY = bytes(range(32))
segment_sizes = st.sampled_from([HEADER_SIZE + TAG_SIZE + 1, 64, 100, 4096, SEGMENT_SIZE])


@settings(deadline=None)  # CI machines are shared: time is no property
@given(cs=segment_sizes, size=st.integers(0, 1 << 34))
def test_layout_sizes_round_trip(cs, size):
    """plaintext_size inverts ciphertext_size, and the segment counts agree."""
    layout = SegmentLayout(cs)
    length = layout.ciphertext_size(size)
    n = layout.segment_count_for_plaintext(size)
    assert length == HEADER_SIZE + size + TAG_SIZE * n
    assert layout.plaintext_size(length) == size
    assert layout.segment_count(length) == n == -(-length // cs)


@pytest.mark.parametrize("cs", [HEADER_SIZE + TAG_SIZE + 1, 64, 100])
def test_layout_invalid_lengths_rejected_exactly(cs):
    """Every length that no plaintext encrypts to is refused, and only those."""
    layout = SegmentLayout(cs)
    valid = {layout.ciphertext_size(p) for p in range(10 * cs)}
    for length in range(8 * cs):
        if length in valid:
            assert layout.ciphertext_size(layout.plaintext_size(length)) == length
        else:
            with pytest.raises(TruncatedCiphertextError):
                layout.plaintext_size(length)


def test_layout_known_sizes_match_spec():
    """The spec's figures: empty plaintext is 56 bytes; 1 MiB segments hold PS - 40 first."""
    layout = SegmentLayout()
    assert layout.ciphertext_size(0) == 56
    assert layout.ciphertext_size(SEGMENT_SIZE - TAG_SIZE - HEADER_SIZE) == SEGMENT_SIZE
    assert layout.segment_count_for_plaintext(SEGMENT_SIZE - TAG_SIZE - HEADER_SIZE + 1) == 2


@pytest.mark.parametrize("cs", [0, HEADER_SIZE + TAG_SIZE])
def test_layout_too_small_segment_size_rejected(cs):
    """A segment must have room for the header, the tag and a byte."""
    with pytest.raises(ValueError):
        SegmentLayout(cs)


def test_layout_negative_plaintext_size_rejected():
    """A negative size is a programming error."""
    with pytest.raises(ValueError):
        SegmentLayout().ciphertext_size(-1)


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 5), (6, 5), (0, 301)])
def test_layout_range_outside_plaintext_rejected(start, end):
    """Empty, reversed, negative or too long ranges are refused."""
    layout = SegmentLayout(64)
    with pytest.raises(ValueError):
        layout.range(start, end, layout.ciphertext_size(300))


def _read_range(layout: SegmentLayout, ciphertext: bytes, start: int, end: int) -> bytes:
    """Decrypt [start, end) the way a range request does: only the segments it needs."""
    found = layout.range(start, end, len(ciphertext))
    cipher = SegmentCipher(KEY, ciphertext[:HEADER_SIZE], b"r")
    count = layout.segment_count(len(ciphertext))
    plaintext = []
    for index in range(found.first_segment, found.last_segment + 1):
        lo, hi = layout.segment_bounds(index, len(ciphertext))
        plaintext.append(cipher.open(index, index == count - 1, ciphertext[lo:hi]))
    skip = start - layout.plaintext_start(found.first_segment)
    return b"".join(plaintext)[skip : skip + end - start]


def _encrypt(layout: SegmentLayout, plaintext: bytes) -> bytes:
    encryptor = Encryptor(KEY, b"r", segment_size=layout.segment_size)
    return encryptor.update(plaintext) + encryptor.finalize()


@pytest.mark.parametrize("size", [1, 3 * (64 - TAG_SIZE) - HEADER_SIZE, 150])
def test_layout_range_every_start_end_matches_slice(size):
    """Every [start, end) of a small stream, read through range(), equals the slice."""
    layout = SegmentLayout(64)
    plaintext = os.urandom(size)
    ciphertext = _encrypt(layout, plaintext)
    for start in range(size):
        for end in range(start + 1, size + 1):
            assert _read_range(layout, ciphertext, start, end) == plaintext[start:end]


@settings(deadline=None)  # CI machines are shared: time is no property
@given(data=st.data(), size=st.integers(1, 40_000))
def test_layout_range_random_ranges_match_slice(data, size):
    """Random ranges of streams with 4 KiB segments equal the slice of the whole."""
    layout = SegmentLayout(4096)
    plaintext = os.urandom(size)
    ciphertext = _encrypt(layout, plaintext)
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start + 1, size))
    assert _read_range(layout, ciphertext, start, end) == plaintext[start:end]


@settings(deadline=None)  # CI machines are shared: time is no property
@given(cs=segment_sizes, size=st.integers(1, 1 << 32), data=st.data())
def test_layout_range_segments_hold_the_range(cs, size, data):
    """range() names the first and last segment holding the bytes."""
    layout = SegmentLayout(cs)
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start + 1, size))
    found = layout.range(start, end, layout.ciphertext_size(size))
    first, last = found.first_segment, found.last_segment
    count = layout.segment_count_for_plaintext(size)
    # Segment i holds plaintext [plaintext_start(i), plaintext_start(i + 1)).
    assert layout.plaintext_start(first) <= start
    assert first == count - 1 or start < layout.plaintext_start(first + 1)
    assert layout.plaintext_start(last) < end
    assert last == count - 1 or end <= layout.plaintext_start(last + 1)
