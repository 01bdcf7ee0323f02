"""The cache directory's files: entries, their metadata, in-use locks and eviction.

Each entry is the big part of one resource version, named after its etag; an extended
attribute on the file names the resource (``folder``, ``filename``) and says when it was
cached, so the names travel with the bytes through the rename that publishes them. Readers hold
a shared ``flock`` on the entry while they read it; removing an entry takes an exclusive one
without waiting, so an entry in use is never removed — by the sidecar or by ``unlockd cache
prune`` running beside it on the same directory. Everything here blocks: the sidecar calls it
from a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlockd.errors import InvalidInputError
from unlockd.files import TEMP_SUFFIX

if TYPE_CHECKING:
    import argparse

__all__ = ["CacheDirectory", "CacheEntry", "cache_command", "hold_shared"]

logger = logging.getLogger(__name__)

_SAFE_ETAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_XATTR = "user.unlockd.resource"


@dataclasses.dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached (or still downloading) big part, as ``GET /cache`` lists it."""

    folder: str
    filename: str
    etag: str
    size: int
    last_used: float  # seconds since the epoch
    complete: bool
    cached_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON, ``last_used`` in ISO 8601 (UTC)."""
        used = dt.datetime.fromtimestamp(self.last_used, dt.UTC).isoformat(timespec="seconds")
        return {
            "folder": self.folder,
            "filename": self.filename,
            "etag": self.etag,
            "size": self.size,
            "last_used": used,
            "complete": self.complete,
        }


class CacheDirectory:
    """The files of one cache directory (blocking calls)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def entry_path(self, etag: str) -> Path:
        """The file of the published entry for ``etag`` (which may not exist)."""
        if _SAFE_ETAG.fullmatch(etag):
            return self.directory / etag
        return self.directory / hashlib.sha256(etag.encode()).hexdigest()

    @staticmethod
    def write_meta(
        file: int | Path, etag: str, folder: str, filename: str, *, cached: bool
    ) -> None:
        """Record on ``file`` (a path or fd) which resource it is; ``cached`` once complete.

        Best effort: on a filesystem without extended attributes the entry still serves, but
        is listed without its name and never counts as superseded.
        """
        meta: dict[str, Any] = {"folder": folder, "filename": filename, "etag": etag}
        if cached:
            meta["cached_at"] = time.time()
        try:
            os.setxattr(file, _XATTR, json.dumps(meta).encode())
        except OSError as exc:
            logger.warning("cannot record the name of cache entry %s: %s", etag, exc.strerror)

    def touch(self, etag: str) -> None:
        """Mark the entry as used now (its mtime is its last use)."""
        with contextlib.suppress(OSError):
            os.utime(self.entry_path(etag))

    def entries(self) -> list[CacheEntry]:
        """Every entry: complete ones, and downloads in progress (their temp files)."""
        found = []
        for path in self.directory.iterdir():
            complete = not path.name.startswith(".")
            if not complete and not path.name.endswith(TEMP_SUFFIX):
                continue
            try:
                info = path.stat()
                meta = _read_meta(path)
            except OSError:
                continue  # gone meanwhile
            if meta is None:
                if not complete:
                    continue  # a probe, or a download that has not named itself yet
                meta = {"folder": "", "filename": "", "etag": path.name}
            found.append(
                CacheEntry(
                    meta["folder"], meta["filename"], meta["etag"], info.st_size,
                    info.st_mtime, complete=complete, cached_at=meta.get("cached_at"),
                )
            )  # fmt: skip
        return sorted(found, key=lambda e: (e.folder, e.filename, e.last_used))

    def remove(self, etag: str) -> bool:
        """Remove the entry of ``etag`` unless a reader holds it; tell whether it is gone."""
        path = self.entry_path(etag)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use
            with contextlib.suppress(FileNotFoundError):
                # Only the file that was locked: not a new one published under the same name.
                if path.stat().st_ino == os.fstat(fd).st_ino:
                    path.unlink()
            return True
        finally:
            os.close(fd)

    def remove_superseded(self, folder: str, filename: str, current: str) -> list[CacheEntry]:
        """Remove the other cached versions of ``folder/filename`` than ``current``, if unused."""
        if not folder:
            return []  # an entry without a name is never "the same resource" as another
        return [
            entry
            for entry in self.entries()
            if entry.complete
            and (entry.folder, entry.filename) == (folder, filename)
            and entry.etag != current
            and self.remove(entry.etag)
        ]

    def sweep(
        self,
        *,
        max_bytes: int | None = None,
        min_free: int = 0,
        keep: frozenset[str] = frozenset(),
        reserve: int = 0,
    ) -> list[CacheEntry] | None:
        """Remove least recently used entries until within limits, with ``reserve`` bytes spare.

        Oldest use first, entries go until the total (``reserve`` included) is at most
        ``max_bytes`` and the filesystem has ``min_free`` + ``reserve`` bytes free. Entries in
        use, and the etags in ``keep`` (downloads in progress), stay. Returns what was removed,
        or None, removing nothing, when even removing every entry could not make room.
        """
        entries = [e for e in self.entries() if e.complete and e.etag not in keep]
        total = sum(e.size for e in entries) + reserve
        free = self.free_bytes()
        evictable = sum(e.size for e in entries)
        if (max_bytes is not None and reserve > max_bytes) or (
            free + evictable < min_free + reserve
        ):
            return None
        removed = []
        for entry in sorted(entries, key=lambda e: e.last_used):
            if (max_bytes is None or total <= max_bytes) and free >= min_free + reserve:
                break
            if self.remove(entry.etag):
                removed.append(entry)
                total -= entry.size
                free = self.free_bytes()
        return removed

    def free_bytes(self) -> int:
        """Bytes available to this process on the cache's filesystem."""
        stat = os.statvfs(self.directory)
        return stat.f_bavail * stat.f_frsize

    def total_bytes(self) -> int:
        """Size of the cache's filesystem."""
        stat = os.statvfs(self.directory)
        return stat.f_blocks * stat.f_frsize


def hold_shared(fd: int) -> bool:
    """Mark an open entry as in use until ``fd`` is closed; False if it is being removed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(os.getxattr(path, _XATTR))
    except OSError as exc:
        if exc.errno in {errno.ENODATA, errno.ENOTSUP}:
            return None
        raise
    except ValueError:
        return None
    fields = ("folder", "filename", "etag")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in fields):
        return None
    return meta


def cache_command(args: argparse.Namespace) -> int:
    """``unlockd cache list|prune --cache-dir DIR [--max-bytes N]``: the cache, offline.

    Safe while a sidecar serves from the same directory: entries being read stay.
    """
    directory = Path(args.cache_dir).expanduser()
    if getattr(args, "max_bytes", None) is not None and args.max_bytes < 0:
        msg = f"--max-bytes: expected a byte count >= 0, got {args.max_bytes}"
        raise InvalidInputError(msg)
    if not directory.is_dir():
        msg = f"no cache directory at {directory}"
        raise InvalidInputError(msg)
    cache, out = CacheDirectory(directory), sys.stdout
    if args.cache_command == "list":
        entries = cache.entries()
        for entry in entries:
            state = "" if entry.complete else "  (downloading)"
            used = entry.to_json()["last_used"]
            out.write(
                f"{entry.folder}/{entry.filename}  {entry.size}  {used}  {entry.etag}{state}\n"
            )
        total = sum(e.size for e in entries)
        out.write(f"{len(entries)} entries, {total} bytes, {cache.free_bytes()} bytes free\n")
        return 0
    in_progress = frozenset(e.etag for e in cache.entries() if not e.complete)
    names = {(e.folder, e.filename) for e in cache.entries() if e.complete and e.folder}
    removed = []
    for folder, filename in sorted(names):
        versions = [
            e
            for e in cache.entries()
            if e.complete and (e.folder, e.filename) == (folder, filename)
        ]
        newest = max(versions, key=lambda e: e.cached_at or 0)
        removed += cache.remove_superseded(folder, filename, newest.etag)
    removed += cache.sweep(max_bytes=args.max_bytes, keep=in_progress) or []
    for entry in removed:
        out.write(f"removed {entry.folder}/{entry.filename}  {entry.size}  {entry.etag}\n")
    out.write(f"{len(removed)} entries removed, {sum(e.size for e in removed)} bytes freed\n")
    return 0
