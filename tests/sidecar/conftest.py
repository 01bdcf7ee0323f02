"""A real stack for the sidecar's tests: the hub and the sidecar, each under uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from harness import PUBLISHER, READER
from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from starlette.applications import Starlette


@dataclasses.dataclass
class Stack:
    hub_url: str
    url: str
    hub_dir: Path
    cache_dir: Path
    email: str = PUBLISHER.email
    password: str = PUBLISHER.password
    reader_email: str = READER.email
    reader_password: str = READER.password

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)

    def login(
        self, client: httpx.Client, email: str = PUBLISHER.email, password: str = PUBLISHER.password
    ) -> None:
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


@pytest.fixture(scope="session")
def make_stack(hub_app: Callable[..., Starlette]) -> Callable[..., Any]:
    """``make_stack(base, hub_settings=None, **sidecar_settings)`` as a context manager.

    ``hub_settings`` go to ``hub_app`` (``clock`` among them); the sidecar points at that hub.
    """

    @contextlib.contextmanager
    def make(base: Path, hub_settings: dict[str, Any] | None = None, **overrides: Any):
        hub_dir = base / "hub"
        with serve(hub_app(hub_dir, **(hub_settings or {}))) as hub_url:
            overrides.setdefault("cache_dir", base / "cache")
            settings = Settings.from_environ({}, upstream_url=hub_url, **overrides)
            with serve(create_app(settings)) as url:
                yield Stack(hub_url=hub_url, url=url, hub_dir=hub_dir, cache_dir=settings.cache_dir)

    return make


@pytest.fixture
def stack(tmp_path: Path, make_stack: Callable[..., Any]) -> Iterator[Stack]:
    """A fresh hub + sidecar, not logged in."""
    with make_stack(tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, make_stack: Callable[..., Any]
) -> Iterator[Stack]:
    """One hub + sidecar per test module, for tests that only read."""
    with make_stack(tmp_path_factory.mktemp("shared")) as running:
        yield running
