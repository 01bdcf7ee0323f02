"""Creating and updating hub accounts from the command line (or tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unlockd.errors import InvalidInputError
from unlockd.hub.auth import Role, hash_password
from unlockd.hub.store import Store

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["add_user"]


def add_user(data_dir: Path, email: str, password: str, role: str = "reader") -> None:
    """Create the account ``email`` (or update its password and role); creates the DB if needed.

    Blocking (scrypt plus SQLite); safe to run while a hub serves the same ``data_dir``.
    """
    if not email or len(email) > 254 or not email.isprintable() or email.strip() != email:
        msg = "the email must be 1-254 printable characters without surrounding spaces"
        raise InvalidInputError(msg)
    if not password or len(password) > 1024:
        msg = "the password must be 1-1024 characters"
        raise InvalidInputError(msg)
    parsed = Role.parse(role)
    store = Store(data_dir)
    store.open()
    try:
        store.put_user(email, hash_password(password), parsed)
    finally:
        store.close()
