"""A response that streams a byte range of an open blob file in constant memory."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from starlette.responses import Response

from unlockd.errors import StorageError
from unlockd.files import read_at

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.types import Receive, Scope, Send

__all__ = ["BlobResponse"]

CHUNK_SIZE = 1024 * 1024


class BlobResponse(Response):
    """Send bytes ``[start, end)`` of the open file ``fd``, then close it (always)."""

    def __init__(  # noqa: PLR0913 - a byte range of a file plus the HTTP head
        self,
        fd: int,
        start: int,
        end: int,
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        send_body: bool = True,
    ) -> None:
        self.fd = fd
        self.start = start
        self.end = end
        self.send_body = send_body
        self.status_code = status_code
        self.media_type = "application/octet-stream"
        self.background = None
        self.init_headers({**(headers or {}), "content-length": str(end - start)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG002 - ASGI signature
        try:
            async with anyio.create_task_group() as task_group:
                # uvicorn drops sends after a disconnect silently: watch for it, stop reading.
                task_group.start_soon(self._cancel_on_disconnect, receive, task_group.cancel_scope)
                await self._send(send)
                task_group.cancel_scope.cancel()
        finally:
            os.close(self.fd)

    @staticmethod
    async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _send(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        position = self.start
        while self.send_body and position < self.end:
            count = min(CHUNK_SIZE, self.end - position)
            data = await read_at(self.fd, count, position)
            if not data:
                msg = f"blob file ended at {position} of {self.end} bytes"
                raise StorageError(msg)
            position += len(data)
            await send(
                {"type": "http.response.body", "body": data, "more_body": position < self.end}
            )
            # A send to a fast client never blocks: without a checkpoint one download would
            # keep the loop (and every other request) waiting until it ends.
            await anyio.lowlevel.checkpoint()
        if not self.send_body or self.start == self.end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
