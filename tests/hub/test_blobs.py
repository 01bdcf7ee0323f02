"""The blob origin: ranges per RFC 9110, validators, caching headers, streaming."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import PUBLISHER, eventually
from unlockd.errors import RangeNotSatisfiableError
from unlockd.httputil import parse_range

SIZE = 10_000
BLOB = os.urandom(SIZE)


@pytest.fixture(scope="module")
def blob(shared_hub, publish):
    """Publish BLOB on the session's hub, for this module's read-only tests; return (URL, etag)."""
    with shared_hub.client(PUBLISHER) as client:
        etag, _, _ = publish(client, "hub-blobs/blob.bin", BLOB)
    return f"{shared_hub.url}/blobs/{etag}", etag


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-0", (0, 1)),
        ("bytes=0-", (0, SIZE)),
        ("bytes=5-9", (5, 10)),
        ("bytes=9999-", (9999, SIZE)),
        ("bytes=9999-100000", (9999, SIZE)),
        ("bytes=0-99999999999999999999", (0, SIZE)),
        ("bytes=-1", (SIZE - 1, SIZE)),
        ("bytes=-500", (SIZE - 500, SIZE)),
        ("bytes=-20000", (0, SIZE)),
        ("BYTES=1-2", (1, 3)),
        (" bytes = 1-2 ", (1, 3)),
        ("bytes=1-2,", (1, 3)),
        ("bytes=9-5", None),
        ("bytes=-", None),
        ("bytes=", None),
        ("bytes=a-b", None),
        ("bytes=1 - 2", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("0-1", None),
        ("bytes=+1-2", None),
    ],
)
def test_parse_range_cases(header, expected):
    """Single ranges resolve; invalid syntax, other units and multiple ranges are ignored."""
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=-0", SIZE), ("bytes=10000-", SIZE), ("bytes=0-0", 0)]
)
def test_parse_range_unsatisfiable_raises_with_size(header, size):
    """A first byte past the end, or a zero-length suffix, is unsatisfiable (416)."""
    with pytest.raises(RangeNotSatisfiableError) as info:
        parse_range(header, size)
    assert info.value.size == size


def test_parse_range_suffix_of_empty_is_whole():
    """A suffix range of an empty representation is answered with the (empty) whole."""
    assert parse_range("bytes=-5", 0) is None


@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(1, 3000))
def test_parse_range_result_is_inside_the_representation(first, last, size):
    """Any satisfiable first-last range is clamped to a non-empty slice of the file."""
    try:
        result = parse_range(f"bytes={first}-{last}", size)
    except RangeNotSatisfiableError:
        assert first >= size
        return
    if last < first:
        assert result is None
    else:
        assert result == (first, min(last + 1, size))


def test_get_blob_whole_has_cache_and_validator_headers(blob):
    """A full GET is 200 with ETag, immutable caching, Accept-Ranges and the exact length."""
    url, etag = blob
    reply = httpx.get(url)
    assert reply.status_code == 200
    assert reply.content == BLOB
    assert reply.headers["etag"] == f'"{etag}"'
    assert reply.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["content-length"] == str(SIZE)
    assert reply.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=-1", SIZE - 1, SIZE),
        ("bytes=-20000", 0, SIZE),
        ("bytes=1234-", 1234, SIZE),
        ("bytes=100-199", 100, 200),
        ("bytes=9000-20000", 9000, SIZE),
    ],
)
def test_get_blob_range_is_206_with_content_range(blob, header, start, end):
    """A satisfiable single range is 206 with Content-Range and exactly those bytes."""
    url, _ = blob
    reply = httpx.get(url, headers={"range": header})
    assert reply.status_code == 206
    assert reply.content == BLOB[start:end]
    assert reply.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert reply.headers["content-length"] == str(end - start)


@pytest.mark.parametrize("header", ["bytes=10000-", "bytes=20000-30000", "bytes=-0"])
def test_get_blob_unsatisfiable_range_is_416(blob, header):
    """A range past the end is 416 with 'Content-Range: bytes */size' and a JSON detail."""
    url, _ = blob
    reply = httpx.get(url, headers={"range": header})
    assert reply.status_code == 416
    assert reply.headers["content-range"] == f"bytes */{SIZE}"
    assert "detail" in reply.json()


@pytest.mark.parametrize("header", ["bytes=5-1", "bytes=x-y", "lines=1-2", "bytes=0-1,3-4"])
def test_get_blob_malformed_or_multiple_ranges_are_ignored(blob, header):
    """Invalid, foreign-unit or multiple ranges are ignored: 200 with the whole blob."""
    url, _ = blob
    reply = httpx.get(url, headers={"range": header})
    assert reply.status_code == 200
    assert reply.content == BLOB


def test_get_blob_if_range_matching_etag_applies_range(blob):
    """If-Range with the current ETag keeps the range; another validator gets the whole blob."""
    url, etag = blob
    matching = httpx.get(url, headers={"range": "bytes=0-9", "if-range": f'"{etag}"'})
    assert (matching.status_code, matching.content) == (206, BLOB[:10])
    for validator in ('"other"', f'W/"{etag}"', "Wed, 21 Oct 2015 07:28:00 GMT"):
        other = httpx.get(url, headers={"range": "bytes=0-9", "if-range": validator})
        assert (other.status_code, other.content) == (200, BLOB)


def test_head_blob_has_headers_and_no_body(blob):
    """HEAD gives the same status and headers as GET, without a body, ranges included."""
    url, etag = blob
    whole = httpx.head(url)
    assert (whole.status_code, whole.content) == (200, b"")
    assert whole.headers["content-length"] == str(SIZE)
    assert whole.headers["etag"] == f'"{etag}"'
    part = httpx.head(url, headers={"range": "bytes=-10"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes {SIZE - 10}-{SIZE - 1}/{SIZE}"
    assert part.headers["content-length"] == "10"
    assert httpx.head(url, headers={"range": "bytes=99999-"}).status_code == 416


@pytest.mark.parametrize("etag", ["0" * 32, "not-an-etag", "A" * 32, "0" * 33])
def test_get_blob_unknown_is_404(shared_hub, etag):
    """An etag that is not a stored blob (or cannot be one) is a JSON 404."""
    reply = httpx.get(f"{shared_hub.url}/blobs/{etag}")
    assert reply.status_code == 404
    assert reply.json() == {"detail": "blob not found"}


def test_get_blob_curl_resume_completes_a_partial_file(blob, tmp_path):
    """`curl -C -` continues a partial download with a range request."""
    url, _ = blob
    target = tmp_path / "blob.bin"
    target.write_bytes(BLOB[:3333])
    subprocess.run(["curl", "-sSf", "-C", "-", "-o", str(target), url], check=True)
    assert target.read_bytes() == BLOB


def test_get_blob_client_disconnect_releases_the_file(hub, publisher, publish):
    """A download abandoned after its first chunk closes the server's file descriptor."""
    etag, _, _ = publish(publisher, "models/large", os.urandom(16 * 1024 * 1024))

    def blob_fds() -> int:
        count = 0
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):  # fds come and go while we look
                count += etag in str(fd.readlink())
        return count

    parts = urlsplit(hub.url)
    with socket.socket() as sock:
        # A small receive buffer keeps the kernel from absorbing the whole blob at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect((parts.hostname, parts.port))
        sock.sendall(f"GET /blobs/{etag} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert blob_fds() == 1
    eventually(lambda: blob_fds() == 0)
    assert httpx.get(f"{hub.url}/health").status_code == 200
