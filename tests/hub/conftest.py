"""Fixtures of the hub's tests: clients of the per-test hub as each account, and publishing."""

from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING

import pytest

from harness import PUBLISHER, READER

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import httpx

    from harness import Hub


@pytest.fixture
def publisher(hub: Hub) -> Iterator[httpx.Client]:
    """A client of the test's hub, logged in as the publisher."""
    with hub.client(PUBLISHER) as client:
        yield client


@pytest.fixture
def reader(hub: Hub) -> Iterator[httpx.Client]:
    """A client of the test's hub, logged in as the reader."""
    with hub.client(READER) as client:
        yield client


def _publish(
    client: httpx.Client, path: str, big: bytes, *, small: bytes = b"s" * 4096
) -> tuple[str, bytes, bytes]:
    """Upload ``big`` and publish it at ``path``; return (etag, key, small)."""
    upload_id = client.post("/uploads").json()["upload_id"]
    reply = client.put(f"/uploads/{upload_id}", content=big)
    assert reply.status_code == 200, reply.text
    key = os.urandom(32)
    body = {"upload_id": upload_id, "key": _b64(key), "small": _b64(small)}
    reply = client.put(f"/resources/{path}", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()["etag"], key, small


@pytest.fixture(scope="session")
def publish() -> Callable[..., tuple[str, bytes, bytes]]:
    """Return ``publish(client, "folder/name", big) -> (etag, key, small)``."""
    return _publish


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def blob_files(hub: Hub) -> Callable[[], list[str]]:
    """Return a function listing the names of the hub's blob files."""
    return lambda: sorted(path.name for path in (hub.data_dir / "blobs").iterdir())


@pytest.fixture(scope="session")
def shared_reader(shared_hub: Hub) -> Iterator[httpx.Client]:
    """A client of the session's hub, logged in as the reader: for tests that change nothing."""
    with shared_hub.client(READER) as client:
        yield client


@pytest.fixture(scope="session")
def shared_publisher(shared_hub: Hub) -> Iterator[httpx.Client]:
    """A client of the session's hub, logged in as the publisher: for tests that change nothing."""
    with shared_hub.client(PUBLISHER) as client:
        yield client
