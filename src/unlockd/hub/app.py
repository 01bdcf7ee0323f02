"""The hub application: storage and tokens owned by the lifespan, errors as JSON."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from starlette.applications import Starlette

from unlockd.errors import UnlockdError
from unlockd.httputil import json_exception_handlers
from unlockd.hub.auth import PASSWORD_HASHING_THREADS, TokenStore, dummy_password_hash
from unlockd.hub.blobstore import DirectoryBlobs, open_blob_store
from unlockd.hub.database import Database
from unlockd.hub.routes import routes
from unlockd.hub.store import Store, default_blob_store

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from unlockd.hub.blobstore import BlobStore
    from unlockd.hub.config import HubSettings

__all__ = ["build_store", "create_hub_app"]

logger = logging.getLogger("unlockd.hub")


def build_store(settings: HubSettings, environ: Mapping[str, str] | None = None) -> Store:
    """The store ``settings`` describe (not opened); S3 variables come from ``environ``."""
    environ = os.environ if environ is None else environ
    if settings.uses_data_dir:
        # 0700: the database holds every content key.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings.data_dir.chmod(0o700)
    blobs: BlobStore = (
        default_blob_store(settings.data_dir)
        if settings.blobs is None
        else open_blob_store(settings.blobs, environ, settings.presign_ttl)
    )
    # An old hub's database converts only where its blob files are: in a directory.
    database = Database(settings.database_url, convert_old=isinstance(blobs, DirectoryBlobs))
    return Store(database, blobs)


async def _clean_periodically(store: Store, tokens: TokenStore, upload_ttl: float) -> None:
    interval = min(60.0, max(0.2, upload_ttl / 4))
    while True:
        await anyio.sleep(interval)
        try:
            removed = await store.remove_expired_uploads(upload_ttl)
            if removed:
                logger.info("removed %d upload(s) not published within %ss", removed, upload_ttl)
            await tokens.prune()
            # A directory belongs to this process alone: what a crash left went at start.
            if not isinstance(store.blobs, DirectoryBlobs):
                await store.collect_garbage(upload_ttl)
        except UnlockdError as exc:
            logger.warning("cleaning up expired uploads and tokens failed: %s", exc.message)


def create_hub_app(
    settings: HubSettings,
    *,
    clock: Callable[[], float] = time.time,
    environ: Mapping[str, str] | None = None,
) -> Starlette:
    """Return the hub's ASGI app; the lifespan opens the store ``settings`` describe.

    ``clock`` is the time that tokens expire by (tests pass one they move by hand);
    ``environ`` holds the ``AWS_*`` variables of an S3 store (default: ``os.environ``).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = build_store(settings, environ)
        await store.open()
        try:
            await store.remove_expired_uploads(settings.upload_ttl)
            lost = await store.drop_lost_uploads()
            if lost:
                logger.warning("dropped %d upload(s) whose body was lost in a crash", lost)
            # A directory is this process's alone, with nothing in flight yet: every temp file
            # is stale. A bucket is shared with hubs at work: their young writes are kept.
            directory = isinstance(store.blobs, DirectoryBlobs)
            await store.collect_garbage(0 if directory else settings.upload_ttl)
            # Computed once up front so the first unknown-email login is not faster.
            await anyio.to_thread.run_sync(dummy_password_hash)
            app.state.store = store
            app.state.tokens = TokenStore(store.database, settings.token_ttl, clock=clock)
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
            with anyio.CancelScope(shield=True):
                await store.close()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=json_exception_handlers(logger, bearer_challenge=True),
    )
    # A trailing or encoded "/" names no resource: 404, not a redirect to a different path.
    app.router.redirect_slashes = False
    return app
