"""Helpers of the transfer tests: a probe around the real hub and shortcuts for transfers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness import eventually_async

if TYPE_CHECKING:
    from collections.abc import Iterator

    from unlockd.api_client import ApiClient
    from unlockd.blobs import BlobClient
    from unlockd.cache import BigPartCache
    from unlockd.metrics import Metrics
    from unlockd.transfers import Transfers


class CutConnectionError(Exception):
    """Raised by the probe to make uvicorn drop a connection mid-body."""


class HubProbe:
    """ASGI wrapper: records (method, path, headers) of each request; optional blob faults."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.cut_blob_after: int | None = None  # one-shot: drop the next blob body after N bytes
        self.ignore_range = False  # answer 200 with the whole blob to range requests
        self.blob_delay = 0.0  # seconds to wait before each blob body message
        self.flip_blob_at: int | None = None  # one-shot: flip the blob byte at this offset
        self.shorten_ranges = 0  # this many range requests are answered with half the range
        # One-shot faults, first match wins: (method, path prefix, "503", "404", "403", "cut").
        self.faults: list[tuple[str, str, str]] = []

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(prefix))

    def blob_requests(self) -> list[dict[str, str]]:
        return [h for m, p, h in self.requests if m == "GET" and p.startswith("/blobs/")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["method"], scope["path"], headers))
        fault = self._fault(scope["method"], scope["path"])
        if fault in {"503", "404", "403"}:
            await _refuse(send, int(fault))
            return
        if fault == "cut":
            send = _cutting(send, 1)
        if scope["path"].startswith("/blobs/"):
            scope, send = self._blob_faults(scope, headers, send)
        await self.app(scope, receive, send)

    def _blob_faults(self, scope: Any, headers: dict[str, str], send: Any) -> tuple[Any, Any]:
        if self.ignore_range:
            kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
            scope = dict(scope, headers=kept)
        elif self.shorten_ranges and "range" in headers:
            self.shorten_ranges -= 1
            first, _, last = headers["range"].removeprefix("bytes=").partition("-")
            if last:
                half = f"bytes={first}-{int(first) + (int(last) - int(first)) // 2}"
                kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
                scope = dict(scope, headers=[*kept, (b"range", half.encode())])
        if self.flip_blob_at is not None:
            first, _, last = headers.get("range", "bytes=0-").removeprefix("bytes=").partition("-")
            if int(first) <= self.flip_blob_at and (not last or self.flip_blob_at <= int(last)):
                send = _flipping(send, self.flip_blob_at - int(first))
                self.flip_blob_at = None
        if self.cut_blob_after is not None:
            send = _cutting(send, self.cut_blob_after)
            self.cut_blob_after = None
        if self.blob_delay:
            send = _delaying(send, self.blob_delay)
        return scope, send

    def _fault(self, method: str, path: str) -> str | None:
        for i, (m, prefix, kind) in enumerate(self.faults):
            if m == method and path.startswith(prefix):
                del self.faults[i]
                return kind
        return None


async def _refuse(send: Any, status: int) -> None:
    body = b'{"detail": "refused by the probe"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _flipping(send: Any, offset: int) -> Any:
    """Flip the body byte at ``offset`` of this response (if it gets there)."""
    seen = 0

    async def wrapped(message: Any) -> None:
        nonlocal seen
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if seen <= offset < seen + len(body):
                flipped = bytearray(body)
                flipped[offset - seen] ^= 0x01
                message = dict(message, body=bytes(flipped))
            seen += len(body)
        await send(message)

    return wrapped


def _cutting(send: Any, limit: int) -> Any:
    sent = 0

    async def wrapped(message: Any) -> None:
        nonlocal sent
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if sent + len(body) >= limit:
                await send(
                    {"type": "http.response.body", "body": body[: limit - sent], "more_body": True}
                )
                raise CutConnectionError
            sent += len(body)
        await send(message)

    return wrapped


def _delaying(send: Any, delay: float) -> Any:
    async def wrapped(message: Any) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(delay)
        await send(message)

    return wrapped


@dataclass
class Hub:
    url: str
    probe: HubProbe
    data_dir: Any


@dataclass
class Sidecar:
    """The data-plane objects a sidecar app would create in its lifespan."""

    api: ApiClient
    cache: BigPartCache
    blobs: BlobClient
    transfers: Transfers
    metrics: Metrics
    cache_dir: Any
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Make every write that grows a file of this process past ``limit`` bytes fail (EFBIG).

    A real fault, as a full disk gives one: the kernel refuses the write, nothing is patched.
    """
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


async def chunked(data: bytes, size: int = 65_536):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def folder_models() -> str:
    return "models"


async def upload(sidecar: Sidecar, name: str, data: bytes, chunk: int = 65_536) -> dict[str, Any]:
    return await sidecar.transfers.upload(name, chunked(data, chunk), folder_models)


async def download(sidecar: Sidecar, name: str, byte_range=None) -> bytes:
    d = await sidecar.transfers.open_download("models", name, byte_range)
    try:
        return b"".join([chunk async for chunk in d])
    finally:
        await d.aclose()


def temp_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


async def settled(sidecar: Sidecar) -> None:
    """Wait until the cache has no download in progress (entries published or dropped)."""
    await eventually_async(lambda: not sidecar.cache._fetches and not temp_files(sidecar.cache_dir))
