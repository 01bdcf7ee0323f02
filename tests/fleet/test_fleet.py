"""Hubs on PostgreSQL and radosgw: shared tokens, presigned blobs, atomic publishes, clean-up."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from harness import PUBLISHER, READER, Hub, eventually

MiB = 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _publish(client: httpx.Client, path: str, big: bytes) -> str:
    upload_id = client.post("/uploads").json()["upload_id"]
    assert client.put(f"/uploads/{upload_id}", content=big).status_code == 200
    body = {"upload_id": upload_id, "key": _b64(os.urandom(32)), "small": _b64(b"small")}
    reply = client.put(f"/resources/{path}", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()["etag"]


def test_fleet_token_from_one_hub_accepted_by_another(fleet):
    """A token issued by one hub process is valid at another sharing the database."""
    with fleet.hub() as first, fleet.hub() as second:
        token = Hub(first, fleet.data_dir).login(*READER)
        reply = httpx.get(f"{second}/keys/none", headers={"authorization": f"Bearer {token}"})
        assert reply.status_code == 404  # authenticated: the key just does not exist


def test_fleet_big_url_is_presigned_and_blobs_redirect(fleet, fleet_hub):
    """big_url is an absolute presigned URL of the store; /blobs/{etag} answers 307 to one."""
    big = os.urandom(3 * MiB + 5)
    with fleet_hub.client(PUBLISHER) as client:
        etag = _publish(client, "models/a.bin", big)
        resource = client.get("/resources/models/a.bin").json()
        assert resource["etag"] == etag
        assert resource["big_size"] == len(big)
        assert resource["big_url"].startswith(fleet.environ["AWS_ENDPOINT_URL"])
        assert "X-Amz-Signature=" in resource["big_url"]
        assert httpx.get(resource["big_url"]).content == big
        ranged = httpx.get(resource["big_url"], headers={"range": "bytes=10-19"})
        assert (ranged.status_code, ranged.content) == (206, big[10:20])
        redirect = client.get(f"/blobs/{etag}")
        assert redirect.status_code == 307
        assert httpx.get(redirect.headers["location"]).content == big
    assert fleet.objects() == [f"hub/{resource['big_url'].split('/hub/')[1].split('?')[0]}"]


def test_fleet_presign_ttl_expires_the_url(fleet):
    """A presigned URL stops working after --presign-ttl; fresh metadata gives a new one."""
    with fleet.hub(presign_ttl=1) as url:
        hub = Hub(url, fleet.data_dir)
        with hub.client(PUBLISHER) as client:
            _publish(client, "models/a.bin", b"big part")
            old = client.get("/resources/models/a.bin").json()["big_url"]
            time.sleep(2.1)
            assert httpx.get(old).status_code == 403
            fresh = client.get("/resources/models/a.bin").json()["big_url"]
            assert httpx.get(fresh).content == b"big part"


def test_fleet_concurrent_publishes_one_name_one_version_no_orphans(fleet):
    """Publishes of one name through two hubs at once: one version wins, no object is left over."""
    with fleet.hub() as first, fleet.hub() as second:
        clients = [Hub(u, fleet.data_dir).client(PUBLISHER) for u in (first, second)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for round_ in range(5):
                bodies = [f"round {round_} writer {i}".encode() for i in range(6)]
                writers = [(clients[i % 2], "models/race.bin", bodies[i]) for i in range(6)]
                etags = list(pool.map(lambda args: _publish(*args), writers))
                current = clients[0].get("/resources/models/race.bin").json()
                assert current["etag"] in etags
                assert httpx.get(current["big_url"]).content in bodies
                # Exactly the current version's object remains.
                assert len(fleet.objects()) == 1
        for client in clients:
            client.close()
    assert fleet.multipart_uploads() == []


def test_fleet_upload_abandoned_mid_body_aborts_multipart(fleet, fleet_hub):
    """A body cut off mid-way (client gone) leaves no object and no multipart upload."""
    token = fleet_hub.login(*PUBLISHER)
    with fleet_hub.client(PUBLISHER) as client:
        upload_id = client.post("/uploads").json()["upload_id"]
    host, port = fleet_hub.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"PUT /uploads/{upload_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {64 * MiB}\r\n\r\n".encode()
    )
    block = os.urandom(MiB)
    for _ in range(20):  # several 8 MiB parts reach the store
        sock.sendall(block)
    eventually(lambda: fleet.multipart_uploads() != [], timeout=30)
    sock.close()
    eventually(lambda: fleet.multipart_uploads() == [] and fleet.objects() == [], timeout=30)
    with fleet_hub.client(PUBLISHER) as client:
        assert client.put(f"/uploads/{upload_id}", content=b"x").status_code == 404


def _hub_process(fleet, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "unlockd", "hub", "--port", str(port)]
    command += ["--database", fleet.database, "--blobs", fleet.blobs, *args]
    process = subprocess.Popen(
        command, env={**os.environ, **fleet.environ}, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    eventually(up, timeout=30)
    return process, url


def test_fleet_hub_killed_mid_upload_cleaned_up_by_expiry(fleet):
    """A hub killed mid-upload publishes nothing; the upload's expiry aborts its multipart."""
    process, url = _hub_process(fleet, "--upload-ttl", "2")
    try:
        hub = Hub(url, fleet.data_dir)
        token = hub.login(*PUBLISHER)
        with hub.client(PUBLISHER) as client:
            upload_id = client.post("/uploads").json()["upload_id"]
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall(
            f"PUT /uploads/{upload_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {64 * MiB}\r\n\r\n".encode()
        )
        for _ in range(20):
            sock.sendall(os.urandom(MiB))
        eventually(lambda: fleet.multipart_uploads() != [], timeout=30)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        sock.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert fleet.multipart_uploads() != []  # nobody aborted it
    with fleet.hub(upload_ttl=1) as survivor:
        eventually(lambda: fleet.multipart_uploads() == [], timeout=30)
        with Hub(survivor, fleet.data_dir).client(READER) as client:
            assert client.get("/resources/models/a.bin").status_code == 404
    assert fleet.objects() == []


def test_fleet_hub_command_missing_bucket_one_line_without_password(fleet):
    """A missing bucket stops `unlockd hub` with one line that never shows the password."""
    password = fleet.database.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlockd",
            "hub",
            "--port",
            "0",
            "--database",
            fleet.database,
            "--blobs",
            "s3://no-such-bucket",
        ],
        env={**os.environ, **fleet.environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "the bucket does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert password not in result.stderr


@pytest.mark.slow
def test_fleet_database_restart_while_idle_next_request_succeeds(fleet, fleet_hub):
    """After PostgreSQL restarts, the next request through an idle hub succeeds."""
    pg_ctl = os.environ.get("UNLOCKD_TEST_PG_CTL")
    if not pg_ctl:
        pytest.skip("UNLOCKD_TEST_PG_CTL unset: the test cannot restart PostgreSQL")
    with fleet_hub.client(PUBLISHER) as client:
        _publish(client, "models/a.bin", b"before")
        # No pipes: the restarted server would hold them open, and run() would wait forever.
        subprocess.run(
            [*shlex.split(pg_ctl), "-w", "-m", "fast", "restart"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        reply = client.get("/resources/models/a.bin")
        assert reply.status_code == 200, reply.text
