"""The sidecar against fleet hubs: two hubs on one database and bucket, presigned big parts."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import httpx

from harness import PUBLISHER, READER
from linkemu import LinkEmulator, LinkSettings
from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import pytest

MiB = 1024 * 1024


@contextlib.contextmanager
def _sidecar(hub_url: str, cache_dir: Path, **settings: Any) -> Iterator[httpx.Client]:
    """A real sidecar app in front of ``hub_url``, and a client of it logged in as ``READER``."""
    config = Settings.from_environ({}, upstream_url=hub_url, cache_dir=cache_dir, **settings)
    with serve(create_app(config)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _login(client: httpx.Client, account: tuple[str, str]) -> None:
    email, password = account
    reply = client.post("/login", json={"email": email, "password": password})
    assert reply.status_code == 200, reply.text


def _upload(client: httpx.Client, name: str, data: bytes) -> str:
    reply = client.post(f"/upload/{name}", data={"folder": "models"}, files={"data": (name, data)})
    assert reply.status_code == 200, reply.text
    etag: str = reply.json()["etag"]
    return etag


def test_sidecar_upload_through_one_hub_load_through_another_exact_bytes(fleet, tmp_path):
    """A model uploaded through one hub loads, whole and by range, through another: same bytes."""
    model = os.urandom(19 * MiB + 12345)
    with fleet.hub() as first, fleet.hub() as second:
        with _sidecar(first, tmp_path / "a") as uploader:
            _login(uploader, PUBLISHER)
            etag = _upload(uploader, "model.bin", model)
        with _sidecar(second, tmp_path / "b", cdn_part_size=4 * MiB) as device:
            _login(device, READER)
            # A range first: the device's cache is cold, the bytes come from the bucket.
            ranged = device.get(
                "/resources/models/model.bin", headers={"range": "bytes=9000000-13000000"}
            )
            assert ranged.status_code == 206, ranged.text
            assert ranged.content == model[9_000_000:13_000_001]
            assert ranged.headers["etag"] == f'"{etag}"'
            loaded = device.post("/load/model.bin", json={"folder": "models"})
            assert loaded.status_code == 200, loaded.text
            assert loaded.content == model
    assert len(fleet.objects()) == 1
    assert fleet.multipart_uploads() == []


def test_sidecar_presigned_url_expires_mid_download_download_completes(
    fleet, tmp_path, caplog: pytest.LogCaptureFixture
):
    """A big_url that expires while a slow download runs is renewed; the bytes are exact."""
    model = os.urandom(16 * MiB + 777)
    endpoint = httpx.URL(fleet.environ["AWS_ENDPOINT_URL"])
    # The hub signs URLs for the emulated link's address, so the device reaches the store
    # through it: 4 MiB/s makes the download last ~4 s, twice the URLs' lifetime. (Not 1 s:
    # a URL's signing time is in whole seconds, so it may be valid for a moment only.)
    link = LinkEmulator(endpoint.host, endpoint.port or 80, LinkSettings(link_rate=4 * MiB))
    with (
        link.running(),
        fleet.hub(presign_ttl=2, environ={"AWS_ENDPOINT_URL": link.url}) as hub_url,
        _sidecar(hub_url, tmp_path / "cache", cdn_part_size=MiB, cdn_connections=2) as device,
    ):
        _login(device, PUBLISHER)
        _upload(device, "model.bin", model)
        caplog.set_level(logging.INFO, logger="unlockd.transfers")
        began = time.monotonic()
        loaded = device.post("/load/model.bin", json={"folder": "models"})
        elapsed = time.monotonic() - began
        assert loaded.status_code == 200, loaded.text
        assert loaded.content == model
    assert elapsed > 3, "the download did not outlive its URL: the test proves nothing"
    assert any("expired; renewed" in record.getMessage() for record in caplog.records)
