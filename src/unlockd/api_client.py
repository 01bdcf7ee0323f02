"""The upstream API client: login and token renewal, resources, uploads, keys and blobs.

One :class:`ApiClient` per app, over the app's pooled ``httpx.AsyncClient``; blob bytes come
from the CDN through :class:`unlockd.cdn.CdnClient`. httpx errors
and upstream answers are translated into :mod:`unlockd.errors` here. Credentials and
tokens never appear in logs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from unlockd.cdn import CdnClient
from unlockd.crypto_stream import HEADER_SIZE, KEY_SIZE, SegmentLayout
from unlockd.errors import (
    CredentialsRejectedError,
    ForbiddenError,
    InvalidUpstreamDataError,
    NotAuthenticatedError,
    NotFoundError,
    TruncatedCiphertextError,
    UpstreamError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable

    from unlockd.metrics import Metrics

__all__ = ["ApiClient", "ResourceInfo"]

logger = logging.getLogger(__name__)

_LAYOUT = SegmentLayout()


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """Upstream metadata of one resource version; ``big_url`` is absolute, CDN override applied."""

    folder: str
    name: str
    key: bytes
    small: bytes
    big_size: int
    etag: str
    big_url: str

    @property
    def ciphertext_size(self) -> int:
        return len(self.small) + self.big_size

    @property
    def plaintext_size(self) -> int:
        """Size of the decrypted resource (checked to be possible by get_resource)."""
        return _LAYOUT.plaintext_size(self.ciphertext_size)

    def __repr__(self) -> str:
        # The key must not end up in a log line through a repr.
        return (
            f"ResourceInfo(folder={self.folder!r}, name={self.name!r}, "
            f"big_size={self.big_size}, etag={self.etag!r})"
        )


class ApiClient:
    """Talks to the upstream (§5 of the spec); renews its token transparently."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        upstream_url: str,
        *,
        cdn_url: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._http = http
        self._base = httpx.URL(upstream_url.rstrip("/") + "/")
        self._cdn_url = httpx.URL(cdn_url) if cdn_url else None
        self._metrics = metrics
        self._cdn = CdnClient(metrics=metrics)
        self._email: str | None = None
        self._password: str | None = None
        self._accepted = False
        self._token: str | None = None
        self._expires_at = 0.0
        # Bumped by every successful login: a request that got a 401 with the token of
        # generation g only logs in again if nobody has done so since g.
        self._generation = 0
        self._lock = asyncio.Lock()

    @property
    def email(self) -> str | None:
        return self._email

    @property
    def authenticated(self) -> bool:
        return self._email is not None and self._accepted

    # -- authentication ------------------------------------------------------------

    async def login(self, email: str, password: str) -> None:
        """Verify the credentials at the upstream, then keep them and the token."""
        async with self._lock:
            try:
                await self._login(email, password)
            except CredentialsRejectedError:
                self._email = self._password = self._token = None
                self._accepted = False
                raise
            self._email, self._password = email, password

    async def _login(self, email: str, password: str) -> None:
        response = await self._send(
            "POST", "auth/login", json={"email": email, "password": password}, kind="login"
        )
        if response.status_code == 401:
            self._accepted = False
            raise CredentialsRejectedError("upstream rejected the credentials")
        self._check_status(response, "login")
        data = _json_object(response)
        token, expires_in = data.get("token"), data.get("expires_in")
        if not isinstance(token, str) or not token:
            raise self._invalid("login answer has no token")
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            raise self._invalid("login answer has no expires_in")
        # Renew a little early so a token does not expire in flight.
        margin = min(30.0, expires_in / 10)
        self._token = token
        self._expires_at = time.monotonic() + expires_in - margin
        self._generation += 1
        self._accepted = True

    async def _valid_token(self, stale_generation: int | None = None) -> tuple[str, int]:
        """Return a token and its generation, logging in once if it is missing or stale."""
        if (
            self._token is not None
            and time.monotonic() < self._expires_at
            and self._generation != stale_generation
        ):
            return self._token, self._generation
        async with self._lock:
            fresh = (
                self._token is not None
                and time.monotonic() < self._expires_at
                and self._generation != stale_generation
            )
            if not fresh:
                if self._email is None or self._password is None:
                    raise NotAuthenticatedError("not logged in: POST /login first")
                await self._login(self._email, self._password)
            assert self._token is not None
            return self._token, self._generation

    async def _authed(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        json: Any = None,
        content: AsyncIterable[bytes] | None = None,
    ) -> httpx.Response:
        token, generation = await self._valid_token()
        response = await self._send(
            method, path, kind=kind, json=json, content=content, token=token
        )
        # A consumed request stream cannot be sent again, so only JSON requests retry.
        if response.status_code == 401 and content is None:
            token, generation = await self._valid_token(stale_generation=generation)
            response = await self._send(method, path, kind=kind, json=json, token=token)
        if response.status_code == 401:
            raise CredentialsRejectedError("upstream rejected the session")
        self._check_status(response, kind)
        return response

    # -- resources, uploads, keys ----------------------------------------------------

    async def check_upstream(self) -> None:
        """Raise UpstreamError unless the upstream answers its health check."""
        response = await self._send("GET", "health", kind="health")
        self._check_status(response, "health")

    async def get_resource(self, folder: str, name: str) -> ResourceInfo:
        """Fetch the metadata of ``folder/name``."""
        response = await self._authed("GET", f"resources/{folder}/{name}", kind="resource")
        data = _json_object(response)
        key = self._b64(data.get("key"), "key")
        if len(key) != KEY_SIZE:
            raise self._invalid("resource key is not 32 bytes")
        small = self._b64(data.get("small"), "small")
        big_size, etag, big_url = data.get("big_size"), data.get("etag"), data.get("big_url")
        if not isinstance(big_size, int) or isinstance(big_size, bool) or big_size < 0:
            raise self._invalid("resource big_size is not a non-negative integer")
        if not isinstance(etag, str) or not etag:
            raise self._invalid("resource etag is missing")
        if not isinstance(big_url, str) or not big_url:
            raise self._invalid("resource big_url is missing")
        info = ResourceInfo(
            folder=folder,
            name=name,
            key=key,
            small=small,
            big_size=big_size,
            etag=etag,
            big_url=self._blob_url(big_url),
        )
        if len(small) < HEADER_SIZE:
            raise self._invalid("resource small part is shorter than a ciphertext header")
        try:
            info.plaintext_size  # noqa: B018 - validates the length
        except TruncatedCiphertextError:
            raise self._invalid("resource size is not a possible ciphertext length") from None
        return info

    async def create_upload(self) -> str:
        """Open an upload at the upstream; return its id."""
        response = await self._authed("POST", "uploads", kind="upload")
        upload_id = _json_object(response).get("upload_id")
        if not isinstance(upload_id, str) or not upload_id or "/" in upload_id:
            raise self._invalid("upload answer has no valid upload_id")
        return upload_id

    async def put_upload(self, upload_id: str, body: AsyncIterable[bytes]) -> None:
        """Stream ``body`` as the data of the upload (not retried: the stream is consumed)."""
        await self._authed("PUT", f"uploads/{upload_id}", kind="upload", content=body)

    async def delete_upload(self, upload_id: str) -> None:
        """Abandon an upload; best effort, an unknown upload is fine."""
        with contextlib.suppress(NotFoundError):
            await self._authed("DELETE", f"uploads/{upload_id}", kind="upload")

    async def publish(
        self, folder: str, name: str, upload_id: str, key: bytes, small: bytes
    ) -> str:
        """Publish an upload as the new version of ``folder/name``; return its etag."""
        body = {
            "upload_id": upload_id,
            "key": base64.b64encode(key).decode("ascii"),
            "small": base64.b64encode(small).decode("ascii"),
        }
        response = await self._authed(
            "PUT", f"resources/{folder}/{name}", kind="publish", json=body
        )
        etag = _json_object(response).get("etag")
        if not isinstance(etag, str) or not etag:
            raise self._invalid("publish answer has no etag")
        return etag

    async def get_key(self, key_id: str) -> bytes:
        """Fetch the archive key ``key_id`` (32 raw bytes)."""
        response = await self._authed("GET", f"keys/{key_id}", kind="key")
        key = self._b64(_json_object(response).get("key"), "key")
        if len(key) != KEY_SIZE:
            raise self._invalid("key is not 32 bytes")
        return key

    async def put_key(self, key_id: str, key: bytes) -> None:
        """Register the archive key ``key_id`` (publishers only)."""
        body = {"key": base64.b64encode(key).decode("ascii")}
        await self._authed("PUT", f"keys/{key_id}", kind="key", json=body)

    # -- blobs ---------------------------------------------------------------------

    def stream_blob(
        self, url: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Yield bytes ``[start, end)`` of the blob at ``url`` (see :meth:`CdnClient.stream`)."""
        return self._cdn.stream(url, start, end)

    async def aclose(self) -> None:
        """Close the CDN connection pool (the httpx client belongs to the caller)."""
        await self._cdn.aclose()

    def _blob_url(self, big_url: str) -> str:
        url = self._base.join(big_url)
        if (cdn := self._cdn_url) is not None:
            url = url.copy_with(scheme=cdn.scheme, host=cdn.host, port=cdn.port)
        return str(url)

    # -- plumbing ------------------------------------------------------------------

    async def _send(  # noqa: PLR0913 - keyword-only plumbing of one request
        self,
        method: str,
        path: str,
        *,
        kind: str,
        json: Any = None,
        content: AsyncIterable[bytes] | None = None,
        token: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        try:
            return await self._http.request(
                method, self._base.join(path), json=json, content=content, headers=headers
            )
        except httpx.TransportError as exc:
            self._count(kind)
            msg = f"upstream unreachable ({type(exc).__name__}) at {method} /{path}"
            raise UpstreamError(msg) from exc

    def _check_status(self, response: httpx.Response, kind: str) -> None:
        status = response.status_code
        if status < 300:
            return
        path = response.request.url.path
        if status == 403:
            msg = f"upstream forbids {response.request.method} {path}"
            raise ForbiddenError(msg)
        if status == 404:
            msg = f"not found upstream: {path}"
            raise NotFoundError(msg)
        self._count(kind)
        msg = f"upstream answered {status} to {response.request.method} {path}"
        raise UpstreamError(msg)

    def _b64(self, value: object, field: str) -> bytes:
        if not isinstance(value, str):
            msg = f"upstream field {field!r} is missing"
            raise self._invalid(msg)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            msg = f"upstream field {field!r} is not base64"
            raise self._invalid(msg) from None

    def _invalid(self, msg: str) -> InvalidUpstreamDataError:
        self._count("invalid")
        return InvalidUpstreamDataError(msg)

    def _count(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_errors.labels(kind=kind).inc()


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        msg = f"upstream answered invalid JSON to {response.request.url.path}"
        raise InvalidUpstreamDataError(msg) from exc
    if not isinstance(data, dict):
        msg = f"upstream answered a non-object to {response.request.url.path}"
        raise InvalidUpstreamDataError(msg)
    return data
