"""The sidecar application: routes, error mapping, local auth, metrics and the lifespan."""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from unlockd.api_client import ApiClient
from unlockd.blobs import BlobClient
from unlockd.cache import BigPartCache
from unlockd.cachedir import CacheDirectory
from unlockd.docker import DockerLoader
from unlockd.httputil import json_exception_handlers
from unlockd.metrics import Metrics
from unlockd.pull import Pulls
from unlockd.routes import routes
from unlockd.transfers import Transfers
from unlockd.unlock import UnlockManager

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from unlockd.config import Settings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# Loopback and LAN upstreams: connecting is quick or hopeless; a CDN may pause between reads.
_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=30.0)
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def create_app(settings: Settings) -> Starlette:
    """Build the sidecar ASGI app; its lifespan creates and closes every shared resource."""
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestMetricsMiddleware),
            Middleware(TokenAuthMiddleware, token=settings.api_token),
        ],
        exception_handlers=json_exception_handlers(logger),
        lifespan=_lifespan,
    )
    # A trailing or encoded "/" names no resource: 404, not a redirect to a different path.
    app.router.redirect_slashes = False
    app.state.settings = settings
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics = Metrics()
    app.state.metrics = metrics
    async with contextlib.AsyncExitStack() as stack:
        # Closed in reverse order: background work first, then the clients it used.
        http = await stack.enter_async_context(
            httpx.AsyncClient(timeout=_TIMEOUT, limits=_LIMITS, http1=True)
        )
        blobs = BlobClient(metrics, stall_timeout=settings.cdn_stall_timeout)
        stack.push_async_callback(blobs.aclose)
        docker = DockerLoader(settings.docker_host)
        stack.push_async_callback(docker.close)
        # The cache owns its downloads (a failing one must not take the app down); the app's
        # task group holds the unlock run. Both are cancelled on shutdown.
        cache = await stack.enter_async_context(
            BigPartCache(
                settings.cache_dir,
                metrics,
                connections=settings.cdn_connections,
                part_size=settings.cdn_part_size,
                max_bytes=settings.cache_max_bytes,
                min_free=await anyio.to_thread.run_sync(_min_free_bytes, settings),
            )
        )
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)
        api = ApiClient(http, settings.upstream_url, cdn_url=settings.cdn_url, metrics=metrics)
        app.state.api = api
        app.state.cache = cache
        transfers = Transfers(api, cache, blobs, metrics, small_size=settings.small_size)
        app.state.transfers = transfers
        app.state.pulls = Pulls(transfers, task_group)
        app.state.unlock = UnlockManager(
            task_group,
            archive=settings.archive,
            key_id=settings.archive_key_id,
            api=api,
            docker=docker,
            metrics=metrics,
        )
        yield


# The operator page is static and holds no secret: it must load to ask for the token.
_PUBLIC_PATHS = frozenset({"/health", "/"})


def _min_free_bytes(settings: Settings) -> int:
    # The directory may not exist yet (the cache creates it): its filesystem is its parent's.
    directory = settings.cache_dir
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        total = CacheDirectory(directory).total_bytes()
    except OSError:
        return 0  # an unusable cache dir: /ready says so, and nothing can be evicted anyway
    return settings.cache_min_free.bytes_of(total)


class TokenAuthMiddleware:
    """Require ``Authorization: Bearer <token>`` on every endpoint but /health and /, if set."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in _PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        # The scheme is case-insensitive (RFC 9110 §11.1); the token is compared as given.
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": "missing or wrong local API token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class RequestMetricsMiddleware:
    """Count requests by method, route template (never the raw path) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.templates: dict[Callable[..., Any], str] = {
            route.endpoint: route.path for route in routes
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self.templates.get(scope.get("endpoint"), "unmatched")  # type: ignore[arg-type]
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                metrics.requests.labels(scope["method"], route, str(status)).inc()
