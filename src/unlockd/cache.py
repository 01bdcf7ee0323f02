"""The big-part cache: ciphertext big parts on disk, keyed by upstream etag.

An entry is a file named after its etag, published by rename only once it is complete and
of the expected size, so a reader never sees half an entry and a new version (new etag)
never mixes with an old one. A miss starts one shared download per etag (a :class:`_Fetch`):
parts of the big part fetched over several connections at once and written at their offsets
into a temp file, from which readers take their bytes as soon as they are written. Every
reader of the entry, whatever range it wants, joins that one download, so parallel range
downloaders and resumes warm the cache too.

The download belongs to the cache, not to a request: it runs in the cache's task group,
entered in the app's lifespan (``async with BigPartCache(...) as cache``), and goes on when
its readers leave, to complete the entry; shutdown cancels it and removes its temp file.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Protocol, Self

import anyio
import anyio.to_thread

from unlockd.cachedir import CacheDirectory, CacheEntry, hold_shared
from unlockd.errors import ConflictError, StorageError, UpstreamError
from unlockd.files import TEMP_SUFFIX, AtomicFile, read_exactly_at

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from anyio.abc import TaskGroup

    from unlockd.metrics import Metrics

__all__ = [
    "DEFAULT_CONNECTIONS",
    "DEFAULT_PART_SIZE",
    "BigPartCache",
    "BigPartReader",
    "FetchFunction",
]

logger = logging.getLogger(__name__)

# Opens a CDN stream of big-part bytes [start, end).
FetchFunction = Callable[[int, int], AsyncGenerator[bytes, None]]

# A part's bytes go to the file (through a worker thread) in batches of this size, which is
# also the granularity at which its readers wake up; memory is about connections x batch.
_WRITE_BATCH = 1 << 20
DEFAULT_CONNECTIONS = 8
DEFAULT_PART_SIZE = 8 << 20


class BigPartReader(Protocol):
    """Random-access reads of one big part, whatever it comes from."""

    source: str  # "cache", "download" or "cdn" (where the bytes come from now), for logs

    async def ready(self, offset: int, length: int) -> None:
        """Wait until ``length`` bytes at ``offset`` can be read without waiting (or failing)."""

    async def readinto(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the big-part bytes at ``offset``."""

    async def aclose(self) -> None:
        """Release the file or stream; safe to call twice."""


class BigPartCache:
    """A directory of ciphertext big parts with shared, cancellable downloads."""

    def __init__(  # noqa: PLR0913 - the directory and its limits, keyword-only
        self,
        directory: Path,
        metrics: Metrics,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        part_size: int = DEFAULT_PART_SIZE,
        max_bytes: int | None = None,
        min_free: int = 0,
    ) -> None:
        self.directory = directory
        self.files = CacheDirectory(directory)
        self.connections = connections
        self.part_size = part_size
        self.max_bytes = max_bytes
        self.min_free = min_free
        self._metrics = metrics
        self._task_group: TaskGroup | None = None
        self._fetches: dict[str, _Fetch] = {}
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in directory.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def path(self, etag: str) -> Path:
        """The file of the published entry for ``etag`` (which may not exist)."""
        return self.files.entry_path(etag)

    async def entries(self) -> list[CacheEntry]:
        """The entries, complete or downloading, with their resources' names."""
        return await anyio.to_thread.run_sync(self.files.entries)

    async def drop(self, folder: str, filename: str) -> int:
        """Remove the cached versions of ``folder/filename``; return how many.

        Raises ConflictError when one is being read or downloaded: it stays.
        """
        entries = [e for e in await self.entries() if (e.folder, e.filename) == (folder, filename)]
        busy = f"{folder}/{filename} is being read or downloaded; try again later"
        if any(e.etag in self._fetches for e in entries):
            raise ConflictError(busy)
        for entry in entries:
            if not await anyio.to_thread.run_sync(self.files.remove, entry.etag):
                raise ConflictError(busy)
        return len(entries)

    async def sweep(self, reserve: int = 0) -> bool:
        """Remove the least recently used entries to stay within the limits; tell if it fits.

        ``reserve`` bytes are made room for on top (a download about to start, and the rest of
        those in progress). False, with nothing removed, when the limits cannot make room for
        them even with the cache empty. A disk that cannot be read is logged, and counts as
        room: the download's own writes will tell.
        """
        try:
            removed = await anyio.to_thread.run_sync(
                functools.partial(
                    self.files.sweep,
                    max_bytes=self.max_bytes,
                    min_free=self.min_free,
                    keep=frozenset(self._fetches),
                    reserve=reserve,
                )
            )
        except OSError as exc:
            logger.warning("cannot apply the cache limits: %s", exc.strerror or exc)
            return True
        if removed is None:
            return False
        _log_removed(removed)
        return True

    async def _remove_superseded(self, etag: str, name: tuple[str, str]) -> None:
        """Remove the other versions of ``name`` now that ``etag`` is cached (if not in use)."""
        try:
            removed = await anyio.to_thread.run_sync(self.files.remove_superseded, *name, etag)
        except OSError as exc:
            logger.warning("cannot remove superseded cache entries: %s", exc.strerror or exc)
            return
        _log_removed(removed)

    def writable(self) -> bool:
        """Tell whether an entry could be written now (for readiness checks)."""
        probe = self.directory / f".probe-{secrets.token_hex(8)}{TEMP_SUFFIX}"
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
            fetch.poison()
        await self._discard(etag)

    async def _discard(self, etag: str) -> None:
        try:
            await _remove(self.path(etag))
        except OSError as exc:
            logger.warning("cannot remove cache entry %s: %s", etag, exc.strerror or exc)

    async def open(
        self,
        etag: str,
        size: int,
        fetch: FetchFunction,
        start: int = 0,
        *,
        name: tuple[str, str] = ("", ""),
    ) -> BigPartReader:
        """Return a reader of the big part ``etag`` of ``size`` bytes, to be read from ``start``.

        ``name`` is the resource's ``(folder, filename)``, recorded with a new entry.

        Served from the cache when present; otherwise from the shared download that fills it
        (started if needed; the part holding ``start`` is fetched first), or straight from the
        CDN when the cache cannot help (a cache directory that cannot be written).
        """
        if (reader := await self._open_entry(etag, size, fetch)) is not None:
            self._metrics.cache_hits.inc()
            return reader
        existing = self._fetches.get(etag)
        if existing is not None and not existing.poisoned and existing.size == size:
            # Neither a hit nor a miss of the disk cache: the download was counted as a miss.
            existing.prioritize(start)
            return existing.attach()
        self._metrics.cache_misses.inc()
        if existing is not None:
            return _StreamReader(fetch, size)  # a poisoned download: leave it to end alone
        try:
            started = self._start(etag, size, fetch, name)
        except OSError as exc:
            logger.warning("cannot write to the cache (%s); streaming from the CDN", exc.strerror)
            return _StreamReader(fetch, size)
        started.prioritize(start)
        return started.attach()

    async def _open_entry(self, etag: str, size: int, fetch: FetchFunction) -> BigPartReader | None:
        """A reader of the published entry, or None if there is no usable one."""
        fd, actual = await anyio.to_thread.run_sync(self._open_file, etag, size)
        if fd is not None:
            return _FileReader(self, etag, fetch, size, fd)
        if actual is not None and actual != size:
            logger.warning("cache entry %s has the wrong size; removing it", etag)
            # Only the file: a download of the same etag in progress is not to blame.
            await self._discard(etag)
        return None

    def _open_file(self, etag: str, size: int) -> tuple[int | None, int | None]:
        """Open, check and lock the entry (blocking); ``(fd or None, its size or None)``."""
        try:
            fd = os.open(self.path(etag), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            logger.warning("cannot read cache entry %s: %s", etag, exc.strerror)
            return None, None
        try:
            actual = os.fstat(fd).st_size
        except OSError as exc:
            logger.warning("cannot stat cache entry %s: %s", etag, exc.strerror)
            os.close(fd)
            return None, None
        # Locked while read (until closed): eviction and `unlockd cache prune` pass it by.
        if actual == size and hold_shared(fd):
            self.files.touch(etag)
            return fd, actual
        os.close(fd)  # the wrong size, or being removed right now: a miss
        return None, actual

    def _start(self, etag: str, size: int, fetch: FetchFunction, name: tuple[str, str]) -> _Fetch:
        if self._task_group is None:
            msg = "the cache is not running: enter it with `async with` first"
            raise RuntimeError(msg)
        temp = AtomicFile(self.path(etag), sync_dir=False)
        temp.open()
        entry = _Fetch(self, etag, size, fetch, temp=temp, name=name)
        self._fetches[etag] = entry
        # The download belongs to the cache, not to the request that started it.
        self._task_group.start_soon(entry.run, name=f"fetch {etag}")
        return entry

    def reserved(self) -> int:
        """Bytes the downloads in progress still have to write."""
        return sum(fetch.remaining() for fetch in self._fetches.values())

    async def wait_cached(self, etag: str) -> bool:
        """Wait for the download of ``etag`` (if any) to end; tell whether the entry is cached."""
        if (fetch := self._fetches.get(etag)) is not None:
            await fetch.ended.wait()
        return await anyio.to_thread.run_sync(self.path(etag).exists)

    def _forget(self, entry: _Fetch) -> None:
        if self._fetches.get(entry.etag) is entry:
            del self._fetches[entry.etag]

    async def __aenter__(self) -> Self:
        await self.sweep()  # limits may have changed since the last run
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
    """One shared download of a big part, in parts, into a temp file published when complete.

    The big part is cut into parts of ``part_size`` bytes, fetched by up to ``connections``
    concurrent range requests and written at their offsets. Parts go in order, except that a
    reader waiting for bytes moves their part to the front: an in-order reader gets the prefix
    first, a range reader (a resume, one of aria2's eight connections) gets its own part next
    rather than after everything before it. In-order scheduling with that one exception was
    measured against per-reader windows and tail stealing on the WAN emulator (bench/wan.py):
    with parts much smaller than the file, the slowest part holds back nothing but its own
    bytes, and a stalled connection is dropped by the CDN client's stall timeout.
    """

    def __init__(  # noqa: PLR0913 - one download's worth of state, keyword-only
        self,
        cache: BigPartCache,
        etag: str,
        size: int,
        fetch: FetchFunction,
        *,
        temp: AtomicFile,
        name: tuple[str, str],
    ) -> None:
        self.cache = cache
        self.name = name
        self.etag = etag
        self.size = size
        self.fetch = fetch
        self.temp = temp
        # Our own descriptor of the temp file, open as long as the download is known: readers
        # dup it (publish closes temp.fd), and its shared lock keeps the entry from eviction
        # while any of them reads, before and after it is published.
        self.fd = os.dup(temp.fd)
        hold_shared(self.fd)
        part_size = cache.part_size
        self._part_size = part_size
        count = max(1, -(-size // part_size))
        self._pending = collections.deque(range(count))
        # Bytes written so far in each part, from its start: part i is done at its length.
        self._written = [0] * count
        self.error: BaseException | None = None
        self.poisoned = False
        self.ended = anyio.Event()  # set once the download is over, published or not
        self.readers = 0
        self._changed = anyio.Event()
        self._scope = anyio.CancelScope()

    # -- the download task -------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                try:
                    await self._download()
                except Exception as exc:  # noqa: BLE001 - stored for the readers, who raise it
                    self._fail(_leaf(exc))
        finally:
            self.cache._forget(self)  # noqa: SLF001 - the cache's own helper
            # The rename may have happened even if a cancellation came right after it.
            published = self.temp.published
            if self.error is None and not published:
                self.error = UpstreamError("download of the big part was cancelled")
            self._notify()
            with anyio.CancelScope(shield=True):
                try:
                    if not published:
                        await anyio.to_thread.run_sync(self.temp.discard)
                    elif self.poisoned:
                        # evict() came while the rename ran: the entry is not to be used.
                        await _remove(self.temp.target)
                    else:
                        # A superseded version goes once the new one is complete; then limits.
                        await self.cache._remove_superseded(self.etag, self.name)  # noqa: SLF001
                        await self.cache.sweep()
                finally:
                    os.close(self.fd)  # readers keep their own duplicates (and the lock)
                    self.ended.set()

    async def _download(self) -> None:
        files, (folder, filename) = self.cache.files, self.name
        await anyio.to_thread.run_sync(
            functools.partial(files.write_meta, self.fd, self.etag, folder, filename, cached=False)
        )
        await self._make_room()
        if self.size:
            async with anyio.create_task_group() as tg:
                for _ in range(min(self.cache.connections, len(self._written))):
                    tg.start_soon(self._worker)
        if self.poisoned:
            msg = "the big part failed authentication; not cached"
            raise UpstreamError(msg)
        await anyio.to_thread.run_sync(self.temp.publish)
        await anyio.to_thread.run_sync(
            functools.partial(files.write_meta, self.fd, self.etag, folder, filename, cached=True)
        )

    async def _make_room(self) -> None:
        if not await self.cache.sweep(reserve=self.cache.reserved()):
            msg = f"no room in the cache for {self.size} bytes within its limits"
            raise _CacheWriteError(msg)

    async def _worker(self) -> None:
        while self._pending:
            await self._fetch_part(self._pending.popleft())

    async def _fetch_part(self, index: int) -> None:
        start = index * self._part_size
        end = min(start + self._part_size, self.size)
        position = start + self._written[index]
        batch: list[bytes] = []
        batched = 0
        async with contextlib.aclosing(self.fetch(position, end)) as chunks:
            async for chunk in chunks:
                if position + batched + len(chunk) > end:
                    msg = "the CDN sent more bytes than the part has"
                    raise UpstreamError(msg)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    position = await self._write(index, batch, position)
                    batch, batched = [], 0
        position = await self._write(index, batch, position)
        if position != end:
            msg = f"the CDN sent {position - start} of {end - start} bytes of part {index}"
            raise UpstreamError(msg)

    async def _write(self, index: int, batch: list[bytes], position: int) -> int:
        if not batch:
            return position
        try:
            n = await anyio.to_thread.run_sync(_pwritev, self.fd, batch, position)
        except OSError as exc:
            msg = f"cannot write the cache: {exc.strerror}"
            raise _CacheWriteError(msg) from exc
        self._written[index] += n
        self._notify()
        return position + n

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not isinstance(exc, _CacheWriteError | UpstreamError):
            logger.warning("download of big part %s failed: %r", self.etag, exc)
        self._notify()

    def cancel(self) -> None:
        self.cache._forget(self)  # noqa: SLF001 - the cache's own helper
        self._scope.cancel()

    def poison(self) -> None:
        """Never publish this download; stop it once nobody reads from it."""
        self.poisoned = True
        if self.readers == 0:
            self.cancel()

    def remaining(self) -> int:
        """Bytes still to be written."""
        return self.size - sum(self._written)

    # -- readers -------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def prioritize(self, offset: int) -> None:
        """Fetch the part that holds ``offset`` next, if it has not started."""
        index = offset // self._part_size
        if index in self._pending and self._pending[0] != index:
            self._pending.remove(index)
            self._pending.appendleft(index)

    async def wait(self, offset: int) -> None:
        """Wait for progress; the part that holds ``offset`` is fetched next if not started."""
        self.prioritize(offset)
        await self._changed.wait()

    def available(self, offset: int, length: int) -> int:
        """How many bytes from ``offset`` on (at most ``length``) are written already."""
        done = 0
        while done < length:
            index, skip = divmod(offset + done, self._part_size)
            ready = self._written[index] - skip
            if ready <= 0:
                break
            done += min(ready, length - done)
            if skip + ready < self._part_size:
                break  # this part is still being written
        return done

    def attach(self) -> BigPartReader:
        self.readers += 1
        return _FetchReader(self, os.dup(self.fd))

    def detach(self) -> None:
        # The download goes on without readers: what it fetched warms the cache.
        self.readers -= 1
        if self.readers == 0 and self.poisoned:
            self.cancel()


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

    async def ready(self, offset: int, length: int) -> None:
        pass  # a published entry is all there

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
    """Reads of an entry being downloaded: from the temp file once its bytes are written."""

    def __init__(self, fetch: _Fetch, fd: int) -> None:
        self.source = "download"
        self._fetch: _Fetch | None = fetch
        self._fd: int | None = fd
        self._fallback: _StreamReader | None = None

    async def ready(self, offset: int, length: int) -> None:
        fetch = self._fetch
        while (
            self._fallback is None
            and fetch is not None
            and fetch.error is None
            and fetch.available(offset, length) < length
        ):
            await fetch.wait(offset)

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
            if n := fetch.available(position, len(view) - done):
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
                await fetch.wait(position)

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

    async def ready(self, offset: int, length: int) -> None:
        pass  # a stream is read as it comes

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


def _log_removed(removed: list[CacheEntry]) -> None:
    for entry in removed:
        logger.info(
            "cache: removed %s/%s (etag %s, %d bytes)",
            entry.folder, entry.filename, entry.etag, entry.size,
        )  # fmt: skip


def _pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
    """Write all of ``buffers`` at ``offset``; return how many bytes (all, or it raises)."""
    total = sum(map(len, buffers))
    done = os.pwritev(fd, buffers, offset)
    if done < total:  # rare for a regular file: finish it in one piece
        rest = memoryview(b"".join(buffers))
        while done < total:
            done += os.pwrite(fd, rest[done:], offset + done)
    return total


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
