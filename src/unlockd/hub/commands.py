"""``unlockd hub`` and ``unlockd hub add-user``."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from unlockd.config import read_password
from unlockd.hub.accounts import add_user
from unlockd.hub.app import create_hub_app
from unlockd.hub.config import HubSettings, resolve_data_dir
from unlockd.hub.store import Store
from unlockd.server import configure_logging, prepare_dir, run_servers

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

__all__ = ["add_user_command", "hub_command"]

_DATA_DIR = "the hub's data dir (--data-dir, UNLOCKD_HUB_DATA_DIR)"


def hub_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Serve the hub with uvicorn; flags win over ``UNLOCKD_HUB_*`` variables."""
    settings = HubSettings.from_environ(
        os.environ if environ is None else environ,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        token_ttl=args.token_ttl,
        upload_ttl=args.upload_ttl,
    )
    prepare_dir(settings.data_dir, _DATA_DIR)
    # Opened once before serving: a corrupt or too-new database is then one line, not the
    # traceback uvicorn prints for a failing lifespan.
    store = Store(settings.data_dir)
    store.open()
    store.close()
    configure_logging()
    logging.getLogger("unlockd.hub").info("hub data in %s", settings.data_dir)
    app = create_hub_app(settings)
    return run_servers([(app, settings.host, settings.port)], access_log=True)


def add_user_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Create or update an account; the password comes from ``UNLOCKD_PASSWORD`` or a prompt.

    The data dir is add-user's own ``--data-dir``, else the hub's (``unlockd hub --data-dir X
    add-user``), else ``UNLOCKD_HUB_DATA_DIR``, else the default: the one ``unlockd hub`` uses.
    """
    environ = os.environ if environ is None else environ
    override = getattr(args, "user_data_dir", None) or args.data_dir
    data_dir = resolve_data_dir(environ, override)
    prepare_dir(data_dir, _DATA_DIR)
    password = read_password(environ)
    add_user(data_dir, args.email, password, args.role)
    print(f"user {args.email} saved with role {args.role} in {data_dir}", file=sys.stderr)  # noqa: T201
    return 0
