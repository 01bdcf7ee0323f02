"""Every bad input of the spec gets the right 4xx, and changes nothing on disk or upstream."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import httpx
import pytest


@pytest.fixture(scope="module")
def logged_in(shared):
    with shared.client() as client:
        shared.login(client)
        shared.upload(client, "good.bin", b"good bytes")
        assert client.post("/load/good.bin").status_code == 200
    return shared


def raw(stack, method: str, path: str, body: bytes = b"", headers=None):
    """Send a request with the path exactly as given (no client-side normalisation)."""
    parts = urlsplit(stack.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        conn.close()


LONG = "a" * 256


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/load/..", 422),
        ("POST", "/load/.", 422),
        ("POST", "/load/%2e%2e", 422),
        ("POST", "/load/a%00b", 422),
        ("POST", f"/load/{LONG}", 422),
        ("POST", "/load/a%20b", 422),
        ("POST", "/load/a$b", 422),
        ("POST", "/load/%C3%A9", 422),
        ("POST", "/load/a%2Fb", 404),
        ("POST", "/load/", 404),
        ("GET", "/resources/../good.bin", 422),
        ("GET", "/resources/models/..", 422),
        ("GET", f"/resources/{LONG}/good.bin", 422),
        ("GET", "/resources/models/a%00", 422),
        ("GET", "/resources/models%2F..%2Fx/good.bin", 404),
        ("HEAD", "/resources/../good.bin", 422),
        ("POST", "/upload/..", 422),
        ("POST", "/upload/a%00b", 422),
        ("POST", f"/upload/{LONG}", 422),
        ("POST", "/upload/a%2Fb", 404),
    ],
)
def test_bad_names_rejected_before_io(logged_in, method, path, status):
    """Invalid names in the path are 422 (or a JSON 404 when no route matches); no I/O."""
    before = logged_in.cache_files()
    got, content_type, body = raw(logged_in, method, path)
    assert got == status
    assert content_type == "application/json"
    if method != "HEAD":
        assert "detail" in json.loads(body)
    assert logged_in.cache_files() == before
    assert logged_in.hub_pending_uploads() == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{", 422),
        (b"[]", 422),
        (b'"models"', 422),
        (b"\xff\xfe", 422),
        (b'{"folder": ".."}', 422),
        (b'{"folder": ""}', 422),
        (b'{"folder": "a/b"}', 422),
        (b'{"folder": "a\\u0000b"}', 422),
        (b'{"folder": 5}', 422),
        (b'{"folder": null}', 422),
        (b'{"folder": "' + LONG.encode() + b'"}', 422),
        (b'{"filename": "other.bin"}', 422),
        (b'{"filename": "../good.bin"}', 422),
        (b'{"filename": 1}', 422),
        (b'{"pad": "' + b"x" * (64 * 1024) + b'"}', 413),
    ],
)
def test_load_bad_body_rejected(logged_in, body, status):
    """Bad JSON bodies of /load are 422 (413 over 64 KiB); nothing is created."""
    before = logged_in.cache_files()
    response = httpx.post(
        f"{logged_in.url}/load/good.bin", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert "detail" in response.json()
    assert logged_in.cache_files() == before


def test_load_matching_body_filename_ok(logged_in):
    """A body filename equal to the path's is accepted."""
    response = httpx.post(f"{logged_in.url}/load/good.bin", json={"filename": "good.bin"})
    assert response.status_code == 200
    assert response.content == b"good bytes"


def test_json_over_limit_chunked_too_large(logged_in):
    """A JSON body over 64 KiB without Content-Length (chunked) is 413 too."""

    def chunks():
        yield b'{"email": "'
        for _ in range(20):
            yield b"x" * 4096

    response = httpx.post(f"{logged_in.url}/login", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b'{"email": "a"}', b'{"email": "", "password": "x"}', b'{"password": "x"}'],
)
def test_login_bad_body_unprocessable(logged_in, body):
    """/login needs a JSON object with non-empty email and password strings."""
    response = httpx.post(f"{logged_in.url}/login", content=body)
    assert response.status_code == 422
    status = httpx.get(f"{logged_in.url}/status").json()
    assert status["authenticated"] is True


def multipart(*parts: tuple[str, bytes], boundary: str = "B0undary") -> tuple[bytes, dict]:
    out = bytearray()
    for name, data in parts:
        filename = '; filename="f.bin"' if name == "data" else ""
        disposition = f'form-data; name="{name}"{filename}'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    ("parts", "status"),
    [
        ([("folder", b"models")], 422),
        ([], 422),
        ([("other", b"x")], 422),
        ([("folder", b".."), ("data", b"x")], 422),
        ([("folder", b""), ("data", b"x")], 422),
        ([("folder", b"a/b"), ("data", b"x")], 422),
        ([("folder", b"\xff"), ("data", b"x")], 422),
        ([("folder", b"x" * (64 * 1024 + 1)), ("data", b"x")], 413),
        ([("folder", b"a"), ("folder", b"b"), ("data", b"x")], 422),
        ([("data", b"x" * 5000), ("folder", b"..")], 422),
        ([("data", b"x" * 5000), ("folder", b"a\x00b")], 422),
        ([("data", b"x"), ("data", b"y")], 422),
        ([("data", b"x"), ("folder", b"a"), ("folder", b"a")], 422),
    ],
)
def test_upload_bad_form_nothing_published(logged_in, parts, status):
    """A bad form is 4xx; the upload is abandoned at the hub and nothing is published."""
    body, headers = multipart(*parts)
    response = httpx.post(f"{logged_in.url}/upload/bad.bin", content=body, headers=headers)
    assert response.status_code == status
    assert "detail" in response.json()
    assert logged_in.hub_pending_uploads() == []
    assert httpx.post(f"{logged_in.url}/load/bad.bin").status_code == 404
    assert httpx.get(f"{logged_in.url}/resources/a/bad.bin").status_code == 404


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"data", {"content-type": "application/octet-stream"}),
        (b"data", {"content-type": "multipart/form-data"}),
        (b"--B\r\nbroken", {"content-type": "multipart/form-data; boundary=B"}),
        (
            b'--B\r\nContent-Disposition: form-data; name="data"\r\n\r\ncut off',
            {"content-type": "multipart/form-data; boundary=B"},
        ),
    ],
)
def test_upload_malformed_multipart_unprocessable(logged_in, body, headers):
    """A body that is not well-formed multipart/form-data is 422; nothing is left."""
    response = httpx.post(f"{logged_in.url}/upload/bad.bin", content=body, headers=headers)
    assert response.status_code == 422
    assert logged_in.hub_pending_uploads() == []
    assert httpx.post(f"{logged_in.url}/load/bad.bin").status_code == 404


def test_upload_over_max_upload_too_large(tmp_path, make_stack):
    """With UNLOCKD_MAX_UPLOAD, a larger body is 413 (declared or streamed), nothing published."""
    with make_stack(tmp_path, max_upload=10_000) as stack:
        with stack.client() as client:
            stack.login(client)
            declared = client.post("/upload/big.bin", files={"data": ("f", b"x" * 20_000)})
            assert declared.status_code == 413

            body, headers = multipart(("data", b"y" * 20_000))

            def chunks():
                for i in range(0, len(body), 1000):
                    yield body[i : i + 1000]

            streamed = client.post("/upload/big.bin", content=chunks(), headers=headers)
            assert streamed.status_code == 413
            assert client.post("/load/big.bin").status_code == 404
            small = client.post("/upload/small.bin", files={"data": ("f", b"z" * 5000)})
            assert small.status_code == 200
        assert stack.hub_pending_uploads() == []
