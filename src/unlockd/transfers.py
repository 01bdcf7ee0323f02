"""Downloads and uploads of resources: the data plane between the routes and the upstream.

A download is one pipeline: small part (from the API) + big part (cache, shared download or
CDN) → exact ciphertext segments, read into a reused buffer → authenticate and decrypt each →
plaintext chunks. An upload is the reverse: plaintext chunks → encrypt with a fresh key →
first bytes kept as the small part, the rest streamed to the upstream → publish.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from unlockd.binary_split import check_small_size, split
from unlockd.crypto_stream import (
    HEADER_SIZE,
    SegmentCipher,
    SegmentLayout,
    encrypt_stream,
    generate_key,
)
from unlockd.errors import (
    CiphertextError,
    RangeNotSatisfiableError,
    UnlockdError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable

    from unlockd.api_client import ApiClient, ResourceInfo
    from unlockd.cache import BigPartCache, BigPartReader
    from unlockd.metrics import Metrics

__all__ = ["Download", "Transfers"]

logger = logging.getLogger(__name__)

_ABANDON_TIMEOUT = 30.0


class Download:
    """A prepared plaintext stream; the first segment of the range is already authenticated."""

    def __init__(  # noqa: PLR0913 - assembled by Transfers.open_download only
        self,
        transfers: Transfers,
        resource: ResourceInfo,
        start: int,
        end: int,
        *,
        first_segment: int,
        last_segment: int,
    ) -> None:
        self.resource = resource
        self.size = resource.plaintext_size
        self.etag = resource.etag
        self.start = start
        self.end = end
        self._transfers = transfers
        self._layout = transfers.layout
        self._cipher = SegmentCipher(
            resource.key, resource.small[:HEADER_SIZE], resource.name.encode()
        )
        self._index = first_segment
        self._last_segment = last_segment
        self._segment_count = self._layout.segment_count(resource.ciphertext_size)
        self._segment = bytearray(self._layout.segment_size)
        self._reader: BigPartReader | None = None
        self._first: bytes | None = None
        self._closed = False
        transfers.metrics.active_transfers.inc()

    @property
    def source(self) -> str:
        """Where the big part comes from: "cache", "download", "cdn" or "none"."""
        return self._reader.source if self._reader is not None else "none"

    async def _prepare(self) -> None:
        """Open the big part and authenticate the first segment."""
        resource = self.resource
        small = len(resource.small)
        segment_start = self._layout.segment_start(self._index)
        if self._layout.segment_bounds(self._last_segment, resource.ciphertext_size)[1] > small:
            self._reader = await self._transfers.cache.open(
                resource.etag,
                resource.big_size,
                self._fetch,
                max(segment_start - small, 0),
            )
        self._first = await self._next_chunk()

    def _fetch(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        return self._transfers.api.stream_blob(self.resource.big_url, start, end)

    async def _next_chunk(self) -> bytes:
        """Read, authenticate and decrypt the next segment; return its wanted plaintext."""
        index = self._index
        ciphertext = await self._read_segment(index)
        # A fresh bytes per segment, not open_into a reused buffer: the server may still hold
        # this chunk when the next segment is decrypted, and one pass beats decrypt + copy
        # (see the performance notes in crypto_stream).
        plaintext = self._cipher.open(index, index == self._segment_count - 1, ciphertext)
        self._index += 1
        first = self._layout.plaintext_start(index)
        lo = max(self.start - first, 0)
        hi = min(self.end - first, len(plaintext))
        if lo == 0 and hi == len(plaintext):
            return plaintext
        return plaintext[lo:hi]  # the first or last segment of a range

    async def _read_segment(self, index: int) -> memoryview:
        start, end = self._layout.segment_bounds(index, self.resource.ciphertext_size)
        view = memoryview(self._segment)[: end - start]
        small = self.resource.small
        if start < len(small):
            n = min(end, len(small)) - start
            view[:n] = small[start : start + n]
        if end > len(small):
            assert self._reader is not None
            big_start = max(start, len(small))
            await self._reader.readinto(view[big_start - start :], big_start - len(small))
        return view

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first is None:
            return
        first, self._first = self._first, None
        sent = self._transfers.metrics.plaintext_bytes_sent
        if first:
            yield first
            sent.inc(len(first))
        while self._index <= self._last_segment:
            try:
                chunk = await self._next_chunk()
            except CiphertextError:
                # The range's first segment authenticated, so the key and header are right:
                # the big part is damaged.
                await self._transfers.integrity_failure(
                    self.resource, self._index, self.source, evict=True
                )
                raise
            yield chunk
            sent.inc(len(chunk))

    async def aclose(self) -> None:
        """Release the big-part reader; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._transfers.metrics.active_transfers.dec()
        reader, self._reader = self._reader, None
        if reader is not None:
            with anyio.CancelScope(shield=True):
                await reader.aclose()


class Transfers:
    """Opens downloads and runs uploads over one ApiClient and one BigPartCache."""

    def __init__(
        self,
        api: ApiClient,
        cache: BigPartCache,
        metrics: Metrics,
        *,
        small_size: int = 4096,
    ) -> None:
        self.api = api
        self.cache = cache
        self.metrics = metrics
        self.small_size = check_small_size(small_size)
        self.layout = SegmentLayout()

    async def stat(self, folder: str, name: str) -> ResourceInfo:
        """Return the metadata of ``folder/name`` (``plaintext_size`` is its size)."""
        return await self.api.get_resource(folder, name)

    async def open_download(
        self,
        folder: str,
        name: str,
        byte_range: tuple[int, int] | None = None,
        *,
        resource: ResourceInfo | None = None,
    ) -> Download:
        """Prepare the plaintext of ``folder/name``, or of ``byte_range`` of it.

        ``byte_range`` is a resolved ``(start, end_exclusive)`` (see httputil.parse_range);
        RangeNotSatisfiableError when it does not lie within the resource.
        """
        info = resource if resource is not None else await self.api.get_resource(folder, name)
        size = info.plaintext_size
        start, end = _check_range(byte_range, size)
        if size == 0:
            first = last = 0  # still authenticate the one (empty) segment
        else:
            segments = self.layout.range(start, end, info.ciphertext_size)
            first, last = segments.first_segment, segments.last_segment
        for attempt in (1, 2):
            download = Download(self, info, start, end, first_segment=first, last_segment=last)
            try:
                await download._prepare()  # noqa: SLF001 - the constructor's second half
            except CiphertextError:
                source = download.source
                await download.aclose()
                if attempt == 1 and source == "cache":
                    # A damaged entry (a crash, a bad disk), or a wrong key or small part:
                    # drop the entry and try the CDN's copy.
                    logger.warning(
                        "cached big part %s failed authentication; refetching", info.etag
                    )
                    await self.cache.evict(info.etag)
                    continue
                # The key, the small part or a fresh big part is wrong; the big part may be
                # fine (and shared with other downloads), so nothing more is evicted.
                await self.integrity_failure(info, first, source, evict=False)
                raise
            except BaseException:
                await download.aclose()
                raise
            return download
        raise AssertionError  # pragma: no cover - the loop returns or raises

    async def integrity_failure(
        self, resource: ResourceInfo, segment: int, source: str, *, evict: bool
    ) -> None:
        """Count and log a segment that failed authentication; ``evict`` its big part."""
        self.metrics.integrity_failures.inc()
        if evict:
            await self.cache.evict(resource.etag)
            culprit, action = "big part", "cache entry evicted"
        else:
            culprit, action = "small part, key or big part", "nothing evicted"
        logger.error(
            "segment %d of %s/%s (etag %s, from %s) failed authentication (%s); %s",
            segment,
            resource.folder,
            resource.name,
            resource.etag,
            source,
            culprit,
            action,
        )

    async def upload(
        self, name: str, chunks: AsyncIterable[bytes], folder: Callable[[], Awaitable[str]]
    ) -> dict[str, Any]:
        """Encrypt ``chunks`` under a fresh key and publish them as ``folder()/name``.

        On any failure or cancellation the upstream upload is abandoned and nothing is
        published.
        """
        self.metrics.active_transfers.inc()
        try:
            return await self._upload(name, chunks, folder)
        finally:
            self.metrics.active_transfers.dec()

    async def _upload(
        self, name: str, chunks: AsyncIterable[bytes], folder: Callable[[], Awaitable[str]]
    ) -> dict[str, Any]:
        key = generate_key()
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                size += len(chunk)
                self.metrics.upload_bytes_received.inc(len(chunk))
                yield chunk

        upload_id = await self.api.create_upload()
        try:
            ciphertext = encrypt_stream(counted(), key, name.encode())
            small, big = await split(ciphertext, self.small_size)
            await self.api.put_upload(upload_id, big)
            folder_name = await folder()
            etag = await self.api.publish(folder_name, name, upload_id, key, small)
        except BaseException:
            # Shielded: a cancelled (disconnected) upload must still be abandoned upstream.
            with anyio.move_on_after(_ABANDON_TIMEOUT, shield=True):
                try:
                    await self.api.delete_upload(upload_id)
                except UnlockdError as exc:
                    logger.warning("could not abandon upload %s: %s", upload_id, exc)
            raise
        return {"status": "ok", "folder": folder_name, "filename": name, "size": size, "etag": etag}


def _check_range(byte_range: tuple[int, int] | None, size: int) -> tuple[int, int]:
    if byte_range is None:
        return 0, size
    start, end = byte_range
    if not 0 <= start < end <= size:
        msg = f"range [{start}, {end}) not satisfiable for a resource of {size} bytes"
        raise RangeNotSatisfiableError(msg, size)
    return start, end
