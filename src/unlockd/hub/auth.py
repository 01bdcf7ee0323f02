"""Passwords (scrypt hashes), bearer tokens and roles of the hub."""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

from unlockd.errors import ForbiddenError, InvalidInputError, NotAuthenticatedError

if TYPE_CHECKING:
    from collections.abc import Callable

    from unlockd.hub.database import Database

__all__ = [
    "PASSWORD_HASHING_THREADS",
    "Principal",
    "Role",
    "TokenStore",
    "dummy_password_hash",
    "hash_password",
    "verify_password",
]

# scrypt with N=2**14, r=8, p=1 costs 16 MiB and ~50 ms: slow for guessing, fine for logins.
_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024
# How many scrypt computations run at once (each in a worker thread, 16 MiB apiece).
PASSWORD_HASHING_THREADS = 4


class Role(enum.StrEnum):
    """What an account may do; a publisher may also do everything a reader may."""

    READER = "reader"
    PUBLISHER = "publisher"

    @classmethod
    def parse(cls, value: object) -> Role:
        try:
            return cls(str(value))
        except ValueError:
            msg = f"invalid role {value!r}: use 'reader' or 'publisher'"
            raise InvalidInputError(msg) from None

    def allows(self, needed: Role) -> bool:
        return self is Role.PUBLISHER or needed is Role.READER


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


def hash_password(password: str, *, n: int = _N) -> str:
    """Return ``scrypt$N$r$p$salt$hash`` (base64 parts) for ``password``; slow on purpose.

    The cost ``n`` is stored in the hash, so it can be raised later without breaking logins.
    """
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, n, _R, _P)
    b64 = base64.b64encode
    return f"scrypt${n}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Return whether ``password`` matches the ``stored`` hash, in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def dummy_password_hash() -> str:
    """Return a hash no password matches, so unknown emails cost as much as known ones."""
    return hash_password(secrets.token_urlsafe(16))


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """The account behind a valid token."""

    email: str
    role: Role

    def require(self, needed: Role) -> None:
        """Raise ForbiddenError unless this account's role allows ``needed``."""
        if not self.role.allows(needed):
            msg = f"this call needs the {needed.value} role"
            raise ForbiddenError(msg)


class TokenStore:
    """Bearer tokens kept in the database as SHA-256 digests with their expiry.

    Every hub process sharing the database accepts a token any of them issued. ``clock``
    tells the time in seconds: wall-clock time by default, since processes compare it
    (tests pass a clock they move themselves).
    """

    def __init__(
        self, database: Database, ttl: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl = ttl
        self._database = database
        self._clock = clock

    async def issue(self, principal: Principal) -> str:
        """Return a new token for ``principal``, valid for ``ttl`` seconds."""
        token = secrets.token_urlsafe(32)
        await self._database.add_token(token, principal, self._clock() + self.ttl)
        return token

    async def check(self, authorization: str | None) -> Principal:
        """Return the principal of an ``Authorization: Bearer`` header or raise 401."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or len(token) > 1024:
            msg = "missing bearer token"
            raise NotAuthenticatedError(msg)
        # Looked up by digest: timing reveals nothing about the token itself.
        principal = await self._database.get_token(token.strip(), self._clock())
        if principal is None:
            msg = "invalid or expired token"
            raise NotAuthenticatedError(msg)
        return principal

    async def prune(self) -> int:
        """Drop expired tokens; return how many."""
        return await self._database.remove_expired_tokens(self._clock())
