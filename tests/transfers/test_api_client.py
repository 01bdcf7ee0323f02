"""ApiClient against the real hub: login, token renewal under concurrency, errors, URLs."""

from __future__ import annotations

import anyio
import httpx
import pytest

from harness import PUBLISHER, READER
from transfers.support import random_bytes, upload
from unlockd.api_client import ApiClient
from unlockd.errors import (
    CredentialsRejectedError,
    ForbiddenError,
    InvalidInputError,
    NotAuthenticatedError,
    NotFoundError,
    UpstreamError,
)


async def _many_gets(api: ApiClient, n: int) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(api.get_resource, "models", "m.bin")


async def test_api_client_token_expired_relogs_in_once(sidecar, hub, clock):
    """80 concurrent requests after the token expired cause exactly one login and no 401."""
    await upload(sidecar, "m.bin", random_bytes(10_000))
    logins, gets = hub.probe.count("POST", "/auth/login"), hub.probe.count("GET", "/resources/")
    clock.advance(3600)  # the token's lifetime, on the hub's clock and the client's alike
    await _many_gets(sidecar.api, 80)
    assert hub.probe.count("POST", "/auth/login") == logins + 1
    assert hub.probe.count("GET", "/resources/") == gets + 80


async def test_api_client_upstream_401_relogs_in_once_and_retries(sidecar, hub, clock):
    """When the hub rejects a token the client thinks valid, one login serves all retries."""
    await upload(sidecar, "m.bin", random_bytes(10_000))
    async with httpx.AsyncClient(timeout=30) as http:
        api = ApiClient(http, hub.url)  # on the real clock: for it, the token stays fresh
        await api.login(*PUBLISHER)
        clock.advance(3600)  # only the hub's time moves
        logins, gets = hub.probe.count("POST", "/auth/login"), hub.probe.count("GET", "/resources/")
        await _many_gets(api, 50)
    assert hub.probe.count("POST", "/auth/login") == logins + 1
    assert hub.probe.count("GET", "/resources/") == gets + 100


async def test_api_client_without_login_not_authenticated(hub):
    """Without credentials, resource calls raise NotAuthenticatedError and send nothing."""
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub.url)
        assert not api.authenticated
        assert api.email is None
        with pytest.raises(NotAuthenticatedError):
            await api.get_resource("models", "m.bin")
    assert hub.probe.requests == []


async def test_api_client_wrong_password_rejected_without_leaking(hub):
    """Rejected credentials raise CredentialsRejectedError; the password is not in the message."""
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub.url)
        with pytest.raises(CredentialsRejectedError) as info:
            await api.login(PUBLISHER.email, "hunter2-wrong")
        assert "hunter2" not in str(info.value)
        assert not api.authenticated


async def test_api_client_login_sets_status(hub):
    """A successful login makes the client authenticated under that email."""
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub.url)
        await api.login(*PUBLISHER)
        assert api.authenticated
        assert api.email == PUBLISHER.email
        await api.check_upstream()


async def test_api_client_missing_resource_not_found(sidecar):
    """An unknown resource is NotFoundError."""
    with pytest.raises(NotFoundError):
        await sidecar.api.get_resource("models", "nope.bin")


async def test_api_client_reader_cannot_upload_forbidden(hub):
    """A reader account gets ForbiddenError for uploads."""
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub.url)
        await api.login(*READER)
        with pytest.raises(ForbiddenError):
            await api.create_upload()


async def test_api_client_cdn_url_replaces_host(sidecar, hub):
    """big_url is made absolute against the upstream, and UNLOCKD_CDN_URL replaces its host."""
    await upload(sidecar, "m.bin", b"x" * 10_000)
    info = await sidecar.api.get_resource("models", "m.bin")
    assert info.big_url == f"{hub.url}/blobs/{info.etag}"
    port = hub.url.rsplit(":", 1)[1]
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub.url, cdn_url=f"http://localhost:{port}")
        await api.login(*PUBLISHER)
        other = await api.get_resource("models", "m.bin")
    assert other.big_url == f"http://localhost:{port}/blobs/{info.etag}"
    blob = b"".join([c async for c in sidecar.blobs.stream(other.big_url)])
    assert len(blob) == info.big_size
    assert repr(info).find("key=") == -1


async def test_api_client_rejected_login_keeps_earlier_session(sidecar, clock):
    """A wrong login after a good one changes nothing: still authenticated, reads still work."""
    await upload(sidecar, "m.bin", random_bytes(10_000))
    api = sidecar.api
    with pytest.raises(CredentialsRejectedError):
        await api.login(PUBLISHER.email, "wrong-password")
    with pytest.raises(CredentialsRejectedError):
        await api.login("someone-else@example.com", PUBLISHER.password)
    assert api.authenticated
    assert api.email == PUBLISHER.email
    clock.advance(3600)  # the token expires: the next call logs in again, with the stored ones
    assert (await api.get_resource("models", "m.bin")).name == "m.bin"


async def test_api_client_upstream_422_is_invalid_input(hub):
    """An upstream 422 (an email over 254 characters) is our InvalidInputError, not a 502."""
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub.url)
        with pytest.raises(InvalidInputError) as info:
            await api.login("a" * 300 + "@example.com", PUBLISHER.password)
    assert info.value.status_code == 422
    assert "upstream" in info.value.message
    assert not api.authenticated


async def test_api_client_get_blips_retried(sidecar, hub):
    """A dropped connection and a 503 on GET /resources are retried; the third try succeeds."""
    await upload(sidecar, "m.bin", random_bytes(10_000))
    hub.probe.faults = [("GET", "/resources/", "cut"), ("GET", "/resources/", "503")]
    before = hub.probe.count("GET", "/resources/")
    assert (await sidecar.api.get_resource("models", "m.bin")).name == "m.bin"
    assert hub.probe.count("GET", "/resources/") == before + 3


async def test_api_client_get_gives_up_after_three_attempts(sidecar, hub):
    """Three 503s in a row end in UpstreamError, counted once."""
    hub.probe.faults = [("GET", "/keys/", "503")] * 3
    with pytest.raises(UpstreamError, match="503"):
        await sidecar.api.get_key("images")
    assert hub.probe.count("GET", "/keys/") == 3
    assert sidecar.metrics.upstream_errors.labels(kind="key")._value.get() == 1


async def test_api_client_post_not_retried(sidecar, hub):
    """A 503 to POST /uploads is not sent again (a retry could open a second upload)."""
    hub.probe.faults = [("POST", "/uploads", "503")]
    with pytest.raises(UpstreamError, match="503"):
        await sidecar.api.create_upload()
    assert hub.probe.count("POST", "/uploads") == 1
