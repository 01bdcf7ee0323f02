"""Where the hub keeps big parts: a directory, or an S3-compatible bucket.

Objects have keys ``uploads/{upload_id}.{nonce}`` (a received body) and, in a directory,
``blobs/{etag}`` (a published one; a bucket keeps the upload's key, since S3 cannot rename).
Both stores write an object whole or not at all: a directory through a temp file and a
rename, a bucket through a multipart upload that is completed at the end or aborted.
What a crash leaves behind (temp files, incomplete multipart uploads, objects no row refers
to) is found by :meth:`BlobStore.writes` and :meth:`BlobStore.objects`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread

from unlockd.errors import InvalidInputError, NotFoundError, StorageError
from unlockd.files import AtomicFile, sync_directory

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping

    from types_aiobotocore_s3 import S3Client

__all__ = [
    "BlobStore",
    "Body",
    "DirectoryBlobs",
    "S3Blobs",
    "S3Location",
    "Write",
    "open_blob_store",
]

_WRITE_SIZE = 1024 * 1024
# S3 parts: at least 5 MiB but the last; a few in flight bound the memory of one upload.
_PART_SIZE = 8 * 1024 * 1024
_PARTS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Body:
    """An object as written: its key, size and SHA-256."""

    key: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    """A write not finished: an S3 multipart upload, or a temp file of a directory."""

    name: str
    started: float  # seconds since the epoch
    # The upload it is the body of; None when nothing tells (a temp file): its age decides.
    upload_id: str | None
    token: str = ""  # what aborting it takes besides the name (a multipart upload's id)


class BlobStore(Protocol):
    """The operations the hub needs from a blob store; errors are StorageError."""

    description: str

    async def open(self) -> None:
        """Check that the store is there and usable."""

    async def close(self) -> None:
        """Release connections."""

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> Body:
        """Store ``chunks`` as object ``key``, whole or not at all."""

    async def write_empty(self, key: str) -> None:
        """Store an empty object ``key``."""

    async def promote(self, key: str, etag: str) -> str:
        """Make the upload ``key`` the blob of ``etag``, durably; return the blob's key.

        NotFoundError when the object ``key`` is not there.
        """

    async def demote(self, blob_key: str, key: str) -> None:
        """Undo :meth:`promote` (its transaction failed)."""

    async def delete(self, key: str) -> None:
        """Remove object ``key``; a missing one is fine."""

    async def exists(self, key: str) -> bool:
        """Whether object ``key`` is there."""

    async def objects(self) -> dict[str, float]:
        """Every object's key, with when it was written (seconds since the epoch)."""

    async def writes(self) -> list[Write]:
        """Every write not finished: in progress, or left by a crash."""

    async def abort(self, write: Write) -> None:
        """Discard the unfinished ``write``; one already gone is fine."""

    def url(self, key: str) -> str | None:
        """A presigned absolute URL of ``key``, or None when the hub serves it itself."""


def _upload_id(key: str) -> str | None:
    if key.startswith("uploads/"):
        return key.removeprefix("uploads/").partition(".")[0]
    return None


def _write_hashed(file: object, digest: hashlib._Hash, data: bytes | bytearray) -> None:
    # hashlib and file writes release the GIL for large buffers: both run off the event loop.
    digest.update(data)
    file.write(data)  # type: ignore[attr-defined]


async def _batched(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[bytearray]:
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) >= size:
            yield buffer
            buffer = bytearray()
    yield buffer


# -- a directory -----------------------------------------------------------------------------


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class DirectoryBlobs:
    """Objects as files: ``blobs/`` (published), ``uploads/`` and ``tmp/`` (being received).

    All three live on one filesystem, so publishing an upload is a rename.
    """

    def __init__(self, blobs: Path, uploads: Path, tmp: Path) -> None:
        self.blobs_dir, self.uploads_dir, self.tmp_dir = blobs, uploads, tmp
        self.description = str(blobs)

    def _path(self, key: str) -> Path:
        prefix, _, name = key.partition("/")
        directory = {"blobs": self.blobs_dir, "uploads": self.uploads_dir}.get(prefix)
        if directory is None or not name or "/" in name or name.startswith("."):
            msg = f"not an object key: {key!r}"
            raise StorageError(msg)
        return directory / name

    def path(self, key: str) -> Path:
        """The file of object ``key``."""
        return self._path(key)

    async def open(self) -> None:
        def prepare() -> None:
            for directory in (self.blobs_dir, self.uploads_dir, self.tmp_dir):
                # 0700: the blobs alone are not secret, but nothing here is anyone else's.
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                directory.chmod(0o700)

        with _os_errors(f"cannot use the blob directory {self.blobs_dir}"):
            await anyio.to_thread.run_sync(prepare)

    async def close(self) -> None:
        pass

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> Body:
        target = self._path(key)
        digest = hashlib.sha256()
        size = 0
        with _os_errors("cannot store the upload"):
            # No directory fsync: a row whose body a crash lost is dropped at the next start
            # (Store.drop_lost_uploads); promote makes the body durable before it is published.
            async with AtomicFile(target, temp_dir=self.tmp_dir, sync_dir=False) as temp:
                async for buffer in _batched(chunks, _WRITE_SIZE):
                    await anyio.to_thread.run_sync(_write_hashed, temp.file, digest, buffer)
                    size += len(buffer)
        return Body(key, size, digest.hexdigest())

    async def write_empty(self, key: str) -> None:
        path = self._path(key)

        def create() -> None:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # A row refers to it once this returns (an empty big part is published at once).
            sync_directory(path.parent)

        with _os_errors("cannot store an empty blob"):
            await anyio.to_thread.run_sync(create)

    async def promote(self, key: str, etag: str) -> str:
        blob_key = f"blobs/{etag}"
        source, target = self._path(key), self._path(blob_key)

        def move() -> bool:
            try:
                source.replace(target)
            except FileNotFoundError:
                return False
            try:
                # The commit that refers to blobs/{etag} follows: the rename must survive a
                # power loss first, or the row would point at a file that is not there.
                sync_directory(target.parent)
                sync_directory(source.parent)
            except OSError:
                target.replace(source)  # the publish fails; the upload keeps its body
                raise
            return True

        with _os_errors("cannot publish the upload"):
            moved = await anyio.to_thread.run_sync(move)
        if not moved:
            msg = f"the body of {key} is gone"
            raise NotFoundError(msg)
        return blob_key

    async def demote(self, blob_key: str, key: str) -> None:
        with _os_errors("cannot restore the upload"):
            await anyio.to_thread.run_sync(self._path(blob_key).replace, self._path(key))

    async def delete(self, key: str) -> None:
        # Off the loop: unlinking a multi-GB file frees its blocks, which takes a while.
        # Readers that already opened the file keep reading it (POSIX unlink semantics).
        with _os_errors("cannot remove a blob"):
            await anyio.to_thread.run_sync(_unlink, self._path(key))

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        with _os_errors("cannot look for a blob"):
            return await anyio.to_thread.run_sync(path.is_file)

    async def objects(self) -> dict[str, float]:
        def scan() -> dict[str, float]:
            found: dict[str, float] = {}
            for prefix, directory in (("blobs", self.blobs_dir), ("uploads", self.uploads_dir)):
                for path in directory.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        if path.is_file():
                            found[f"{prefix}/{path.name}"] = path.stat().st_mtime
            return found

        with _os_errors("cannot list the blob directory"):
            return await anyio.to_thread.run_sync(scan)

    async def writes(self) -> list[Write]:
        def scan() -> list[Write]:
            found: list[Write] = []
            for path in self.tmp_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    found.append(Write(path.name, path.stat().st_mtime, None))
            return found

        with _os_errors("cannot list the temp directory"):
            return await anyio.to_thread.run_sync(scan)

    async def abort(self, write: Write) -> None:
        with _os_errors("cannot remove a temp file"):
            await anyio.to_thread.run_sync(_unlink, self.tmp_dir / Path(write.name).name)

    def url(self, key: str) -> str | None:  # noqa: ARG002 - the protocol
        return None


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        msg = f"{what}: {exc.strerror or exc}"
        raise StorageError(msg) from exc


# -- an S3-compatible bucket -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket, a key prefix and how to reach it (the standard ``AWS_*`` variables)."""

    bucket: str
    prefix: str
    region: str
    endpoint: str | None = None
    access_key_id: str | None = dataclasses.field(default=None, repr=False)
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, environ: Mapping[str, str]) -> S3Location:
        """Parse ``s3://BUCKET[/PREFIX]``; the rest comes from ``AWS_*`` in ``environ``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket or any(c in bucket for c in "?#@:"):
            msg = f"--blobs: expected s3://BUCKET[/PREFIX], got {url!r}"
            raise InvalidInputError(msg)
        endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            msg = "AWS_ENDPOINT_URL: expected an http:// or https:// URL"
            raise InvalidInputError(msg)
        return cls(
            bucket=bucket,
            prefix=prefix.strip("/"),
            region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint=endpoint.rstrip("/") if endpoint else None,
            access_key_id=environ.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY") or None,
        )

    @property
    def description(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}".replace("/ at", " at")


class S3Blobs:
    """Objects in a bucket: obstore streams, presigns and deletes; aiobotocore finds and
    aborts the multipart uploads a killed hub left (obstore cannot list them).
    """

    def __init__(self, location: S3Location, presign_ttl: int) -> None:
        import obstore.store  # noqa: PLC0415 - only an S3 hub needs it

        self.location = location
        self.description = location.description
        self._ttl = dt.timedelta(seconds=presign_ttl)
        config: dict[str, str] = {"region": location.region}
        if location.endpoint:
            config["endpoint"] = location.endpoint
        if location.access_key_id and location.secret_access_key:
            config["access_key_id"] = location.access_key_id
            config["secret_access_key"] = location.secret_access_key
        self._store = obstore.store.S3Store(
            location.bucket,
            prefix=location.prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options={
                "allow_http": True,
                "connect_timeout": dt.timedelta(seconds=5),
                "timeout": dt.timedelta(seconds=120),
            },
            retry_config={"max_retries": 3, "retry_timeout": dt.timedelta(seconds=30)},
        )
        self._exit = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    def _full(self, key: str) -> str:
        return f"{self.location.prefix}/{key}" if self.location.prefix else key

    async def open(self) -> None:
        from aiobotocore.session import get_session  # noqa: PLC0415 - S3 only
        from botocore.config import Config  # noqa: PLC0415

        loc = self.location
        config = Config(
            region_name=loc.region,
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 2},
            # Stores such as Ceph before Reef reject the newer default checksum trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            await self._connect(loc, config, get_session)
        except BaseException:
            await self.close()
            raise

    async def _connect(self, loc: S3Location, config: Any, get_session: Any) -> None:
        with _s3_errors(f"cannot use the bucket {self.description}"):
            client = await self._exit.enter_async_context(
                get_session().create_client(
                    "s3",
                    region_name=loc.region,
                    endpoint_url=loc.endpoint,
                    aws_access_key_id=loc.access_key_id,
                    aws_secret_access_key=loc.secret_access_key,
                    config=config,
                )
            )
            self._client = client
            await client.head_bucket(Bucket=loc.bucket)

    async def close(self) -> None:
        await self._exit.aclose()
        self._client = None

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> Body:
        import obstore  # noqa: PLC0415

        digest = hashlib.sha256()
        size = 0

        async def hashed() -> AsyncIterator[bytes]:
            nonlocal size
            async for buffer in _batched(chunks, _WRITE_SIZE):
                await anyio.to_thread.run_sync(digest.update, buffer)
                size += len(buffer)
                yield bytes(buffer)

        # A multipart upload whose input fails is aborted by obstore itself.
        with _s3_errors("cannot store the upload"):
            await obstore.put_async(
                self._store,
                key,
                hashed(),
                chunk_size=_PART_SIZE,
                max_concurrency=_PARTS_IN_FLIGHT,
            )
        return Body(key, size, digest.hexdigest())

    async def write_empty(self, key: str) -> None:
        import obstore  # noqa: PLC0415

        with _s3_errors("cannot store an empty blob"):
            await obstore.put_async(self._store, key, b"")

    async def promote(self, key: str, etag: str) -> str:  # noqa: ARG002 - the protocol
        # S3 has no rename: the upload's object becomes the blob under its own key. It must
        # still be there: a row must never point at an object nobody can fetch.
        if not await self.exists(key):
            msg = f"the body of {key} is gone"
            raise NotFoundError(msg)
        return key

    async def demote(self, blob_key: str, key: str) -> None:
        pass

    async def delete(self, key: str) -> None:
        import obstore  # noqa: PLC0415

        with _s3_errors("cannot remove a blob"):
            await obstore.delete_async(self._store, key)

    async def exists(self, key: str) -> bool:
        import obstore  # noqa: PLC0415

        with _s3_errors("cannot look for a blob"):
            try:
                await obstore.head_async(self._store, key)
            except FileNotFoundError:  # obstore's "not found"
                return False
        return True

    async def objects(self) -> dict[str, float]:
        import obstore  # noqa: PLC0415

        found: dict[str, float] = {}
        with _s3_errors("cannot list the bucket"):
            async for batch in obstore.list(self._store, chunk_size=1000):
                found.update((meta["path"], meta["last_modified"].timestamp()) for meta in batch)
        return found

    def _client_or_fail(self) -> S3Client:
        if self._client is None:
            msg = "the blob store is closed"
            raise StorageError(msg)
        return self._client

    async def writes(self) -> list[Write]:
        client = self._client_or_fail()
        found: list[Write] = []
        with _s3_errors("cannot list multipart uploads"):
            paginator = client.get_paginator("list_multipart_uploads")
            prefix = self._full("uploads/")
            async for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    key = upload["Key"].removeprefix(self._full(""))
                    started = upload["Initiated"].timestamp()
                    found.append(Write(upload["Key"], started, _upload_id(key), upload["UploadId"]))
        return found

    async def abort(self, write: Write) -> None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        client = self._client_or_fail()
        with _s3_errors("cannot abort a multipart upload"):
            try:
                await client.abort_multipart_upload(
                    Bucket=self.location.bucket, Key=write.name, UploadId=write.token
                )
            except ClientError as exc:
                # Completed or aborted since it was listed: nothing left to discard.
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

    def url(self, key: str) -> str:
        import obstore  # noqa: PLC0415

        with _s3_errors("cannot presign a blob URL"):
            return obstore.sign(self._store, "GET", key, self._ttl)


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate obstore and botocore errors (and sockets') into StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415
    from obstore.exceptions import BaseError  # noqa: PLC0415

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code") or status
        if str(code) in {"404", "NoSuchBucket"}:
            code = "the bucket does not exist"
        msg = f"{what}: {code}"
        raise StorageError(msg) from None
    except (BaseError, BotoCoreError, OSError, RuntimeError, ValueError) as exc:
        # obstore's errors (BaseError, and OSError for some); their first line is the gist.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"{what}: {first}"
        raise StorageError(msg) from None


def open_blob_store(blobs: str, environ: Mapping[str, str], presign_ttl: int) -> BlobStore:
    """The store for ``--blobs``: ``s3://BUCKET[/PREFIX]`` or a directory."""
    if blobs.startswith("s3://"):
        return S3Blobs(S3Location.parse(blobs, environ), presign_ttl)
    if "://" in blobs:
        msg = f"--blobs: expected s3://BUCKET[/PREFIX] or a directory, got {blobs!r}"
        raise InvalidInputError(msg)
    root = Path(blobs)
    return DirectoryBlobs(root, root / ".uploads", root / ".tmp")
