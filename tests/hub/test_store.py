"""The hub's store: schema versions, reopening, file modes and blocking work off the loop."""

from __future__ import annotations

import os
import pathlib
import socket
import sqlite3
import stat
import threading

import pytest

from unlockd.errors import NotFoundError, StorageError, UnlockdError
from unlockd.hub.auth import Role
from unlockd.hub.blobstore import S3Blobs, S3Location
from unlockd.hub.database import Database
from unlockd.hub.store import Store, default_blob_store

BY = "pub@example.com"


def _schema_version(path):
    with sqlite3.connect(path) as db:
        (value,) = db.execute("SELECT version FROM unlockd_schema").fetchone()
    db.close()
    return value


async def test_database_open_creates_schema_version_and_wal(tmp_path):
    """A new database gets its schema version and WAL journaling; reopening is a no-op."""
    path = tmp_path / "hub.sqlite3"
    for _ in range(2):
        database = Database(path)
        await database.open()
        await database.close()
    assert _schema_version(path) >= 1
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


async def test_database_open_newer_schema_is_refused(tmp_path):
    """A database written by a newer unlockd is not touched."""
    path = tmp_path / "hub.sqlite3"
    database = Database(path)
    await database.open()
    await database.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE unlockd_schema SET version = 999")
    db.close()
    with pytest.raises(UnlockdError, match="newer than this unlockd knows"):
        await Database(path).open()


async def test_database_closed_refuses_work(tmp_path):
    """Using a closed database is a clear error, not a crash inside the driver."""
    with pytest.raises(StorageError, match="closed"):
        await Database(tmp_path / "hub.sqlite3").put_user("a@b.c", "hash", Role.READER)


async def test_database_open_corrupt_file_is_a_clear_error(tmp_path):
    """A file that is not SQLite fails with the file's name."""
    (tmp_path / "hub.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"cannot open the hub database .*hub\.sqlite3"):
        await Database(tmp_path / "hub.sqlite3").open()


async def test_store_files_private_modes(tmp_path):
    """The database and every stored body are 0600, their directories 0700."""
    store = Store(Database(tmp_path / "hub.sqlite3"), default_blob_store(tmp_path))
    await store.open()

    async def body():
        yield b"x" * 100

    try:
        by = "pub@example.com"
        upload_id = await store.create_upload(by)
        await store.write_upload(upload_id, by, body())
        pending = await store.create_upload(by)
        await store.write_upload(pending, by, body())
        await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=by)
    finally:
        await store.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} >= {"blobs", "uploads"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name in ("blobs", "uploads", "tmp"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o700


async def test_store_file_moves_and_removals_off_event_loop(tmp_path, monkeypatch):
    """Renames and unlinks of uploads and blobs (possibly many GB) run in worker threads."""
    calls: list[tuple[str, bool]] = []
    main = threading.main_thread()
    real_unlink, real_replace = pathlib.Path.unlink, pathlib.Path.replace

    def unlink(self, *args, **kwargs):
        calls.append(("unlink", threading.current_thread() is main))
        return real_unlink(self, *args, **kwargs)

    def replace(self, target):
        calls.append(("replace", threading.current_thread() is main))
        return real_replace(self, target)

    async def body():
        yield b"x" * 100

    store = Store(Database(tmp_path / "hub.sqlite3"), default_blob_store(tmp_path))
    await store.open()
    try:
        monkeypatch.setattr(pathlib.Path, "unlink", unlink)
        monkeypatch.setattr(pathlib.Path, "replace", replace)
        by = "pub@example.com"
        for _ in range(2):  # the second publish removes the first version's blob
            upload_id = await store.create_upload(by)
            await store.write_upload(upload_id, by, body())
            await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=by)
        await store.delete_resource("models", "m.bin")
        abandoned = await store.create_upload(by)
        await store.write_upload(abandoned, by, body())
        await store.delete_upload(abandoned, by)
        monkeypatch.undo()
    finally:
        await store.close()
    assert {op for op, _ in calls} == {"unlink", "replace"}
    assert [call for call in calls if call[1]] == []
    assert list((tmp_path / "blobs").iterdir()) == list((tmp_path / "uploads").iterdir()) == []


async def _body():
    yield b"x" * 100


@pytest.fixture
async def directory_store(tmp_path):
    """A store on SQLite and a blob directory under ``tmp_path``, open."""
    store = Store(Database(tmp_path / "hub.sqlite3"), default_blob_store(tmp_path))
    await store.open()
    yield store
    await store.close()


@pytest.mark.parametrize("sent", [True, False], ids=["body", "no-body"])
async def test_store_publish_blob_directory_synced_before_commit(
    tmp_path, monkeypatch, directory_store, sent
):
    """The published blob's directory entry is fsynced before the commit that refers to it."""
    store = directory_store
    events: list[str] = []
    real_fsync, real_publish = os.fsync, store.database.publish

    def fsync(fd):
        events.append(str(pathlib.Path(f"/proc/self/fd/{fd}").readlink()))
        real_fsync(fd)

    async def publish(*args, **kwargs):
        replaced = await real_publish(*args, **kwargs)
        events.append("commit")
        return replaced

    upload_id = await store.create_upload(BY)
    if sent:
        await store.write_upload(upload_id, BY, _body())
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store.database, "publish", publish)
    await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=BY)
    monkeypatch.undo()
    blob = await store.get_resource("models", "m.bin")
    directory = str((tmp_path / blob.object).parent.resolve())
    assert directory in events[: events.index("commit")]


async def test_store_publish_upload_whose_body_is_gone_not_found_and_dropped(
    tmp_path, directory_store
):
    """Publishing an upload whose body file is gone is NotFoundError and drops the upload."""
    store = directory_store
    upload_id = await store.create_upload(BY)
    await store.write_upload(upload_id, BY, _body())
    (body,) = (tmp_path / "uploads").iterdir()
    body.unlink()
    with pytest.raises(NotFoundError, match="body was lost"):
        await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=BY)
    assert await store.database.upload_ids() == set()
    with pytest.raises(NotFoundError):
        await store.get_resource("models", "m.bin")


async def test_s3_blobs_unreachable_store_is_a_storage_error():
    """An S3 store that refuses connections is a StorageError naming the operation."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    blobs = S3Blobs(S3Location.parse("s3://bucket", environ), presign_ttl=60)
    with pytest.raises(StorageError, match="cannot store an empty blob"):
        await blobs.write_empty("uploads/x")
    with pytest.raises(StorageError, match="cannot look for a blob"):
        await blobs.exists("uploads/x")
