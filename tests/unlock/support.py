"""Helpers shared by the unlock tests and fixtures: engine access and sealing."""

from __future__ import annotations

import os
import socket
import urllib.parse
import uuid

import httpx

from harness import PUBLISHER
from unlockd.demo import IMAGE_LABEL
from unlockd.docker import resolve_docker_host
from unlockd.seal import seal


def probe_docker() -> tuple[str, str | None]:
    """The engine's address at DOCKER_HOST, and why it cannot be used (None if it can)."""
    host = resolve_docker_host()
    try:
        if host.startswith("unix://"):
            # A plain connect first: httpx leaks the socket of a failed unix connect.
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(host.removeprefix("unix://"))
        with engine_client(host) as client:
            client.get("/_ping").raise_for_status()
    except (httpx.HTTPError, OSError) as exc:
        return host, f"no Docker engine at {host}: {exc}"
    return host, None


def docker_required() -> bool:
    """CI sets UNLOCKD_REQUIRE_DOCKER=1: a missing engine is then a failure, not a skip."""
    return os.environ.get("UNLOCKD_REQUIRE_DOCKER") == "1"


def engine_client(docker_host: str) -> httpx.Client:
    """A synchronous client of the engine API at ``docker_host``."""
    if docker_host.startswith("unix://"):
        transport = httpx.HTTPTransport(uds=docker_host.removeprefix("unix://"))
        return httpx.Client(transport=transport, base_url="http://docker", timeout=30)
    base = docker_host.replace("tcp://", "http://", 1)
    return httpx.Client(base_url=base, timeout=30)


class Engine:
    """Synchronous helpers over the engine API for assertions and cleanup."""

    def __init__(self, client: httpx.Client, prefix: str | None = None) -> None:
        self.client = client
        self.prefix = prefix or f"unlockd-test-{uuid.uuid4().hex[:12]}"
        self._count = 0

    def new_tag(self) -> str:
        """Return a tag unique to this test; its image is removed at teardown."""
        self._count += 1
        return f"{self.prefix}/img{self._count}:v1"

    def tags(self) -> set[str]:
        """Tags of this test's images present in the engine."""
        response = self.client.get("/images/json")
        response.raise_for_status()
        return {
            tag
            for image in response.json()
            for tag in image.get("RepoTags") or []
            if tag.startswith(self.prefix)
        }

    def leftovers(self) -> int:
        """Images of this test in the engine, tagged or not (found by their label)."""
        response = self.client.get("/images/json", params={"all": "1"})
        response.raise_for_status()
        return sum(
            1
            for image in response.json()
            if str((image.get("Labels") or {}).get(IMAGE_LABEL, "")).startswith(self.prefix)
        )

    def load(self, archive: bytes) -> None:
        """Load a plaintext archive directly (the engine's own API, as `docker load` does)."""
        response = self.client.post("/images/load", content=archive)
        response.raise_for_status()

    def remove_all(self) -> None:
        for tag in self.tags():
            quoted = urllib.parse.quote(tag, safe="")
            self.client.delete(f"/images/{quoted}", params={"force": "1"})


async def seal_archive(hub_url: str, out, plaintext: bytes, key_id: str = "images"):
    """Seal a plaintext image archive into ``out`` (from memory), its key registered at the hub."""

    async def chunks():
        yield plaintext

    await seal(
        chunks(), out, key_id=key_id, upstream=hub_url, email=PUBLISHER[0], password=PUBLISHER[1]
    )
    return out
