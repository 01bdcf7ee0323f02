"""The one retry policy: exponential backoff with jitter, bounded attempts (stamina).

Every retried operation (idempotent API calls, CDN reads) goes through :func:`retrying`, so
the backoff is the same everywhere and tests make it instant with
``stamina.set_testing(True, attempts=..., cap=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import stamina

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

__all__ = ["API_ATTEMPTS", "CDN_ATTEMPTS", "retrying"]

# Idempotent API calls ride out a blip; a CDN read resumes where it stopped, so it may try
# more often (each attempt that makes progress starts a fresh budget, see cdn.py).
API_ATTEMPTS = 3
CDN_ATTEMPTS = 5
_WAIT_INITIAL = 0.05
_WAIT_MAX = 1.0


def retrying(
    on: type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool],
    attempts: int,
) -> AsyncIterator[stamina.Attempt]:
    """Iterate over up to ``attempts`` attempts, retrying the errors ``on`` selects.

    ``async for attempt in retrying(...): with attempt: ...``; the last error is re-raised.
    """
    context = stamina.retry_context(
        on=on,
        attempts=attempts,
        timeout=None,  # a slow but live transfer is bounded by its stall timeout instead
        wait_initial=_WAIT_INITIAL,
        wait_max=_WAIT_MAX,
        wait_jitter=_WAIT_INITIAL,
    )
    return aiter(context)
