"""Upload then download through the sidecar, end to end over real sockets."""

from __future__ import annotations

import hashlib
import os
import subprocess

import httpx
import pytest

from unlockd.crypto_stream import HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE

PS = SEGMENT_SIZE - TAG_SIZE  # plaintext per segment
FIRST = PS - HEADER_SIZE  # plaintext in segment 0


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (cheap to build for tens of MB)."""
    block = hashlib.sha256(f"{seed}".encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(8, "big") + block[8:]
        counter += 1
    return bytes(out[:size])


SIZES = [0, 1, 4095, 4096, 4097, FIRST - 1, FIRST, FIRST + 1, FIRST + PS, 3 * PS + 17]


@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_sizes_identical(shared, size):
    """Upload then /load and /resources give back identical bytes, for edge sizes."""
    data = pattern(size, seed=size)
    name = f"rt-{size}.bin"
    with shared.client() as client:
        shared.login(client)
        result = shared.upload(client, name, data, folder="rt")
        assert result["status"] == "ok"
        assert result["size"] == size
        assert result["folder"] == "rt"
        assert result["filename"] == name
        loaded = client.post(f"/load/{name}", json={"folder": "rt"})
        assert loaded.status_code == 200
        assert loaded.headers["content-length"] == str(size)
        assert loaded.headers["content-type"] == "application/octet-stream"
        assert loaded.content == data
        again = client.get(f"/resources/rt/{name}")
        assert again.status_code == 200
        assert again.headers["etag"] == f'"{result["etag"]}"'
        assert again.headers["accept-ranges"] == "bytes"
        assert again.content == data


def test_roundtrip_tens_of_mb_streamed(shared):
    """A 40 MB upload streams in and out identically (hash compared while streaming)."""
    size = 40 * 1000 * 1000 + 12345
    data = pattern(size, seed=7)
    with shared.client() as client:
        shared.login(client)

        def body():
            for i in range(0, size, 1 << 20):
                yield data[i : i + (1 << 20)]

        boundary = "bndry"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; '
            f'filename="big.bin"\r\n\r\n'
        ).encode()
        tail = (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n'
            f"models\r\n--{boundary}--\r\n"
        ).encode()

        def multipart():
            yield head
            yield from body()
            yield tail

        response = client.post(
            "/upload/big.bin",
            content=multipart(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["size"] == size
        digest = hashlib.sha256()
        with client.stream("POST", "/load/big.bin") as stream:
            assert stream.headers["content-length"] == str(size)
            for chunk in stream.iter_bytes():
                digest.update(chunk)
        assert digest.digest() == hashlib.sha256(data).digest()


def test_roundtrip_folder_before_or_after_data(shared):
    """The folder field works before and after the data part."""
    with shared.client() as client:
        shared.login(client)
        before = client.post(
            "/upload/order.bin", data={"folder": "first"}, files={"data": ("x", b"before")}
        )
        assert before.json()["folder"] == "first"
        boundary = "b0"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x"\r\n\r\n'
            f"after\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\nsecond\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        after = client.post(
            "/upload/order.bin",
            content=body,
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert after.json()["folder"] == "second"
        default = client.post("/upload/order.bin", files={"data": ("x", b"default")})
        assert default.json()["folder"] == "models"
        assert client.get("/resources/first/order.bin").content == b"before"
        assert client.get("/resources/second/order.bin").content == b"after"
        assert client.post("/load/order.bin").content == b"default"
        loaded = client.post("/load/order.bin", json={"filename": "order.bin", "folder": "second"})
        assert loaded.content == b"after"


def test_roundtrip_republish_new_etag(shared):
    """Uploading a name again publishes a new version with a new ETag."""
    with shared.client() as client:
        shared.login(client)
        first = shared.upload(client, "v.bin", b"one")
        assert client.post("/load/v.bin").content == b"one"
        second = shared.upload(client, "v.bin", b"two-two")
        assert first["etag"] != second["etag"]
        response = client.post("/load/v.bin")
        assert response.content == b"two-two"
        assert response.headers["etag"] == f'"{second["etag"]}"'


def test_roundtrip_curl_upload_and_resume_identical(shared, tmp_path):
    """curl -F uploads, and `curl -C -` resumes a partial download into the identical file."""
    size = 3 * PS + 999
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(size))
    with shared.client() as client:
        shared.login(client)
    upload = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "-F",
            f"data=@{source}",
            "-F",
            "folder=curl",
            f"{shared.url}/upload/model.bin",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert httpx.Response(200, content=upload.stdout).json()["size"] == size
    target = tmp_path / "resumed.bin"
    url = f"{shared.url}/resources/curl/model.bin"
    subprocess.run(
        ["curl", "-sS", "--fail", "-r", "0-1234566", "-o", str(target), url], check=True, timeout=60
    )
    assert target.stat().st_size == 1234567
    subprocess.run(
        ["curl", "-sS", "--fail", "-C", "-", "-o", str(target), url], check=True, timeout=60
    )
    assert target.read_bytes() == source.read_bytes()
    loaded = tmp_path / "loaded.bin"
    subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "-X",
            "POST",
            "-o",
            str(loaded),
            f"{shared.url}/load/model.bin",
            "-H",
            "content-type: application/json",
            "-d",
            '{"folder": "curl"}',
        ],
        check=True,
        timeout=60,
    )
    assert loaded.read_bytes() == source.read_bytes()
