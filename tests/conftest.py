"""Fixtures of every test directory: hubs under uvicorn with the account table, and a clock.

Importable helpers (the accounts, ``FakeClock``, ``eventually``) are in ``harness.py``.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any

import pytest
import stamina

from harness import ACCOUNTS, PUBLISHER, READER, Account, FakeClock, Hub
from servers import serve
from unlock.support import Engine, docker_required, engine_client, probe_docker
from unlockd.hub import HubSettings, create_hub_app
from unlockd.hub.accounts import save_user
from unlockd.hub.auth import hash_password

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager
    from pathlib import Path

    from starlette.applications import Starlette


@pytest.fixture(autouse=True, scope="session")
def _instant_retries() -> Iterator[None]:
    """Retries keep their attempt counts but wait no time between them (stamina's test mode)."""
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


@pytest.fixture(scope="session")
def _accounts_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding only the account table: scrypt runs once per session, not per hub."""
    template = tmp_path_factory.mktemp("hub-template")
    for (email, password), role in ACCOUNTS.items():
        # A low scrypt cost keeps logins fast; add_user's real cost is tested apart.
        save_user(template, email, hash_password(password, n=2**10), role)
    return template


@pytest.fixture(scope="session")
def hub_app(_accounts_template: Path) -> Callable[..., Starlette]:
    """Return ``hub_app(data_dir, *, clock=time.monotonic, **settings)``: the hub's ASGI app.

    A ``data_dir`` that does not exist yet starts with the account table.
    """

    def make(
        data_dir: Path, *, clock: Callable[[], float] = time.monotonic, **settings: Any
    ) -> Starlette:
        if not data_dir.exists():
            shutil.copytree(_accounts_template, data_dir)
        return create_hub_app(HubSettings(data_dir, **settings), clock=clock)

    return make


@pytest.fixture(scope="session")
def start_hub(
    hub_app: Callable[..., Starlette],
) -> Callable[..., AbstractContextManager[str]]:
    """Return ``start_hub(data_dir, **kwargs)``: runs ``hub_app(...)``, yields the hub's URL."""

    def start(data_dir: Path, **kwargs: Any) -> AbstractContextManager[str]:
        return serve(hub_app(data_dir, **kwargs))

    return start


@pytest.fixture(scope="session")
def accounts() -> tuple[Account, Account]:
    """The publisher and the reader every test hub has, as (email, password) pairs."""
    return PUBLISHER, READER


@pytest.fixture
def clock() -> FakeClock:
    """A clock that stands still until the test moves it."""
    return FakeClock()


@pytest.fixture
def hub(tmp_path: Path, start_hub: Callable[..., AbstractContextManager[str]]) -> Iterator[Hub]:
    """A fresh hub of this test's own, under ``tmp_path / "hub"``."""
    data_dir = tmp_path / "hub"
    with start_hub(data_dir) as url:
        yield Hub(url, data_dir)


@pytest.fixture(scope="session")
def shared_hub(
    tmp_path_factory: pytest.TempPathFactory,
    start_hub: Callable[..., AbstractContextManager[str]],
) -> Iterator[Hub]:
    """One hub for the whole session, for tests that only add to it under names of their own."""
    data_dir = tmp_path_factory.mktemp("shared") / "hub"
    with start_hub(data_dir) as url:
        yield Hub(url, data_dir)


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The engine at DOCKER_HOST; skip without one, fail if UNLOCKD_REQUIRE_DOCKER=1."""
    host, reason = probe_docker()
    if reason is not None:
        if docker_required():
            pytest.fail(reason)
        pytest.skip(reason)
    return host


@pytest.fixture
def engine(docker_host: str) -> Iterator[Engine]:
    """Helpers over the real engine; removes every image this test loaded (and no other)."""
    with engine_client(docker_host) as client:
        eng = Engine(client)
        try:
            yield eng
        finally:
            eng.remove_all()
