"""Paths, local auth, secrets in settings, readiness, upstream etags and upload limits."""

from __future__ import annotations

import base64
import contextlib
import socket
from typing import TYPE_CHECKING

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from harness import eventually
from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings
from unlockd.crypto_stream import Encryptor, generate_key
from unlockd.errors import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def published(shared):
    """The shared stack, logged in, with models/model.bin published."""
    with shared.client() as client:
        shared.login(client)
        shared.upload(client, "model.bin", b"model bytes" * 1000)
    return shared


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/resources/models/model.bin%2f"),
        ("GET", "/resources/models/model.bin%2F"),
        ("HEAD", "/resources/models/model.bin%2F"),
        ("GET", "/resources/models/model.bin/"),
        ("POST", "/load/model.bin%2F"),
        ("POST", "/load/model.bin/"),
        ("GET", "/health/"),
        ("GET", "/status%2F"),
    ],
)
def test_routes_trailing_slash_json_404_not_redirect(published, method, path):
    """A trailing or encoded trailing '/' is a JSON 404, never a redirect to another path."""
    response = httpx.request(method, f"{published.url}{path}", follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
    if method != "HEAD":
        assert response.json() == {"detail": "Not Found"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, make_stack):
    """A stack whose local API wants the bearer token ``local-secret``, for tests that only read."""
    with make_stack(tmp_path_factory.mktemp("guarded"), api_token="local-secret") as stack:
        yield stack


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_local_token_scheme_case_insensitive(guarded, scheme):
    """The Bearer scheme of the local API token is matched case-insensitively (RFC 9110)."""
    good = httpx.get(f"{guarded.url}/status", headers={"Authorization": f"{scheme} local-secret"})
    assert good.status_code == 200
    wrong = httpx.get(f"{guarded.url}/status", headers={"Authorization": f"{scheme} LOCAL-secret"})
    assert wrong.status_code == 401


def test_settings_repr_hides_api_token():
    """The API token never appears in the settings' repr (logs, tracebacks)."""
    settings = Settings.from_environ({"UNLOCKD_API_TOKEN": "s3cr3t-token"})
    assert "s3cr3t-token" not in repr(settings)
    assert settings.api_token == "s3cr3t-token"


@pytest.mark.parametrize("flag", ["upstream_url", "cdn_url"])
def test_settings_url_with_credentials_rejected(flag):
    """A user:password@ URL is refused: it would replace the bearer token and leak in output."""
    with pytest.raises(InvalidInputError, match="credentials in the URL are not supported") as exc:
        Settings.from_environ({}, **{flag: "http://user:pa55word@127.0.0.1:9/api"})
    assert "pa55word" not in str(exc.value)


@contextlib.contextmanager
def _silent_upstream() -> Iterator[str]:
    """A listening socket that accepts connections (in its backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_ready_hung_upstream_not_ready(tmp_path):
    """/ready gives up on an upstream that never answers: a 503 naming it, not a hang."""
    with _silent_upstream() as upstream:
        settings = Settings.from_environ({}, upstream_url=upstream, cache_dir=tmp_path)
        with serve(create_app(settings)) as url:
            # A liveness bound, not a latency claim: a hung /ready would never answer at all.
            response = httpx.get(f"{url}/ready", timeout=30)
    assert response.status_code == 503
    assert any("no answer" in reason for reason in response.json()["reasons"])


def _fake_upstream(etag: str, plaintext: bytes, small_size: int = 4096) -> Starlette:
    """An upstream serving one real resource, models/m.bin, under the given etag."""
    key = generate_key()
    encryptor = Encryptor(key, b"m.bin")
    ciphertext = b"".join(encryptor.feed(memoryview(plaintext))) + encryptor.finalize()

    async def login(_request):
        return JSONResponse({"token": "t", "token_type": "bearer", "expires_in": 3600})

    async def resource(_request):
        return JSONResponse(
            {
                "key": base64.b64encode(key).decode(),
                "small": base64.b64encode(ciphertext[:small_size]).decode(),
                "big_size": len(ciphertext) - small_size,
                "etag": etag,
                "big_url": "/blobs/the-blob",
            }
        )

    async def blob(request):
        start = 0
        if (header := request.headers.get("range")) is not None:
            start = int(header.removeprefix("bytes=").split("-")[0])
        big = ciphertext[small_size:]
        if start:
            headers = {"content-range": f"bytes {start}-{len(big) - 1}/{len(big)}"}
            return Response(big[start:], status_code=206, headers=headers)
        return Response(big)

    return Starlette(
        routes=[
            Route("/auth/login", login, methods=["POST"]),
            Route("/resources/models/m.bin", resource),
            Route("/blobs/the-blob", blob),
        ]
    )


@pytest.mark.parametrize("etag", ['ab"cd', "ab cd", "ab\x7fcd", "ab\ncd"])
def test_resources_header_unsafe_upstream_etag_bad_gateway(tmp_path, etag):
    """An upstream etag that cannot go into an ETag header is a 502, on every download path."""
    plaintext = b"p" * 10_000
    with serve(_fake_upstream(etag, plaintext)) as upstream:
        settings = Settings.from_environ({}, upstream_url=upstream, cache_dir=tmp_path)
        with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/login", json={"email": "a@b.c", "password": "x"}).is_success
            for method, path, headers in [
                ("POST", "/load/m.bin", {}),
                ("GET", "/resources/models/m.bin", {}),
                ("GET", "/resources/models/m.bin", {"Range": "bytes=5-"}),
                ("HEAD", "/resources/models/m.bin", {}),
            ]:
                response = client.request(method, path, headers=headers)
                assert response.status_code == 502, (method, path, response.text)
                if method != "HEAD":
                    assert "not a valid entity tag" in response.json()["detail"]


def test_resources_header_safe_upstream_etag_served(tmp_path):
    """The fake upstream itself works: a plain etag is served and quoted."""
    plaintext = b"p" * 10_000
    with serve(_fake_upstream("v1-abc_DEF.9", plaintext)) as upstream:
        settings = Settings.from_environ({}, upstream_url=upstream, cache_dir=tmp_path)
        with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/login", json={"email": "a@b.c", "password": "x"}).is_success
            response = client.post("/load/m.bin")
    assert response.status_code == 200
    assert response.content == plaintext
    assert response.headers["etag"] == '"v1-abc_DEF.9"'


def test_upload_max_upload_exceeded_mid_stream_nothing_published(tmp_path, make_stack):
    """A chunked upload passing UNLOCKD_MAX_UPLOAD after MiBs went upstream: 413, no trace."""
    limit = 3 << 20
    boundary = "B0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="f"\r\n\r\n'
    ).encode()

    def chunks():
        yield head
        for _ in range(5 * 16):  # 5 MiB of data, no Content-Length
            yield b"u" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    with make_stack(tmp_path, max_upload=limit) as stack, stack.client() as client:
        stack.login(client)
        response = client.post(
            "/upload/huge.bin",
            content=chunks(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 413
        assert str(limit) in response.json()["detail"]
        assert client.post("/load/huge.bin").status_code == 404
        eventually(lambda: stack.hub_pending_uploads() == [])
