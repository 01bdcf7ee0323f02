"""The SQLite store: schema versioning and reopening."""

from __future__ import annotations

import pathlib
import sqlite3
import threading

import pytest

from unlockd.errors import UnlockdError
from unlockd.hub.auth import Role
from unlockd.hub.store import Store


def _pragma(path, name):
    with sqlite3.connect(path) as db:
        (value,) = db.execute(f"PRAGMA {name}").fetchone()
    db.close()
    return value


def test_store_open_creates_schema_version_and_wal(tmp_path):
    """A new store gets every table, its schema version and WAL journaling; reopening is a no-op."""
    store = Store(tmp_path)
    store.open()
    store.close()
    version = _pragma(tmp_path / "hub.sqlite3", "user_version")
    assert version >= 1
    assert _pragma(tmp_path / "hub.sqlite3", "journal_mode") == "wal"
    store.open()
    store.close()
    assert _pragma(tmp_path / "hub.sqlite3", "user_version") == version
    assert {p.name for p in tmp_path.iterdir()} >= {"blobs", "uploads", "tmp", "hub.sqlite3"}


def test_store_open_newer_schema_is_refused(tmp_path):
    """A database written by a newer unlockd is not touched."""
    with sqlite3.connect(tmp_path / "hub.sqlite3") as db:
        db.execute("PRAGMA user_version = 999")
    db.close()
    store = Store(tmp_path)
    with pytest.raises(UnlockdError, match="newer than this unlockd knows"):
        store.open()


def test_store_closed_refuses_work(tmp_path):
    """Using a closed store is a clear error, not a crash inside sqlite3."""
    store = Store(tmp_path)
    with pytest.raises(UnlockdError, match="closed"):
        store.put_user("a@b.c", "hash", Role.READER)


def test_store_open_corrupt_database_is_a_clear_error(tmp_path):
    """A data dir whose database is not SQLite fails with the file's name."""
    (tmp_path / "hub.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(UnlockdError, match="cannot open the hub database"):
        Store(tmp_path).open()


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

    store = Store(tmp_path)
    store.open()
    try:
        monkeypatch.setattr(pathlib.Path, "unlink", unlink)
        monkeypatch.setattr(pathlib.Path, "replace", replace)
        by = "pub@example.com"
        for _ in range(2):  # the second publish removes the first version's blob
            upload_id = await store.create_upload(by)
            await store.write_upload(upload_id, body())
            await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=by)
        await store.delete_resource("models", "m.bin")
        abandoned = await store.create_upload(by)
        await store.write_upload(abandoned, body())
        await store.delete_upload(abandoned)
        monkeypatch.undo()
    finally:
        store.close()
    assert {op for op, _ in calls} == {"unlink", "replace"}
    assert [call for call in calls if call[1]] == []
    assert list((tmp_path / "blobs").iterdir()) == list((tmp_path / "uploads").iterdir()) == []
