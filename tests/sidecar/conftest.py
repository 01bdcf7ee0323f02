"""A real stack for the sidecar's tests: the hub and the sidecar, each under uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import httpx
import pytest

from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings
from unlockd.hub import HubSettings, add_user, create_hub_app

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

EMAIL = "publisher@example.com"
PASSWORD = "publisher-password"
READER_EMAIL = "reader@example.com"
READER_PASSWORD = "reader-password"


@dataclasses.dataclass
class Stack:
    hub_url: str
    url: str
    hub_dir: Path
    cache_dir: Path
    email: str = EMAIL
    password: str = PASSWORD
    reader_email: str = READER_EMAIL
    reader_password: str = READER_PASSWORD

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)

    def login(self, client: httpx.Client, email: str = EMAIL, password: str = PASSWORD) -> None:
        response = client.post("/login", json={"email": email, "password": password})
        assert response.status_code == 200, response.text

    def upload(self, client: httpx.Client, name: str, data: bytes, folder: str = "models"):
        response = client.post(
            f"/upload/{name}", data={"folder": folder}, files={"data": (name, data)}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def cache_files(self) -> list[str]:
        return sorted(p.name for p in self.cache_dir.rglob("*"))

    def hub_pending_uploads(self) -> list[str]:
        return sorted(
            p.name
            for sub in ("uploads", "tmp")
            if (self.hub_dir / sub).is_dir()
            for p in (self.hub_dir / sub).iterdir()
        )


@contextlib.contextmanager
def _make_stack(base: Path, hub_settings=None, **overrides) -> Iterator[Stack]:
    """Run a hub with a publisher and a reader account, and a sidecar pointed at it."""
    hub_dir, cache_dir = base / "hub", base / "cache"
    hub_dir.mkdir(parents=True, exist_ok=True)
    add_user(hub_dir, EMAIL, PASSWORD, role="publisher")
    add_user(hub_dir, READER_EMAIL, READER_PASSWORD, role="reader")
    hub_app = create_hub_app(HubSettings(data_dir=hub_dir, **(hub_settings or {})))
    with serve(hub_app) as hub_url:
        overrides.setdefault("cache_dir", cache_dir)
        settings = Settings.from_environ({}, upstream_url=hub_url, **overrides)
        with serve(create_app(settings)) as url:
            yield Stack(hub_url=hub_url, url=url, hub_dir=hub_dir, cache_dir=settings.cache_dir)


@pytest.fixture
def stack(tmp_path) -> Iterator[Stack]:
    """A fresh hub + sidecar, not logged in."""
    with _make_stack(tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Stack]:
    """One hub + sidecar per test module, for tests that only read."""
    with _make_stack(tmp_path_factory.mktemp("shared")) as running:
        yield running


@pytest.fixture
def make_stack():
    """``make_stack(base, hub_settings=None, **sidecar_settings)`` as a context manager."""
    return _make_stack
