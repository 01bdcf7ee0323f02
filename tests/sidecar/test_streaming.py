"""Streaming guarantees: aborted bodies on bad segments, disconnects leave nothing behind."""

from __future__ import annotations

import re
import socket
import subprocess
from urllib.parse import urlsplit

import httpx
import pytest

from harness import eventually
from unlockd.crypto_stream import SEGMENT_SIZE, TAG_SIZE

PS = SEGMENT_SIZE - TAG_SIZE


def metric(stack, name: str) -> float:
    text = httpx.get(f"{stack.url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


def temp_files(stack) -> list[str]:
    return [name for name in stack.cache_files() if name.startswith(".")]


@pytest.fixture
def cached(stack):
    """A 3-segment resource, loaded once so its big part is in the cache."""
    data = bytes(range(256)) * ((3 * PS) // 256)
    with stack.client() as client:
        stack.login(client)
        etag = stack.upload(client, "seg.bin", data)["etag"]
        assert client.post("/load/seg.bin").content == data
    eventually(lambda: (stack.cache_dir / etag).exists() and not temp_files(stack))
    return stack, data, etag


def test_flipped_byte_in_cache_later_segment_aborts_then_recovers(cached):
    """A bad later segment aborts the body short of Content-Length; the next load succeeds."""
    stack, data, etag = cached
    entry = stack.cache_dir / etag
    with entry.open("r+b") as file:
        file.seek(2 * SEGMENT_SIZE + 100)  # inside the third segment
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 1]))
    received = bytearray()

    def read_all(response) -> None:
        for chunk in response.iter_bytes():
            received.extend(chunk)

    with stack.client() as client:
        with client.stream("POST", "/load/seg.bin") as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(data))
            with pytest.raises(httpx.RemoteProtocolError):
                read_all(response)
        assert len(received) < len(data)
        assert data.startswith(bytes(received))  # what was sent was authentic
        assert metric(stack, "unlockd_integrity_failures_total") == 1
        again = client.post("/load/seg.bin")
    assert again.status_code == 200
    assert again.content == data


def test_flipped_byte_curl_sees_partial_transfer(cached, tmp_path):
    """curl reports a partial transfer (exit 18) when a later segment fails."""
    stack, data, etag = cached
    entry = stack.cache_dir / etag
    with entry.open("r+b") as file:
        file.seek(SEGMENT_SIZE + 5)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0x80]))
    out = tmp_path / "out.bin"
    result = subprocess.run(
        ["curl", "-sS", "-o", str(out), f"{stack.url}/resources/models/seg.bin"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 18, result.stderr
    assert out.stat().st_size < len(data)


def test_client_disconnect_mid_download_cleans_up(stack):
    """A client that goes away mid-download leaves no temp file and no active transfer."""
    data = bytes(range(256)) * (24 * 4096)  # 24 MiB
    with stack.client() as client:
        stack.login(client)
        stack.upload(client, "dl.bin", data)
        for _ in range(2):  # cold (shared CDN fetch), then warm (cache file)
            with client.stream("POST", "/load/dl.bin") as response:
                assert response.status_code == 200
                next(response.iter_raw())
    eventually(lambda: metric(stack, "unlockd_active_transfers") == 0)
    eventually(lambda: not temp_files(stack))
    with stack.client() as client:
        assert client.post("/load/dl.bin").content == data


def test_client_disconnect_mid_upload_nothing_published(stack):
    """A client that goes away mid-upload leaves no hub upload and publishes nothing."""
    with stack.client() as client:
        stack.login(client)
    parts = urlsplit(stack.url)
    head = b'--B\r\nContent-Disposition: form-data; name="data"; filename="f"\r\n\r\n' + b"x" * (
        3 * SEGMENT_SIZE
    )
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            b"POST /upload/cut.bin HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n"
            + f"Content-Length: {10 * SEGMENT_SIZE}\r\n\r\n".encode()
            + head
        )
        eventually(lambda: metric(stack, "unlockd_upload_bytes_received_total") > 0)
    eventually(lambda: metric(stack, "unlockd_active_transfers") == 0)
    eventually(lambda: stack.hub_pending_uploads() == [])
    assert httpx.post(f"{stack.url}/load/cut.bin").status_code == 404


def test_client_disconnect_before_folder_nothing_published(stack):
    """A client that goes away after the data but before the folder field publishes nothing."""
    with stack.client() as client:
        stack.login(client)
    parts = urlsplit(stack.url)
    body = (
        b'--B\r\nContent-Disposition: form-data; name="data"; filename="f"\r\n\r\n'
        + b"y" * 10_000
        + b'\r\n--B\r\nContent-Disposition: form-data; name="folder"\r\n\r\nmod'
    )
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            b"POST /upload/cut2.bin HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n"
            + f"Content-Length: {len(body) + 100}\r\n\r\n".encode()
            + body
        )
        eventually(lambda: metric(stack, "unlockd_upload_bytes_received_total") >= 10_000)
    eventually(lambda: metric(stack, "unlockd_active_transfers") == 0)
    eventually(lambda: stack.hub_pending_uploads() == [])
    assert httpx.post(f"{stack.url}/load/cut2.bin", json={"folder": "mod"}).status_code == 404
