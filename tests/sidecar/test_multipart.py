"""The streaming multipart reader, over crafted bodies split anywhere and over real sockets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from servers import serve
from unlockd.errors import InvalidInputError, PayloadTooLargeError, UnlockdError
from unlockd.multipart import MultipartReader

if TYPE_CHECKING:
    from starlette.requests import Request

BOUNDARY = "xYzZY-boundary"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def body(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = bytearray()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


async def chunked(data: bytes, cuts: list[int]):
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        yield data[previous:cut]
        previous = cut


async def collect(reader: MultipartReader) -> list[tuple[str, str | None, bytes]]:
    return [(part.name, part.filename, b"".join([c async for c in part])) async for part in reader]


PARTS = [
    ("folder", None, b"models"),
    ("data", "w.bin", b"\r\n--xYzZY-boundar\r\n--" + bytes(range(256)) * 3 + b"\r"),
    ("empty", "e", b""),
]


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(body(*PARTS))), max_size=8))
@settings(max_examples=300, deadline=None)
async def test_reader_any_split_same_parts(cuts):
    """However the body is split into chunks, the same parts and bytes come out."""
    data = body(*PARTS)
    assert await collect(MultipartReader(HEADERS, chunked(data, cuts))) == PARTS


async def test_reader_every_single_cut_same_parts():
    """Every one-cut split of the body, including cuts inside the boundary, parses the same."""
    data = body(*PARTS)
    for cut in range(len(data) + 1):
        assert await collect(MultipartReader(HEADERS, chunked(data, [cut]))) == PARTS


async def test_reader_byte_by_byte_same_parts():
    """A body delivered one byte per chunk parses the same."""
    data = body(*PARTS)
    assert await collect(MultipartReader(HEADERS, chunked(data, list(range(len(data)))))) == PARTS


async def test_reader_unread_part_skipped():
    """Asking for the next part skips what is left of the current one."""
    reader = MultipartReader(HEADERS, chunked(body(*PARTS), [10, 100]))
    names = [part.name async for part in reader]
    assert names == ["folder", "data", "empty"]


async def test_reader_field_text_read():
    """A small field reads fully as text."""
    reader = MultipartReader(HEADERS, chunked(body(*PARTS), []))
    part = await reader.next_part()
    assert part is not None
    assert await part.text() == "models"


async def test_reader_field_over_limit_too_large():
    """A field over the size cap is 413."""
    reader = MultipartReader(HEADERS, chunked(body(("folder", None, b"x" * 100)), []))
    part = await reader.next_part()
    assert part is not None
    with pytest.raises(PayloadTooLargeError):
        await part.read(limit=99)


async def test_reader_body_over_max_size_too_large():
    """A body over max_size is 413 even without a Content-Length."""
    reader = MultipartReader(HEADERS, chunked(body(("data", "f", b"x" * 1000)), [50]), max_size=500)
    with pytest.raises(PayloadTooLargeError):
        await collect(reader)


def test_reader_content_length_over_max_size_too_large():
    """A declared Content-Length over max_size is 413 before reading."""
    with pytest.raises(PayloadTooLargeError):
        MultipartReader({**HEADERS, "content-length": "501"}, chunked(b"", []), max_size=500)


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "multipart/form-data", 'multipart/form-data; boundary=""'],
)
def test_reader_no_boundary_invalid(content_type):
    """A body that is not multipart/form-data with a boundary is 422."""
    headers = {} if content_type is None else {"content-type": content_type}
    with pytest.raises(InvalidInputError):
        MultipartReader(headers, chunked(b"", []))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b'--xYzZY-boundary\r\nContent-Disposition: form-data; name="a"\r\n\r\nabc',
        b'--xYzZY-boundary\r\nContent-Disposition: form-data; name="a"\r\n\r\nabc\r\n--xYzZY-b',
        b"--xYzZY-boundary\r\nNo Colon Header\r\n\r\nabc\r\n--xYzZY-boundary--\r\n",
        b"--xYzZY-boundary\r\nContent-Type: text/plain\r\n\r\nabc\r\n--xYzZY-boundary--\r\n",
        b"--xYzZY-boundary\r\nContent-Disposition: attachment\r\n\r\nabc\r\n--xYzZY-boundary--\r\n",
        b"--other\r\n",
    ],
)
async def test_reader_malformed_body_invalid(data):
    """Malformed, unnamed or truncated bodies are 422."""
    with pytest.raises(InvalidInputError):
        await collect(MultipartReader(HEADERS, chunked(data, [len(data) // 2])))


async def test_reader_empty_message_no_parts():
    """A body with only the closing boundary has no parts."""
    data = f"--{BOUNDARY}--\r\n".encode()
    assert await collect(MultipartReader(HEADERS, chunked(data, []))) == []


async def _echo(request: Request) -> JSONResponse:
    try:
        reader = MultipartReader(request.headers, request.stream(), max_size=1 << 30)
        parts = []
        async for part in reader:
            size = 0
            async for chunk in part:
                size += len(chunk)
            parts.append([part.name, part.filename, size])
    except UnlockdError as exc:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)
    return JSONResponse(parts)


def test_reader_over_uvicorn_httpx_upload_parsed():
    """A real httpx multipart upload of a few MB through uvicorn parses part by part."""
    app = Starlette(routes=[Route("/", _echo, methods=["POST"])])
    payload = bytes(range(256)) * (3 * 4096 + 7)
    with serve(app) as url:
        response = httpx.post(
            url, data={"folder": "models"}, files={"data": ("m.bin", payload)}, timeout=30
        )
        assert response.status_code == 200
        assert response.json() == [["folder", None, 6], ["data", "m.bin", len(payload)]]
        broken = httpx.post(url, content=b"--x\r\n", headers={"content-type": "text/plain"})
        assert broken.status_code == 422
