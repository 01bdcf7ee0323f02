"""A streaming multipart/form-data reader: parts one after another, bodies as byte streams.

Starlette's ``request.form()`` spools file parts to disk, which would put uploaded plaintext
at rest; this reader hands each part's body on as it arrives, so memory stays flat::

    async for part in MultipartReader(request.headers, request.stream()):
        if part.name == "data":
            async for chunk in part: ...
        else:
            value = await part.text()

A part's body must be read (or is skipped) before the next part is delivered.
"""

from __future__ import annotations

import collections
import enum
import logging
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from unlockd.errors import InvalidInputError, PayloadTooLargeError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from python_multipart.multipart import MultipartCallbacks

__all__ = ["MAX_FIELD_SIZE", "MultipartReader", "Part"]

MAX_FIELD_SIZE = 64 * 1024

# The parser logs a warning about every malformed body before raising; the error reaches the
# client as a 422 already. Unconfigured, Python's last-resort handler would print that warning
# as a bare line on stderr: keep only errors, and send them to the application's handlers.
_parser_logger = logging.getLogger("python_multipart")
_parser_logger.setLevel(logging.ERROR)
_parser_logger.addHandler(logging.NullHandler())


class _Event(enum.Enum):
    PART_BEGIN = enum.auto()
    HEADER_FIELD = enum.auto()
    HEADER_VALUE = enum.auto()
    HEADER_END = enum.auto()
    HEADERS_FINISHED = enum.auto()
    DATA = enum.auto()
    PART_END = enum.auto()
    END = enum.auto()


class Part:
    """One part of a multipart body; iterate it for the body bytes."""

    def __init__(self, reader: MultipartReader, headers: list[tuple[str, str]]) -> None:
        self.headers = headers
        disposition = next((v for k, v in headers if k == "content-disposition"), None)
        if disposition is None:
            raise InvalidInputError("multipart part without a Content-Disposition header")
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in options:
            raise InvalidInputError("multipart part is not a named form-data part")
        self.name = options[b"name"].decode("latin-1")
        filename = options.get(b"filename")
        self.filename = None if filename is None else filename.decode("latin-1")
        self._reader = reader
        self.done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self.done:
            event, data = await self._reader._next_event()  # noqa: SLF001 - Part is the reader's own
            if event is _Event.DATA:
                return data
            if event is _Event.PART_END:
                self.done = True
            else:  # pragma: no cover - the parser emits only data until the part ends
                msg = f"unexpected multipart event {event.name} in a part body"
                raise InvalidInputError(msg)
        raise StopAsyncIteration

    async def read(self, limit: int = MAX_FIELD_SIZE) -> bytes:
        """Read the whole body of a small part; more than ``limit`` bytes is 413."""
        buffer = bytearray()
        async for chunk in self:
            buffer += chunk
            if len(buffer) > limit:
                msg = f"form field {self.name!r} is larger than {limit} bytes"
                raise PayloadTooLargeError(msg)
        return bytes(buffer)

    async def text(self, limit: int = MAX_FIELD_SIZE) -> str:
        """Read a small part as UTF-8 text."""
        data = await self.read(limit)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            msg = f"form field {self.name!r} is not UTF-8 text"
            raise InvalidInputError(msg) from exc

    async def skip(self) -> None:
        """Discard the rest of the body."""
        async for _ in self:
            pass


class MultipartReader:
    """Read a multipart/form-data body part by part from an async byte stream.

    ``max_size`` caps the whole body (413 beyond it). Malformed bodies, a missing boundary
    and a body that ends early raise :class:`InvalidInputError`.
    """

    def __init__(
        self,
        headers: Mapping[str, str],
        stream: AsyncIterator[bytes],
        *,
        max_size: int | None = None,
    ) -> None:
        kind, options = parse_options_header(headers.get("content-type"))
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidInputError("expected a multipart/form-data body with a boundary")
        self._max_size = max_size
        length = headers.get("content-length")
        if max_size is not None and length is not None and length.isdigit():
            self._check_size(int(length))
        self._stream = stream
        self._received = 0
        self._events: collections.deque[tuple[_Event, bytes]] = collections.deque()
        self._ended = False
        self._part: Part | None = None
        try:
            self._parser = MultipartParser(boundary, self._callbacks())
        except (MultipartParseError, ValueError) as exc:
            msg = f"invalid multipart boundary: {exc}"
            raise InvalidInputError(msg) from exc

    def _check_size(self, size: int) -> None:
        if self._max_size is not None and size > self._max_size:
            msg = f"upload is larger than the limit of {self._max_size} bytes"
            raise PayloadTooLargeError(msg)

    def _callbacks(self) -> MultipartCallbacks:
        events = self._events

        def notify(event: _Event) -> Callable[[], None]:
            return lambda: events.append((event, b""))

        def data(event: _Event) -> Callable[[bytes, int, int], None]:
            return lambda buf, start, end: events.append((event, buf[start:end]))

        return {
            "on_part_begin": notify(_Event.PART_BEGIN),
            "on_header_field": data(_Event.HEADER_FIELD),
            "on_header_value": data(_Event.HEADER_VALUE),
            "on_header_end": notify(_Event.HEADER_END),
            "on_headers_finished": notify(_Event.HEADERS_FINISHED),
            "on_part_data": data(_Event.DATA),
            "on_part_end": notify(_Event.PART_END),
            "on_end": notify(_Event.END),
        }

    async def _next_event(self) -> tuple[_Event, bytes]:
        while not self._events:
            if self._ended:
                raise InvalidInputError("multipart body ended before its closing boundary")
            try:
                chunk = await anext(self._stream)
            except StopAsyncIteration:
                self._ended = True
                continue
            self._received += len(chunk)
            self._check_size(self._received)
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                msg = f"malformed multipart body: {exc}"
                raise InvalidInputError(msg) from exc
        return self._events.popleft()

    def __aiter__(self) -> AsyncIterator[Part]:
        return self

    async def __anext__(self) -> Part:
        part = await self.next_part()
        if part is None:
            raise StopAsyncIteration
        return part

    async def next_part(self) -> Part | None:
        """Return the next part, skipping what is left of the current one; None at the end."""
        if self._part is not None and not self._part.done:
            await self._part.skip()
        self._part = None
        headers: list[tuple[str, str]] = []
        field, value = bytearray(), bytearray()
        while True:
            event, data = await self._next_event()
            if event is _Event.END:
                self._events.clear()  # the epilogue is ignored
                return None
            if event is _Event.HEADER_FIELD:
                field += data
            elif event is _Event.HEADER_VALUE:
                value += data
            elif event is _Event.HEADER_END:
                headers.append((field.decode("latin-1").lower(), value.decode("latin-1")))
                field, value = bytearray(), bytearray()
            elif event is _Event.HEADERS_FINISHED:
                self._part = Part(self, headers)
                return self._part
            # PART_BEGIN (and a PART_END right after a skipped part) carry nothing to keep.
