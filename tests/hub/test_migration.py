"""Databases of the single-process hub (schema in PRAGMA user_version) are converted at start."""

from __future__ import annotations

import base64
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from harness import PUBLISHER, READER, Hub, eventually
from unlockd.errors import StorageError
from unlockd.hub.auth import hash_password
from unlockd.hub.database import Database

# The schema SQL of the hub before the fleet change, as it created hub.sqlite3 (user_version 1).
_OLD_SCHEMA = """
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
"""
ETAG = "0123456789abcdef0123456789abcdef"
BIG = os.urandom(100_000)
PENDING = "AAAAAAAAAAAAAAAAAAAAAA"  # an upload id: 22 url-safe characters
EMPTY_PENDING = "BBBBBBBBBBBBBBBBBBBBBB"


def _old_data_dir(data_dir):
    """A data dir as the old hub left it: accounts, a key, a resource, two pending uploads."""
    for sub in ("blobs", "uploads", "tmp"):
        (data_dir / sub).mkdir(parents=True)
    (data_dir / "blobs" / ETAG).write_bytes(BIG)
    (data_dir / "uploads" / PENDING).write_bytes(b"pending body")
    db = sqlite3.connect(data_dir / "hub.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(f"BEGIN; {_OLD_SCHEMA} PRAGMA user_version = 1; COMMIT;")
    now = time.time()
    for account, role in ((PUBLISHER, "publisher"), (READER, "reader")):
        hashed = hash_password(account.password, n=2**10)
        db.execute("INSERT INTO users VALUES (?, ?, ?, ?)", (account.email, hashed, role, now))
    db.execute("INSERT INTO keys VALUES ('images', ?, ?)", (b"k" * 32, now))
    db.execute(
        "INSERT INTO resources VALUES ('models', 'a.bin', ?, ?, ?, 'sha', ?, ?, ?)",
        (b"K" * 32, b"small part", len(BIG), ETAG, now, PUBLISHER.email),
    )
    db.execute("INSERT INTO uploads VALUES (?, ?, ?, 12, 'sha')", (PENDING, PUBLISHER.email, now))
    db.execute(
        "INSERT INTO uploads VALUES (?, ?, ?, NULL, NULL)", (EMPTY_PENDING, PUBLISHER.email, now)
    )
    db.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_hub_old_user_version_database_converted_data_kept(tmp_path, start_hub):
    """A hub starts on the old hub's data dir and serves its accounts, keys, blobs and uploads."""
    data_dir = tmp_path / "hub"
    _old_data_dir(data_dir)
    with start_hub(data_dir) as url:
        hub = Hub(url, data_dir)
        with hub.client(READER) as reader:
            resource = reader.get("/resources/models/a.bin").json()
            assert resource["etag"] == ETAG
            assert base64.b64decode(resource["small"]) == b"small part"
            assert reader.get(resource["big_url"]).content == BIG
            assert base64.b64decode(reader.get("/keys/images").json()["key"]) == b"k" * 32
        with hub.client(PUBLISHER) as publisher:
            for upload_id, path in ((PENDING, "b.bin"), (EMPTY_PENDING, "c.bin")):
                body = {"upload_id": upload_id, "key": _b64(bytes(32)), "small": _b64(b"s")}
                reply = publisher.put(f"/resources/models/{path}", json=body)
                assert reply.status_code == 201, reply.text
            published = publisher.get("/resources/models/b.bin").json()
            assert publisher.get(published["big_url"]).content == b"pending body"
            assert publisher.get("/resources/models/c.bin").json()["big_size"] == 0
    blobs = {ETAG, published["etag"]}
    assert {p.name for p in (data_dir / "blobs").iterdir()} == blobs  # the body moved there
    with sqlite3.connect(data_dir / "hub.sqlite3") as db:
        assert db.execute("SELECT version FROM unlockd_schema").fetchone() == (1,)
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
    db.close()


def test_hub_old_user_version_database_started_twice_converted_once(tmp_path, start_hub):
    """Starting again on a converted database changes nothing: the accounts still log in."""
    data_dir = tmp_path / "hub"
    _old_data_dir(data_dir)
    for _ in range(2):
        with start_hub(data_dir) as url:
            token = Hub(url, data_dir).login(*READER)
            reply = httpx.get(f"{url}/keys/images", headers={"authorization": f"Bearer {token}"})
            assert reply.status_code == 200


async def test_database_open_unknown_user_version_schema_one_clear_line(tmp_path):
    """A user_version database that is not the old hub's stops with one line, untouched."""
    path = tmp_path / "hub.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("CREATE TABLE things (x); PRAGMA user_version = 3;")
    db.close()
    with pytest.raises(StorageError, match="not a hub database this unlockd can convert") as info:
        await Database(path).open()
    assert "\n" not in info.value.message
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
        assert (tables, db.execute("PRAGMA user_version").fetchone()) == (["things"], (3,))
    db.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_hub_command_old_database_conversion_is_logged(tmp_path):
    """`unlockd hub` on the old hub's data dir says on stderr that it converted the database."""
    data_dir = tmp_path / "hub"
    _old_data_dir(data_dir)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "unlockd", "hub", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.TransportError:
            return process.poll() is not None  # died: the assertions below say why

    try:
        eventually(healthy, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "converted" in err
    assert "single-process hub" in err


def test_hub_command_old_database_with_s3_blobs_refused_untouched(tmp_path):
    """The old hub's database is not converted for an S3 store: one line, database untouched."""
    data_dir = tmp_path / "hub"
    _old_data_dir(data_dir)
    environ = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    command = [sys.executable, "-m", "unlockd", "hub", "--data-dir", str(data_dir)]
    command += ["--port", "0", "--blobs", "s3://bucket"]
    result = subprocess.run(
        command, env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "database of the single-process hub" in result.stderr
    with sqlite3.connect(data_dir / "hub.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "tokens" not in tables
    db.close()
