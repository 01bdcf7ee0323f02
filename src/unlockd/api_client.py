"""The upstream API client: login and token renewal, resources, uploads and keys.

One :class:`ApiClient` per app, over the app's pooled ``httpx.AsyncClient`` (blob bytes are
the transfer layer's business: :mod:`unlockd.blobs`). httpx errors and upstream answers are
translated into :mod:`unlockd.errors` here, upstream metadata is validated where it is
parsed. Credentials and tokens never appear in logs or error messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from unlockd.crypto_stream import HEADER_SIZE, KEY_SIZE, SegmentLayout
from unlockd.errors import (
    CredentialsRejectedError,
    ForbiddenError,
    InvalidInputError,
    InvalidUpstreamDataError,
    NotAuthenticatedError,
    NotFoundError,
    TruncatedCiphertextError,
    UpstreamError,
)
from unlockd.metrics import Metrics
from unlockd.retry import API_ATTEMPTS, retrying

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable, Iterator

__all__ = ["ApiClient", "ResourceInfo"]

logger = logging.getLogger(__name__)

_LAYOUT = SegmentLayout()
# What an upstream etag may hold: RFC 9110's etagc (§8.8.3) without obs-text; it ends up in
# ETag headers and cache file names.
_ETAG = re.compile(r"[\x21\x23-\x7e]{1,128}")


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._clock = clock  # tokens expire by it; tests pass one they move by hand
        self._base = httpx.URL(upstream_url.rstrip("/") + "/")
        self._cdn_url = httpx.URL(cdn_url) if cdn_url else None
        self._metrics = metrics if metrics is not None else Metrics()
        self._email: str | None = None
        self._password: str | None = None
        self._accepted = False
        self._token: str | None = None
        self._role: str | None = None
        self._expires_at = 0.0
        # Bumped by every successful login: a request that got a 401 with the token of
        # generation g only logs in again if nobody has done so since g.
        self._generation = 0
        self._lock = anyio.Lock()

    @property
    def email(self) -> str | None:
        return self._email

    @property
    def role(self) -> str | None:
        """The role the upstream named at the last login (``reader``/``publisher``), if any."""
        return self._role

    @property
    def authenticated(self) -> bool:
        return self._email is not None and self._accepted

    # -- authentication ------------------------------------------------------------

    async def login(self, email: str, password: str) -> None:
        """Verify the credentials at the upstream, then keep them and the token.

        A login that fails for any reason changes nothing: the credentials and token of an
        earlier successful login stay in use.
        """
        async with self._lock:
            await self._login(email, password)
            self._email, self._password = email, password

    async def _login(self, email: str, password: str) -> None:
        response = await self._send(
            "POST", "auth/login", json={"email": email, "password": password}, kind="login"
        )
        if response.status_code == 401:
            raise CredentialsRejectedError("upstream rejected the credentials")
        self._check_status(response, "login")
        data = _json_object(response)
        token, expires_in = data.get("token"), data.get("expires_in")
        if not isinstance(token, str) or not token:
            raise self._invalid("upstream login answer has no token")
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            raise self._invalid("upstream login answer has no expires_in")
        # Renew a little early so a token does not expire in flight.
        margin = min(30.0, expires_in / 10)
        self._token = token
        self._expires_at = self._clock() + expires_in - margin
        self._generation += 1
        self._accepted = True
        # An optional extension of the protocol (docs/upstream-api.md); None if not named.
        role = data.get("role")
        self._role = role if isinstance(role, str) else None

    async def bearer_token(self) -> str:
        """A valid upstream token for a request this client does not send itself."""
        token, _ = await self._valid_token()
        return token

    async def _valid_token(self, stale_generation: int | None = None) -> tuple[str, int]:
        """Return a token and its generation, logging in once if it is missing or stale."""
        if (
            self._token is not None
            and self._clock() < self._expires_at
            and self._generation != stale_generation
        ):
            return self._token, self._generation
        async with self._lock:
            fresh = (
                self._token is not None
                and self._clock() < self._expires_at
                and self._generation != stale_generation
            )
            if not fresh:
                if self._email is None or self._password is None:
                    raise NotAuthenticatedError("not logged in: POST /login first")
                try:
                    await self._login(self._email, self._password)
                except CredentialsRejectedError:
                    self._accepted = False  # the stored credentials stopped working
                    raise
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
        retry = method == "GET"  # idempotent and bodiless: safe to send again after a blip
        token, generation = await self._valid_token()
        response = await self._send(
            method, path, kind=kind, json=json, content=content, token=token, retry=retry
        )
        # A consumed request stream cannot be sent again, so only JSON requests retry.
        if response.status_code == 401 and content is None:
            token, generation = await self._valid_token(stale_generation=generation)
            response = await self._send(
                method, path, kind=kind, json=json, token=token, retry=retry
            )
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
            raise self._invalid("upstream resource key is not 32 bytes")
        small = self._b64(data.get("small"), "small")
        big_size, etag, big_url = data.get("big_size"), data.get("etag"), data.get("big_url")
        if not isinstance(big_size, int) or isinstance(big_size, bool) or big_size < 0:
            raise self._invalid("upstream resource big_size is not a non-negative integer")
        if not isinstance(etag, str) or not _ETAG.fullmatch(etag):
            raise self._invalid("upstream resource etag is missing or not a valid entity tag")
        if not isinstance(big_url, str) or not big_url:
            raise self._invalid("upstream resource big_url is missing")
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
            raise self._invalid("upstream resource small part is shorter than a header")
        try:
            info.plaintext_size  # noqa: B018 - validates the length
        except TruncatedCiphertextError:
            msg = "upstream resource size is not a possible ciphertext length"
            raise self._invalid(msg) from None
        return info

    async def create_upload(self) -> str:
        """Open an upload at the upstream; return its id."""
        response = await self._authed("POST", "uploads", kind="upload")
        upload_id = _json_object(response).get("upload_id")
        if not isinstance(upload_id, str) or not upload_id or "/" in upload_id:
            raise self._invalid("upstream upload answer has no valid upload_id")
        return upload_id

    def upload_url(self, upload_id: str) -> str:
        """Where the body of ``upload_id`` goes (``PUT``, see :meth:`BlobClient.put`)."""
        return str(self._base.join(f"uploads/{upload_id}"))

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
            raise self._invalid("upstream publish answer has no etag")
        return etag

    async def get_key(self, key_id: str) -> bytes:
        """Fetch the archive key ``key_id`` (32 raw bytes)."""
        response = await self._authed("GET", f"keys/{key_id}", kind="key")
        key = self._b64(_json_object(response).get("key"), "key")
        if len(key) != KEY_SIZE:
            raise self._invalid("upstream key is not 32 bytes")
        return key

    async def put_key(self, key_id: str, key: bytes) -> None:
        """Register the archive key ``key_id`` (publishers only)."""
        body = {"key": base64.b64encode(key).decode("ascii")}
        await self._authed("PUT", f"keys/{key_id}", kind="key", json=body)

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
        retry: bool = False,
    ) -> httpx.Response:
        """Send one request; with ``retry``, connection errors and 5xx are tried again."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        url = self._base.join(path)
        # Never for a login, an upload or a publish (not idempotent, or a consumed stream),
        # nor for the health check, which should report the present.
        try:
            with self._map_httpx_errors(method, path, kind):
                async for attempt in retrying(_retryable, API_ATTEMPTS if retry else 1):
                    with attempt:
                        if attempt.num > 1:
                            logger.warning("upstream %s /%s failed; retrying", method, path)
                        response = await self._http.request(
                            method, url, json=json, content=content, headers=headers
                        )
                        _ServerError.check(response, retry=retry)
        except _ServerError as exc:
            return exc.response  # out of attempts: the caller maps the status
        return response

    @contextlib.contextmanager
    def _map_httpx_errors(self, method: str, path: str, kind: str) -> Iterator[None]:
        # The one place that turns httpx's errors into ours, as httpx does with httpcore's.
        try:
            yield
        except httpx.TransportError as exc:
            self._metrics.upstream_error(kind)
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
        if status == 422:
            # The upstream refused what we passed on (e.g. an over-long email): the caller's
            # input, not an upstream failure.
            msg = f"upstream refused the input of {response.request.method} {path}"
            if detail := _detail(response):
                msg = f"{msg}: {detail}"
            raise InvalidInputError(msg)
        self._metrics.upstream_error(kind)
        msg = f"upstream answered {status} to {response.request.method} {path}"
        raise UpstreamError(msg)

    def _invalid(self, msg: str) -> InvalidUpstreamDataError:
        """Count and return (for the caller to raise) an error for unusable upstream data."""
        self._metrics.upstream_error("invalid")
        return InvalidUpstreamDataError(msg)

    def _b64(self, value: object, field: str) -> bytes:
        if not isinstance(value, str):
            msg = f"upstream field {field!r} is missing"
            raise self._invalid(msg)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            msg = f"upstream field {field!r} is not base64"
            raise self._invalid(msg) from None


class _ServerError(Exception):
    """A 5xx answer to a request that may be retried."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"status {response.status_code}")
        self.response = response

    @classmethod
    def check(cls, response: httpx.Response, *, retry: bool) -> None:
        """Raise for a 5xx answer when the request may be retried."""
        if retry and response.status_code >= 500:
            raise cls(response)


def _retryable(exc: Exception) -> bool:
    # A timeout already cost the whole timeout: retrying would multiply the wait.
    if isinstance(exc, httpx.TransportError):
        return not isinstance(exc, httpx.TimeoutException)
    return isinstance(exc, _ServerError)


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


def _detail(response: httpx.Response) -> str:
    """The upstream's ``{"detail": ...}`` message, shortened and printable, or ""."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(detail, str):
        return ""
    return "".join(c if c.isprintable() else "?" for c in detail[:200])
