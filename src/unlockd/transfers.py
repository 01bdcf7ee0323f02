"""Downloads and uploads of resources: the data plane between the routes and the upstream.

A download is one pipeline: small part (from the API) + big part (cache, shared download or
CDN) → exact ciphertext segments, read into a reused buffer → authenticate and decrypt each →
plaintext chunks. An upload is the reverse: plaintext chunks → encrypt with a fresh key →
first bytes kept as the small part, the rest streamed to the upstream → publish.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from unlockd.binary_split import DEFAULT_SMALL_SIZE, check_small_size, split
from unlockd.crypto_stream import (
    HEADER_SIZE,
    SegmentCipher,
    SegmentLayout,
    encrypt_stream,
    generate_key,
)
from unlockd.errors import (
    CiphertextError,
    ForbiddenError,
    InvalidUpstreamDataError,
    RangeNotSatisfiableError,
    UnlockdError,
    UpstreamError,
)

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        AsyncIterable,
        AsyncIterator,
        Awaitable,
        Callable,
    )

    from unlockd.api_client import ApiClient, ResourceInfo
    from unlockd.blobs import BlobClient
    from unlockd.cache import BigPartCache, BigPartReader, FetchFunction
    from unlockd.metrics import Metrics

__all__ = ["Download", "Transfers"]

logger = logging.getLogger(__name__)

_ABANDON_TIMEOUT = 30.0
_LAYOUT = SegmentLayout()


class _BufferPool:
    """Segment-sized buffers lent to downloads only while they read and decrypt a segment.

    A download waiting on a slow client holds none: memory for stalled clients is then only
    the plaintext queued to them, which the server's send budget bounds.
    """

    def __init__(self, size: int, keep: int = 8) -> None:
        self._size = size
        self._keep = keep
        self._free: list[memoryview] = []

    def get(self) -> memoryview:
        return self._free.pop() if self._free else memoryview(bytearray(self._size))

    def put(self, buffer: memoryview) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


class _Segments:
    """Authenticated plaintext of consecutive segments: small part, then big part, decrypted."""

    def __init__(
        self,
        resource: ResourceInfo,
        reader: BigPartReader | None,
        index: int,
        layout: SegmentLayout,
        buffers: _BufferPool,
    ) -> None:
        self._small = resource.small
        self._size = resource.ciphertext_size
        self._cipher = SegmentCipher(
            resource.key, resource.small[:HEADER_SIZE], resource.name.encode()
        )
        self._reader = reader
        self._layout = layout
        self._last = layout.segment_count(self._size) - 1
        self._buffers = buffers
        self.index = index

    @property
    def source(self) -> str:
        """Where the big part comes from: "cache", "download", "cdn" or "none"."""
        return self._reader.source if self._reader is not None else "none"

    async def next(self) -> bytes:
        """Read, authenticate and decrypt the next segment; return all its plaintext."""
        index = self.index
        start, end = self._layout.segment_bounds(index, self._size)
        small = self._small
        if end > len(small):
            # Not holding a buffer while a slow download brings the bytes: a waiting reader
            # costs nothing but its place in the queue.
            assert self._reader is not None
            big_start = max(start, len(small))
            await self._reader.ready(big_start - len(small), end - big_start)
        buffer = self._buffers.get()
        try:
            view = buffer[: end - start]
            if start < len(small):
                n = min(end, len(small)) - start
                view[:n] = small[start : start + n]
            if end > len(small):
                assert self._reader is not None
                big_start = max(start, len(small))
                await self._reader.readinto(view[big_start - start :], big_start - len(small))
            # A fresh bytes per segment, not open_into a reused buffer: the server may still hold
            # this chunk when the next segment is decrypted (docs/performance.md).
            plaintext = self._cipher.open(index, index == self._last, view)
        finally:
            self._buffers.put(buffer)
        self.index += 1
        return plaintext

    async def aclose(self) -> None:
        """Release the big-part reader; safe to call twice."""
        reader, self._reader = self._reader, None
        if reader is not None:
            with anyio.CancelScope(shield=True):
                await reader.aclose()


class Download:
    """The plaintext of one resource range, as an async iterator of chunks.

    Built by :meth:`Transfers.open_download` once the range's first segment has been
    authenticated; a later segment that fails authentication is reported to
    ``on_integrity_failure(segment, source)`` and ends the iteration with its error.
    """

    def __init__(  # noqa: PLR0913 - one download's worth of parts, keyword-only
        self,
        resource: ResourceInfo,
        start: int,
        end: int,
        *,
        segments: _Segments,
        first: bytes,
        metrics: Metrics,
        on_integrity_failure: Callable[[int, str], Awaitable[None]],
    ) -> None:
        self.resource = resource
        self.size = resource.plaintext_size
        self.etag = resource.etag
        self.start = start
        self.end = end
        self._segments = segments
        self._first: bytes | None = first
        self._metrics = metrics
        self._on_integrity_failure = on_integrity_failure
        self._closed = False
        metrics.active_transfers.inc()

    @property
    def source(self) -> str:
        """Where the big part comes from: "cache", "download", "cdn" or "none"."""
        return self._segments.source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        first, self._first = self._first, None
        if first is None:
            return
        sent = self._metrics.plaintext_bytes_sent
        segments, layout, end = self._segments, _LAYOUT, self.end
        if first:
            yield first
            sent.inc(len(first))
        while layout.plaintext_start(segments.index) < end:
            # A download whose sends never block would otherwise keep the loop to itself
            # (/health waited seconds behind 8 warm loads): every segment is a checkpoint.
            await anyio.lowlevel.checkpoint()
            index = segments.index
            try:
                plaintext = await segments.next()
            except CiphertextError:
                # The range's first segment authenticated, so the key and header are right:
                # the big part is damaged.
                await self._on_integrity_failure(index, segments.source)
                raise
            chunk = _clip(plaintext, layout.plaintext_start(index), self.start, end)
            yield chunk
            sent.inc(len(chunk))

    async def aclose(self) -> None:
        """Release the big-part reader; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._metrics.active_transfers.dec()
        await self._segments.aclose()


class Transfers:
    """Opens downloads and runs uploads: the API for metadata, the cache and CDN for bytes."""

    def __init__(
        self,
        api: ApiClient,
        cache: BigPartCache,
        blobs: BlobClient,
        metrics: Metrics,
        *,
        small_size: int = DEFAULT_SMALL_SIZE,
    ) -> None:
        self.api = api
        self.cache = cache
        self.blobs = blobs
        self.metrics = metrics
        self.small_size = check_small_size(small_size)
        self._buffers = _BufferPool(_LAYOUT.segment_size)
        # Metadata of the resources served so far, for when the upstream is away.
        self._seen: dict[tuple[str, str], ResourceInfo] = {}

    async def stat(self, folder: str, name: str) -> ResourceInfo:
        """Return the metadata of ``folder/name`` (``plaintext_size`` is its size).

        When the upstream is unreachable (no connection, a timeout, a 5xx), the metadata last
        seen for a resource whose big part is cached is used instead: a device keeps serving
        the models it has. Only for the life of the process: nothing is written to disk.
        """
        try:
            info = await self.api.get_resource(folder, name)
        except UpstreamError as exc:
            if isinstance(exc, InvalidUpstreamDataError):
                raise
            known = self._seen.get((folder, name))
            if known is None or (
                known.big_size  # a resource all in its small part needs no cache entry
                and not await anyio.to_thread.run_sync(self.cache.path(known.etag).exists)
            ):
                raise
            logger.warning(
                "upstream unreachable (%s); serving %s/%s from the cache", exc, folder, name
            )
            self.metrics.offline_loads.inc()
            return known
        self._seen[(folder, name)] = info
        return info

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
        RangeNotSatisfiableError when it does not lie within the resource. The range's first
        segment is authenticated before this returns.
        """
        info = resource if resource is not None else await self.stat(folder, name)
        start, end = _check_range(byte_range, info.plaintext_size)
        if start == end:
            first = last = 0  # an empty resource: still authenticate its one (empty) segment
        else:
            span = _LAYOUT.range(start, end, info.ciphertext_size)
            first, last = span.first_segment, span.last_segment
        for attempt in (1, 2):
            reader = await self._open_big_part(info, first, last)
            segments = _Segments(info, reader, first, _LAYOUT, self._buffers)
            try:
                plaintext = await segments.next()
            except CiphertextError:
                source = segments.source
                await segments.aclose()
                if attempt == 1 and source == "cache":
                    # A damaged entry (a crash, a bad disk), or a wrong key or small part:
                    # drop the entry and try the CDN's copy.
                    self.metrics.integrity_failures.inc()
                    logger.warning(
                        "cached big part %s failed authentication; evicted, refetching",
                        info.etag,
                    )
                    await self.cache.evict(info.etag)
                    continue
                # The key, the small part or a fresh big part is wrong; the big part may be
                # fine (and shared with other downloads), so nothing more is evicted.
                await self._integrity_failure(info, first, source, evict=False)
                raise
            except BaseException:
                await segments.aclose()
                raise
            return Download(
                info,
                start,
                end,
                segments=segments,
                first=_clip(plaintext, _LAYOUT.plaintext_start(first), start, end),
                metrics=self.metrics,
                on_integrity_failure=functools.partial(self._integrity_failure, info, evict=True),
            )
        raise AssertionError  # pragma: no cover - the loop returns or raises

    async def _open_big_part(
        self, info: ResourceInfo, first: int, last: int
    ) -> BigPartReader | None:
        """A reader of the big part from segment ``first`` on, or None if the range avoids it."""
        small = len(info.small)
        if _LAYOUT.segment_bounds(last, info.ciphertext_size)[1] <= small:
            return None
        start = max(_LAYOUT.segment_start(first) - small, 0)
        return await self.cache.open(
            info.etag, info.big_size, self._big_part(info), start, name=(info.folder, info.name)
        )

    def _big_part(self, info: ResourceInfo) -> FetchFunction:
        """Reads of the big part; a presigned URL that expired (403) is renewed and read on."""
        url = info.big_url

        async def stream(start: int, end: int) -> AsyncGenerator[bytes, None]:
            nonlocal url
            position, renewed = start, False
            while True:
                try:
                    async for chunk in self.blobs.stream(url, position, end):
                        position += len(chunk)
                        renewed = False
                        yield chunk
                except ForbiddenError as exc:
                    if renewed:
                        msg = "the CDN refused the big part even with a fresh URL"
                        raise UpstreamError(msg) from exc
                    # Same etag, same bytes: only the URL's signature ran out (SPEC §10).
                    fresh = await self.api.get_resource(info.folder, info.name)
                    if fresh.etag != info.etag:
                        msg = f"{info.folder}/{info.name} changed during the download"
                        raise UpstreamError(msg) from None
                    logger.info("big part URL of %s expired; renewed", info.etag)
                    url, renewed = fresh.big_url, True
                else:
                    return

        return stream

    async def _integrity_failure(
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
            url, token = self.api.upload_url(upload_id), await self.api.bearer_token()
            await self.blobs.put(url, big, token=token)
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


def _clip(plaintext: bytes, offset: int, start: int, end: int) -> bytes:
    """The part of a segment's plaintext (which starts at ``offset``) within [start, end)."""
    lo = max(start - offset, 0)
    hi = min(end - offset, len(plaintext))
    if lo == 0 and hi == len(plaintext):
        return plaintext  # the common case: no copy
    return plaintext[lo:hi]


def _check_range(byte_range: tuple[int, int] | None, size: int) -> tuple[int, int]:
    if byte_range is None:
        return 0, size
    start, end = byte_range
    if not 0 <= start < end <= size:
        msg = f"range [{start}, {end}) not satisfiable for a resource of {size} bytes"
        raise RangeNotSatisfiableError(msg, size)
    return start, end
