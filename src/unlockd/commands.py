"""``unlockd serve`` and ``unlockd seal``: from parsed arguments and the environ to the modules.

Each command validates its inputs (flags winning over variables), then calls into the module
that does the work; errors are :class:`~unlockd.errors.UnlockdError`, printed by the CLI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from unlockd.app import create_app
from unlockd.config import Limits, Settings, http_url, read_password
from unlockd.errors import InvalidInputError
from unlockd.models import validate_name
from unlockd.progress import Progress
from unlockd.seal import SealSource, seal
from unlockd.server import configure_logging, prepare_dir, run_servers

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

__all__ = ["seal_command", "serve_command"]

logger = logging.getLogger("unlockd")


def serve_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run the sidecar until interrupted; flags win over ``UNLOCKD_*`` variables."""
    environ = os.environ if environ is None else environ
    settings = Settings.from_environ(
        environ,
        host=args.host,
        port=args.port,
        upstream_url=args.upstream,
        cdn_url=args.cdn,
        cache_dir=args.cache_dir,
        archive=args.archive,
        archive_key_id=args.archive_key_id,
        api_token=args.api_token,
        cache_min_free=args.cache_min_free,
        cdn_connections=args.cdn_connections,
        cdn_part_size=args.cdn_part_size,
        cache_max_bytes=args.cache_max_bytes,
    )
    # A read-only cache still serves: downloads stream from the CDN and /ready says why.
    prepare_dir(
        settings.cache_dir, "the model cache dir (--cache-dir, UNLOCKD_CACHE_DIR)", writable=False
    )
    configure_logging()
    if not settings.loopback and settings.api_token is None:
        logger.warning(
            "listening on %s without UNLOCKD_API_TOKEN: anyone who can reach this port can "
            "load models and upload with the stored credentials",
            settings.host,
        )
    limits = Limits.from_environ(environ)
    return run_servers([(create_app(settings), settings.host, settings.port)], limits=limits)


def seal_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Seal INPUT (or ``--image``s) into OUTPUT and register its key; return the exit status."""
    source = SealSource.parse(args.input, list(args.image))
    validate_name(args.key_id, "key id")
    upstream = http_url("--upstream", args.upstream)
    output = Path(args.output)
    # Checked before anything else: a failure after the key is registered would leave the
    # hub with a key that no archive on disk matches.
    if output.is_dir():
        msg = f"output {args.output!r} is a directory"
        raise InvalidInputError(msg)
    if not output.parent.is_dir():
        msg = f"output directory {str(output.parent)!r} does not exist"
        raise InvalidInputError(msg)
    if not os.access(output.parent, os.W_OK):
        msg = f"output directory {str(output.parent)!r} is not writable"
        raise InvalidInputError(msg)
    password = read_password(environ, prompt=f"Password for {args.email}: ")

    async def run() -> int:
        with Progress(await source.size(), "seal") as progress:
            return await seal(
                source,
                output,
                key_id=args.key_id,
                upstream=upstream,
                email=args.email,
                password=password,
                on_progress=progress.advance,
            )

    size = anyio.run(run)
    print(  # noqa: T201
        f"sealed {output} ({size} bytes); key {args.key_id!r} registered at {upstream}"
    )
    return 0
