"""HTTP helpers shared by the sidecar and the hub: ranges, small JSON bodies, JSON errors."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from unlockd.errors import (
    InvalidInputError,
    NotAuthenticatedError,
    PayloadTooLargeError,
    RangeNotSatisfiableError,
    UnlockdError,
)

if TYPE_CHECKING:
    import logging
    from collections.abc import Awaitable, Callable

    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["if_range_allows", "json_exception_handlers", "parse_range", "read_json_object"]

_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:  # noqa: PLR0911 - one return per RFC 9110 case
    """Return the ``[start, end)`` a ``Range`` header selects in ``size`` bytes, or None.

    None means "send the whole representation": no header, another unit, a syntactically
    invalid set, or several ranges (which RFC 9110 lets a server ignore rather than answer
    with multipart/byteranges). RangeNotSatisfiableError when no byte of the set exists.
    """
    if header is None:
        return None
    unit, sep, range_set = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if len(specs) != 1 or not (match := _SPEC.fullmatch(specs[0])):
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            msg = "a suffix range of 0 bytes selects nothing"
            raise RangeNotSatisfiableError(msg, size)
        # A non-empty suffix of an empty representation has no Content-Range to describe it.
        return (max(0, size - suffix), size) if size else None
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        msg = f"range starts at {start}, past the last byte ({size} bytes)"
        raise RangeNotSatisfiableError(msg, size)
    end = min(int(last) + 1, size) if last else size
    return start, end


def if_range_allows(header: str | None, etag: str) -> bool:
    """Tell whether ``If-Range`` lets a range be served for the representation ``etag``.

    Only a strong entity tag can validate a range; a date never matches (there is no
    Last-Modified), which means "send it all": the client's partial copy is of something else.
    """
    return header is None or header.strip() == etag


async def read_json_object(
    request: Request, limit: int, *, required: bool = True
) -> dict[str, Any]:
    """Read a JSON object body of at most ``limit`` bytes; an empty body is {} unless required."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            _too_large(limit)
    if not required and not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        msg = "the body is not valid JSON"
        raise InvalidInputError(msg) from None
    if not isinstance(value, dict):
        msg = "the body must be a JSON object"
        raise InvalidInputError(msg)
    return value


def _too_large(limit: int) -> None:
    msg = f"JSON body larger than {limit} bytes"
    raise PayloadTooLargeError(msg)


def json_exception_handlers(
    logger: logging.Logger, *, bearer_challenge: bool = False
) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Starlette exception handlers answering ``{"detail": ...}`` for every error.

    ``bearer_challenge`` adds ``WWW-Authenticate: Bearer`` to a NotAuthenticatedError (the
    hub's token check); 5xx errors of ours are logged as one line on ``logger``.
    """

    async def unlockd_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, UnlockdError)
        headers = {}
        if bearer_challenge and isinstance(exc, NotAuthenticatedError):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RangeNotSatisfiableError):
            headers["Content-Range"] = f"bytes */{exc.size}"
        if exc.status_code >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    async def server_error(_request: Request, _exc: Exception) -> Response:
        # ServerErrorMiddleware logs the traceback and re-raises after this reply is sent;
        # the body tells nothing internal.
        return JSONResponse({"detail": "Internal Server Error"}, status_code=500)

    return {UnlockdError: unlockd_error, HTTPException: http_error, Exception: server_error}
