"""Authentication before release: wrong associated data, damaged cache, CDN outages."""

from __future__ import annotations

import contextlib
import dataclasses

import anyio
import httpx
import pytest

from harness import PUBLISHER, eventually_async
from servers import serve
from transfers.support import (
    download,
    file_size_limit,
    random_bytes,
    settled,
    upload,
)
from unlockd.api_client import ApiClient
from unlockd.blobs import BlobClient
from unlockd.cache import BigPartCache
from unlockd.errors import CiphertextError, UpstreamError
from unlockd.metrics import Metrics
from unlockd.transfers import Transfers

PS = (1 << 20) - 16


async def test_open_download_wrong_name_fails_before_any_byte(sidecar):
    """A resource handed out under another name fails in open_download, before any plaintext."""
    await upload(sidecar, "m.bin", random_bytes(2 * PS))
    info = await sidecar.api.get_resource("models", "m.bin")
    swapped = dataclasses.replace(info, name="other.bin")
    with pytest.raises(CiphertextError):
        await sidecar.transfers.open_download("models", "other.bin", resource=swapped)
    assert sidecar.metrics.integrity_failures._value.get() == 1
    assert sidecar.metrics.active_transfers._value.get() == 0


async def test_open_download_damaged_first_cached_segment_refetches(sidecar, hub):
    """A damaged first segment in the cache is counted, evicted and fetched again, transparently."""
    data = random_bytes(3 * PS)
    await upload(sidecar, "m.bin", data)
    assert await download(sidecar, "m.bin") == data
    await settled(sidecar)
    (entry,) = sidecar.cache_dir.iterdir()
    with entry.open("r+b") as f:
        f.seek(100)
        f.write(b"\0" * 8)
    assert await download(sidecar, "m.bin") == data
    assert len(hub.probe.blob_requests()) == 2
    assert sidecar.metrics.integrity_failures._value.get() == 1


async def test_download_range_shares_download_and_cleans_up(hub, tmp_path):
    """A whole and a ranged download share one CDN read and leave no temp files."""
    data = random_bytes(5 * PS)
    metrics = Metrics()
    async with (
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient(timeout=30) as http,
    ):
        api = ApiClient(http, hub.url, metrics=metrics)
        await api.login(*PUBLISHER)
        blobs = BlobClient(metrics)
        stack.push_async_callback(blobs.aclose)
        cache = await stack.enter_async_context(BigPartCache(tmp_path / "cache", metrics))
        transfers = Transfers(api, cache, blobs, metrics)
        await transfers.upload("m.bin", _once(data), _models)
        hub.probe.blob_delay = 0.05  # the download outlasts the second open, which joins it
        first = await transfers.open_download("models", "m.bin")
        second = await transfers.open_download("models", "m.bin", (PS, len(data)))
        assert first.source == second.source == "download"
        got = b"".join([c async for c in first])
        await first.aclose()
        await second.aclose()
        assert got == data
        await eventually_async(lambda: not cache._fetches)
    assert [p.name.startswith(".") for p in (tmp_path / "cache").iterdir()] == [False]
    assert len(hub.probe.blob_requests()) == 1


async def test_get_resource_upstream_down_raises_upstream_error(hub_probe):
    """A hub that goes away after login makes resource calls fail with UpstreamError."""
    async with httpx.AsyncClient(timeout=5) as http:
        with serve(hub_probe()) as url:
            api = ApiClient(http, url)
            await api.login(*PUBLISHER)
        with pytest.raises(UpstreamError):
            await api.get_resource("models", "m.bin")


async def test_cdn_stream_cdn_down_gives_up_with_upstream_error():
    """An unreachable CDN is retried a few times with backoff, then UpstreamError."""
    blobs = BlobClient(Metrics())
    async with contextlib.aclosing(blobs):
        with anyio.fail_after(10), pytest.raises(UpstreamError, match="5 attempts"):
            async for _ in blobs.stream("http://127.0.0.1:9/blobs/x", 0, 10):
                pass


async def _once(data: bytes):
    yield data


async def _models() -> str:
    return "models"


async def test_download_far_range_fetches_its_part_first_then_completes_entry(hub, tmp_path):
    """A range far into an uncached entry gets its own part first; the rest fills the cache."""
    metrics = Metrics()
    blobs = BlobClient(metrics)
    data = random_bytes(4 * PS)
    async with httpx.AsyncClient(timeout=30) as http:
        api = ApiClient(http, hub.url, metrics=metrics)
        await api.login(*PUBLISHER)
        cache = BigPartCache(tmp_path / "cache", metrics, connections=1, part_size=1 << 20)
        async with cache:
            transfers = Transfers(api, cache, blobs, metrics)
            await transfers.upload("m.bin", _once(data), _models)
            d = await transfers.open_download("models", "m.bin", (2 * PS + 5, len(data)))
            assert d.source == "download"
            got = b"".join([c async for c in d])
            await d.aclose()
            await eventually_async(lambda: not cache._fetches)
        await blobs.aclose()
    assert got == data[2 * PS + 5 :]
    # Segment 2 starts at big-part offset 2 MiB - 4096, in part 1: that part came first.
    ranges = [r["range"] for r in hub.probe.blob_requests()]
    assert ranges[0] == f"bytes={1 << 20}-{(2 << 20) - 1}"
    assert sorted(ranges[1:]) == sorted(
        f"bytes={start}-{min(start + (1 << 20), info_size(data)) - 1}"
        for start in (0, 2 << 20, 3 << 20, 4 << 20)
        if start < info_size(data)
    )
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.stat().st_size == info_size(data)


def info_size(data: bytes) -> int:
    """The big-part size of ``data`` encrypted and split with the default small size."""
    segments = -(-(len(data) + 40) // PS)
    return len(data) + 40 + 16 * segments - 4096


async def test_download_cache_write_fails_falls_back_to_cdn(sidecar):
    """A cache that cannot be written (as on a full disk) still serves the download from the CDN."""
    data = random_bytes(5 * PS)
    await upload(sidecar, "m.bin", data)
    with file_size_limit(PS):  # the cache entry cannot grow past its first segment
        assert await download(sidecar, "m.bin") == data
        await settled(sidecar)
    assert list(sidecar.cache_dir.iterdir()) == []
