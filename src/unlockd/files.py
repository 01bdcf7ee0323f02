"""Files: atomic publication, and positional reads that stay on the event loop.

A file appears at its name complete, or not at all.
Writes go to a temp file on the same filesystem (beside the target unless told otherwise);
publishing flushes and fsyncs it, renames it over the target and fsyncs the directory, so a
crash leaves the old file or the new one, never a torn one. Any failure removes the temp file::

    with AtomicFile(path) as temp:               # or: async with AtomicFile(path) as temp
        temp.file.write(data)
    # published here; an exception in the block would have discarded it

Errors are the ``OSError`` of the failing call: each caller knows what to call it.

A read of a cached model is a memcpy from the page cache: handing it to a worker thread costs
more than the copy (two thread switches per MiB halved warm-load throughput). ``RWF_NOWAIT``
makes ``preadv`` fail with ``EAGAIN`` instead of waiting for the disk, so :func:`read_at` and
:func:`read_exactly_at` read inline and only a read that would block goes to a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from functools import cached_property
from typing import IO, TYPE_CHECKING, Self

import anyio
import anyio.to_thread

from unlockd.errors import TruncatedCiphertextError

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

__all__ = ["TEMP_SUFFIX", "AtomicFile", "read_at", "read_exactly_at", "sync_directory"]

TEMP_SUFFIX = ".tmp"


def sync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) durable; blocking."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A temp file that becomes ``target`` on :meth:`publish` or vanishes on :meth:`discard`.

    It is created by :meth:`open` (or on entering ``with``/``async with``) with ``mode``,
    0600 unless asked (the umask applies), in ``temp_dir`` or beside ``target``. Writers use
    :attr:`file` or :attr:`fd`. As a context manager it publishes when the block succeeds
    (unless already published) and discards on any exception; ``async with`` does the
    blocking steps in a worker thread, and the clean-up shielded from cancellation.
    ``sync_dir=False`` skips the directory fsync, for callers that recover a lost rename
    on their own.
    """

    def __init__(
        self,
        target: Path,
        *,
        mode: int = 0o600,
        temp_dir: Path | None = None,
        sync_dir: bool = True,
    ) -> None:
        self.target = target
        self.path = (temp_dir or target.parent) / (
            f".{target.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        )
        self.published = False
        self._mode = mode
        self._sync_dir = sync_dir
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        """The temp file's descriptor, open for reading and writing."""
        if self._fd is None:
            msg = f"{self.path} is not open"
            raise ValueError(msg)
        return self._fd

    @cached_property
    def file(self) -> IO[bytes]:
        """A buffered binary writer on :attr:`fd`, flushed by :meth:`publish`."""
        return open(self.fd, "wb", closefd=False)

    def open(self) -> Self:
        """Create the temp file (never over an existing one); blocking."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, self._mode)
        return self

    def publish(self) -> None:
        """Flush, fsync and rename the temp file over ``target``; blocking, once."""
        if self.published:
            return
        if "file" in self.__dict__:
            self.file.flush()
        os.fsync(self.fd)
        self._close()
        self.path.replace(self.target)
        self.published = True
        if self._sync_dir:
            sync_directory(self.target.parent)

    def discard(self) -> None:
        """Close and remove the temp file; blocking, a no-op once published."""
        self._close()
        if not self.published:
            self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if "file" in self.__dict__:
                # Unflushed bytes of a discarded file do not matter; its close must not raise.
                with contextlib.suppress(OSError):
                    self.__dict__.pop("file").close()
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self.publish()
        finally:
            self.discard()

    async def __aenter__(self) -> Self:
        return await anyio.to_thread.run_sync(self.open)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                await anyio.to_thread.run_sync(self.publish)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.discard)


# Not every platform or filesystem has it; without it every read goes to a thread.
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
_NOWAIT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL})


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


async def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` on; return how many bytes, fewer only at end of file."""
    global _NOWAIT  # noqa: PLW0603 - learnt once per process: the flag is not supported
    done, size = 0, len(view)
    while done < size:
        rest = view[done:]
        n = -1
        if _NOWAIT is not None:
            try:
                n = os.preadv(fd, [rest], offset + done, _NOWAIT)
            except BlockingIOError:
                pass  # not in the page cache: the disk is needed
            except OSError as exc:
                if exc.errno not in _NOWAIT_UNSUPPORTED:
                    raise
                _NOWAIT = None
        if n < 0:
            n = await anyio.to_thread.run_sync(_preadv, fd, rest, offset + done)
        if n == 0:
            break
        done += n
    return done


async def read_exactly_at(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes of ``fd`` at ``offset``; raise if the file ends first.

    Raises :class:`OSError` for a failed read and :class:`TruncatedCiphertextError` when the
    file is shorter than ``offset + len(view)``.
    """
    if await _read_into(fd, view, offset) < len(view):
        msg = f"file ends before byte {offset + len(view)}"
        raise TruncatedCiphertextError(msg)


async def read_at(fd: int, count: int, offset: int) -> bytearray:
    """Return a new buffer of ``count`` bytes of ``fd`` at ``offset`` (fewer at end of file).

    A fresh buffer per call, for senders that may still hold on to the previous one.
    """
    buffer = bytearray(count)
    with memoryview(buffer) as view:
        done = await _read_into(fd, view, offset)
    del buffer[done:]
    return buffer
