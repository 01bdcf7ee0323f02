"""Creating and updating hub accounts from the command line (or tests)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from unlockd.errors import InvalidInputError
from unlockd.hub.auth import Role, hash_password
from unlockd.hub.database import Database

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["add_user", "save_user"]


def add_user(database: Path | str, email: str, password: str, role: str = "reader") -> None:
    """Create the account ``email`` (or update its password and role) in ``database``.

    ``database`` is a data dir (its SQLite database) or a database URL; the schema is
    created if needed. Blocking (scrypt plus the database); safe while hubs serve it.
    """
    if not email or len(email) > 254 or not email.isprintable() or email.strip() != email:
        msg = "the email must be 1-254 printable characters without surrounding spaces"
        raise InvalidInputError(msg)
    if not password or len(password) > 1024:
        msg = "the password must be 1-1024 characters"
        raise InvalidInputError(msg)
    save_user(database, email, hash_password(password), Role.parse(role))


def save_user(database: Path | str, email: str, password_hash: str, role: Role) -> None:
    """Store an account whose password is hashed already; blocking."""
    url = (
        database
        if isinstance(database, str)
        else f"sqlite:///{database.absolute() / 'hub.sqlite3'}"
    )
    asyncio.run(_save_user(url, email, password_hash, role))


async def _save_user(url: str, email: str, password_hash: str, role: Role) -> None:
    db = Database(url)
    await db.open()
    try:
        await db.put_user(email, password_hash, role)
    finally:
        await db.close()
