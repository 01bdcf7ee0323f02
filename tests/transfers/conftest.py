"""Fixtures: a real hub under uvicorn behind a probe, and a sidecar's data plane against it."""

from __future__ import annotations

import httpx
import pytest

from servers import serve
from transfers.support import EMAIL, PASSWORD, Hub, Sidecar, make_hub
from unlockd.api_client import ApiClient
from unlockd.cache import BigPartCache
from unlockd.metrics import Metrics
from unlockd.transfers import Transfers


@pytest.fixture
def hub(tmp_path):
    data_dir, probe = make_hub(tmp_path)
    with serve(probe) as url:
        yield Hub(url, probe, data_dir)


@pytest.fixture
async def sidecar(hub, tmp_path):
    metrics = Metrics()
    cache_dir = tmp_path / "cache"
    async with httpx.AsyncClient(timeout=30) as http:
        api = ApiClient(http, hub.url, metrics=metrics)
        await api.login(EMAIL, PASSWORD)
        cache = BigPartCache(cache_dir, metrics)
        try:
            yield Sidecar(api, cache, Transfers(api, cache, metrics), metrics, cache_dir)
        finally:
            await cache.aclose()
            await api.aclose()
