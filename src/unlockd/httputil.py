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

__all__ = [
    "LIMITS_SCOPE_KEY",
    "MAX_DIGITS",
    "if_range_allows",
    "json_exception_handlers",
    "parse_range",
    "read_json_object",
]

_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)
# 20 digits hold any 64-bit number. Python refuses int() of more than 4300 digits with a
# ValueError, and is quadratic below that: a longer number is refused before int() sees it.
MAX_DIGITS = 20
# The server (unlockd.limits) puts its Limits into each request's scope under this key.
LIMITS_SCOPE_KEY = "unlockd.limits"
_DEFAULT_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


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
    if len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
        # No representation has a byte past 20 digits: the range cannot be satisfied.
        msg = f"a range position longer than {MAX_DIGITS} digits"
        raise RangeNotSatisfiableError(msg, size)
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
    """Read a JSON object body of at most ``limit`` bytes; an empty body is {} unless required.

    The server's limits (in the scope, see :mod:`unlockd.limits`) may lower ``limit`` and
    bound the nesting depth; numbers longer than :data:`MAX_DIGITS` digits are refused.
    Too large is PayloadTooLargeError (413), anything else InvalidInputError (422).
    """
    limits = request.scope.get(LIMITS_SCOPE_KEY)
    depth = _DEFAULT_JSON_DEPTH
    if limits is not None:
        limit, depth = min(limit, limits.max_json_bytes), limits.max_json_depth
    length = request.headers.get("content-length")
    if (
        length is not None
        and length.isdigit()
        and (len(length) > MAX_DIGITS or int(length) > limit)
    ):
        _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            _too_large(limit)
    if not required and not body.strip():
        return {}
    _check_depth(body, depth)
    try:
        value = json.loads(body, parse_int=_json_int, parse_float=_json_float)
    except (UnicodeDecodeError, json.JSONDecodeError):
        msg = "the body is not valid JSON"
        raise InvalidInputError(msg) from None
    if not isinstance(value, dict):
        msg = "the body must be a JSON object"
        raise InvalidInputError(msg)
    return value


def _check_depth(body: bytes | bytearray, limit: int) -> None:
    # json.loads recurses once per level: 30,000 levels is a RecursionError (a 500). Counted
    # on the raw bytes with strings blanked out, so brackets inside strings do not count.
    depth = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b'""', body)):
        depth += 1 if bracket in b"[{" else -1
        if depth > limit:
            msg = f"the JSON body is nested deeper than {limit} levels"
            raise InvalidInputError(msg)


def _json_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_DIGITS:
        msg = f"a number in the JSON body is longer than {MAX_DIGITS} digits"
        raise InvalidInputError(msg)
    return int(literal)


def _json_float(literal: str) -> float:
    # Leading zeros are not significant: 0.000001234 is as precise as 1.234e-6.
    mantissa, _, exponent = literal.lower().partition("e")
    digits = mantissa.lstrip("-").replace(".", "").lstrip("0")
    if len(digits) > MAX_DIGITS or len(exponent.lstrip("+-")) > MAX_DIGITS:
        msg = f"a number in the JSON body is longer than {MAX_DIGITS} digits"
        raise InvalidInputError(msg)
    return float(literal)


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
