"""The sidecar application: routes, error mapping, local auth, metrics and the lifespan."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware

from unlockd.api_client import ApiClient
from unlockd.cache import BigPartCache
from unlockd.docker import DockerLoader
from unlockd.httputil import json_exception_handlers
from unlockd.metrics import Metrics
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
    async with httpx.AsyncClient(timeout=_TIMEOUT, limits=_LIMITS, http1=True) as http:
        api = ApiClient(http, settings.upstream_url, cdn_url=settings.cdn_url, metrics=metrics)
        docker = DockerLoader(settings.docker_host)
        app.state.api = api
        app.state.unlock = UnlockManager(
            archive=settings.archive,
            key_id=settings.archive_key_id,
            api=api,
            docker=docker,
            metrics=metrics,
        )
        try:
            async with anyio.create_task_group() as task_group:
                # The cache tracks its own fill tasks (closed below): a failing fill must not
                # take the app's task group, and with it the whole app, down.
                cache = BigPartCache(settings.cache_dir, metrics)
                app.state.task_group = task_group
                app.state.cache = cache
                app.state.transfers = Transfers(api, cache, metrics, small_size=settings.small_size)
                try:
                    yield
                finally:
                    # Background work (cache fills, an unlock run) is cancelled on shutdown.
                    with anyio.CancelScope(shield=True):
                        await cache.aclose()
                    task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await docker.close()
                await api.aclose()


class TokenAuthMiddleware:
    """Require ``Authorization: Bearer <token>`` on every endpoint but /health, if configured."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        # The scheme is case-insensitive (RFC 9110 §11.1); the token is compared as given.
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or wrong local API token"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


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
