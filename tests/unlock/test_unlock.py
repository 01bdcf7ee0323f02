"""The unlock workflow against a real hub, a real ApiClient and a real Docker engine."""

from __future__ import annotations

import asyncio
import os
import socket

import anyio
import httpx
import pytest
from starlette.responses import JSONResponse

from harness import READER, eventually_async
from servers import serve
from unlock.support import seal_archive
from unlockd.api_client import ApiClient
from unlockd.docker import DockerLoader
from unlockd.errors import ConflictError, NotFoundError
from unlockd.metrics import Metrics
from unlockd.unlock import UnlockManager

pytestmark = pytest.mark.docker

MARKER = b"unlockd-plaintext-marker-"


async def _seal_tags(hub_url, tmp_path, image_archive, images, key_id="images"):
    # Sealed from memory: the device only ever holds the sealed archive.
    return await seal_archive(hub_url, tmp_path / "images.enc", image_archive(images), key_id)


def _files(tags, size=0):
    return {
        tag: {"marker.txt": MARKER + tag.encode(), "blob.bin": os.urandom(size)} for tag in tags
    }


@pytest.fixture
async def make_manager(hub_url, docker_host):
    """Build UnlockManagers over a real ApiClient and DockerLoader; closes them after."""
    closers = []

    async def make(archive, *, task_group, key_id="images", host=None, metrics=None):
        http = httpx.AsyncClient(timeout=30)
        loader = DockerLoader(host or docker_host)
        closers.extend([http.aclose, loader.close])
        api = ApiClient(http, hub_url)
        return UnlockManager(
            task_group, archive=archive, key_id=key_id, api=api, docker=loader, metrics=metrics
        )

    yield make
    for close in closers:
        await close()


async def _run(manager, email=READER[0], password=READER[1]):
    assert await manager.start(email, password) == {"state": "authenticating"}
    await eventually_async(lambda: not manager.state.running, timeout=120)
    return manager.status()


async def test_unlock_sealed_archive_ready_with_tags(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """Seal -> unlock: the engine lists the images and the state is ready with their tags."""
    tags = [engine.new_tag(), engine.new_tag()]
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files(tags, 3 << 20))
    metrics = Metrics()
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, metrics=metrics, task_group=tg)
        assert manager.status()["state"] == "idle"
        status = await _run(manager)
        assert status["state"] == "ready", status
        assert status["error"] is None
        assert sorted(status["images"]) == sorted(tags)
        size = archive.stat().st_size
        assert status["progress"] == {"bytes_done": size, "bytes_total": size}
        assert status["started_at"] is not None
        assert status["finished_at"] is not None
        assert engine.tags() == set(tags)
        assert engine.leftovers() == 2
        assert b'unlockd_unlock_state{unlockd_unlock_state="ready"} 1.0' in metrics.render()[0]


async def test_unlock_wrong_password_error_nothing_loaded(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """A rejected password ends in error 'invalid credentials' and loads nothing."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag]))
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, task_group=tg)
        status = await _run(manager, READER[0], "wrong-password")
        assert status["state"] == "error"
        assert status["error"] == "invalid credentials"
        assert status["images"] == []
        assert engine.tags() == set()


async def test_unlock_unknown_key_error_names_key(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """A key id the hub does not know ends in error naming the key."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag]))
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, key_id="no-such-key", task_group=tg)
        status = await _run(manager)
        assert status["state"] == "error"
        assert status["error"] == "archive key 'no-such-key' not found at upstream"
        assert engine.tags() == set()


@pytest.mark.parametrize("damage", ["flip-middle", "truncate-end", "flip-last-byte"])
async def test_unlock_tampered_archive_error_nothing_loaded(  # noqa: PLR0917 - fixtures
    hub_url, engine, image_archive, make_manager, tmp_path, damage
):
    """A flipped byte or a cut-off end is 'corrupted or tampered', and Docker keeps nothing."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag], 4 << 20))
    data = bytearray(archive.read_bytes())
    if damage == "flip-middle":
        data[len(data) // 2] ^= 0x01
    elif damage == "flip-last-byte":
        data[-1] ^= 0x80
    else:
        del data[-1000:]
    archive.write_bytes(bytes(data))
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, task_group=tg)
        status = await _run(manager)
        assert status["state"] == "error"
        assert status["error"] == "archive is corrupted or has been tampered with"
        assert status["images"] == []
        assert engine.tags() == set()
        assert engine.leftovers() == 0


async def test_unlock_docker_unreachable_error(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """A DOCKER_HOST socket nobody listens on ends in 'Docker engine unreachable'."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag]))
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, host=f"unix://{tmp_path}/dead.sock", task_group=tg)
        status = await _run(manager)
        assert status["state"] == "error"
        assert status["error"].startswith("Docker engine unreachable")


async def test_unlock_not_an_image_archive_docker_rejects(hub_url, engine, make_manager, tmp_path):
    """An authentic archive whose plaintext is no image tar is 'Docker rejected the archive'."""
    junk = b"this is not a tar file\n" * 1000
    archive = await seal_archive(hub_url, tmp_path / "junk.enc", junk, key_id="junk")
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, key_id="junk", task_group=tg)
        status = await _run(manager)
        assert status["state"] == "error"
        assert status["error"].startswith("Docker rejected the archive")


async def test_unlock_start_missing_archive_not_found(make_manager, tmp_path):
    """start() without an archive file raises NotFoundError and stays idle."""
    for archive in (tmp_path / "absent.enc", None):
        async with anyio.create_task_group() as tg:
            manager = await make_manager(archive, task_group=tg)
            with pytest.raises(NotFoundError, match="Encrypted archive not found"):
                await manager.start(*READER)
        assert manager.status()["state"] == "idle"


async def test_unlock_concurrent_starts_exactly_one_wins(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """50 concurrent start() calls: exactly one starts a run, the rest get ConflictError."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag]))
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, task_group=tg)
        outcomes: list[object] = []

        async def attempt():
            try:
                outcomes.append(await manager.start(*READER))
            except ConflictError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as starters:
            for _ in range(50):
                starters.start_soon(attempt)
        await eventually_async(lambda: not manager.state.running, timeout=120)
        assert outcomes.count({"state": "authenticating"}) == 1
        assert sum(isinstance(o, ConflictError) for o in outcomes) == 49
        assert manager.status()["state"] == "ready"


async def test_unlock_second_run_after_ready_and_error_works(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """A new run is allowed after error and after ready, and resets the status."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag]))
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, task_group=tg)
        assert (await _run(manager, READER[0], "nope"))["state"] == "error"
        first = await _run(manager)
        assert first["state"] == "ready"
        assert first["error"] is None
        engine.remove_all()
        second = await _run(manager)
        assert second["state"] == "ready"
        assert second["images"] == [tag]
        assert engine.tags() == {tag}


async def test_unlock_cancelled_during_run_consistent_no_leftovers(
    hub_url, engine, image_archive, make_manager, tmp_path
):
    """Shutdown mid-run: the task ends, the state says so, no task, image or plaintext is left."""
    tag = engine.new_tag()
    archive = await _seal_tags(hub_url, tmp_path, image_archive, _files([tag], 48 << 20))
    before = asyncio.all_tasks()
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, task_group=tg)
        await manager.start(*READER)
        # A tight poll, not eventually(): the run must still be decrypting when it is caught.
        with anyio.fail_after(30):
            while manager.status()["progress"]["bytes_done"] == 0:  # noqa: ASYNC110 - polling is the API
                await anyio.sleep(0.001)
        assert manager.status()["state"] == "decrypting"
        tg.cancel_scope.cancel()  # what the app's lifespan does on shutdown
    status = manager.status()
    assert status["state"] == "error"
    assert status["error"] == "interrupted by shutdown (while decrypting)"
    assert status["finished_at"] is not None
    await eventually_async(lambda: asyncio.all_tasks() <= before)
    assert [p.name for p in tmp_path.iterdir()] == ["images.enc"]
    assert engine.tags() == set()
    assert engine.leftovers() == 0
    # A new manager (a restarted sidecar) unlocks the same archive.
    async with anyio.create_task_group() as tg:
        manager = await make_manager(archive, task_group=tg)
        assert (await _run(manager))["state"] == "ready"


async def test_unlock_upstream_down_error_names_upstream(tmp_path):
    """An unreachable upstream ends the run in an error that says so; no Docker needed."""
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"\x00" * 100)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with httpx.AsyncClient() as http:
        loader = DockerLoader(f"unix://{tmp_path}/unused.sock")
        api = ApiClient(http, f"http://127.0.0.1:{port}")
        async with anyio.create_task_group() as tg:
            manager = UnlockManager(tg, archive=archive, key_id="images", api=api, docker=loader)
            status = await _run(manager)
        await loader.close()
    assert status["state"] == "error"
    assert status["error"].startswith("upstream unreachable")
    assert status["progress"] == {"bytes_done": 0, "bytes_total": 100}


async def test_unlock_short_key_from_upstream_error_says_so(tmp_path, hub_app):
    """An upstream key that is not 32 bytes ends the run in the ApiClient's own message."""
    hub = hub_app(tmp_path / "hub")

    async def short_keys(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/keys/"):
            await JSONResponse({"key": "AAAA"})(scope, receive, send)
            return
        await hub(scope, receive, send)

    archive = tmp_path / "images.enc"
    archive.write_bytes(b"\x00" * 100)
    with serve(short_keys) as url:
        async with httpx.AsyncClient() as http:
            loader = DockerLoader(f"unix://{tmp_path}/unused.sock")
            api = ApiClient(http, url)
            async with anyio.create_task_group() as tg:
                manager = UnlockManager(
                    tg, archive=archive, key_id="images", api=api, docker=loader
                )
                status = await _run(manager)
            await loader.close()
    assert status["state"] == "error"
    assert status["error"] == "upstream key is not 32 bytes"
