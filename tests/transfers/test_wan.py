"""Big parts over an emulated WAN: parallel parts, cuts, stalls, odd servers, expiry, damage."""

from __future__ import annotations

import dataclasses

import anyio
import httpx
import pytest

from harness import PUBLISHER, eventually_async
from linkemu import LinkEmulator, LinkSettings
from servers import in_own_task
from transfers.support import (
    HubProbe,
    Sidecar,
    download,
    random_bytes,
    settled,
    temp_files,
    upload,
)
from unlockd.api_client import ApiClient
from unlockd.blobs import BlobClient
from unlockd.cache import BigPartCache
from unlockd.errors import CiphertextError, UpstreamError
from unlockd.metrics import Metrics
from unlockd.transfers import Transfers

PS = (1 << 20) - 16
SIZE = 5 * PS + 12_345  # a big part of five 1 MiB parts and a bit
PART = 1 << 20
STALL_TIMEOUT = 0.5


@dataclasses.dataclass
class Wan:
    sidecar: Sidecar
    link: LinkEmulator
    probe: HubProbe


@pytest.fixture
async def wan(hub, tmp_path):
    """A sidecar data plane whose big-part reads cross the link emulator (4 parts at a time)."""
    target = httpx.URL(hub.url)
    link = LinkEmulator(target.host, target.port, LinkSettings())
    metrics = Metrics()
    blobs = BlobClient(metrics, stall_timeout=STALL_TIMEOUT)
    cache_dir = tmp_path / "cache"
    with link.running():
        async with httpx.AsyncClient(timeout=30) as http:
            api = ApiClient(http, hub.url, cdn_url=link.url, metrics=metrics)
            await api.login(*PUBLISHER)
            cache = BigPartCache(cache_dir, metrics, connections=4, part_size=PART)
            try:
                async with in_own_task(cache):
                    transfers = Transfers(api, cache, blobs, metrics)
                    yield Wan(
                        Sidecar(api, cache, blobs, transfers, metrics, cache_dir), link, hub.probe
                    )
                    await settled(Sidecar(api, cache, blobs, transfers, metrics, cache_dir))
            finally:
                await blobs.aclose()
    assert temp_files(cache_dir) == []


def _parts(wan: Wan) -> list[int]:
    """The first byte of each blob request, in the order they reached the hub."""
    return [
        int(r["range"].removeprefix("bytes=").partition("-")[0]) for r in wan.probe.blob_requests()
    ]


async def test_wan_parallel_parts_complete_entry_out_of_order(wan):
    """Parts are fetched over several connections at once and the entry is published whole."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.link.settings.rtt = 0.02
    assert await download(wan.sidecar, "m.bin") == data
    await settled(wan.sidecar)
    assert sorted(_parts(wan)) == [i * PART for i in range(6)]
    assert wan.link.connections >= 4
    (entry,) = wan.sidecar.cache_dir.iterdir()
    assert entry.stat().st_size == (await wan.sidecar.api.get_resource("models", "m.bin")).big_size


async def test_wan_cuts_in_every_part_resume_with_range(wan):
    """A link that cuts every connection after 300 kB still gives the right bytes, resumed."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.link.settings.cut_after = 300_000
    assert await download(wan.sidecar, "m.bin") == data
    assert wan.link.cuts >= 6  # each 1 MiB part was cut at least once
    starts = _parts(wan)
    assert len(starts) > 12
    # Every part was started, and the resumes pick up where their part stopped.
    assert {s for s in starts if s % PART == 0} == {i * PART for i in range(6)}
    assert sum(1 for s in starts if s % PART) >= 6


async def test_wan_stall_shorter_than_timeout_waits(wan):
    """A connection that pauses for less than the stall timeout is kept."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.link.settings.stall_after, wan.link.settings.stall_seconds = 100_000, STALL_TIMEOUT / 5
    assert await download(wan.sidecar, "m.bin") == data
    assert len(_parts(wan)) == 6


async def test_wan_stall_longer_than_timeout_reconnects(wan):
    """A connection silent for longer than the stall timeout is dropped and its part resumed."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.link.settings.stall_after, wan.link.settings.stall_seconds = 100_000, 30.0
    with anyio.fail_after(20):  # far less than the stall: the part did not wait it out
        assert await download(wan.sidecar, "m.bin") == data
    assert len(_parts(wan)) == 7  # six parts and one resume


async def test_wan_server_ignores_range_parts_still_exact(wan):
    """A CDN that answers 200 with the whole blob to every range still yields exact parts."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.probe.ignore_range = True
    assert await download(wan.sidecar, "m.bin") == data


async def test_wan_server_shorter_range_is_completed(wan):
    """A CDN that answers less of a range than asked is asked again for the rest."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.probe.shorten_ranges = 3
    assert await download(wan.sidecar, "m.bin") == data
    assert len(_parts(wan)) == 9


async def test_wan_expired_url_renewed_from_fresh_metadata(wan):
    """A 403 from the CDN (an expired presigned URL) fetches fresh metadata and goes on."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.probe.faults.append(("GET", "/blobs/", "403"))
    before = wan.probe.count("GET", "/resources/")
    assert await download(wan.sidecar, "m.bin") == data
    assert wan.probe.count("GET", "/resources/") == before + 2  # the load's, and the renewal


async def test_wan_bit_flip_in_a_part_aborts_evicts_then_heals(wan):
    """A flipped bit in one part aborts the load and evicts the entry; the next load heals."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.probe.flip_blob_at = 3 * PART + 1000
    d = await wan.sidecar.transfers.open_download("models", "m.bin")
    with pytest.raises(CiphertextError):
        async for _ in d:
            pass
    await d.aclose()
    assert wan.sidecar.metrics.integrity_failures._value.get() == 1
    await settled(wan.sidecar)
    assert list(wan.sidecar.cache_dir.iterdir()) == []
    assert await download(wan.sidecar, "m.bin") == data
    await settled(wan.sidecar)
    assert len(list(wan.sidecar.cache_dir.iterdir())) == 1


async def test_wan_parallel_ranges_leave_complete_entry(wan):
    """Eight concurrent range readers (an aria2c -x 8) share one download that fills the cache."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.link.settings.rtt = 0.02
    step = -(-len(data) // 8)
    got: dict[int, bytes] = {}

    async def fetch(start: int) -> None:
        got[start] = await download(wan.sidecar, "m.bin", (start, min(start + step, len(data))))

    async with anyio.create_task_group() as tg:
        for start in range(0, len(data), step):
            tg.start_soon(fetch, start)
    assert b"".join(got[k] for k in sorted(got)) == data
    await eventually_async(lambda: not wan.sidecar.cache._fetches)
    assert sorted(_parts(wan)) == [i * PART for i in range(6)]  # each part fetched once
    assert len(list(wan.sidecar.cache_dir.iterdir())) == 1
    assert await download(wan.sidecar, "m.bin") == data
    assert len(_parts(wan)) == 6  # served from the cache


async def test_wan_blob_missing_at_cdn_is_an_upstream_error(wan):
    """A CDN that has no blob the API just named fails the load as a 502, not a 404."""
    data = random_bytes(SIZE)
    await upload(wan.sidecar, "m.bin", data)
    wan.probe.faults.append(("GET", "/blobs/", "404"))
    with pytest.raises(UpstreamError) as caught:
        await download(wan.sidecar, "m.bin")
    assert caught.value.status_code == 502


async def test_blob_client_errors_never_show_a_url_query():
    """A presigned URL's query (its signature) appears in no error message."""
    blobs = BlobClient(Metrics(), stall_timeout=STALL_TIMEOUT)
    try:
        with pytest.raises(UpstreamError) as caught:
            async for _ in blobs.stream("http://127.0.0.1:9/blobs/x?X-Amz-Signature=s3cr3t", 0, 9):
                pass
    finally:
        await blobs.aclose()
    assert "s3cr3t" not in caught.value.message
    assert "http://127.0.0.1:9/blobs/x" in caught.value.message
