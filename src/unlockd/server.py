"""``unlockd serve`` runs the sidecar under uvicorn; ``unlockd dev`` runs hub + sidecar together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import uvicorn

from unlockd.config import Settings
from unlockd.errors import InvalidInputError, UnlockdError

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

    from starlette.types import ASGIApp

__all__ = ["DEMO_EMAIL", "dev_command", "prepare_dir", "run_servers", "serve_command"]

DEMO_EMAIL = "demo@example.com"
DEV_DIR = Path(".unlockd-dev")
DEV_HUB_PORT = 8700
DEV_SIDECAR_PORT = 8600
DEV_ARCHIVE_KEY_ID = "images"
logger = logging.getLogger("unlockd")


def serve_command(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run the sidecar until interrupted; flags win over ``UNLOCKD_*`` variables."""
    settings = Settings.from_environ(
        os.environ if environ is None else environ,
        host=args.host,
        port=args.port,
        upstream_url=args.upstream,
        cdn_url=args.cdn,
        cache_dir=args.cache_dir,
        archive=args.archive,
        archive_key_id=args.archive_key_id,
        api_token=args.api_token,
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
    from unlockd.app import create_app  # noqa: PLC0415 - keeps `unlockd --help` fast

    return run_servers([(create_app(settings), settings.host, settings.port)])


def dev_command(args: argparse.Namespace) -> int:  # noqa: ARG001 - `unlockd dev` has no flags
    """Run hub and sidecar on loopback with a demo publisher account; data in ./.unlockd-dev.

    Both use their own fixed settings: ``UNLOCKD_*`` variables (meant for ``serve`` and
    ``hub``) would break the printed session, e.g. an API token the banner's curls lack.
    Only ``DOCKER_HOST`` is honoured, for unlocking into the engine.
    """
    from unlockd.app import create_app  # noqa: PLC0415
    from unlockd.hub import HubSettings, add_user, create_hub_app  # noqa: PLC0415

    base = DEV_DIR.resolve()
    hub_dir, cache_dir, archive = base / "hub", base / "cache", base / "images.enc"
    for directory in (hub_dir, cache_dir):
        prepare_dir(directory, "the dev stack's data dir")
    password = _demo_password(base / "demo-password")
    add_user(hub_dir, DEMO_EMAIL, password, role="publisher")
    upstream = f"http://127.0.0.1:{DEV_HUB_PORT}"
    hub = create_hub_app(HubSettings(data_dir=hub_dir, host="127.0.0.1", port=DEV_HUB_PORT))
    sidecar = create_app(
        Settings.from_environ(
            {k: v for k, v in os.environ.items() if k == "DOCKER_HOST"},
            host="127.0.0.1",
            port=DEV_SIDECAR_PORT,
            upstream_url=upstream,
            cache_dir=cache_dir,
            archive=archive,
            archive_key_id=DEV_ARCHIVE_KEY_ID,
        )
    )
    configure_logging()

    async def setup() -> None:
        try:
            await _seal_demo_archive(archive, upstream, password)
        except UnlockdError as exc:
            logger.warning("could not seal the demo image archive: %s", exc.message)
        print(_dev_banner(base, upstream, password), flush=True)  # noqa: T201

    return run_servers(
        [(hub, "127.0.0.1", DEV_HUB_PORT), (sidecar, "127.0.0.1", DEV_SIDECAR_PORT)], setup
    )


def prepare_dir(path: Path, what: str, *, writable: bool = True) -> None:
    """Create ``path`` if needed, check it is ``writable``; InvalidInputError naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create {what} {path}: {exc.strerror or exc}"
        raise InvalidInputError(msg) from exc
    if writable and not os.access(path, os.W_OK | os.X_OK):
        msg = f"{what} {path} is not writable"
        raise InvalidInputError(msg)


async def _seal_demo_archive(archive: Path, upstream: str, password: str) -> None:
    """Seal the demo image into ``archive``, its key registered at the dev hub.

    Sealed anew at every start, so the archive and the hub's key always belong together;
    the plaintext (a few KiB, built in memory) is never written to disk.
    """
    from unlockd.demo import demo_image_archive  # noqa: PLC0415
    from unlockd.seal import seal  # noqa: PLC0415

    async def plaintext() -> AsyncIterator[bytes]:
        yield demo_image_archive()

    await seal(
        plaintext(),
        archive,
        key_id=DEV_ARCHIVE_KEY_ID,
        upstream=upstream,
        email=DEMO_EMAIL,
        password=password,
    )


def _config(app: ASGIApp, host: str, port: int, *, access_log: bool) -> uvicorn.Config:
    # "auto" picks uvloop and httptools when they are installed (uvicorn[standard]).
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",
        http="auto",
        lifespan="on",
        log_level="info",
        access_log=access_log,
        # A multi-GiB download must not hold a shutdown (or a redeploy) forever.
        timeout_graceful_shutdown=10,
    )


def configure_logging() -> None:
    """Log ``unlockd.*`` messages to stderr, once."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run_servers(
    apps: Sequence[tuple[ASGIApp, str, int]],
    setup: Callable[[], Awaitable[None]] | None = None,
    *,
    access_log: bool = False,
) -> int:
    """Serve each ``(app, host, port)`` under uvicorn until SIGINT or SIGTERM; return the status.

    A signal is a clean shutdown (0), as container runtimes expect; a server that cannot start
    (a busy port, a failing lifespan) has logged why and stops the others: 1. ``setup`` runs
    once every server is up. The access log is off by default: one line per request would
    drown the interesting ones.
    """
    servers = [_Server(_config(app, host, port, access_log=access_log)) for app, host, port in apps]
    with asyncio.Runner(loop_factory=servers[0].config.get_loop_factory()) as runner:
        runner.run(_serve_together(servers, setup))
    return 1 if any(server.failed for server in servers) else 0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to :func:`_serve_together` (one handler for all)."""

    failed = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_together(
    servers: list[_Server], setup: Callable[[], Awaitable[None]] | None
) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            # A second Ctrl-C stops waiting for open connections.
            server.force_exit = server.should_exit
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        async with anyio.create_task_group() as task_group:
            for server in servers:
                task_group.start_soon(_serve_one, server, servers)
            if setup is not None:
                task_group.start_soon(_after_start, servers, setup)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _after_start(servers: list[_Server], setup: Callable[[], Awaitable[None]]) -> None:
    while not all(server.started for server in servers):
        if any(server.should_exit for server in servers):
            return
        await anyio.sleep(0.02)
    await setup()


async def _serve_one(server: _Server, servers: list[_Server]) -> None:
    try:
        await server.serve()
    except SystemExit:
        # uvicorn logs a startup failure (e.g. "address already in use") on one line, then
        # calls sys.exit(), which must not escape as a traceback through the task group.
        server.failed = True
    finally:
        # When one stops (or fails to start), stop the other too.
        for other in servers:
            other.should_exit = True


def _demo_password(path: Path) -> str:
    """The dev account's password: random on first run, then kept in ``path`` (mode 0600)."""
    with contextlib.suppress(FileNotFoundError):
        if stored := path.read_text().strip():
            return stored
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(password + "\n")
    return password


def _dev_banner(base: Path, upstream: str, password: str) -> str:
    sidecar = f"http://127.0.0.1:{DEV_SIDECAR_PORT}"
    login = shlex.quote(f'{{"email": "{DEMO_EMAIL}", "password": "{password}"}}')
    lines = [
        "unlockd dev stack",
        f"  hub (upstream)   {upstream}   data in {base / 'hub'}",
        f"  sidecar          {sidecar}   cache in {base / 'cache'}",
        f"  demo publisher   {DEMO_EMAIL} / {password}   (kept in {base / 'demo-password'})",
        "",
        "Try it (another terminal):",
        f"  curl -s {sidecar}/login -H 'Content-Type: application/json' -d {login}",
        "  head -c 50000000 /dev/urandom > model.bin",
        f"  curl -s -F folder=models -F data=@model.bin {sidecar}/upload/model.bin",
        f"  curl -s -X POST {sidecar}/load/model.bin -o loaded.bin && cmp model.bin loaded.bin",
        f"  curl -s -r 0-9999999 -o resumed.bin {sidecar}/resources/models/model.bin",
        f"  curl -s -C - -o resumed.bin {sidecar}/resources/models/model.bin",
        "  cmp model.bin resumed.bin",
        f"  curl -s {sidecar}/status; curl -s {sidecar}/metrics | grep unlockd_",
        "",
        f"Unlock the demo image archive {base / 'images.enc'} into Docker (DOCKER_HOST):",
        f"  curl -s -X POST {sidecar}/unlock -H 'Content-Type: application/json' -d {login}",
        f"  curl -s {sidecar}/unlock/status   # until state is ready: images [unlockd-demo:latest]",
        "",
        "Ctrl-C stops both.",
    ]
    return "\n".join(lines)
