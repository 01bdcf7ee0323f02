"""The hub's storage: metadata in a :class:`Database`, big parts in a :class:`BlobStore`.

The embedded default is SQLite plus a blob directory under the data dir::

    hub.sqlite3      users, tokens, uploads, resources, keys (WAL)
    tmp/             bodies being received; removed on failure, and when stale
    uploads/{id}.N   complete upload bodies waiting to be published
    blobs/{etag}     published big parts, one file per version

For a fleet, PostgreSQL and an S3-compatible bucket (``uploads/{id}.N`` objects, which stay
where they are when published). The rules that keep the two in step, whichever they are:

- an object is written whole (temp file + rename, or a completed multipart upload) before
  any row refers to it, so a crash never leaves a row pointing at half an object; a
  directory's received body is not made durable at once, so an upload row whose body a
  power loss took is dropped at the next start (:meth:`Store.drop_lost_uploads`);
- publishing takes the upload's row and inserts the resource's in one transaction (the
  directory's rename happens inside it, durably before the commit, and is undone if it
  fails); an upload whose object is not there is not published, but dropped;
- an object is deleted after the commit that stopped referring to it; what a crash left
  (an object no row refers to whose upload is gone, an incomplete multipart upload of a
  gone upload) is removed by :meth:`Store.collect_garbage`, at start and periodically.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING

import anyio

from unlockd.errors import NotFoundError, StorageError
from unlockd.hub.blobstore import Body, DirectoryBlobs
from unlockd.hub.database import Database, Resource

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator
    from pathlib import Path

    from unlockd.hub.auth import Role
    from unlockd.hub.blobstore import BlobStore
    from unlockd.hub.database import Upload

__all__ = ["Resource", "Store", "UploadResult", "default_blob_store"]

logger = logging.getLogger("unlockd.hub")

_ETAG = re.compile(r"[0-9a-f]{32}")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{22}")
# A body that is still arriving refreshes its upload this often, so no hub expires it.
_TOUCH_INTERVAL = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class UploadResult:
    """What the hub received for an upload body."""

    size: int
    sha256: str


def default_blob_store(data_dir: Path) -> DirectoryBlobs:
    """The blob directory of the embedded default, laid out as ``data_dir`` always was."""
    return DirectoryBlobs(data_dir / "blobs", data_dir / "uploads", data_dir / "tmp")


def _check_upload_id(upload_id: str) -> None:
    if not _UPLOAD_ID.fullmatch(upload_id):
        msg = f"upload {upload_id[:64]!r} not found"
        raise NotFoundError(msg)


class Store:
    """Accounts, tokens, resources, uploads and keys over a database and a blob store."""

    def __init__(self, database: Database, blobs: BlobStore) -> None:
        self.database = database
        self.blobs = blobs

    async def open(self) -> None:
        """Connect to both (migrating the schema); StorageError naming what failed."""
        await self.database.open()
        try:
            await self.blobs.open()
        except BaseException:
            await self.database.close()
            raise

    async def close(self) -> None:
        """Close both."""
        try:
            await self.blobs.close()
        finally:
            await self.database.close()

    async def get_user(self, email: str) -> tuple[str, Role] | None:
        """Return the password hash and role of ``email``, or None."""
        return await self.database.get_user(email)

    # -- resources -------------------------------------------------------------------------

    async def get_resource(self, folder: str, name: str) -> Resource:
        """Return the current version of ``folder/name`` or raise NotFoundError."""
        return await self.database.get_resource(folder, name)

    def big_url(self, resource: Resource) -> str:
        """Where clients fetch the big part: presigned in a bucket, else the hub's /blobs."""
        return self.blobs.url(resource.object) or f"/blobs/{resource.etag}"

    async def blob_object(self, etag: str) -> str:
        """The object of the big part ``etag``; NotFoundError if there is none."""
        key = await self.database.blob_object(etag) if _ETAG.fullmatch(etag) else None
        if key is None:
            msg = "blob not found"
            raise NotFoundError(msg)
        return key

    async def publish(  # noqa: PLR0913 - the protocol's fields, keyword-only
        self, folder: str, name: str, upload_id: str, *, key: bytes, small: bytes, by: str
    ) -> str:
        """Make ``upload_id`` the big part of a new version of ``folder/name``; return its etag."""
        _check_upload_id(upload_id)
        etag = secrets.token_hex(16)
        # The rename (or empty object) and the commit must not be torn apart by a cancel.
        with anyio.CancelScope(shield=True):
            promoted: tuple[Upload, str] | None = None
            lost: str | None = None

            async def promote(upload: Upload) -> tuple[str, int, str]:
                nonlocal promoted, lost
                if upload.object is None:  # no body was sent: an empty big part
                    blob = f"uploads/{upload.id}.{secrets.token_hex(4)}"
                    await self.blobs.write_empty(blob)
                    promoted = (upload, blob)
                    return blob, 0, _EMPTY_SHA256
                try:
                    blob = await self.blobs.promote(upload.object, etag)
                except NotFoundError:
                    lost = upload.object
                    raise
                promoted = (upload, blob)
                return blob, upload.size or 0, upload.sha256 or _EMPTY_SHA256

            try:
                previous = await self.database.publish(
                    upload_id, by, folder, name, key=key, small=small, etag=etag, promote=promote
                )
            except BaseException:
                if promoted is not None:
                    undone, blob = promoted
                    if undone.object is None:
                        await self.blobs.delete(blob)
                    else:
                        await self.blobs.demote(blob, undone.object)
                if lost is not None:
                    # Nothing can publish it any more: it goes, as a body cut off does.
                    await self.database.drop_upload(upload_id, lost)
                    msg = f"upload {upload_id} not found: its body was lost, upload it again"
                    raise NotFoundError(msg) from None
                raise
            if previous is not None:
                await self._delete_quietly(previous)
        return etag

    async def delete_resource(self, folder: str, name: str) -> None:
        """Remove ``folder/name`` and its blob; NotFoundError if absent."""
        with anyio.CancelScope(shield=True):
            removed = await self.database.delete_resource(folder, name)
            await self._delete_quietly(removed)

    async def _delete_quietly(self, key: str) -> None:
        # The commit that dropped the reference has happened: a failure here leaves an
        # unreferenced object, which the next garbage collection removes.
        try:
            await self.blobs.delete(key)
        except StorageError as exc:
            logger.warning("could not remove %s now, will retry: %s", key, exc.message)

    # -- uploads ---------------------------------------------------------------------------

    async def create_upload(self, by: str) -> str:
        """Register a new, empty upload of ``by`` and return its id."""
        upload_id = secrets.token_urlsafe(16)
        await self.database.create_upload(upload_id, by)
        return upload_id

    async def write_upload(
        self, upload_id: str, by: str, chunks: AsyncIterable[bytes]
    ) -> UploadResult:
        """Receive the body of ``upload_id`` (an upload of ``by``), replacing any earlier one.

        A body that fails (a client disconnect, a cancelled task, a full disk or store)
        leaves nothing behind, and the upload is abandoned at once.
        """
        _check_upload_id(upload_id)
        await self.database.start_receiving(upload_id, by)
        key = f"uploads/{upload_id}.{secrets.token_hex(4)}"
        body: Body | None = None
        try:
            body = await self.blobs.write(key, self._touching(upload_id, chunks))
        except BaseException:
            # A body cut off abandons the upload (SPEC §5).
            with anyio.CancelScope(shield=True):
                await self._abandon(upload_id)
            raise
        with anyio.CancelScope(shield=True):
            exists, stale = await self.database.finish_receiving(
                upload_id, (body.key, body.size, body.sha256)
            )
            if stale is not None:
                await self._delete_quietly(stale)
        if not exists:
            msg = f"upload {upload_id} not found"
            raise NotFoundError(msg)
        return UploadResult(body.size, body.sha256)

    async def _touching(self, upload_id: str, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        touched = time.monotonic()
        async for chunk in chunks:
            if time.monotonic() - touched > _TOUCH_INTERVAL:
                await self.database.touch_upload(upload_id)
                touched = time.monotonic()
            yield chunk

    async def _abandon(self, upload_id: str) -> None:
        try:
            key = await self.database.delete_upload(upload_id, None)
        except NotFoundError:
            return
        if key is not None:
            await self._delete_quietly(key)

    async def delete_upload(self, upload_id: str, by: str) -> None:
        """Abandon ``upload_id``: its row and body go at once; NotFoundError if unknown."""
        _check_upload_id(upload_id)
        with anyio.CancelScope(shield=True):
            key = await self.database.delete_upload(upload_id, by)
            if key is not None:
                await self._delete_quietly(key)

    async def remove_expired_uploads(self, ttl: float) -> int:
        """Remove uploads untouched for ``ttl`` seconds, with their data; return how many."""
        with anyio.CancelScope(shield=True):
            expired = await self.database.remove_expired_uploads(time.time() - ttl)
            for _, key in expired:
                if key is not None:
                    await self._delete_quietly(key)
        return len(expired)

    async def drop_lost_uploads(self) -> int:
        """Remove the uploads whose body is not in the blob store; return how many.

        A directory makes a received body durable only when it is published: after a power
        loss, a row may claim a body that is gone. Called at start.
        """
        dropped = 0
        for upload_id, key in (await self.database.upload_objects()).items():
            if not await self.blobs.exists(key) and await self.database.drop_upload(upload_id, key):
                dropped += 1
        return dropped

    async def collect_garbage(self, grace: float) -> int:
        """Remove what crashes left: stale writes, and objects no row refers to; return count.

        Safe while other hubs work on the same store: an object or a write is kept while
        its upload exists (its row may not point at it yet), any row refers to it, or it is
        younger than ``grace`` seconds.
        """
        # What is in the store first, the rows second: anything listed was begun by an
        # upload that existed then, so that upload is in the snapshot below, or it was
        # published (its object is referenced) or abandoned (its object is garbage). The
        # other order would take an upload begun in between for one long gone.
        writes = await self.blobs.writes()
        objects = await self.blobs.objects()
        # Upload ids first, references second: a publish that commits in between has
        # moved its object from the first set into the second.
        upload_ids = await self.database.upload_ids()
        referenced = await self.database.referenced_objects()
        cutoff = time.time() - grace
        removed = 0
        for write in writes:
            if write.started < cutoff and write.upload_id not in upload_ids:
                await self.blobs.abort(write)
                removed += 1
        for key, written in objects.items():
            owner = key.removeprefix("uploads/").partition(".")[0]
            if (
                written >= cutoff
                or key in referenced
                or (key.startswith("uploads/") and owner in upload_ids)
            ):
                continue
            await self.blobs.delete(key)
            removed += 1
        return removed

    # -- archive keys ----------------------------------------------------------------------

    async def put_key(self, key_id: str, key: bytes) -> bool:
        """Store ``key`` under ``key_id``, replacing any earlier one; return whether it is new."""
        return await self.database.put_key(key_id, key)

    async def get_key(self, key_id: str) -> bytes:
        """Return the key registered under ``key_id`` or raise NotFoundError."""
        return await self.database.get_key(key_id)


_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
