"""The hub's storage: an SQLite database for accounts, resources and keys, plus blob files.

Layout of ``data_dir``::

    hub.sqlite3      users, uploads, resources, keys (WAL mode, schema in PRAGMA user_version)
    tmp/             bodies being received; removed on failure and at start
    uploads/{id}     complete upload bodies waiting to be published
    blobs/{etag}     published big parts, one file per version

Files move only by rename inside ``data_dir``, so a blob is either complete or absent.
Publishing renames the upload to its blob and commits the row in one locked step; the
previous version's blob is removed after the commit once no row references it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections import Counter
from functools import partial
from typing import IO, TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from unlockd.errors import ConflictError, NotFoundError, StorageError
from unlockd.files import AtomicFile
from unlockd.hub.auth import Role

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable
    from pathlib import Path

__all__ = ["Resource", "Store", "UploadResult"]

T = TypeVar("T")

_WRITE_SIZE = 1024 * 1024
_ETAG = re.compile(r"[0-9a-f]{32}")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Each entry migrates the schema from version i to i + 1; append, never edit.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        email TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('reader', 'publisher')),
        created_at REAL NOT NULL
    );
    CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        created_by TEXT NOT NULL,
        touched_at REAL NOT NULL,
        size INTEGER,
        sha256 TEXT
    );
    CREATE TABLE resources (
        folder TEXT NOT NULL,
        name TEXT NOT NULL,
        key BLOB NOT NULL,
        small BLOB NOT NULL,
        big_size INTEGER NOT NULL,
        big_sha256 TEXT NOT NULL,
        etag TEXT NOT NULL,
        published_at REAL NOT NULL,
        published_by TEXT NOT NULL,
        PRIMARY KEY (folder, name)
    );
    CREATE INDEX resources_etag ON resources (etag);
    CREATE TABLE keys (
        key_id TEXT PRIMARY KEY,
        key BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    """,
]


@dataclasses.dataclass(frozen=True, slots=True)
class Resource:
    """One published version of a resource."""

    folder: str
    name: str
    key: bytes
    small: bytes
    big_size: int
    etag: str


@dataclasses.dataclass(frozen=True, slots=True)
class UploadResult:
    """What the hub received for an upload body."""

    size: int
    sha256: str


def _write_hashed(file: IO[bytes], digest: Any, data: bytes | bytearray) -> None:
    # hashlib and file writes release the GIL for large buffers: both run off the event loop.
    digest.update(data)
    file.write(data)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _remove(path: Path) -> None:
    # Off the loop: unlinking a multi-GB blob or upload frees its blocks, which takes a while.
    await anyio.to_thread.run_sync(_unlink, path)


async def _rename(source: Path, target: Path) -> None:
    await anyio.to_thread.run_sync(source.replace, target)


class Store:
    """SQLite database plus blob directory; async methods keep blocking work off the loop."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.database = data_dir / "hub.sqlite3"
        self.tmp_dir = data_dir / "tmp"
        self.uploads_dir = data_dir / "uploads"
        self.blobs_dir = data_dir / "blobs"
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        # Orders the file renames of uploads and publishes with their database rows.
        self._lock = anyio.Lock()
        self._writing: Counter[str] = Counter()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories and schema (migrating an older one); blocking."""
        for directory in (self.data_dir, self.tmp_dir, self.uploads_dir, self.blobs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(
                self.database, timeout=30, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            msg = f"cannot open the hub database {self.database}: {exc}"
            raise StorageError(msg) from exc
        self._db = db
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self.close()
            msg = f"cannot open the hub database {self.database}: {exc}"
            raise StorageError(msg) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the database; blocking."""
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _migrate(self) -> None:
        def migrate(db: sqlite3.Connection) -> None:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > len(_MIGRATIONS):
                msg = f"{self.database} has schema {version}, newer than this unlockd knows"
                raise StorageError(msg)
            for number in range(version, len(_MIGRATIONS)):
                for statement in _MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")

        self._transaction(migrate)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._db_lock:
            db = self._db
            if db is None:
                msg = "the hub store is closed"
                raise StorageError(msg)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await anyio.to_thread.run_sync(self._transaction, work)

    # -- accounts --------------------------------------------------------------------------

    def put_user(self, email: str, password_hash: str, role: Role) -> None:
        """Create the account or replace its password and role; blocking."""
        self._transaction(
            lambda db: db.execute(
                "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (email) DO UPDATE"
                " SET password_hash = excluded.password_hash, role = excluded.role",
                (email, password_hash, role.value, time.time()),
            )
        )

    async def get_user(self, email: str) -> tuple[str, Role] | None:
        """Return the password hash and role of ``email``, or None."""
        row = await self._run(
            lambda db: db.execute(
                "SELECT password_hash, role FROM users WHERE email = ?", (email,)
            ).fetchone()
        )
        return None if row is None else (row[0], Role(row[1]))

    # -- resources -------------------------------------------------------------------------

    async def get_resource(self, folder: str, name: str) -> Resource:
        """Return the current version of ``folder/name`` or raise NotFoundError."""
        row = await self._run(
            lambda db: db.execute(
                "SELECT key, small, big_size, etag FROM resources WHERE folder = ? AND name = ?",
                (folder, name),
            ).fetchone()
        )
        if row is None:
            msg = f"resource {folder}/{name} not found"
            raise NotFoundError(msg)
        return Resource(folder, name, bytes(row[0]), bytes(row[1]), row[2], row[3])

    async def publish(  # noqa: PLR0913 - the protocol's fields, keyword-only
        self, folder: str, name: str, upload_id: str, *, key: bytes, small: bytes, by: str
    ) -> str:
        """Make ``upload_id`` the big part of a new version of ``folder/name``; return its etag."""
        etag = secrets.token_hex(16)
        blob = self.blobs_dir / etag
        source = self._upload_path(upload_id)
        # Renames and the commit must not be torn apart by a cancelled request.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                upload = await self._run(partial(self._upload_row, upload_id))
                if upload_id in self._writing:
                    msg = f"upload {upload_id} is still receiving its body"
                    raise ConflictError(msg)
                size, sha256 = upload
                if size is None:  # no body was sent: an empty big part
                    await anyio.to_thread.run_sync(blob.touch)
                    size, sha256 = 0, _EMPTY_SHA256
                else:
                    try:
                        await _rename(source, blob)
                    except FileNotFoundError:
                        msg = f"upload {upload_id} lost its body; upload it again"
                        raise ConflictError(msg) from None
                row = (folder, name, key, small, size, sha256, etag, time.time(), by)
                try:
                    previous = await self._run(partial(self._publish_row, upload_id, row))
                except BaseException:
                    if upload[0] is None:
                        await _remove(blob)
                    else:
                        await _rename(blob, source)
                    raise
                if previous is not None:
                    await self._remove_blob_if_unreferenced(previous)
        return etag

    @staticmethod
    def _publish_row(upload_id: str, row: tuple[Any, ...], db: sqlite3.Connection) -> str | None:
        previous = db.execute(
            "SELECT etag FROM resources WHERE folder = ? AND name = ?", row[:2]
        ).fetchone()
        db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        db.execute(
            "INSERT INTO resources (folder, name, key, small, big_size, big_sha256, etag,"
            " published_at, published_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (folder, name) DO UPDATE SET key = excluded.key,"
            " small = excluded.small, big_size = excluded.big_size,"
            " big_sha256 = excluded.big_sha256, etag = excluded.etag,"
            " published_at = excluded.published_at, published_by = excluded.published_by",
            row,
        )
        return None if previous is None else str(previous[0])

    async def delete_resource(self, folder: str, name: str) -> None:
        """Remove ``folder/name`` and, once unreferenced, its blob; NotFoundError if absent."""

        def delete(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "DELETE FROM resources WHERE folder = ? AND name = ? RETURNING etag",
                (folder, name),
            ).fetchone()
            return None if row is None else str(row[0])

        with anyio.CancelScope(shield=True):
            async with self._lock:
                etag = await self._run(delete)
                if etag is not None:
                    await self._remove_blob_if_unreferenced(etag)
        if etag is None:
            msg = f"resource {folder}/{name} not found"
            raise NotFoundError(msg)

    async def _remove_blob_if_unreferenced(self, etag: str) -> None:
        referenced = await self._run(
            lambda db: db.execute("SELECT 1 FROM resources WHERE etag = ?", (etag,)).fetchone()
        )
        if referenced is None:
            # Readers that already opened the file keep reading it: POSIX unlink semantics.
            await _remove(self.blobs_dir / etag)

    def blob_path(self, etag: str) -> Path:
        """Return the file of blob ``etag``; NotFoundError for a name that cannot be one."""
        if not _ETAG.fullmatch(etag):
            msg = "blob not found"
            raise NotFoundError(msg)
        return self.blobs_dir / etag

    # -- uploads ---------------------------------------------------------------------------

    def _upload_path(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):
            msg = f"upload {upload_id[:64]!r} not found"
            raise NotFoundError(msg)
        return self.uploads_dir / upload_id

    @staticmethod
    def _upload_row(upload_id: str, db: sqlite3.Connection) -> tuple[int | None, str | None]:
        row = db.execute("SELECT size, sha256 FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is None:
            msg = f"upload {upload_id} not found"
            raise NotFoundError(msg)
        return row[0], row[1]

    async def create_upload(self, by: str) -> str:
        """Register a new, empty upload and return its id."""
        upload_id = secrets.token_urlsafe(16)
        await self._run(
            lambda db: db.execute(
                "INSERT INTO uploads (id, created_by, touched_at) VALUES (?, ?, ?)",
                (upload_id, by, time.time()),
            )
        )
        return upload_id

    async def write_upload(self, upload_id: str, chunks: AsyncIterable[bytes]) -> UploadResult:
        """Receive the body of ``upload_id`` from ``chunks``, replacing any earlier body.

        The body goes to a temp file that becomes the upload only once complete; if
        ``chunks`` fails (a client disconnect) or the task is cancelled, it is removed at once.
        """
        target = self._upload_path(upload_id)
        await self._run(partial(self._touch_upload, upload_id))
        # No directory fsync: recover() drops a row whose body a crash lost.
        temp = AtomicFile(target, temp_dir=self.tmp_dir, sync_dir=False)
        self._writing[upload_id] += 1
        try:
            try:
                async with temp:
                    result = await self._receive(temp, chunks)
                    with anyio.CancelScope(shield=True):
                        async with self._lock:
                            # The upload may have been deleted or published meanwhile.
                            await self._run(partial(self._upload_row, upload_id))
                            await anyio.to_thread.run_sync(temp.publish)
                            await self._run(partial(self._finish_upload, upload_id, result))
            except OSError as exc:
                msg = f"cannot store the upload: {exc.strerror or exc}"
                raise StorageError(msg) from exc
        except BaseException:
            if not temp.published:
                # A body cut off (client gone, task cancelled, disk full) abandons the upload.
                with anyio.CancelScope(shield=True):
                    await self._delete_upload(upload_id)
            raise
        finally:
            self._writing[upload_id] -= 1
            if not self._writing[upload_id]:
                del self._writing[upload_id]
        return result

    @staticmethod
    async def _receive(temp: AtomicFile, chunks: AsyncIterable[bytes]) -> UploadResult:
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        async for chunk in chunks:
            buffer += chunk
            if len(buffer) >= _WRITE_SIZE:
                await anyio.to_thread.run_sync(_write_hashed, temp.file, digest, buffer)
                size += len(buffer)
                buffer = bytearray()
        await anyio.to_thread.run_sync(_write_hashed, temp.file, digest, buffer)
        size += len(buffer)
        return UploadResult(size, digest.hexdigest())

    @staticmethod
    def _touch_upload(upload_id: str, db: sqlite3.Connection) -> None:
        cursor = db.execute(
            "UPDATE uploads SET touched_at = ? WHERE id = ?", (time.time(), upload_id)
        )
        if cursor.rowcount == 0:
            msg = f"upload {upload_id} not found"
            raise NotFoundError(msg)

    @staticmethod
    def _finish_upload(upload_id: str, result: UploadResult, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE uploads SET size = ?, sha256 = ?, touched_at = ? WHERE id = ?",
            (result.size, result.sha256, time.time(), upload_id),
        )

    async def delete_upload(self, upload_id: str) -> None:
        """Abandon ``upload_id``: its row and body go at once; NotFoundError if unknown."""
        self._upload_path(upload_id)
        with anyio.CancelScope(shield=True):
            deleted = await self._delete_upload(upload_id)
        if not deleted:
            msg = f"upload {upload_id} not found"
            raise NotFoundError(msg)

    async def _delete_upload(self, upload_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount > 0

        async with self._lock:
            deleted = await self._run(delete)
            await _remove(self.uploads_dir / upload_id)
        return deleted

    async def remove_expired_uploads(self, ttl: float) -> int:
        """Remove uploads untouched for ``ttl`` seconds and not receiving a body; return count."""
        cutoff = time.time() - ttl
        busy = set(self._writing)

        def expire(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("SELECT id FROM uploads WHERE touched_at < ?", (cutoff,))
            expired = [row[0] for row in rows if row[0] not in busy]
            db.executemany("DELETE FROM uploads WHERE id = ?", [(i,) for i in expired])
            return expired

        with anyio.CancelScope(shield=True):
            async with self._lock:
                expired = await self._run(expire)
                for upload_id in expired:
                    await _remove(self.uploads_dir / upload_id)
        return len(expired)

    def recover(self, upload_ttl: float) -> None:
        """Bring files and rows back in line after a crash or stop; blocking, call at start."""
        for path in self.tmp_dir.iterdir():
            _unlink(path)
        cutoff = time.time() - upload_ttl

        def scan(db: sqlite3.Connection) -> tuple[set[str], set[str]]:
            db.execute("DELETE FROM uploads WHERE touched_at < ?", (cutoff,))
            # A row that claims a body whose file is gone cannot be published any more.
            for (upload_id,) in db.execute("SELECT id FROM uploads WHERE size IS NOT NULL"):
                if not (self.uploads_dir / upload_id).exists():
                    db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
            uploads = {
                row[0] for row in db.execute("SELECT id FROM uploads WHERE size IS NOT NULL")
            }
            etags = {row[0] for row in db.execute("SELECT etag FROM resources")}
            return uploads, etags

        uploads, etags = self._transaction(scan)
        for path in self.uploads_dir.iterdir():
            if path.name not in uploads:
                _unlink(path)
        for path in self.blobs_dir.iterdir():
            if path.name not in etags:
                _unlink(path)

    # -- archive keys ----------------------------------------------------------------------

    async def put_key(self, key_id: str, key: bytes) -> bool:
        """Store ``key`` under ``key_id``, replacing any earlier one; return whether it is new."""

        def put(db: sqlite3.Connection) -> bool:
            exists = db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            db.execute(
                "INSERT INTO keys (key_id, key, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET key = excluded.key,"
                " created_at = excluded.created_at",
                (key_id, key, time.time()),
            )
            return exists is None

        return await self._run(put)

    async def get_key(self, key_id: str) -> bytes:
        """Return the key registered under ``key_id`` or raise NotFoundError."""
        row = await self._run(
            lambda db: db.execute("SELECT key FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        )
        if row is None:
            msg = f"key {key_id} not found"
            raise NotFoundError(msg)
        return bytes(row[0])
