"""The hub application: storage and tokens owned by the lifespan, errors as JSON."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from starlette.applications import Starlette

from unlockd.errors import UnlockdError
from unlockd.httputil import json_exception_handlers
from unlockd.hub.auth import PASSWORD_HASHING_THREADS, TokenStore, dummy_password_hash
from unlockd.hub.routes import routes
from unlockd.hub.store import Store

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from unlockd.hub.config import HubSettings

__all__ = ["create_hub_app"]

logger = logging.getLogger("unlockd.hub")


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


def create_hub_app(
    settings: HubSettings, *, clock: Callable[[], float] = time.monotonic
) -> Starlette:
    """Return the hub's ASGI app; the lifespan opens the store under ``settings.data_dir``.

    ``clock`` is the time that tokens expire by (tests pass one they move by hand).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store(settings.data_dir)
        await anyio.to_thread.run_sync(store.open)
        try:
            await anyio.to_thread.run_sync(store.recover, settings.upload_ttl)
            # Computed once up front so the first unknown-email login is not faster.
            await anyio.to_thread.run_sync(dummy_password_hash)
            app.state.store = store
            app.state.tokens = TokenStore(settings.token_ttl, clock=clock)
            # scrypt takes 16 MiB and ~50 ms a login: a burst of logins must not fill every
            # worker thread (and hundreds of MiB) at once.
            app.state.password_limiter = anyio.CapacityLimiter(PASSWORD_HASHING_THREADS)
            app.state.settings = settings
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(
                    _clean_periodically, store, app.state.tokens, settings.upload_ttl
                )
                yield
                task_group.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(store.close)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=json_exception_handlers(logger, bearer_challenge=True),
    )
    # A trailing or encoded "/" names no resource: 404, not a redirect to a different path.
    app.router.redirect_slashes = False
    return app
