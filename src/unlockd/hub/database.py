"""The hub's metadata in SQLite or PostgreSQL, through one SQLAlchemy Core (async) query layer.

Tables: ``users``, ``tokens`` (SHA-256 digests of bearer tokens with their expiry, so every
hub process sharing the database accepts them), ``uploads``, ``resources`` (the current version
of each ``folder/name``, with the storage key of its big part) and ``keys``. The schema version
lives in ``unlockd_schema``; :meth:`Database.migrate` applies the missing steps of
``_MIGRATIONS`` in one transaction, under a lock that makes hub processes starting at once
against one database take turns (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``).
A SQLite database of the single-process hub that came before (its version in ``PRAGMA
user_version``) is converted to schema 1 by the same transaction, its rows kept.

Every driver or SQLAlchemy error leaves this module as :class:`~unlockd.errors.StorageError`
with the server's message: never the SQL parameters (keys, hashes) nor the URL's password.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from unlockd.errors import ConflictError, InvalidInputError, NotFoundError, StorageError
from unlockd.hub.auth import Principal, Role

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

__all__ = [
    "Database",
    "Resource",
    "Upload",
    "database_url",
    "display_url",
]

logger = logging.getLogger("unlockd.hub")

# pg_advisory_xact_lock key of schema migrations: any constant unique to unlockd.
_MIGRATION_LOCK = 0x756E6C6F636B64


def database_url(value: str | Path) -> str:
    """Return the SQLAlchemy URL of ``postgresql://…``, ``sqlite:///ABS/PATH`` or a file path.

    Raises InvalidInputError (never showing a password) for anything else.
    """
    text = str(value)
    if "://" not in text:
        return f"sqlite+aiosqlite:///{text}"
    try:
        url = sa.make_url(text)
    except ArgumentError:
        msg = "expected postgresql://USER[:PASS]@HOST[:PORT]/DB or sqlite:///ABS/PATH"
        raise InvalidInputError(msg) from None
    backend = url.get_backend_name()
    if backend == "postgresql" and url.database:
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    if backend == "sqlite" and url.database and url.database.startswith("/"):
        return url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    shown = display_url(text)
    msg = f"expected postgresql://USER[:PASS]@HOST[:PORT]/DB or sqlite:///ABS/PATH, got {shown}"
    raise InvalidInputError(msg)


def display_url(value: str) -> str:
    """``value`` with its password (if any) replaced by ``***``, safe to print."""
    try:
        return sa.make_url(value).render_as_string(hide_password=True)
    except ArgumentError:
        return "a database URL that does not parse (not shown)"


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors into StorageError carrying the server's message only."""
    try:
        yield
    except DBAPIError as exc:
        # str(exc) would carry the SQL and its parameters; the driver's own error does not.
        msg = f"{what}: {type(exc.orig).__name__}: {exc.orig}".strip()
        raise StorageError(msg) from None
    except SQLAlchemyError as exc:
        msg = f"{what}: {type(exc).__name__}"
        raise StorageError(msg) from None
    except OSError as exc:  # the server is unreachable (asyncpg connects through sockets)
        msg = f"{what}: {exc.strerror or exc}"
        raise StorageError(msg) from None


# -- schema ----------------------------------------------------------------------------------


def _schema_v1(metadata: sa.MetaData) -> None:
    # Frozen: later versions append migrations, they never edit this one.
    sa.Table(
        "users",
        metadata,
        sa.Column("email", sa.String(254), primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "tokens",
        metadata,
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    sa.Table(
        "uploads",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_by", sa.String(254), nullable=False),
        sa.Column("touched_at", sa.Float, nullable=False, index=True),
        # How many bodies are arriving right now (a publish meanwhile is a conflict).
        sa.Column("receiving", sa.Integer, nullable=False, server_default="0"),
        sa.Column("object", sa.Text),
        sa.Column("size", sa.BigInteger),
        sa.Column("sha256", sa.String(64)),
    )
    sa.Table(
        "resources",
        metadata,
        sa.Column("folder", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("small", sa.LargeBinary, nullable=False),
        sa.Column("big_size", sa.BigInteger, nullable=False),
        sa.Column("big_sha256", sa.String(64), nullable=False),
        sa.Column("etag", sa.String(32), nullable=False, unique=True),
        sa.Column("object", sa.Text, nullable=False),
        sa.Column("published_at", sa.Float, nullable=False),
        sa.Column("published_by", sa.String(254), nullable=False),
    )
    sa.Table(
        "keys",
        metadata,
        sa.Column("key_id", sa.String(255), primary_key=True),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


async def _create_v1(connection: AsyncConnection) -> None:
    metadata = sa.MetaData()
    _schema_v1(metadata)
    await connection.run_sync(metadata.create_all)


# Each entry migrates the schema from version i to i + 1; append, never edit.
_MIGRATIONS: list[Callable[[AsyncConnection], Any]] = [_create_v1]

# The single-process hub's tables (SQLite, schema version 1 in PRAGMA user_version), and how
# each row becomes one of schema 1 here; see Database._adopt_user_version_schema.
_LEGACY_TABLES = ("users", "uploads", "resources", "keys")
_LEGACY_COPIES = (
    (
        "INSERT INTO users (email, password_hash, role, created_at)"
        " SELECT email, password_hash, role, created_at FROM legacy_users"
    ),
    "INSERT INTO keys (key_id, key, created_at) SELECT key_id, key, created_at FROM legacy_keys",
    (
        "INSERT INTO resources (folder, name, key, small, big_size, big_sha256, etag, object,"
        " published_at, published_by) SELECT folder, name, key, small, big_size, big_sha256,"
        " etag, 'blobs/' || etag, published_at, published_by FROM legacy_resources"
    ),
    (
        "INSERT INTO uploads (id, created_by, touched_at, receiving, object, size, sha256)"
        " SELECT id, created_by, touched_at, 0,"
        " CASE WHEN size IS NULL THEN NULL ELSE 'uploads/' || id END, size, sha256"
        " FROM legacy_uploads"
    ),
)

_schema = sa.Table(
    "unlockd_schema", sa.MetaData(), sa.Column("version", sa.Integer, nullable=False)
)

# The query layer: lightweight tables (no types needed to bind bytes, text and numbers).
_users = sa.table("users", *map(sa.column, ("email", "password_hash", "role", "created_at")))
_tokens = sa.table("tokens", *map(sa.column, ("digest", "email", "role", "expires_at")))
_uploads = sa.table(
    "uploads",
    *map(sa.column, ("id", "created_by", "touched_at", "receiving", "object", "size", "sha256")),
)
_resources = sa.table(
    "resources",
    *map(
        sa.column,
        (
            "folder",
            "name",
            "key",
            "small",
            "big_size",
            "big_sha256",
            "etag",
            "object",
            "published_at",
            "published_by",
        ),
    ),
)
_keys = sa.table("keys", *map(sa.column, ("key_id", "key", "created_at")))


@dataclasses.dataclass(frozen=True, slots=True)
class Resource:
    """One published version of a resource, with the storage key of its big part."""

    folder: str
    name: str
    key: bytes
    small: bytes
    big_size: int
    etag: str
    object: str


@dataclasses.dataclass(frozen=True, slots=True)
class Upload:
    """A pending upload: who created it and the body it holds (``object`` None: none yet)."""

    id: str
    created_by: str
    receiving: int
    object: str | None
    size: int | None
    sha256: str | None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _name_lock(folder: str, name: str) -> int:
    # A signed 64-bit key for pg_advisory_xact_lock, one per resource name.
    digest = hashlib.sha256(f"{folder}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Database:
    """The hub's tables in one database; every method is one transaction.

    ``convert_old`` says whether the blobs are in a directory, where the single-process hub
    kept them: only then is a database of that hub converted; otherwise it is refused.
    """

    def __init__(self, url: str | Path, *, convert_old: bool = True) -> None:
        self.url = database_url(url)
        self._convert_old = convert_old
        # As the user wrote it: without the driver, and without the password.
        self.display = display_url(self.url.replace("+asyncpg", "").replace("+aiosqlite", ""))
        self._postgres = self.url.startswith("postgresql")
        self._engine: AsyncEngine | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, then create or migrate the schema; StorageError when that fails."""
        if self._postgres:
            engine = create_async_engine(
                self.url,
                hide_parameters=True,
                # A connection that died with a server restart is replaced, not handed out.
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=20,
                connect_args={"timeout": 10, "command_timeout": 60},
            )
        else:
            _create_private(sa.make_url(self.url).database or "")
            engine = create_async_engine(
                self.url, hide_parameters=True, connect_args={"timeout": 30}
            )
            event.listen(engine.sync_engine, "connect", _sqlite_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
        self._engine = engine
        try:
            await self.migrate()
        except StorageError as exc:
            await self.close()
            msg = f"cannot open the hub database {self.display}: {exc.message}"
            raise StorageError(msg) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        if self._engine is None:
            msg = "the hub store is closed"
            raise StorageError(msg)
        with _translate("a query failed"):
            async with self._engine.begin() as connection:
                yield connection

    async def migrate(self) -> None:
        """Bring the schema to this version; refuses a database of a newer unlockd."""
        async with self._begin() as db:
            if self._postgres:
                await db.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            await db.run_sync(lambda sync: _schema.create(sync, checkfirst=True))
            version = (await db.execute(sa.select(_schema.c.version))).scalar()
            if version is None:
                version = 0 if self._postgres else await self._adopt_user_version_schema(db)
                await db.execute(sa.insert(_schema).values(version=version))
            if version > len(_MIGRATIONS):
                msg = f"{self.display} has schema {version}, newer than this unlockd knows"
                raise StorageError(msg)
            for number in range(version, len(_MIGRATIONS)):
                await _MIGRATIONS[number](db)
            await db.execute(sa.update(_schema).values(version=len(_MIGRATIONS)))

    async def _adopt_user_version_schema(self, db: AsyncConnection) -> int:
        """Convert a SQLite database of the single-process hub; return the version it now has.

        That hub kept its schema version in ``PRAGMA user_version`` (0 means none: a new
        database, or one of this layout). Its only version had this one's tables less the
        tokens and the columns saying where a big part is, which a blob directory answers:
        ``blobs/{etag}`` once published, ``uploads/{id}`` while pending.
        """
        version = (await db.exec_driver_sql("PRAGMA user_version")).scalar()
        if not version:
            return 0
        found = await db.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        tables = set(found.scalars()) - {_schema.name}
        if version != 1 or tables != set(_LEGACY_TABLES):
            msg = (
                f"{self.display} is not a hub database this unlockd can convert (PRAGMA "
                f"user_version {version}); move it aside and start afresh"
            )
            raise StorageError(msg)
        if not self._convert_old:
            # Its resources would point at blobs/{etag} objects that are not in the bucket.
            msg = (
                f"{self.display} is a database of the single-process hub, whose blobs are "
                "files in its data dir: convert it with the default blob directory, not --blobs"
            )
            raise StorageError(msg)
        for table in _LEGACY_TABLES:
            await db.exec_driver_sql(f"ALTER TABLE {table} RENAME TO legacy_{table}")
        await _create_v1(db)
        for statement in _LEGACY_COPIES:
            await db.exec_driver_sql(statement)
        for table in _LEGACY_TABLES:
            await db.exec_driver_sql(f"DROP TABLE legacy_{table}")
        # The version is in unlockd_schema from now on; an older unlockd finds none.
        await db.exec_driver_sql("PRAGMA user_version = 0")
        logger.info("converted %s from the single-process hub's schema", self.display)
        return 1

    def _insert(self, table: sa.TableClause) -> Any:
        # INSERT … ON CONFLICT DO UPDATE: the same upsert in both dialects.
        return postgresql.insert(table) if self._postgres else sqlite.insert(table)

    async def ping(self) -> None:
        """Run a trivial query (a startup check)."""
        async with self._begin() as db:
            await db.execute(sa.select(1))

    # -- accounts and tokens -------------------------------------------------------------

    async def put_user(self, email: str, password_hash: str, role: Role) -> None:
        """Create the account or replace its password and role."""
        async with self._begin() as db:
            insert = self._insert(_users).values(
                email=email, password_hash=password_hash, role=role.value, created_at=time.time()
            )
            await db.execute(
                insert.on_conflict_do_update(
                    index_elements=["email"],
                    set_={"password_hash": password_hash, "role": role.value},
                )
            )

    async def get_user(self, email: str) -> tuple[str, Role] | None:
        """Return the password hash and role of ``email``, or None."""
        async with self._begin() as db:
            row = (
                await db.execute(
                    sa.select(_users.c.password_hash, _users.c.role).where(_users.c.email == email)
                )
            ).first()
        return None if row is None else (row[0], Role(row[1]))

    async def add_token(self, token: str, principal: Principal, expires_at: float) -> None:
        """Remember ``token`` (as its digest) for ``principal`` until ``expires_at``."""
        async with self._begin() as db:
            await db.execute(
                sa.insert(_tokens).values(
                    digest=_digest(token),
                    email=principal.email,
                    role=principal.role.value,
                    expires_at=expires_at,
                )
            )

    async def get_token(self, token: str, now: float) -> Principal | None:
        """Return the principal of a token that has not expired at ``now``, or None."""
        async with self._begin() as db:
            row = (
                await db.execute(
                    sa.select(_tokens.c.email, _tokens.c.role).where(
                        _tokens.c.digest == _digest(token), _tokens.c.expires_at > now
                    )
                )
            ).first()
        return None if row is None else Principal(row[0], Role(row[1]))

    async def remove_expired_tokens(self, now: float) -> int:
        """Drop tokens expired at ``now``; return how many."""
        async with self._begin() as db:
            result = await db.execute(sa.delete(_tokens).where(_tokens.c.expires_at <= now))
        return int(result.rowcount)

    # -- resources -----------------------------------------------------------------------

    async def get_resource(self, folder: str, name: str) -> Resource:
        """Return the current version of ``folder/name`` or raise NotFoundError."""
        async with self._begin() as db:
            row = (
                await db.execute(
                    sa.select(
                        _resources.c.key,
                        _resources.c.small,
                        _resources.c.big_size,
                        _resources.c.etag,
                        _resources.c.object,
                    ).where(_resources.c.folder == folder, _resources.c.name == name)
                )
            ).first()
        if row is None:
            msg = f"resource {folder}/{name} not found"
            raise NotFoundError(msg)
        return Resource(folder, name, bytes(row[0]), bytes(row[1]), row[2], row[3], row[4])

    async def blob_object(self, etag: str) -> str | None:
        """Return the storage key of the big part with ``etag``, or None."""
        async with self._begin() as db:
            key = (
                await db.execute(sa.select(_resources.c.object).where(_resources.c.etag == etag))
            ).scalar()
        return None if key is None else str(key)

    async def publish(  # noqa: PLR0913 - the protocol's fields, keyword-only
        self,
        upload_id: str,
        by: str,
        folder: str,
        name: str,
        *,
        key: bytes,
        small: bytes,
        etag: str,
        promote: Callable[[Upload], Awaitable[tuple[str, int, str]]],
    ) -> str | None:
        """Publish the upload ``upload_id`` of ``by`` as ``folder/name``; return the replaced
        object, if any.

        One transaction takes the upload's row and writes the resource's; inside it,
        ``promote(upload)`` turns the upload's body into the blob and returns its ``(object,
        size, sha256)``. One version wins when several hubs publish one name at once: the
        writers of a name take turns (a per-name advisory lock on PostgreSQL, the write lock
        on SQLite), so each learns exactly the object it replaced. NotFoundError for an
        unknown upload or one of another account, ConflictError while its body arrives.
        """
        async with self._begin() as db:
            upload = await self._upload(db, upload_id, by)
            if upload.receiving:
                msg = f"upload {upload_id} is still receiving its body"
                raise ConflictError(msg)
            if self._postgres:
                lock = _name_lock(folder, name)
                await db.execute(sa.select(sa.func.pg_advisory_xact_lock(lock)))
            taken = await db.execute(
                sa.delete(_uploads).where(_uploads.c.id == upload_id, _uploads.c.receiving == 0)
            )
            if taken.rowcount != 1:  # another hub published or deleted it just now
                msg = f"upload {upload_id} not found"
                raise NotFoundError(msg)
            where = (_resources.c.folder == folder, _resources.c.name == name)
            previous = (
                await db.execute(sa.delete(_resources).where(*where).returning(_resources.c.object))
            ).scalar()
            blob, size, sha256 = await promote(upload)
            await db.execute(
                sa.insert(_resources).values(
                    folder=folder,
                    name=name,
                    key=key,
                    small=small,
                    big_size=size,
                    big_sha256=sha256,
                    etag=etag,
                    object=blob,
                    published_at=time.time(),
                    published_by=by,
                )
            )
        return previous

    async def delete_resource(self, folder: str, name: str) -> str:
        """Remove ``folder/name``; return its object; NotFoundError if absent."""
        async with self._begin() as db:
            removed = (
                await db.execute(
                    sa.delete(_resources)
                    .where(_resources.c.folder == folder, _resources.c.name == name)
                    .returning(_resources.c.object)
                )
            ).scalar()
        if removed is None:
            msg = f"resource {folder}/{name} not found"
            raise NotFoundError(msg)
        return str(removed)

    # -- uploads -------------------------------------------------------------------------

    async def create_upload(self, upload_id: str, by: str) -> None:
        """Register the empty upload ``upload_id`` of ``by``."""
        async with self._begin() as db:
            await db.execute(
                sa.insert(_uploads).values(id=upload_id, created_by=by, touched_at=time.time())
            )

    @staticmethod
    async def _upload(db: AsyncConnection, upload_id: str, by: str) -> Upload:
        row = (
            await db.execute(
                sa.select(
                    _uploads.c.created_by,
                    _uploads.c.receiving,
                    _uploads.c.object,
                    _uploads.c.size,
                    _uploads.c.sha256,
                ).where(_uploads.c.id == upload_id)
            )
        ).first()
        # Another account's upload is as unknown as a missing one.
        if row is None or row[0] != by:
            msg = f"upload {upload_id} not found"
            raise NotFoundError(msg)
        return Upload(upload_id, row[0], row[1], row[2], row[3], row[4])

    async def start_receiving(self, upload_id: str, by: str) -> None:
        """Mark a body of ``upload_id`` as arriving; NotFoundError unless ``by`` owns it."""
        async with self._begin() as db:
            await self._upload(db, upload_id, by)
            await db.execute(
                sa.update(_uploads)
                .where(_uploads.c.id == upload_id)
                .values(receiving=_uploads.c.receiving + 1, touched_at=time.time())
            )

    async def touch_upload(self, upload_id: str) -> None:
        """Keep a body that is still arriving safe from expiry."""
        async with self._begin() as db:
            await db.execute(
                sa.update(_uploads).where(_uploads.c.id == upload_id).values(touched_at=time.time())
            )

    async def finish_receiving(
        self, upload_id: str, body: tuple[str, int, str] | None
    ) -> tuple[bool, str | None]:
        """End a body's arrival; ``body`` is its ``(object, size, sha256)`` when it completed.

        Returns whether the upload still exists, and the object to remove: the one this body
        replaced, or this body's own when the upload went away meanwhile.
        """
        async with self._begin() as db:
            row = (
                await db.execute(sa.select(_uploads.c.object).where(_uploads.c.id == upload_id))
            ).first()
            if row is None:
                return False, None if body is None else body[0]
            values: dict[str, Any] = {
                "receiving": sa.case((_uploads.c.receiving > 0, _uploads.c.receiving - 1), else_=0),
                "touched_at": time.time(),
            }
            if body is not None:
                values.update(object=body[0], size=body[1], sha256=body[2])
            await db.execute(sa.update(_uploads).where(_uploads.c.id == upload_id).values(values))
        return True, (row[0] if body is not None else None)

    async def delete_upload(self, upload_id: str, by: str | None) -> str | None:
        """Remove the upload (of ``by``, when given) and return its object.

        NotFoundError for an unknown upload or another account's.
        """
        async with self._begin() as db:
            if by is not None:
                await self._upload(db, upload_id, by)
            removed = (
                await db.execute(
                    sa.delete(_uploads)
                    .where(_uploads.c.id == upload_id)
                    .returning(_uploads.c.id, _uploads.c.object)
                )
            ).first()
        if removed is None:
            msg = f"upload {upload_id} not found"
            raise NotFoundError(msg)
        return None if removed[1] is None else str(removed[1])

    async def remove_expired_uploads(self, cutoff: float) -> list[tuple[str, str | None]]:
        """Remove uploads untouched since ``cutoff``; return their ids and objects."""
        async with self._begin() as db:
            rows = (
                await db.execute(
                    sa.delete(_uploads)
                    .where(_uploads.c.touched_at < cutoff)
                    .returning(_uploads.c.id, _uploads.c.object)
                )
            ).all()
        return [(row[0], row[1]) for row in rows]

    async def upload_objects(self) -> dict[str, str]:
        """The object of every pending upload that has received a body, by upload id."""
        async with self._begin() as db:
            rows = await db.execute(
                sa.select(_uploads.c.id, _uploads.c.object).where(_uploads.c.object.is_not(None))
            )
            return {row[0]: row[1] for row in rows}

    async def drop_upload(self, upload_id: str, key: str) -> bool:
        """Remove the upload ``upload_id`` if its body is still the object ``key``; whether
        it was removed (a body that replaced ``key`` meanwhile keeps it)."""
        async with self._begin() as db:
            dropped = await db.execute(
                sa.delete(_uploads).where(_uploads.c.id == upload_id, _uploads.c.object == key)
            )
            return bool(dropped.rowcount)

    async def upload_ids(self) -> set[str]:
        """The ids of every pending upload."""
        async with self._begin() as db:
            return set((await db.execute(sa.select(_uploads.c.id))).scalars())

    async def referenced_objects(self) -> set[str]:
        """Every object a resource or a pending upload refers to."""
        async with self._begin() as db:
            resources = (await db.execute(sa.select(_resources.c.object))).scalars()
            uploads = (
                await db.execute(sa.select(_uploads.c.object).where(_uploads.c.object.is_not(None)))
            ).scalars()
            return {*resources, *uploads}

    # -- archive keys --------------------------------------------------------------------

    async def put_key(self, key_id: str, key: bytes) -> bool:
        """Store ``key`` under ``key_id``, replacing any earlier one; return whether it is new."""
        async with self._begin() as db:
            exists = (
                await db.execute(sa.select(_keys.c.key_id).where(_keys.c.key_id == key_id))
            ).first()
            now = time.time()
            insert = self._insert(_keys).values(key_id=key_id, key=key, created_at=now)
            await db.execute(
                insert.on_conflict_do_update(
                    index_elements=["key_id"], set_={"key": key, "created_at": now}
                )
            )
            return exists is None

    async def get_key(self, key_id: str) -> bytes:
        """Return the key registered under ``key_id`` or raise NotFoundError."""
        async with self._begin() as db:
            key = (
                await db.execute(sa.select(_keys.c.key).where(_keys.c.key_id == key_id))
            ).scalar()
        if key is None:
            msg = f"key {key_id} not found"
            raise NotFoundError(msg)
        return bytes(key)


def _create_private(path: str) -> None:
    # 0600 from the first byte: the database holds every content key. SQLite gives its -wal
    # and -shm files the database's mode.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        msg = f"cannot create the hub database {path}: {exc.strerror or exc}"
        raise StorageError(msg) from exc


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the driver, decides where transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # Take the write lock up front: two transactions never both read, then both write.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
