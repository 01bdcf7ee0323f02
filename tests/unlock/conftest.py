"""Fixtures for the unlock tests: a real Docker engine, test images, and their cleanup."""

from __future__ import annotations

import pytest

from unlock.support import Engine, docker_required, engine_client, probe_docker
from unlockd.demo import build_image_archive


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The engine at DOCKER_HOST; skip without one, fail if UNLOCKD_REQUIRE_DOCKER=1."""
    host, reason = probe_docker()
    if reason is not None:
        if docker_required():
            pytest.fail(reason)
        pytest.skip(reason)
    return host


@pytest.fixture(autouse=True)
def _require_docker_for_marked(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_host")


@pytest.fixture
def engine(docker_host: str):
    """Helpers over the real engine; removes every image this test loaded."""
    with engine_client(docker_host) as client:
        eng = Engine(client)
        try:
            yield eng
        finally:
            eng.remove_all()


@pytest.fixture
def image_archive():
    """Build a small `docker save` archive: ``image_archive({tag: {path: bytes}})``."""
    return build_image_archive


@pytest.fixture(scope="session")
def hub_url(shared_hub):
    """The session's hub (publisher and reader accounts); tests register keys of their own."""
    return shared_hub.url
