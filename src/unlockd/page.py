"""The operator page (SPEC.md §13): one HTML document, its style and script inlined at import.

The three parts are plain files in ``static/`` (no build step); inlining them makes the page one
request and lets a strict Content-Security-Policy allow exactly this style and this script, by
hash, and nothing from any other origin.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from typing import TYPE_CHECKING

from starlette.responses import HTMLResponse

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["operator_page"]


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _build() -> tuple[bytes, dict[str, str]]:
    static = files("unlockd") / "static"
    html = (static / "operator.html").read_text(encoding="utf-8")
    style = (static / "operator.css").read_text(encoding="utf-8")
    script = (static / "operator.js").read_text(encoding="utf-8")
    page = html.replace("<style></style>", f"<style>{style}</style>", 1)
    page = page.replace("<script></script>", f"<script>{script}</script>", 1)
    policy = "; ".join(
        [
            "default-src 'none'",
            "connect-src 'self'",
            "img-src 'self' data:",
            f"style-src {_sha256(style)}",
            f"script-src {_sha256(script)}",
            # The forms are submitted by the script; a form submitted without it goes nowhere,
            # so a password never ends up in a URL.
            "form-action 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    return page.encode(), headers


_PAGE, _HEADERS = _build()


async def operator_page(_request: Request) -> HTMLResponse:
    """The operator page; it holds no secret, so it is served without the local API token."""
    return HTMLResponse(_PAGE, headers=_HEADERS)
