"""What one client may cost a server: uvicorn's httptools protocol with SPEC §12's limits.

uvicorn bounds none of these by itself with httptools: a header of any size is buffered (and
re-concatenated) by the parser, a connection that sends half a request line stays open, its
``limit_concurrency`` answers 503 only once a request is parsed (in plain text), and a response
whose client stopped reading waits in ``drain()`` forever, holding the chunk it was sending.
:class:`LimitedHttpProtocol` adds, per connection:

- the request head (request line and headers) is counted as it arrives: past
  ``max_header_bytes`` the answer is 431 and the connection is closed, before the parser
  buffers more;
- a head not complete within ``header_timeout`` of its first byte (or of the connection,
  for the first request) closes the connection;
- a connection beyond ``max_connections`` is answered 503 as soon as it is accepted, and
  closed within a second;
- while the transport's buffer stays above its high-water mark, a client that takes no byte
  in ``send_timeout`` is dropped (the response task then sees ``http.disconnect``);
- response bytes queued for clients, counted per chunk of 64 KiB or more, come out of the
  server's :class:`SendBudget`: when slow clients hold it all, other bulk responses wait for
  their next chunk. Smaller chunks (``/health``, JSON answers) never wait: uvicorn already
  holds each connection to its write buffer's high-water mark plus one message, so they cost
  at most 64 KiB a connection, bounded by ``max_connections``.

Error answers are JSON ``{"detail": ...}`` like every other error, and the server's
:class:`~unlockd.config.Limits` go into each request's scope for the JSON body checks of
:func:`unlockd.httputil.read_json_object`.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import gc
import http
import json
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from unlockd.httputil import LIMITS_SCOPE_KEY

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from unlockd.config import Limits

__all__ = ["LimitedHttpProtocol", "SendBudget", "protocol_class"]

logger = logging.getLogger("unlockd")

# After the last of a burst of slow clients has gone, give the freed chunks back to the OS;
# not after every download (a fast client holds a chunk or two), and not more often than
# _TRIM_INTERVAL: a full collection of a big heap takes the loop for tens of milliseconds.
_TRIM_DELAY = 1.0
_TRIM_INTERVAL = 10.0
_TRIM_ABOVE = 32 * 1024 * 1024

# Chunks smaller than this are not counted (see the module's docstring); it is also the
# default high-water mark of asyncio's and uvloop's transports.
_UNCOUNTED_BELOW = 64 * 1024

# How long a connection over the cap is read (and its bytes dropped) after its 503.
_OVER_CAP_LINGER = 1.0


class SendBudget:
    """Bytes of response chunks that clients have not taken yet, shared by a server's connections.

    A chunk is counted from the moment it is handed to the server until the transport has
    written it to the socket. :meth:`acquire` waits while the budget is spent; a chunk larger
    than the whole budget counts as the whole budget, so it can still go out alone. When the
    budget goes idle after a burst, freed memory goes back to the OS ``trim_delay`` later, at
    most once per ``trim_interval``.
    """

    def __init__(
        self, total: int, *, trim_delay: float = _TRIM_DELAY, trim_interval: float = _TRIM_INTERVAL
    ) -> None:
        self.total = total
        self.used = 0
        self._peak = 0
        self._released = asyncio.Event()
        self._trim_delay = trim_delay
        self._trim_interval = trim_interval
        self._trim: asyncio.TimerHandle | None = None
        self._trimming: asyncio.Future[Any] | None = None
        self._last_trim = -trim_interval

    def clip(self, size: int) -> int:
        """The amount a chunk of ``size`` bytes counts for."""
        return min(size, self.total)

    async def acquire(self, amount: int) -> None:
        """Wait until ``amount`` (see :meth:`clip`) fits in the budget, then count it."""
        while self.used + amount > self.total:
            self._released.clear()
            await self._released.wait()
        self.used += amount
        self._peak = max(self._peak, self.used)

    def release(self, amount: int) -> None:
        """Give back ``amount``; when the budget is idle, return freed memory to the OS soon."""
        self.used -= amount
        self._released.set()
        if self.used == 0 and self._peak >= _TRIM_ABOVE and self._trim is None:
            loop = asyncio.get_running_loop()
            delay = max(self._trim_delay, self._last_trim + self._trim_interval - loop.time())
            self._trim = loop.call_later(delay, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        if self.used != 0 or self._trimming is not None:
            return  # the next idle moment (or the trim under way) will do
        loop = asyncio.get_running_loop()
        self._peak = 0
        self._last_trim = loop.time()
        # The chunks and segment buffers of cancelled downloads sit in reference cycles
        # (tracebacks, frames) until a full collection; then glibc keeps the freed 1 MiB
        # blocks in its heap (its mmap threshold grows with the first ones freed). Without
        # both, RSS stays at its peak after slow clients have gone. The collection stays on
        # the loop: it holds the GIL in any thread, and would run the finalizers of the
        # loop's objects in another. malloc_trim walks the whole heap without the GIL.
        gc.collect()
        if _malloc_trim is not None:
            self._trimming = loop.run_in_executor(None, _malloc_trim, 0)
            self._trimming.add_done_callback(self._trimmed)

    def _trimmed(self, future: asyncio.Future[Any]) -> None:
        self._trimming = None
        future.result()  # malloc_trim raises nothing; a bug would be logged by the loop


def _find_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)  # glibc only; musl has none


_malloc_trim = _find_malloc_trim()


def protocol_class(limits: Limits, budget: SendBudget) -> type[LimitedHttpProtocol]:
    """A :class:`LimitedHttpProtocol` for uvicorn's ``http=`` with these limits and budget."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits, "budget": budget})


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; see :func:`protocol_class`."""

    limits: ClassVar[Limits]
    budget: ClassVar[SendBudget]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._inner_app = self.app
        self.app = self._limited_app
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_buffer = 0
        self._over_cap = False
        # Sizes and budget amounts of the chunks written to the transport, not yet on the socket.
        self._queued: collections.deque[tuple[int, int]] = collections.deque()
        # Counted for the response's next chunk, before the app makes it.
        self._reserved = 0

    # -- the request head --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._turn_away()
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timeout)

    def _turn_away(self) -> None:
        # Answered at once, not once a request is in: a flood of idle connections would
        # otherwise hold a descriptor each for the header timeout. Then only half closed,
        # for a moment: a request arriving at a closed socket is answered with a reset,
        # which can destroy the 503 before the client has read it.
        self._over_cap = True
        self.transport.write(
            _error_response(503, "too many connections; try again later", retry_after=1)
        )
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        linger = min(_OVER_CAP_LINGER, self.limits.header_timeout)
        self._head_timer = self.loop.call_later(linger, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._over_cap:
            return  # the rest of a request already answered 503
        # Fed to the parser no further than the limit: httptools would buffer a header of
        # any size before calling back.
        while data and self._in_head and not self.transport.is_closing():
            room = self.limits.max_header_bytes - self._head_bytes
            if room <= 0:
                self._reject_head()
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
        # Body bytes, and whatever follows them in this read (at most one read buffer).
        if data and not self.transport.is_closing():
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _reject_head(self) -> None:
        detail = f"request headers larger than {self.limits.max_header_bytes} bytes"
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request behind a response in progress: no room for an answer.
            self.transport.close()
        else:
            self._answer_and_close(431, detail)

    def send_400_response(self, msg: str) -> None:
        """Answer a request the parser rejected, in JSON like every other error."""
        self._answer_and_close(400, msg)

    def _answer_and_close(self, status: int, detail: str) -> None:
        self.transport.write(_error_response(status, detail))
        self.transport.close()

    # -- the response ------------------------------------------------------------------

    async def _limited_app(self, scope: Any, receive: Any, send: Any) -> None:
        scope[LIMITS_SCOPE_KEY] = self.limits
        try:
            await self._inner_app(scope, receive, self._send_counted(send))
        finally:
            self._release_reserved()

    def _send_counted(self, send: Any) -> Any:
        async def send_counted(message: Any) -> None:
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            if not body:
                await send(message)
                return
            amount = self.budget.clip(len(body)) if len(body) >= _UNCOUNTED_BELOW else 0
            if amount > self._reserved:
                await self.budget.acquire(amount - self._reserved)
            else:
                self.budget.release(self._reserved - amount)
            self._reserved = 0
            self._queued.append((len(body), amount))
            try:
                await send(message)
            finally:
                self._release_sent()
            if amount and message.get("more_body", False) and not self.transport.is_closing():
                # The next chunk is made when this call returns: it is counted before it
                # exists, so a response waits for the budget before it makes a chunk.
                await self.budget.acquire(amount)
                self._reserved = amount

        return send_counted

    def _release_reserved(self) -> None:
        self.budget.release(self._reserved)
        self._reserved = 0

    def _release_sent(self) -> None:
        # The transport writes chunks in order: those older than what its buffer still
        # holds are on the socket.
        buffered = 0 if self.transport.is_closing() else self.transport.get_write_buffer_size()
        queued = sum(size for size, _ in self._queued)
        while self._queued and queued - self._queued[0][0] >= buffered:
            size, amount = self._queued.popleft()
            queued -= size
            self.budget.release(amount)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_buffer = self.transport.get_write_buffer_size()
        self._stall_timer = self.loop.call_later(self.limits.send_timeout, self._check_stall)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().resume_writing()
        self._release_sent()

    def _check_stall(self) -> None:
        buffered = self.transport.get_write_buffer_size()
        if buffered < self._stall_buffer:  # slow, not stalled
            self._stall_buffer = buffered
            self._release_sent()
            self._stall_timer = self.loop.call_later(self.limits.send_timeout, self._check_stall)
            return
        self._stall_timer = None
        logger.info(
            "dropped a client that took no byte of its response in %g s",
            self.limits.send_timeout,
        )
        # abort(), not close(): close() would wait for the buffer to drain, i.e. forever.
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().connection_lost(exc)
        while self._queued:
            self.budget.release(self._queued.popleft()[1])
        self._release_reserved()


def _error_response(status: int, detail: str, *, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response, JSON like every other error, closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"{retry}connection: close\r\n\r\n"
    )
    return head.encode() + body
