"""Run ASGI apps under a real uvicorn server on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn

from harness import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

T = TypeVar("T")


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Serve ``app`` in a thread with its own event loop; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    config.setdefault("lifespan", "on")
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive())
    if not server.started:
        msg = "server did not start"
        raise RuntimeError(msg)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@contextlib.asynccontextmanager
async def in_own_task(manager: contextlib.AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter ``manager`` in a task of its own and leave it there when the block ends.

    pytest-asyncio runs an async fixture's setup and teardown in different tasks, and a
    task group (the cache's, say) must be left in the task that entered it.
    """
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    leave = asyncio.Event()

    async def hold() -> None:
        async with manager as value:
            entered.set_result(value)
            await leave.wait()

    task = asyncio.create_task(hold())
    await asyncio.wait([entered, task], return_when=asyncio.FIRST_COMPLETED)
    if not entered.done():
        await task  # entering failed: raise its error
    try:
        yield entered.result()
    finally:
        leave.set()
        await task
