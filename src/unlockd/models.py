"""Shared value types: the unlock state machine's states and the rules for names."""

from __future__ import annotations

import enum
import re

from unlockd.errors import InvalidInputError

__all__ = ["UnlockState", "validate_name"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


class UnlockState(enum.StrEnum):
    """States of the unlock workflow; ``ready`` and ``error`` are final for a run."""

    IDLE = "idle"
    AUTHENTICATING = "authenticating"
    DOWNLOADING_KEY = "downloading_key"
    DECRYPTING = "decrypting"
    LOADING_IMAGES = "loading_images"
    READY = "ready"
    ERROR = "error"

    @property
    def running(self) -> bool:
        return self not in {UnlockState.IDLE, UnlockState.READY, UnlockState.ERROR}


def validate_name(value: object, what: str = "filename") -> str:
    """Return ``value`` if it is a valid file or folder name, else raise InvalidInputError.

    A name is one path segment of 1-255 characters from ``[A-Za-z0-9._-]``, not ``.`` or ``..``.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in {".", ".."}:
        shown = repr(value) if isinstance(value, str) and len(value) <= 64 else "value"
        msg = (
            f"invalid {what} {shown}: use 1-255 characters from A-Z a-z 0-9 . _ - (not '.' or '..')"
        )
        raise InvalidInputError(msg)
    return value
