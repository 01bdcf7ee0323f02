"""/resources: single byte ranges, HEAD, If-Range and 416, against plaintext slices."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from unlockd.crypto_stream import HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE

PS = SEGMENT_SIZE - TAG_SIZE
SIZE = 2 * PS + 4321
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(SIZE // 32 + 1))[:SIZE]
URL = "/resources/models/ranged.bin"


@pytest.fixture(scope="module")
def ranged(shared):
    with shared.client() as client:
        shared.login(client)
        etag = shared.upload(client, "ranged.bin", DATA)["etag"]
        shared.login(client, shared.reader_email, shared.reader_password)
    return shared, f'"{etag}"'


def get(stack, headers, method="GET"):
    return httpx.request(method, f"{stack.url}{URL}", headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=0-99", 0, 100),
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE),
        (f"bytes={SIZE - 1}-", SIZE - 1, SIZE),
        (
            f"bytes={PS - HEADER_SIZE - 5}-{PS - HEADER_SIZE + 5}",
            PS - HEADER_SIZE - 5,
            PS - HEADER_SIZE + 6,
        ),
        (f"bytes=100-{2 * PS + 10}", 100, 2 * PS + 11),
        ("bytes=1000-", 1000, SIZE),
        ("bytes=-1", SIZE - 1, SIZE),
        ("bytes=-5000", SIZE - 5000, SIZE),
        (f"bytes=-{SIZE + 100}", 0, SIZE),
        (f"bytes=5-{SIZE + 100}", 5, SIZE),
    ],
)
def test_resources_range_partial_content(ranged, spec, start, end):
    """A satisfiable single range is 206 with the exact plaintext slice and Content-Range."""
    stack, etag = ranged
    response = get(stack, {"Range": spec})
    assert response.status_code == 206
    assert response.content == DATA[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert response.headers["content-length"] == str(end - start)
    assert response.headers["etag"] == etag
    assert response.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize(
    "spec",
    [
        "bytes=0-1,5-6",
        "bytes=5-1",
        "items=0-1",
        "bytes=abc",
        "bytes=-",
        "bytes",
        "bytes=1-2-3",
        "bytes=7 - 9",
    ],
)
def test_resources_unsupported_range_ignored(ranged, spec):
    """Multiple or malformed ranges are ignored (RFC 9110): 200 with the whole file."""
    stack, _ = ranged
    response = get(stack, {"Range": spec})
    assert response.status_code == 200
    assert response.content == DATA


@pytest.mark.parametrize("spec", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
def test_resources_unsatisfiable_range_416(ranged, spec):
    """A range wholly past the end is 416 with Content-Range bytes */size and a JSON body."""
    stack, _ = ranged
    response = get(stack, {"Range": spec})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{SIZE}"
    assert "detail" in response.json()


def test_resources_if_range_matching_etag_partial(ranged):
    """If-Range with the current ETag honours the range."""
    stack, etag = ranged
    response = get(stack, {"Range": "bytes=10-19", "If-Range": etag})
    assert response.status_code == 206
    assert response.content == DATA[10:20]


@pytest.mark.parametrize("validator", ['"other"', 'W/"x"', "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_resources_if_range_stale_whole_file(ranged, validator):
    """If-Range with another ETag or a date ignores the range: 200 with the whole file."""
    stack, _ = ranged
    response = get(stack, {"Range": "bytes=10-19", "If-Range": validator})
    assert response.status_code == 200
    assert response.content == DATA


def test_resources_head_headers_no_body(ranged):
    """HEAD gives the GET headers (size, ETag, Accept-Ranges) and no body."""
    stack, etag = ranged
    response = get(stack, {}, method="HEAD")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["etag"] == etag
    assert response.headers["accept-ranges"] == "bytes"
    assert response.content == b""
    partial = get(stack, {"Range": "bytes=-10"}, method="HEAD")
    assert partial.status_code == 206
    assert partial.headers["content-range"] == f"bytes {SIZE - 10}-{SIZE - 1}/{SIZE}"
    assert partial.headers["content-length"] == "10"
    assert get(stack, {"Range": f"bytes={SIZE}-"}, method="HEAD").status_code == 416


def test_resources_head_missing_not_found(ranged):
    """HEAD of a missing resource is 404."""
    stack, _ = ranged
    response = httpx.head(f"{stack.url}/resources/models/nope.bin")
    assert response.status_code == 404


def test_resources_range_empty_file_416(shared):
    """Every range of an empty resource is unsatisfiable; without Range it is 200 and empty."""
    with shared.client() as client:
        shared.login(client)
        shared.upload(client, "empty.bin", b"")
        assert (
            client.get("/resources/models/empty.bin", headers={"Range": "bytes=0-"}).status_code
            == 416
        )
        whole = client.get("/resources/models/empty.bin")
    assert whole.status_code == 200
    assert whole.content == b""
    assert whole.headers["content-length"] == "0"
