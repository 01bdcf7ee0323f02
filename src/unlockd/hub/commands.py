"""``unlockd hub`` and ``unlockd hub add-user``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from unlockd.config import Limits, read_password
from unlockd.hub.accounts import add_user
from unlockd.hub.app import build_store, create_hub_app
from unlockd.hub.config import HubSettings, resolve_data_dir, resolve_database
from unlockd.hub.database import display_url
from unlockd.server import configure_logging, prepare_dir, run_servers

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["add_user_command", "hub_command"]

_DATA_DIR = "the hub's data dir (--data-dir, UNLOCKD_HUB_DATA_DIR)"


def hub_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Serve the hub with uvicorn; flags win over ``UNLOCKD_HUB_*`` variables."""
    environ = os.environ if environ is None else environ
    settings = HubSettings.from_environ(
        environ,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        token_ttl=args.token_ttl,
        upload_ttl=args.upload_ttl,
        database=args.database,
        blobs=args.blobs,
        presign_ttl=args.presign_ttl,
    )
    if settings.uses_data_dir:
        prepare_dir(settings.data_dir, _DATA_DIR)
    # Before the store opens: converting an old database logs that it did.
    configure_logging()
    # Opened once before serving: an unreachable database or store, a missing bucket, a
    # corrupt or too-new schema is then one line, not the traceback of a failing lifespan.
    asyncio.run(_check_store(settings, environ))
    store = build_store(settings, environ)
    logging.getLogger("unlockd.hub").info(
        "hub metadata in %s, blobs in %s", store.database.display, store.blobs.description
    )
    app = create_hub_app(settings, environ=environ)
    limits = Limits.from_environ(environ, "UNLOCKD_HUB_")
    return run_servers([(app, settings.host, settings.port)], access_log=True, limits=limits)


async def _check_store(settings: HubSettings, environ: Mapping[str, str]) -> None:
    store = build_store(settings, environ)
    await store.open()
    await store.close()


def add_user_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Create or update an account; the password comes from ``UNLOCKD_PASSWORD`` or a prompt.

    The database is add-user's own ``--database``, else the hub's, else
    ``UNLOCKD_HUB_DATABASE``; without one, SQLite in the data dir: add-user's own
    ``--data-dir``, else the hub's (``unlockd hub --data-dir X add-user``), else
    ``UNLOCKD_HUB_DATA_DIR``, else the default: the one ``unlockd hub`` uses.
    """
    environ = os.environ if environ is None else environ
    database = resolve_database(
        environ, getattr(args, "user_database", None) or getattr(args, "database", None)
    )
    if database is None:
        override = getattr(args, "user_data_dir", None) or args.data_dir
        data_dir = resolve_data_dir(environ, override)
        prepare_dir(data_dir, _DATA_DIR)
        data_dir.chmod(0o700)
        target: Path | str = data_dir
        where = str(data_dir)
    else:
        target, where = database, display_url(database)
    password = read_password(environ)
    add_user(target, args.email, password, args.role)
    print(f"user {args.email} saved with role {args.role} in {where}", file=sys.stderr)  # noqa: T201
    return 0
