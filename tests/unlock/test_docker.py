"""DockerLoader against a real engine."""

from __future__ import annotations

import asyncio

import pytest

from unlockd.docker import DEFAULT_DOCKER_HOST, DockerLoader, resolve_docker_host
from unlockd.errors import AuthenticationFailedError, DockerError

pytestmark = pytest.mark.docker


async def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i : i + size]


async def test_load_archive_stream_returns_tags(docker_host, engine, image_archive):
    """A streamed archive with two images loads both and returns their tags."""
    a, b = engine.new_tag(), engine.new_tag()
    archive = image_archive({a: {"a.txt": b"a"}, b: {"b.txt": b"b" * 5000}})
    loader = DockerLoader(docker_host)
    try:
        tags = await loader.load(_chunks(archive))
    finally:
        await loader.close()
    assert sorted(tags) == sorted([a, b])
    assert engine.tags() == {a, b}


async def test_load_source_fails_after_last_byte_nothing_loaded(docker_host, engine, image_archive):
    """A stream that fails even after its last byte is cut off: the engine commits nothing."""
    tag = engine.new_tag()
    archive = image_archive({tag: {"a.txt": b"a" * 10000}})

    async def failing():
        async for chunk in _chunks(archive):
            yield chunk
        raise AuthenticationFailedError("tampered")

    loader = DockerLoader(docker_host)
    try:
        with pytest.raises(AuthenticationFailedError):
            await loader.load(failing())
    finally:
        await loader.close()
    assert engine.tags() == set()
    assert engine.leftovers() == 0


async def test_load_garbage_rejected(docker_host, engine):
    """Bytes that are not an image archive are a DockerError naming the rejection."""
    loader = DockerLoader(docker_host)
    try:
        with pytest.raises(DockerError, match="Docker rejected the archive"):
            await loader.load(_chunks(b"not a tar archive at all" * 100))
    finally:
        await loader.close()


async def test_load_dead_socket_unreachable(tmp_path):
    """A DOCKER_HOST socket nobody listens on is 'Docker engine unreachable'."""
    loader = DockerLoader(f"unix://{tmp_path}/nothing.sock")
    try:
        with pytest.raises(DockerError, match="Docker engine unreachable"):
            await loader.load(_chunks(b"x" * 10))
    finally:
        await loader.close()


def test_resolve_docker_host_explicit_then_environ_then_default():
    """The one rule for the engine address: the caller's, else DOCKER_HOST, else the socket."""
    environ = {"DOCKER_HOST": "unix:///from/environ.sock"}
    assert resolve_docker_host("tcp://127.0.0.1:1", environ) == "tcp://127.0.0.1:1"
    assert resolve_docker_host(None, environ) == "unix:///from/environ.sock"
    assert resolve_docker_host(None, {}) == DEFAULT_DOCKER_HOST
    assert resolve_docker_host("", {"DOCKER_HOST": ""}) == DEFAULT_DOCKER_HOST
