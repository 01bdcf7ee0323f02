"""POST /unlock and GET /unlock/status through the real sidecar app under uvicorn."""

from __future__ import annotations

import asyncio
import os

import anyio
import httpx
import pytest

from harness import PUBLISHER, READER, eventually_async
from servers import serve
from unlock.support import seal_archive
from unlockd.app import create_app
from unlockd.config import Settings

pytestmark = pytest.mark.docker


async def _sealed(hub_url, tmp_path, archive_bytes, key_id="images"):
    return await seal_archive(hub_url, tmp_path / "images.enc", archive_bytes, key_id)


def _settings(hub_url, docker_host, tmp_path, archive):
    return Settings(
        upstream_url=hub_url,
        cache_dir=tmp_path / "cache",
        archive=archive,
        docker_host=docker_host,
    )


async def _poll(client, until):
    async def reached():
        status = (await client.get("/unlock/status")).json()
        return status if until(status) else None

    return await eventually_async(reached, timeout=30)


async def test_http_unlock_poll_ready_with_images(
    hub_url, docker_host, engine, image_archive, tmp_path
):
    """POST /unlock answers authenticating; polling reaches ready with the tags; creds are set."""
    tag = engine.new_tag()
    archive = await _sealed(hub_url, tmp_path, image_archive({tag: {"f": b"f"}}))
    with serve(create_app(_settings(hub_url, docker_host, tmp_path, archive))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post(
                "/unlock", json={"email": READER[0], "password": READER[1]}
            )
            assert response.status_code == 200
            assert response.json() == {"state": "authenticating"}
            status = await _poll(client, lambda s: s["state"] in {"ready", "error"})
            assert status["state"] == "ready", status
            assert status["images"] == [tag]
            assert status["progress"]["bytes_done"] == archive.stat().st_size
            assert (await client.get("/status")).json()["authenticated"] is True
            assert b'unlockd_unlock_state="ready"} 1.0' in (await client.get("/metrics")).content
    assert engine.tags() == {tag}


async def test_http_unlock_missing_archive_404(hub_url, docker_host, tmp_path):
    """Without the archive file, POST /unlock is 404 with the spec's detail."""
    settings = _settings(hub_url, docker_host, tmp_path, tmp_path / "absent.enc")
    with serve(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post(
                "/unlock", json={"email": READER[0], "password": READER[1]}
            )
            assert response.status_code == 404
            assert response.json() == {"detail": "Encrypted archive not found"}
            assert (await client.get("/unlock/status")).json()["state"] == "idle"


async def test_http_unlock_50_concurrent_posts_one_200_rest_409(
    hub_url, docker_host, engine, image_archive, tmp_path
):
    """50 concurrent POST /unlock: exactly one 200, the other 49 are 409."""
    tag = engine.new_tag()
    archive = await _sealed(hub_url, tmp_path, image_archive({tag: {"f": os.urandom(1 << 20)}}))
    with serve(create_app(_settings(hub_url, docker_host, tmp_path, archive))) as url:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            body = {"email": READER[0], "password": READER[1]}
            responses = await asyncio.gather(
                *(client.post("/unlock", json=body) for _ in range(50))
            )
            codes = sorted(r.status_code for r in responses)
            assert codes == [200] + [409] * 49
            status = await _poll(client, lambda s: s["state"] in {"ready", "error"})
            assert status["state"] == "ready", status


async def test_http_unlock_shutdown_mid_run_interrupted_no_leftovers(
    hub_url, docker_host, engine, image_archive, tmp_path
):
    """Stopping the sidecar mid-run cancels the run: error state, no image, no plaintext file."""
    tag = engine.new_tag()
    archive = await _sealed(hub_url, tmp_path, image_archive({tag: {"f": os.urandom(48 << 20)}}))
    app = create_app(_settings(hub_url, docker_host, tmp_path, archive))
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            body = {"email": READER[0], "password": READER[1]}
            assert (await client.post("/unlock", json=body)).status_code == 200
            await _poll(client, lambda s: s["progress"]["bytes_done"] > 0)
    status = app.state.unlock.status()
    assert status["state"] == "error"
    assert status["error"].startswith("interrupted by shutdown (while ")
    plaintext = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "images.enc"]
    assert plaintext == []
    if status["error"].endswith("(while loading_images)"):
        # The engine had the whole authentic archive: it may still commit it; let it settle.
        await eventually_async(lambda: engine.tags() == {tag}, timeout=30)
    else:
        await anyio.sleep(0.5)
        assert engine.tags() == set()
        assert engine.leftovers() == 0


async def test_http_rejected_login_and_unlock_keep_working_login(hub_url, docker_host, tmp_path):
    """A wrong /login or /unlock password after a good login changes nothing: loads still work."""
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"\x00" * 100)
    data = os.urandom(100_000)
    with serve(create_app(_settings(hub_url, docker_host, tmp_path, archive))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            good = {"email": PUBLISHER[0], "password": PUBLISHER[1]}
            wrong = {"email": PUBLISHER[0], "password": "wrong-password"}
            assert (await client.post("/login", json=good)).status_code == 200
            uploaded = await client.post("/upload/m.bin", files={"data": ("m.bin", data)})
            assert uploaded.status_code == 200, uploaded.text
            assert (await client.post("/login", json=wrong)).status_code == 401
            assert (await client.post("/unlock", json=wrong)).status_code == 200
            status = await _poll(client, lambda s: s["state"] in {"ready", "error"})
            assert status["error"] == "invalid credentials"
            me = (await client.get("/status")).json()
            assert (me["authenticated"], me["email"]) == (True, PUBLISHER[0])
            loaded = await client.post("/load/m.bin")
            assert loaded.status_code == 200
            assert loaded.content == data
