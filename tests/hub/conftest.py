"""Fixtures: a real hub under uvicorn on loopback, with a publisher and a reader account."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
from typing import TYPE_CHECKING

import httpx
import pytest

from servers import serve
from unlockd.hub import HubSettings, create_hub_app
from unlockd.hub.auth import Role, hash_password
from unlockd.hub.store import Store

if TYPE_CHECKING:
    from pathlib import Path

PUBLISHER = ("pub@example.com", "publisher-password")
READER = ("reader@example.com", "reader-password")


@dataclasses.dataclass
class Hub:
    url: str
    data_dir: Path

    def login(self, email: str, password: str) -> str:
        reply = httpx.post(f"{self.url}/auth/login", json={"email": email, "password": password})
        reply.raise_for_status()
        return str(reply.json()["token"])

    def client(self, account: tuple[str, str] | None = None, **kwargs) -> httpx.Client:
        headers = {}
        if account is not None:
            headers["authorization"] = f"Bearer {self.login(*account)}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="session")
def _accounts_template(tmp_path_factory):
    """A data dir holding only the two accounts: scrypt runs once per session, not per test."""
    template = tmp_path_factory.mktemp("hub-template")
    store = Store(template)
    store.open()
    # A low scrypt cost keeps each test's logins fast; add_user's real cost is tested apart.
    store.put_user(PUBLISHER[0], hash_password(PUBLISHER[1], n=2**10), Role.PUBLISHER)
    store.put_user(READER[0], hash_password(READER[1], n=2**10), Role.READER)
    store.close()
    return template


@pytest.fixture(scope="session")
def start_hub(_accounts_template):
    """Return ``start(data_dir, **settings)``: a context manager yielding the hub's URL.

    A new ``data_dir`` starts with the publisher and reader accounts.
    """

    def start(data_dir: Path, **settings):
        if not data_dir.exists():
            shutil.copytree(_accounts_template, data_dir)
        return serve(create_hub_app(HubSettings(data_dir, **settings)))

    return start


@pytest.fixture(scope="session")
def accounts():
    """The (email, password) pairs of the publisher and the reader every test hub has."""
    return PUBLISHER, READER


@pytest.fixture
def hub(tmp_path, start_hub):
    data_dir = tmp_path / "hub"
    with start_hub(data_dir) as url:
        yield Hub(url, data_dir)


@pytest.fixture
def publisher(hub):
    with hub.client(PUBLISHER) as client:
        yield client


@pytest.fixture
def reader(hub):
    with hub.client(READER) as client:
        yield client


def _publish(client: httpx.Client, path: str, big: bytes, *, small: bytes = b"s" * 4096):
    """Upload ``big`` and publish it at ``path``; return (etag, key, small)."""
    upload_id = client.post("/uploads").json()["upload_id"]
    reply = client.put(f"/uploads/{upload_id}", content=big)
    assert reply.status_code == 200, reply.text
    key = os.urandom(32)
    body = {"upload_id": upload_id, "key": b64(key), "small": b64(small)}
    reply = client.put(f"/resources/{path}", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()["etag"], key, small


@pytest.fixture(scope="session")
def publish():
    """Return ``publish(client, "folder/name", big) -> (etag, key, small)``."""
    return _publish


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def blob_files(hub):
    """Return a function listing the names of the hub's blob files."""
    return lambda: sorted(path.name for path in (hub.data_dir / "blobs").iterdir())
