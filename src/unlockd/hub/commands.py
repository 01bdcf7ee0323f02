"""``unlockd hub`` and ``unlockd hub add-user``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from unlockd.hub.accounts import add_user
from unlockd.hub.app import create_hub_app
from unlockd.hub.config import HubSettings

if TYPE_CHECKING:
    import argparse

__all__ = ["add_user_command", "hub_command"]


def hub_command(args: argparse.Namespace) -> int:
    """Serve the hub with uvicorn; flags win over ``UNLOCKD_HUB_*`` variables."""
    settings = HubSettings.from_environ(
        os.environ,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        token_ttl=args.token_ttl,
        upload_ttl=args.upload_ttl,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    logging.getLogger("unlockd").info("hub data in %s", settings.data_dir)
    config = uvicorn.Config(
        create_hub_app(settings),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        # A multi-GiB blob download must not hold a shutdown (or a redeploy) forever.
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def add_user_command(args: argparse.Namespace) -> int:
    """Create or update an account; the password comes from ``UNLOCKD_PASSWORD`` or a prompt."""
    from unlockd.cli import read_password  # noqa: PLC0415 - cli imports this module lazily

    password = read_password()
    add_user(Path(args.data_dir), args.email, password, args.role)
    print(f"user {args.email} saved with role {args.role}", file=sys.stderr)  # noqa: T201
    return 0
