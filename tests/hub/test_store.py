"""The SQLite store: schema versioning and reopening."""

from __future__ import annotations

import sqlite3

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
