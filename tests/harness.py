"""What the test directories share: the accounts, a clock moved by hand, a poller, a hub handle.

The fixtures built on these live in ``tests/conftest.py``; this module holds what tests and
support modules import by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import anyio
import httpx
import pytest

from unlockd.hub.auth import Role

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

T = TypeVar("T")


class Account(NamedTuple):
    """An account every test hub has; unpacks as ``email, password``."""

    email: str
    password: str

    @property
    def body(self) -> dict[str, str]:
        """The JSON body of a login (the hub's ``/auth/login``, the sidecar's ``/login``)."""
        return {"email": self.email, "password": self.password}


PUBLISHER = Account("publisher@example.com", "publisher-password")
READER = Account("reader@example.com", "reader-password")
# The account table: every hub a test starts holds exactly these, with these roles.
ACCOUNTS: dict[Account, Role] = {PUBLISHER: Role.PUBLISHER, READER: Role.READER}


class FakeClock:
    """A monotonic clock that moves only when told to: ``clock.advance(3600)``.

    Pass it as the ``clock`` of the hub or an ``ApiClient`` to expire tokens without sleeping.
    """

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def eventually(predicate: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll ``predicate`` until it returns something true and return that; fail after ``timeout``.

    For state that another thread or process changes (servers under uvicorn, subprocesses).
    """
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout} s: {_describe(predicate)}")
        time.sleep(0.01)
    return result


async def eventually_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - the signature of eventually()
) -> T:
    """:func:`eventually` for state that tasks of the running event loop change.

    ``predicate`` may also return an awaitable (``lambda: status(client)``): it is awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        result = await outcome if inspect.isawaitable(outcome) else outcome
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout} s: {_describe(predicate)}")
        await anyio.sleep(0.01)


def _describe(predicate: Callable[[], Any]) -> str:
    code = getattr(predicate, "__code__", None)
    if code is None:
        return repr(predicate)
    return f"{code.co_qualname} at {Path(code.co_filename).name}:{code.co_firstlineno}"


@dataclasses.dataclass
class Hub:
    """A hub running under uvicorn: its URL, its data dir, and shortcuts to talk to it."""

    url: str
    data_dir: Path

    def login(self, email: str, password: str) -> str:
        """Return a fresh bearer token for the account."""
        reply = httpx.post(f"{self.url}/auth/login", json={"email": email, "password": password})
        reply.raise_for_status()
        return str(reply.json()["token"])

    def client(self, account: tuple[str, str] | None = None, **kwargs: Any) -> httpx.Client:
        """A client of the hub, logged in as ``account`` if one is given."""
        headers = {}
        if account is not None:
            headers["authorization"] = f"Bearer {self.login(*account)}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``"4m"``) at ``mount_point``, to fill for real; root only.

    Skips the test where mounting is not allowed.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
