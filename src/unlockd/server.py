"""Run ASGI apps as a process: uvicorn servers together, signals, logging, data dirs.

``unlockd serve``, ``unlockd hub`` and ``unlockd dev`` all run through :func:`run_servers`:
one-line startup errors, exit 0 on SIGINT and SIGTERM, one server failing stops the others,
and every server under the limits of SPEC §12 (:mod:`unlockd.limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn

from unlockd.config import Limits
from unlockd.errors import InvalidInputError
from unlockd.limits import SendBudget, protocol_class

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence
    from pathlib import Path

    from starlette.types import ASGIApp

__all__ = ["configure_logging", "limit_options", "prepare_dir", "run_servers", "server_configs"]

logger = logging.getLogger("unlockd")


def prepare_dir(path: Path, what: str, *, writable: bool = True) -> None:
    """Create ``path`` if needed, check it is ``writable``; InvalidInputError naming ``what``."""
    try:
        # Private when we create it (model keys pass through, cached ciphertext sits there);
        # an existing directory keeps the mode its owner gave it.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create {what} {path}: {exc.strerror or exc}"
        raise InvalidInputError(msg) from exc
    if writable and not os.access(path, os.W_OK | os.X_OK):
        msg = f"{what} {path} is not writable"
        raise InvalidInputError(msg)


def limit_options(limits: Limits, budget: SendBudget | None = None) -> dict[str, Any]:
    """uvicorn.Config options that put a server under ``limits`` (``budget``: its own if None)."""
    budget = SendBudget(limits.send_buffer_budget) if budget is None else budget
    # The protocol counts connections itself: uvicorn's limit_concurrency would also count
    # requests in flight, and answer in plain text.
    return {"http": protocol_class(limits, budget), "ws": "none", "limit_concurrency": None}


def server_configs(
    apps: Sequence[tuple[ASGIApp, str, int]],
    *,
    limits: Limits | None = None,
    access_log: bool = False,
) -> list[uvicorn.Config]:
    """A uvicorn.Config for each ``(app, host, port)``, under ``limits``, each with its budget.

    One budget per server, not per process: in ``unlockd dev`` the sidecar's stalled clients
    would otherwise hold back the hub's blob sends that the sidecar's own fetches wait for.
    """
    limits = Limits() if limits is None else limits
    return [
        _config(app, host, port, access_log=access_log, options=limit_options(limits))
        for app, host, port in apps
    ]


def _config(
    app: ASGIApp, host: str, port: int, *, access_log: bool, options: dict[str, Any]
) -> uvicorn.Config:
    # "auto" picks uvloop when it is installed (uvicorn[standard]); the HTTP protocol is
    # httptools' with our limits.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",
        lifespan="on",
        log_level="info",
        access_log=access_log,
        # A multi-GiB download must not hold a shutdown (or a redeploy) forever.
        timeout_graceful_shutdown=10,
        **options,
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
    limits: Limits | None = None,
) -> int:
    """Serve each ``(app, host, port)`` under uvicorn until SIGINT or SIGTERM; return the status.

    A signal is a clean shutdown (0), as container runtimes expect; a server that cannot start
    (a busy port, a failing lifespan) has logged why and stops the others: 1. ``setup`` runs
    once every server is up. The access log is off by default: one line per request would
    drown the interesting ones. Every server is under ``limits`` (default: SPEC §12's), with a
    memory budget of its own (:func:`server_configs`).
    """
    servers = [_Server(c) for c in server_configs(apps, limits=limits, access_log=access_log)]
    # What is alive now (modules, classes, the apps) lives as long as the process: out of
    # the collector's sight, a full collection (Python's own, or the send budget's after a
    # burst of slow clients) blocks the loop for well under a millisecond, not ~50.
    gc.collect()
    gc.freeze()
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
