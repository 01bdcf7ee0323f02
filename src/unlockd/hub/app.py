"""The hub application: storage and tokens owned by the lifespan, errors as JSON."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from unlockd.errors import NotAuthenticatedError, RangeNotSatisfiableError, UnlockdError
from unlockd.hub.auth import TokenStore, dummy_password_hash
from unlockd.hub.routes import routes
from unlockd.hub.store import Store

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request
    from starlette.responses import Response

    from unlockd.hub.config import HubSettings

__all__ = ["create_hub_app"]

logger = logging.getLogger("unlockd.hub")


async def _unlockd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UnlockdError)
    headers = {}
    if isinstance(exc, NotAuthenticatedError):
        headers["www-authenticate"] = "Bearer"
    if isinstance(exc, RangeNotSatisfiableError):
        headers["content-range"] = f"bytes */{exc.size}"
    if exc.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _server_error(_request: Request, _exc: Exception) -> Response:
    # ServerErrorMiddleware logs the traceback and re-raises after this reply is sent.
    return JSONResponse({"detail": "internal server error"}, status_code=500)


async def _clean_periodically(store: Store, tokens: TokenStore, upload_ttl: float) -> None:
    interval = min(60.0, max(0.2, upload_ttl / 4))
    while True:
        await anyio.sleep(interval)
        try:
            removed = await store.remove_expired_uploads(upload_ttl)
        except (UnlockdError, OSError) as exc:
            logger.warning("removing expired uploads failed: %s", exc)
        else:
            if removed:
                logger.info("removed %d upload(s) not published within %ss", removed, upload_ttl)
        tokens.prune()


def create_hub_app(settings: HubSettings) -> Starlette:
    """Return the hub's ASGI app; the lifespan opens the store under ``settings.data_dir``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store(settings.data_dir)
        await anyio.to_thread.run_sync(store.open)
        try:
            await anyio.to_thread.run_sync(store.recover, settings.upload_ttl)
            # Computed once up front so the first unknown-email login is not faster.
            await anyio.to_thread.run_sync(dummy_password_hash)
            app.state.store = store
            app.state.tokens = TokenStore(settings.token_ttl)
            app.state.settings = settings
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(
                    _clean_periodically, store, app.state.tokens, settings.upload_ttl
                )
                yield
                task_group.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(store.close)

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            UnlockdError: _unlockd_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
