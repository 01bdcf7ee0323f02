"""Fixtures for the unlock tests: a real Docker engine, test images, and their cleanup."""

from __future__ import annotations

import pytest

from unlockd.demo import build_image_archive


@pytest.fixture(autouse=True)
def _require_docker_for_marked(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_host")


@pytest.fixture
def image_archive():
    """Build a small `docker save` archive: ``image_archive({tag: {path: bytes}})``."""
    return build_image_archive


@pytest.fixture(scope="session")
def hub_url(shared_hub):
    """The session's hub (publisher and reader accounts); tests register keys of their own."""
    return shared_hub.url
