"""Streaming uploads: chunked bodies, replacement, abandonment, disconnects and expiry."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from harness import PUBLISHER, eventually
from unlockd.hub import add_user

MiB = 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _listing(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _upload_ids(directory) -> list[str]:
    # Upload bodies are named {upload_id}.{nonce}: one per PUT.
    return sorted(path.name.partition(".")[0] for path in directory.iterdir())


def _open_put(url: str, path: str, authorization: str, headers: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: {authorization}\r\n"
        f"{headers}\r\n"
    )
    sock.sendall(head.encode())
    return sock


def _publish_body(upload_id: str) -> dict[str, str]:
    return {"upload_id": upload_id, "key": _b64(os.urandom(32)), "small": _b64(b"small")}


def test_put_upload_chunked_body_returns_size_and_sha256(publisher):
    """A chunked (Transfer-Encoding) body is stored whole; the reply has its size and hash."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    pieces = [os.urandom(n) for n in (1, 70_000, MiB, 3 * MiB + 7, 0, 12)]

    reply = publisher.put(f"/uploads/{upload_id}", content=iter(pieces))
    data = b"".join(pieces)
    assert reply.request.headers["transfer-encoding"] == "chunked"
    assert reply.status_code == 200
    assert reply.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_put_upload_empty_body_is_an_empty_upload(publisher):
    """An empty body is a valid, empty big part."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    reply = publisher.put(f"/uploads/{upload_id}", content=b"")
    assert reply.json() == {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}


def test_put_upload_twice_replaces_the_body(hub, publisher):
    """A repeated PUT replaces the body; publishing serves the second one."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    publisher.put(f"/uploads/{upload_id}", content=b"first body, longer than the second")
    reply = publisher.put(f"/uploads/{upload_id}", content=b"second")
    assert reply.json()["size"] == 6
    assert _upload_ids(hub.data_dir / "uploads") == [upload_id]
    etag = publisher.put("/resources/models/a", json=_publish_body(upload_id)).json()["etag"]
    assert publisher.get(f"/blobs/{etag}").content == b"second"


def test_create_upload_ids_are_unique(publisher):
    """Every POST /uploads gives a fresh id with 201."""
    replies = [publisher.post("/uploads") for _ in range(5)]
    assert {r.status_code for r in replies} == {201}
    assert len({r.json()["upload_id"] for r in replies}) == 5


def test_delete_upload_removes_its_data_at_once(hub, publisher):
    """DELETE abandons the upload: its file goes, it cannot be published, a 2nd DELETE is 404."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    publisher.put(f"/uploads/{upload_id}", content=b"x" * 1000)
    assert publisher.delete(f"/uploads/{upload_id}").status_code == 204
    assert _listing(hub.data_dir / "uploads") == []
    assert publisher.put("/resources/models/a", json=_publish_body(upload_id)).status_code == 404
    assert publisher.delete(f"/uploads/{upload_id}").status_code == 404


@pytest.mark.parametrize("upload_id", ["A" * 22, "short", "..", "x" * 300])
def test_put_upload_unknown_id_is_404(shared_publisher, upload_id):
    """PUT or DELETE of an id that was never created is 404."""
    assert shared_publisher.put(f"/uploads/{upload_id}", content=b"data").status_code == 404
    assert shared_publisher.delete(f"/uploads/{upload_id}").status_code == 404


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_put_upload_client_disconnect_leaves_nothing(hub, publisher, framing):
    """A body cut off mid-way removes the temp file and the upload itself, at once."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    if framing == "chunked":
        headers = "Transfer-Encoding: chunked\r\n"
        piece = f"{MiB:x}\r\n".encode() + b"x" * MiB + b"\r\n"
    else:
        headers = f"Content-Length: {50 * MiB}\r\n"
        piece = b"x" * MiB
    sock = _open_put(hub.url, f"/uploads/{upload_id}", publisher.headers["authorization"], headers)
    with sock:
        for _ in range(3):
            sock.sendall(piece)
        eventually(lambda: _listing(hub.data_dir / "tmp") != [])
    eventually(lambda: _listing(hub.data_dir / "tmp") == [])
    assert _listing(hub.data_dir / "uploads") == []
    assert publisher.put("/resources/models/a", json=_publish_body(upload_id)).status_code == 404
    assert publisher.get("/resources/models/a").status_code == 404


def test_publish_while_body_still_arriving_is_409(hub, publisher):
    """Publishing an upload whose PUT is still running is refused; the PUT then completes."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    sock = _open_put(
        hub.url,
        f"/uploads/{upload_id}",
        publisher.headers["authorization"],
        f"Content-Length: {2 * MiB}\r\n",
    )
    with sock:
        sock.sendall(b"y" * MiB)
        eventually(lambda: _listing(hub.data_dir / "tmp") != [])
        reply = publisher.put("/resources/models/a", json=_publish_body(upload_id))
        assert reply.status_code == 409
        sock.sendall(b"y" * MiB)
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 200")
    assert publisher.put("/resources/models/a", json=_publish_body(upload_id)).status_code == 201


def test_delete_upload_while_body_arrives_discards_the_body(hub, publisher):
    """An upload deleted during its PUT ends with a 404 for the PUT and no files left."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    sock = _open_put(
        hub.url,
        f"/uploads/{upload_id}",
        publisher.headers["authorization"],
        f"Content-Length: {2 * MiB}\r\n",
    )
    with sock:
        sock.sendall(b"z" * MiB)
        eventually(lambda: _listing(hub.data_dir / "tmp") != [])
        assert publisher.delete(f"/uploads/{upload_id}").status_code == 204
        sock.sendall(b"z" * MiB)
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 404")
    assert _listing(hub.data_dir / "tmp") == []
    assert _listing(hub.data_dir / "uploads") == []


def test_upload_never_published_is_removed_after_ttl(tmp_path, start_hub):
    """An upload untouched for longer than --upload-ttl disappears by itself while the hub runs."""
    data_dir = tmp_path / "hub"
    with start_hub(data_dir, upload_ttl=1) as url:
        token = httpx.post(f"{url}/auth/login", json=PUBLISHER.body).json()["token"]
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}) as client:
            upload_id = client.post("/uploads").json()["upload_id"]
            client.put(f"/uploads/{upload_id}", content=b"forgotten")
            assert _upload_ids(data_dir / "uploads") == [upload_id]
            # The store keeps wall-clock times: age the upload instead of waiting out the ttl.
            with sqlite3.connect(data_dir / "hub.sqlite3") as db:
                db.execute("UPDATE uploads SET touched_at = 0 WHERE id = ?", (upload_id,))
            db.close()
            eventually(lambda: _listing(data_dir / "uploads") == [])
            assert client.put(f"/uploads/{upload_id}", content=b"late").status_code == 404


def test_hub_start_removes_temp_files_stale_uploads_and_orphan_blobs(tmp_path, start_hub, publish):
    """At start, temp files, uploads older than the ttl and unreferenced blobs are removed."""
    data_dir = tmp_path / "hub"
    with start_hub(data_dir) as url:
        token = httpx.post(f"{url}/auth/login", json=PUBLISHER.body).json()["token"]
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}) as client:
            etag, _, _ = publish(client, "models/kept", b"kept")
            stale, fresh = (client.post("/uploads").json()["upload_id"] for _ in range(2))
            client.put(f"/uploads/{stale}", content=b"old")
            client.put(f"/uploads/{fresh}", content=b"new")
    with sqlite3.connect(data_dir / "hub.sqlite3") as db:
        db.execute("UPDATE uploads SET touched_at = 0 WHERE id = ?", (stale,))
    db.close()
    (data_dir / "tmp" / "crashed.part").write_bytes(b"partial")
    (data_dir / "blobs" / ("0" * 32)).write_bytes(b"orphan")
    (data_dir / "uploads" / ("B" * 22)).write_bytes(b"orphan")

    with start_hub(data_dir):
        assert _listing(data_dir / "tmp") == []
        assert _listing(data_dir / "blobs") == [etag]
        assert _upload_ids(data_dir / "uploads") == [fresh]


def test_hub_start_drops_uploads_whose_body_was_lost(tmp_path, start_hub):
    """An upload whose body file a crash lost is gone after a restart: publishing it is a 404."""
    data_dir = tmp_path / "hub"
    with start_hub(data_dir) as url:
        token = httpx.post(f"{url}/auth/login", json=PUBLISHER.body).json()["token"]
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}) as client:
            lost, kept = (client.post("/uploads").json()["upload_id"] for _ in range(2))
            client.put(f"/uploads/{lost}", content=b"lost")
            client.put(f"/uploads/{kept}", content=b"kept")
    for path in (data_dir / "uploads").iterdir():
        if path.name.startswith(lost):
            path.unlink()  # as a power loss takes a rename that was never synced

    with start_hub(data_dir):
        with sqlite3.connect(data_dir / "hub.sqlite3") as db:
            assert db.execute("SELECT id FROM uploads").fetchall() == [(kept,)]
        db.close()


@pytest.mark.slow
def test_put_upload_hundreds_of_mb_streams_in_flat_memory(hub, publisher):
    """A 384 MiB chunked upload and its download keep the process RSS flat."""
    size = 384 * MiB
    block = os.urandom(MiB)
    samples: list[int] = []
    stop = threading.Event()

    def rss() -> int:
        pages = Path("/proc/self/statm").read_text().split()[1]
        return int(pages) * os.sysconf("SC_PAGE_SIZE")

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss())
            time.sleep(0.02)

    def body():
        for _ in range(size // MiB):
            yield block

    expected = hashlib.sha256()
    for _ in range(size // MiB):
        expected.update(block)
    baseline = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        upload_id = publisher.post("/uploads").json()["upload_id"]
        reply = publisher.put(f"/uploads/{upload_id}", content=body())
        assert reply.json() == {"size": size, "sha256": expected.hexdigest()}
        etag = publisher.put("/resources/models/big", json=_publish_body(upload_id)).json()["etag"]
        received = hashlib.sha256()
        with publisher.stream("GET", f"/blobs/{etag}") as download:
            for chunk in download.iter_bytes():
                received.update(chunk)
        assert received.hexdigest() == expected.hexdigest()
    finally:
        stop.set()
        sampler.join()
    assert max(samples) - baseline < 64 * MiB


def test_upload_of_another_publisher_is_404(hub, publisher):
    """An upload id is usable only by the account that created it: 404 for any other."""
    add_user(hub.data_dir, "other@example.com", "other-password", role="publisher")
    upload_id = publisher.post("/uploads").json()["upload_id"]
    with hub.client(("other@example.com", "other-password")) as other:
        assert other.put(f"/uploads/{upload_id}", content=b"mine").status_code == 404
        reply = other.put("/resources/models/stolen", json=_publish_body(upload_id))
        assert reply.status_code == 404
        assert other.delete(f"/uploads/{upload_id}").status_code == 404
    assert publisher.put(f"/uploads/{upload_id}", content=b"body").status_code == 200
    reply = publisher.put("/resources/models/own", json=_publish_body(upload_id))
    assert reply.status_code == 201


@pytest.mark.parametrize("field", ["key", "small"])
def test_publish_non_ascii_base64_is_422(publisher, field):
    """Non-ASCII text where base64 belongs is a 422, not a 500, and publishes nothing."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    body = {**_publish_body(upload_id), field: "é"}
    reply = publisher.put("/resources/models/accented", json=body)
    assert reply.status_code == 422
    assert publisher.get("/resources/models/accented").status_code == 404


def test_put_key_non_ascii_is_422(publisher):
    """PUT /keys/x with a non-ASCII key is a 422 and registers nothing."""
    assert publisher.put("/keys/accented", json={"key": "é"}).status_code == 422
    assert publisher.get("/keys/accented").status_code == 404
