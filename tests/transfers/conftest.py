"""Fixtures: a real hub under uvicorn behind a probe, and a sidecar's data plane against it."""

from __future__ import annotations

import httpx
import pytest

from harness import PUBLISHER
from servers import in_own_task, serve
from transfers.support import Hub, HubProbe, Sidecar
from unlockd.api_client import ApiClient
from unlockd.blobs import BlobClient
from unlockd.cache import BigPartCache
from unlockd.metrics import Metrics
from unlockd.transfers import Transfers


@pytest.fixture
def hub_probe(tmp_path, hub_app):
    """``hub_probe(**hub_app_kwargs)``: the hub over ``tmp_path / "hub"``, behind a HubProbe."""
    return lambda **kwargs: HubProbe(hub_app(tmp_path / "hub", **kwargs))


@pytest.fixture
def hub(tmp_path, hub_probe, clock):
    """A hub of this test's own behind a probe; its tokens expire by ``clock``."""
    probe = hub_probe(clock=clock)
    with serve(probe) as url:
        yield Hub(url, probe, tmp_path / "hub")


@pytest.fixture
async def sidecar(hub, tmp_path, clock):
    """The sidecar's data plane, logged in as the publisher; its token expires by ``clock``."""
    metrics = Metrics()
    cache_dir = tmp_path / "cache"
    async with httpx.AsyncClient(timeout=30) as http:
        api = ApiClient(http, hub.url, metrics=metrics, clock=clock)
        await api.login(*PUBLISHER)
        blobs = BlobClient(metrics)
        try:
            async with in_own_task(BigPartCache(cache_dir, metrics)) as cache:
                transfers = Transfers(api, cache, blobs, metrics)
                yield Sidecar(api, cache, blobs, transfers, metrics, cache_dir)
        finally:
            await blobs.aclose()
