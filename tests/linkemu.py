"""A WAN link emulator: a TCP proxy that adds latency, caps rates and injects faults.

This kernel has no ``netem``, so latency and per-connection limits are emulated here, in user
space, between a client (the sidecar) and a server (the CDN). Each direction of each
connection is a pipe that delays every chunk by half the round-trip time and paces bytes by
two token buckets: one of the connection and one shared by the whole link. Faults: ``cut_after``
closes a connection once it has carried that many response bytes, ``stall_after`` stops one
connection's responses for ``stall_seconds``. Used by the transfer tests and ``bench/wan.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

_CHUNK = 64 * 1024


@dataclasses.dataclass
class LinkSettings:
    """What the emulated link does; every field may be changed while it runs."""

    rtt: float = 0.0  # seconds, split evenly between the two directions
    link_rate: float | None = None  # bytes/s for all connections together, server to client
    connection_rate: float | None = None  # bytes/s for each connection, server to client
    cut_after: int | None = None  # response bytes after which every connection is cut
    stall_after: int | None = None  # response bytes after which one connection stalls...
    stall_seconds: float = 0.0  # ...for this long (the first connection to get there)


class _Bucket:
    """A token bucket: ``take(n)`` waits until ``n`` bytes may pass at ``rate``."""

    def __init__(self) -> None:
        self._next = time.monotonic()

    async def take(self, n: int, rate: float | None) -> None:
        if rate is None:
            return
        now = time.monotonic()
        start = max(self._next, now)
        self._next = start + n / rate
        if start > now:
            await asyncio.sleep(start - now)


class LinkEmulator:
    """The proxy, on 127.0.0.1, in an event loop of its own thread; ``url`` is its address."""

    def __init__(self, target_host: str, target_port: int, settings: LinkSettings) -> None:
        self.settings = settings
        self._target = (target_host, target_port)
        self._link = _Bucket()
        self._stalled = False
        self.connections = 0
        self.cuts = 0
        self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        tasks = [
            asyncio.ensure_future(self._pipe(reader, up_writer, down=False)),
            asyncio.ensure_future(self._pipe(up_reader, writer, down=True)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The emulator is stopping: asyncio's stream server logs a handler that ends
            # cancelled as an error, so this one ends quietly (it is the last thing to run).
            pass
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, down: bool
    ) -> None:
        own = _Bucket()
        carried = 0
        stalled_here = False
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        delivery = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(_CHUNK):
                s = self.settings
                if down:
                    if s.cut_after is not None and carried + len(data) > s.cut_after:
                        self.cuts += 1
                        return  # the connection is cut: both sides are closed
                    if (
                        s.stall_after is not None
                        and not self._stalled
                        and carried + len(data) > s.stall_after
                    ):
                        self._stalled = stalled_here = True
                    if stalled_here:
                        stalled_here = False
                        await asyncio.sleep(s.stall_seconds)
                    await own.take(len(data), s.connection_rate)
                    await self._link.take(len(data), s.link_rate)
                    carried += len(data)
                    self.bytes_down += len(data)
                await queue.put((time.monotonic() + s.rtt / 2, data))
            await queue.put((0.0, b""))
            await delivery
        finally:
            delivery.cancel()

    def reset_faults(self) -> None:
        """Allow the next stall again (one connection per run stalls)."""
        self._stalled = False

    @contextlib.contextmanager
    def running(self) -> Iterator[LinkEmulator]:
        """Run the proxy in a thread until the block ends."""
        started = threading.Event()
        stop: asyncio.Future[None] | None = None

        async def main() -> None:
            nonlocal stop
            self._loop = asyncio.get_running_loop()
            stop = self._loop.create_future()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            await stop
            self._server.close()

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        started.wait(10)
        try:
            yield self
        finally:
            loop = self._loop
            if loop is not None and stop is not None:
                loop.call_soon_threadsafe(stop.set_result, None)
            thread.join(timeout=10)
