"""CDN faults, cache corruption, shared and cancelled downloads, abandoned uploads."""

from __future__ import annotations

import dataclasses
import errno
import pathlib
import threading

import anyio
import httpx
import pytest

from harness import PUBLISHER
from transfers.support import (
    chunked,
    download,
    folder_models,
    random_bytes,
    settled,
    temp_files,
    upload,
)
from unlockd import cache as cache_module
from unlockd.api_client import ApiClient
from unlockd.blobs import BlobClient
from unlockd.cache import BigPartCache
from unlockd.errors import (
    CiphertextError,
    InvalidInputError,
    NotFoundError,
    UpstreamError,
)
from unlockd.files import read_exactly_at
from unlockd.metrics import Metrics
from unlockd.transfers import Transfers

PS = (1 << 20) - 16
SIZE = 6 * PS + 999
MAIN = threading.main_thread()


async def test_download_second_time_hits_cache(sidecar, hub):
    """The second download of a resource reads no blob from the CDN."""
    data = random_bytes(3 * PS)
    await upload(sidecar, "m.bin", data)
    assert await download(sidecar, "m.bin") == data
    assert await download(sidecar, "m.bin") == data
    assert len(hub.probe.blob_requests()) == 1
    assert len(list(sidecar.cache_dir.iterdir())) == 1


async def test_download_flipped_cached_byte_aborts_then_refetches(sidecar, hub):
    """A flipped byte in a later cached segment aborts mid-stream, evicts; the next load works."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    assert await download(sidecar, "m.bin") == data
    await settled(sidecar)
    (entry,) = sidecar.cache_dir.iterdir()
    with entry.open("r+b") as f:
        f.seek(3 * PS)
        byte = f.read(1)
        f.seek(3 * PS)
        f.write(bytes([byte[0] ^ 1]))
    d = await sidecar.transfers.open_download("models", "m.bin")
    received = bytearray()

    async def consume() -> None:
        async for chunk in d:
            received.extend(chunk)

    with pytest.raises(CiphertextError):
        await consume()
    await d.aclose()
    assert 0 < len(received) < len(data)
    assert data.startswith(received)
    assert not entry.exists()
    assert sidecar.metrics.integrity_failures._value.get() == 1
    assert await download(sidecar, "m.bin") == data
    assert len(hub.probe.blob_requests()) == 2


async def test_download_cdn_cut_mid_body_resumes_with_range(sidecar, hub):
    """A CDN that drops the connection mid-body is resumed with Range from the last byte."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    hub.probe.cut_blob_after = 1_500_000
    assert await download(sidecar, "m.bin") == data
    first, second = hub.probe.blob_requests()
    end = len(data) + 6 * 16 + 40 + 16 - 4096 - 1
    assert first["range"] == f"bytes=0-{end}"
    # From the last byte that arrived: at most what the hub sent before the cut.
    resumed = int(second["range"].removeprefix("bytes=").partition("-")[0])
    assert 0 < resumed <= 1_500_000
    assert second["range"] == f"bytes={resumed}-{end}"


async def test_stream_blob_range_answered_200_skips_prefix(sidecar, hub):
    """A CDN that ignores Range (200, whole blob) still yields exactly the asked bytes."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    info = await sidecar.api.get_resource("models", "m.bin")
    whole = b"".join([c async for c in sidecar.blobs.stream(info.big_url)])
    hub.probe.ignore_range = True
    part = b"".join([c async for c in sidecar.blobs.stream(info.big_url, 1_000_001, 2_500_000)])
    assert part == whole[1_000_001:2_500_000]
    hub.probe.cut_blob_after = 2_000_000
    rest = b"".join([c async for c in sidecar.blobs.stream(info.big_url, 10, None)])
    assert rest == whole[10:]


async def test_download_concurrent_cold_share_one_blob_request(sidecar, hub):
    """Concurrent downloads of an uncached resource share one CDN read."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    results: list[bytes] = []

    async def one() -> None:
        results.append(await download(sidecar, "m.bin"))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(one)
    assert results == [data] * 6
    assert len(hub.probe.blob_requests()) == 1
    await settled(sidecar)
    assert len(list(sidecar.cache_dir.iterdir())) == 1


async def test_download_reader_leaves_download_completes_entry(sidecar, hub):
    """A reader that goes away mid-download leaves the shared download to complete the entry."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    hub.probe.blob_delay = 0.05
    d = await sidecar.transfers.open_download("models", "m.bin")
    async for _chunk in d:
        break
    assert len(temp_files(sidecar.cache_dir)) == 1
    await d.aclose()
    await settled(sidecar)
    assert temp_files(sidecar.cache_dir) == []
    assert len(list(sidecar.cache_dir.iterdir())) == 1
    assert await download(sidecar, "m.bin") == data
    assert len(hub.probe.blob_requests()) == 1  # the second load was a cache hit


async def test_cache_shutdown_mid_download_removes_temp_file(hub, tmp_path):
    """Leaving the cache's context (app shutdown) cancels its downloads and their temp files."""
    metrics = Metrics()
    blobs = BlobClient(metrics)
    async with httpx.AsyncClient(timeout=30) as http:
        api = ApiClient(http, hub.url, metrics=metrics)
        await api.login(*PUBLISHER)
        async with BigPartCache(tmp_path / "cache", metrics) as cache:
            transfers = Transfers(api, cache, blobs, metrics)
            await transfers.upload("m.bin", chunked(random_bytes(SIZE)), folder_models)
            hub.probe.blob_delay = 0.2
            d = await transfers.open_download("models", "m.bin")
            await d.aclose()
            assert len(temp_files(tmp_path / "cache")) == 1
        await blobs.aclose()
    assert list((tmp_path / "cache").iterdir()) == []


async def test_download_one_reader_cancelled_other_completes(sidecar, hub):
    """One reader leaving does not stop the download another reader still needs."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    hub.probe.blob_delay = 0.05
    leaving = await sidecar.transfers.open_download("models", "m.bin")
    staying = await sidecar.transfers.open_download("models", "m.bin")
    async for _chunk in leaving:
        break
    await leaving.aclose()
    received = b"".join([chunk async for chunk in staying])
    await staying.aclose()
    assert received == data
    await settled(sidecar)
    assert len(list(sidecar.cache_dir.iterdir())) == 1
    assert len(hub.probe.blob_requests()) == 1


async def test_download_cancelled_task_leaves_complete_entry(sidecar, hub):
    """Cancelling the task that reads a cold download leaves a complete entry, no temp file."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    hub.probe.blob_delay = 0.05
    with anyio.move_on_after(0.2):
        await download(sidecar, "m.bin")
    await settled(sidecar)
    (entry,) = sidecar.cache_dir.iterdir()
    assert entry.stat().st_size == len(data) + 6 * 16 + 40 + 16 - 4096


async def test_upload_folder_error_abandons_upload(sidecar, hub):
    """An upload whose folder turns out invalid is deleted at the hub and nothing is published."""

    async def bad_folder() -> str:
        raise InvalidInputError("invalid folder")

    async def chunks():
        yield random_bytes(2 * PS)

    with pytest.raises(InvalidInputError):
        await sidecar.transfers.upload("m.bin", chunks(), bad_folder)
    assert hub.probe.count("DELETE", "/uploads/") == 1
    assert list((hub.data_dir / "uploads").iterdir()) == []
    with pytest.raises(NotFoundError):
        await sidecar.api.get_resource("models", "m.bin")


async def test_upload_client_stream_fails_abandons_upload(sidecar, hub):
    """A body that fails mid-stream (client gone) publishes nothing and deletes the upload."""

    async def chunks():
        yield random_bytes(3 * PS)
        raise OSError("client disconnected")

    with pytest.raises(OSError, match="client disconnected"):
        await sidecar.transfers.upload("m.bin", chunks(), folder_models)
    assert hub.probe.count("DELETE", "/uploads/") == 1
    assert hub.probe.count("PUT", "/resources/") == 0
    with pytest.raises(NotFoundError):
        await sidecar.api.get_resource("models", "m.bin")


async def test_upstream_down_raises_upstream_error(tmp_path):
    """An unreachable upstream is an UpstreamError for login and health checks."""
    async with httpx.AsyncClient(timeout=5) as http:
        api = ApiClient(http, "http://127.0.0.1:9")
        with pytest.raises(UpstreamError):
            await api.login(*PUBLISHER)
        with pytest.raises(UpstreamError):
            await api.check_upstream()
        assert not api.authenticated


async def test_download_directory_at_cache_entry_still_served(sidecar, hub):
    """A directory where the cache entry belongs (a bad disk state) is no 500: the CDN serves."""
    data = random_bytes(2 * PS)
    await upload(sidecar, "m.bin", data)
    info = await sidecar.api.get_resource("models", "m.bin")
    blocker = sidecar.cache.path(info.etag)
    blocker.mkdir()
    (blocker / "x").write_bytes(b"x")
    assert await download(sidecar, "m.bin") == data
    await settled(sidecar)
    assert await download(sidecar, "m.bin") == data
    assert blocker.is_dir()


async def test_download_cache_read_error_mid_stream_falls_back_to_cdn(sidecar, hub, monkeypatch):
    """A cached entry that fails to read (EIO) mid-stream is evicted; the CDN serves the rest."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    assert await download(sidecar, "m.bin") == data
    await settled(sidecar)
    (entry,) = sidecar.cache_dir.iterdir()
    reads = 0

    # No real disk here can fail on demand: the read function is the seam.
    async def failing(fd, view, offset):
        nonlocal reads
        reads += 1
        if reads > 2:
            raise OSError(errno.EIO, "Input/output error")
        await read_exactly_at(fd, view, offset)

    monkeypatch.setattr(cache_module, "read_exactly_at", failing)
    d = await sidecar.transfers.open_download("models", "m.bin")
    assert d.source == "cache"
    got = b"".join([chunk async for chunk in d])
    assert d.source == "cdn"
    await d.aclose()
    assert got == data
    assert not entry.exists()
    assert len(hub.probe.blob_requests()) == 2
    assert sidecar.metrics.integrity_failures._value.get() == 0


async def test_open_download_wrong_key_keeps_shared_download(sidecar, hub, caplog):
    """A segment 0 failing for a bad small part or key does not poison the valid download."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    info = await sidecar.api.get_resource("models", "m.bin")
    hub.probe.blob_delay = 0.02
    good = await sidecar.transfers.open_download("models", "m.bin")
    assert good.source == "download"
    swapped = dataclasses.replace(info, key=bytes(32))
    with pytest.raises(CiphertextError):
        await sidecar.transfers.open_download("models", "m.bin", resource=swapped)
    assert "small part, key or big part" in caplog.text
    assert b"".join([chunk async for chunk in good]) == data
    await good.aclose()
    await settled(sidecar)
    assert len(list(sidecar.cache_dir.iterdir())) == 1
    assert len(hub.probe.blob_requests()) == 1
    assert sidecar.metrics.integrity_failures._value.get() == 1


async def test_open_download_after_evict_not_joined_to_poisoned_download(sidecar, hub):
    """A download evicted mid-flight is not shared with new readers; they stream from the CDN."""
    data = random_bytes(SIZE)
    await upload(sidecar, "m.bin", data)
    info = await sidecar.api.get_resource("models", "m.bin")
    hub.probe.blob_delay = 0.02
    first = await sidecar.transfers.open_download("models", "m.bin")
    await sidecar.cache.evict(info.etag)
    second = await sidecar.transfers.open_download("models", "m.bin")
    assert (first.source, second.source) == ("download", "cdn")
    for d in (first, second):
        assert b"".join([chunk async for chunk in d]) == data
        await d.aclose()
    await settled(sidecar)
    assert list(sidecar.cache_dir.iterdir()) == []


async def test_download_joining_in_flight_download_is_no_cache_hit(sidecar, hub):
    """Joining a download in progress counts neither as a cache hit nor as a second miss."""
    data = random_bytes(3 * PS)
    await upload(sidecar, "m.bin", data)
    hub.probe.blob_delay = 0.02
    first = await sidecar.transfers.open_download("models", "m.bin")
    second = await sidecar.transfers.open_download("models", "m.bin")
    assert first.source == second.source == "download"
    for d in (first, second):
        await d.aclose()
    assert sidecar.metrics.cache_hits._value.get() == 0
    assert sidecar.metrics.cache_misses._value.get() == 1


async def test_cache_file_removal_and_publish_off_event_loop(sidecar, hub, monkeypatch):
    """Publishing an entry (rename) and evicting it (unlink) run in worker threads."""
    calls: list[tuple[str, str, bool]] = []
    real_unlink, real_replace = pathlib.Path.unlink, pathlib.Path.replace

    def unlink(self, *args, **kwargs):
        calls.append(("unlink", self.parent.name, threading.current_thread() is MAIN))
        return real_unlink(self, *args, **kwargs)

    def replace(self, target):
        calls.append(("replace", self.parent.name, threading.current_thread() is MAIN))
        return real_replace(self, target)

    data = random_bytes(2 * PS)
    await upload(sidecar, "m.bin", data)
    info = await sidecar.api.get_resource("models", "m.bin")
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    monkeypatch.setattr(pathlib.Path, "replace", replace)
    assert await download(sidecar, "m.bin") == data
    await settled(sidecar)
    await sidecar.cache.evict(info.etag)
    monkeypatch.undo()
    ours = [(op, on_loop) for op, parent, on_loop in calls if parent == "cache"]
    assert ("replace", False) in ours
    assert ("unlink", False) in ours
    assert not any(on_loop for _, on_loop in ours)
