"""The big-part cache: ciphertext big parts on disk, keyed by upstream etag.

An entry is a file named after its etag, published by rename only once it is complete and
of the expected size, so a reader never sees half an entry and a new version (new etag)
never mixes with an old one. A miss starts one shared download per etag (a :class:`_Fetch`)
that keeps its most recent bytes in memory while a writer copies them to a temp file: the
readers of a cold entry are served from memory at network speed and fall back to the temp
file only when they lag behind, so a slow disk does not hold the first client back (it
only does once the writer lags by more than ``max_lag`` bytes, which bounds memory).

The download belongs to the cache, not to a request: it runs in the cache's task group,
entered in the app's lifespan (``async with BigPartCache(...) as cache``). A client that
goes away does not stop the others; when the last reader goes, an unfinished download is
cancelled and its temp file removed.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Protocol, Self

import anyio
import anyio.to_thread

from unlockd.errors import StorageError, UpstreamError
from unlockd.files import read_exactly_at

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from anyio.abc import TaskGroup

    from unlockd.metrics import Metrics

__all__ = ["BigPartCache", "BigPartReader", "FetchFunction"]

logger = logging.getLogger(__name__)

# Opens a CDN stream of big-part bytes [start, end).
FetchFunction = Callable[[int, int], AsyncGenerator[bytes, None]]

_SAFE_ETAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_TEMP_SUFFIX = ".tmp"
_MAX_LAG = 16 << 20  # unwritten bytes held in memory before the download waits for the disk
_KEEP = 4 << 20  # written bytes kept in memory for readers just behind the download
_WRITE_BATCH = 8 << 20
_ANNOUNCE = 1 << 20  # wake readers and the writer once per this many bytes, not per chunk
_AHEAD = 64 << 20  # a read this far beyond a download's progress goes to the CDN directly


class BigPartReader(Protocol):
    """Random-access reads of one big part, whatever it comes from."""

    source: str  # "cache", "download" or "cdn" (where the bytes come from now), for logs

    async def readinto(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the big-part bytes at ``offset``."""

    async def aclose(self) -> None:
        """Release the file or stream; safe to call twice."""


class BigPartCache:
    """A directory of ciphertext big parts with shared, cancellable downloads."""

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self.directory = directory
        self._metrics = metrics
        self._task_group: TaskGroup | None = None
        self._fetches: dict[str, _Fetch] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f".*{_TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def path(self, etag: str) -> Path:
        """The file of the published entry for ``etag`` (which may not exist)."""
        if _SAFE_ETAG.fullmatch(etag):
            return self.directory / etag
        return self.directory / hashlib.sha256(etag.encode()).hexdigest()

    def writable(self) -> bool:
        """Tell whether an entry could be written now (for readiness checks)."""
        probe = self.directory / f".probe-{secrets.token_hex(8)}{_TEMP_SUFFIX}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True

    async def evict(self, etag: str) -> None:
        """Drop the entry for ``etag``, and keep an unfinished download from publishing it.

        Best effort: an entry that cannot be removed is logged, and the next read of it
        fails over to the CDN again.
        """
        if (fetch := self._fetches.get(etag)) is not None:
            fetch.poisoned = True
        await self._discard(etag)

    async def _discard(self, etag: str) -> None:
        try:
            await _remove(self.path(etag))
        except OSError as exc:
            logger.warning("cannot remove cache entry %s: %s", etag, exc.strerror or exc)

    async def open(
        self, etag: str, size: int, fetch: FetchFunction, start: int = 0
    ) -> BigPartReader:
        """Return a reader of the big part ``etag`` of ``size`` bytes, to be read from ``start``.

        Served from the cache when present; otherwise from a shared download that fills it,
        or straight from the CDN when the cache cannot help (a read far into an entry that is
        not being downloaded, or a cache directory that cannot be written).
        """
        if (reader := await self._open_entry(etag, size, fetch)) is not None:
            self._metrics.cache_hits.inc()
            return reader
        existing = self._fetches.get(etag)
        if (
            existing is not None
            and not existing.poisoned
            and existing.size == size
            and start <= existing.received + _AHEAD
        ):
            # Neither a hit nor a miss of the disk cache: the download was counted as a miss.
            return existing.attach()
        self._metrics.cache_misses.inc()
        if existing is not None or start > _AHEAD:
            return _StreamReader(fetch, size)
        try:
            started = self._start(etag, size, fetch)
        except OSError as exc:
            logger.warning("cannot write to the cache (%s); streaming from the CDN", exc.strerror)
            return _StreamReader(fetch, size)
        return started.attach()

    async def _open_entry(self, etag: str, size: int, fetch: FetchFunction) -> BigPartReader | None:
        """A reader of the published entry, or None if there is no usable one."""
        try:
            fd = os.open(self.path(etag), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cannot read cache entry %s: %s", etag, exc.strerror)
            return None
        try:
            actual = os.fstat(fd).st_size
        except OSError as exc:
            actual = None
            logger.warning("cannot stat cache entry %s: %s", etag, exc.strerror)
        if actual == size:
            return _FileReader(self, etag, fetch, size, fd)
        os.close(fd)
        if actual is not None:
            logger.warning("cache entry %s has the wrong size; removing it", etag)
        # Only the file: a download of the same etag in progress is not to blame.
        await self._discard(etag)
        return None

    def _start(self, etag: str, size: int, fetch: FetchFunction) -> _Fetch:
        if self._task_group is None:
            msg = "the cache is not running: enter it with `async with` first"
            raise RuntimeError(msg)
        final = self.path(etag)
        temp = final.with_name(f".{final.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        entry = _Fetch(self, etag, size, fetch, fd, temp, final)
        self._fetches[etag] = entry
        # The download belongs to the cache, not to the request that started it.
        self._task_group.start_soon(entry.run, name=f"fetch {etag}")
        return entry

    def _forget(self, entry: _Fetch) -> None:
        if self._fetches.get(entry.etag) is entry:
            del self._fetches[entry.etag]

    async def __aenter__(self) -> Self:
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        """Cancel the downloads in progress and wait for them to clean up."""
        task_group, self._task_group = self._task_group, None
        assert task_group is not None
        for entry in list(self._fetches.values()):
            entry.cancel()
        return await task_group.__aexit__(exc_type, exc, traceback)


class _CacheWriteError(StorageError):
    """The temp file could not be written; readers switch to the CDN."""


class _Fetch:
    """One shared download of a big part into a temp file, published when complete."""

    def __init__(  # noqa: PLR0913, PLR0917 - one download's worth of state
        self,
        cache: BigPartCache,
        etag: str,
        size: int,
        fetch: FetchFunction,
        fd: int,
        temp: Path,
        final: Path,
    ) -> None:
        self.cache = cache
        self.etag = etag
        self.size = size
        self.fetch = fetch
        self.fd = fd
        self.temp = temp
        self.final = final
        self.received = 0
        self.written = 0
        # The recent bytes, as contiguous chunks: _offsets[i] is where _chunks[i] starts.
        self._offsets: list[int] = []
        self._chunks: list[bytes] = []
        self._head = 0
        self._kept = 0  # bytes in _chunks[_head:]
        self.error: BaseException | None = None
        self.poisoned = False
        self.readers = 0
        self._changed = anyio.Event()
        self._scope = anyio.CancelScope()

    # -- the download task -------------------------------------------------------

    async def run(self) -> None:
        published = False
        try:
            with self._scope:
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._write_all)
                        await self._receive_all()
                    await anyio.to_thread.run_sync(os.fsync, self.fd)
                    if not self.poisoned:
                        await anyio.to_thread.run_sync(self.temp.replace, self.final)
                        published = True
                        await self._unpublish_if_poisoned()
                except Exception as exc:  # noqa: BLE001 - stored for the readers, who raise it
                    self._fail(_leaf(exc))
        finally:
            self.cache._forget(self)  # noqa: SLF001 - the cache's own helper
            os.close(self.fd)
            if self.error is None and self.received < self.size:
                self.error = UpstreamError("download of the big part was cancelled")
            self._notify()
            if not published:
                with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await _remove(self.temp)

    async def _unpublish_if_poisoned(self) -> None:
        # evict() may have run while the rename was in a thread: its unlink came too early.
        if self.poisoned:
            await _remove(self.final)

    async def _receive_all(self) -> None:
        announced = 0
        async with contextlib.aclosing(self.fetch(0, self.size)) as chunks:
            async for chunk in chunks:
                if self.received + len(chunk) > self.size:
                    msg = "the CDN sent more bytes than the big part has"
                    raise UpstreamError(msg)
                self._offsets.append(self.received)
                self._chunks.append(chunk)
                self._kept += len(chunk)
                self.received += len(chunk)
                if self.received - announced >= _ANNOUNCE:
                    announced = self.received
                    self._notify()
                while self.received - self.written > _MAX_LAG:
                    await self._wait()
        self._notify()
        if self.received != self.size:
            msg = f"the CDN sent {self.received} of {self.size} bytes"
            raise UpstreamError(msg)

    async def _write_all(self) -> None:
        while self.written < self.size:
            if self.written == self.received:
                await self._wait()
                continue
            index = bisect.bisect_right(self._offsets, self.written, lo=self._head) - 1
            skip = self.written - self._offsets[index]
            batch: list[memoryview] = []
            total = 0
            while index < len(self._chunks) and total < _WRITE_BATCH:
                piece = memoryview(self._chunks[index])[skip:]
                batch.append(piece)
                total += len(piece)
                skip = 0
                index += 1
            try:
                n = await anyio.to_thread.run_sync(_pwritev, self.fd, batch, self.written)
            except OSError as exc:
                msg = f"cannot write the cache: {exc.strerror}"
                raise _CacheWriteError(msg) from exc
            self.written += n
            self._trim()
            self._notify()

    def _trim(self) -> None:
        # Keep recent bytes for readers just behind; drop only what is on disk.
        while self._head < len(self._chunks) and self._kept > _KEEP:
            end = self._offsets[self._head] + len(self._chunks[self._head])
            if end > self.written:
                break
            self._kept -= len(self._chunks[self._head])
            self._chunks[self._head] = b""  # free it now, the list is compacted later
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._chunks):
            del self._offsets[: self._head], self._chunks[: self._head]
            self._head = 0

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not isinstance(exc, _CacheWriteError | UpstreamError):
            logger.warning("download of big part %s failed: %r", self.etag, exc)
        self._notify()

    def cancel(self) -> None:
        self.cache._forget(self)  # noqa: SLF001 - the cache's own helper
        self._scope.cancel()

    # -- readers -------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()

    def attach(self) -> BigPartReader:
        self.readers += 1
        return _FetchReader(self, os.dup(self.fd))

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0 and self.received < self.size:
            # Nobody wants the rest: stop, and let the task remove the temp file.
            self.cancel()

    def copy_from_memory(self, view: memoryview, position: int) -> int:
        """Copy bytes at ``position`` from memory into ``view``; return how many (0 if none)."""
        if not self._offsets or position >= self.received:
            return 0
        if self._head >= len(self._offsets) or position < self._offsets[self._head]:
            return 0
        index = bisect.bisect_right(self._offsets, position, lo=self._head) - 1
        done = 0
        while done < len(view) and index < len(self._chunks):
            chunk = self._chunks[index]
            skip = position + done - self._offsets[index]
            n = min(len(chunk) - skip, len(view) - done)
            view[done : done + n] = chunk[skip : skip + n]
            done += n
            index += 1
        return done


class _FileReader:
    """Reads of a published entry with positional reads off the loop; the CDN if it breaks."""

    def __init__(
        self, cache: BigPartCache, etag: str, fetch: FetchFunction, size: int, fd: int
    ) -> None:
        self.source = "cache"
        self._cache = cache
        self._etag = etag
        self._fetch = fetch
        self._size = size
        self._fd: int | None = fd
        self._fallback: _StreamReader | None = None

    async def readinto(self, view: memoryview, offset: int) -> None:
        if self._fallback is None:
            assert self._fd is not None
            try:
                await read_exactly_at(self._fd, view, offset)
            except OSError as exc:
                # A bad disk: the entry cannot be trusted to be read again; the CDN can.
                logger.warning(
                    "cannot read cache entry %s (%s); evicting it, streaming from the CDN",
                    self._etag,
                    exc.strerror or exc,
                )
                self._close_file()
                await self._cache.evict(self._etag)
                self._fallback = _StreamReader(self._fetch, self._size)
                self.source = "cdn"
            else:
                return
        await self._fallback.readinto(view, offset)

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def aclose(self) -> None:
        self._close_file()
        if self._fallback is not None:
            await self._fallback.aclose()


class _FetchReader:
    """Reads of an entry being downloaded: from memory, the temp file, or waiting."""

    def __init__(self, fetch: _Fetch, fd: int) -> None:
        self.source = "download"
        self._fetch: _Fetch | None = fetch
        self._fd: int | None = fd
        self._fallback: _StreamReader | None = None

    async def readinto(self, view: memoryview, offset: int) -> None:
        if self._fallback is not None:
            await self._fallback.readinto(view, offset)
            return
        fetch, fd = self._fetch, self._fd
        assert fetch is not None
        assert fd is not None
        done = 0
        while done < len(view):
            position = offset + done
            if n := fetch.copy_from_memory(view[done:], position):
                done += n
            elif position < fetch.written:
                n = min(len(view) - done, fetch.written - position)
                try:
                    await read_exactly_at(fd, view[done : done + n], position)
                except OSError as exc:
                    reason = f"cannot read the cache: {exc.strerror or exc}"
                    await self._fall_back(reason, view[done:], position)
                    return
                done += n
            elif isinstance(fetch.error, _CacheWriteError):
                await self._fall_back(str(fetch.error), view[done:], position)
                return
            elif fetch.error is not None:
                msg = f"download of the big part failed: {fetch.error}"
                raise UpstreamError(msg) from fetch.error
            else:
                await fetch._wait()  # noqa: SLF001 - the reader is part of the download

    async def _fall_back(self, reason: str, view: memoryview, offset: int) -> None:
        fetch = self._fetch
        assert fetch is not None
        logger.warning("%s; streaming big part %s from the CDN", reason, fetch.etag)
        self._fallback = _StreamReader(fetch.fetch, fetch.size)
        self.source = "cdn"
        await self.aclose_fetch()
        await self._fallback.readinto(view, offset)

    async def aclose_fetch(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._fetch is not None:
            fetch, self._fetch = self._fetch, None
            fetch.detach()

    async def aclose(self) -> None:
        await self.aclose_fetch()
        if self._fallback is not None:
            await self._fallback.aclose()


class _StreamReader:
    """Sequential reads straight from the CDN (no caching); reopens on a jump."""

    source = "cdn"

    def __init__(self, fetch: FetchFunction, size: int) -> None:
        self._fetch = fetch
        self._size = size
        self._stream: AsyncGenerator[bytes, None] | None = None
        self._position = 0
        self._rest = memoryview(b"")

    async def readinto(self, view: memoryview, offset: int) -> None:
        if self._stream is None or offset != self._position:
            await self.aclose()
            self._stream = self._fetch(offset, self._size)
            self._position = offset
        done = 0
        while done < len(view):
            if not self._rest:
                try:
                    self._rest = memoryview(await anext(self._stream))
                except StopAsyncIteration:
                    msg = "the CDN stream ended early"
                    raise UpstreamError(msg) from None
            n = min(len(self._rest), len(view) - done)
            view[done : done + n] = self._rest[:n]
            self._rest = self._rest[n:]
            done += n
        self._position += done

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._rest = memoryview(b"")
        if stream is not None:
            await stream.aclose()


def _pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
    return os.pwritev(fd, buffers, offset)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _remove(path: Path) -> None:
    # Off the loop: unlinking a multi-GB file frees its blocks, which can take a while.
    await anyio.to_thread.run_sync(_unlink, path)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
