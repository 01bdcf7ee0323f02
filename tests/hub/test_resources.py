"""Resources, publishing, archive keys and the router's JSON errors."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess

import httpx
import pytest

from harness import READER
from servers import serve


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_is_ok_without_auth(shared_hub):
    """/health answers without credentials."""
    reply = httpx.get(f"{shared_hub.url}/health")
    assert (reply.status_code, reply.json()) == (200, {"status": "ok"})


def test_get_resource_after_publish_returns_key_small_and_blob(publisher, reader, publish):
    """The reader sees exactly what was published, and big_url serves the big part."""
    big = os.urandom(100_000)
    etag, key, small = publish(publisher, "models/model.onnx", big, small=os.urandom(4096))
    reply = reader.get("/resources/models/model.onnx")
    assert reply.status_code == 200
    assert reply.json() == {
        "key": _b64(key),
        "small": _b64(small),
        "big_size": len(big),
        "etag": etag,
        "big_url": f"/blobs/{etag}",
    }
    assert reader.get(f"/blobs/{etag}").content == big


def test_get_resource_unknown_is_404(shared_reader):
    """A resource never published is 404 with a JSON detail."""
    reply = shared_reader.get("/resources/models/missing.bin")
    assert reply.status_code == 404
    assert reply.json() == {"detail": "resource models/missing.bin not found"}


@pytest.mark.parametrize(
    "path",
    [
        "/resources/models/a%20b",
        "/resources/mod%24els/a",
        "/resources/models/" + "a" * 256,
        "/resources/models/%C3%A9",
        "/resources/%2E/x",
    ],
)
def test_get_resource_bad_name_is_422(shared_reader, path):
    """Names outside [A-Za-z0-9._-]{1,255}, or '.'/'..', are 422."""
    reply = shared_reader.get(path)
    assert reply.status_code == 422
    assert "invalid" in reply.json()["detail"]


def test_get_resource_dot_dot_name_is_422(hub, reader):
    """A literal '..' segment that reaches the router is rejected, not resolved (curl)."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--path-as-is",
            "-H",
            f"authorization: {reader.headers['authorization']}",
            "-w",
            "\n%{http_code}",
            f"{hub.url}/resources/models/..",
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "422"
    assert "invalid filename '..'" in json.loads(body)["detail"]


def test_unknown_route_and_encoded_slash_are_json_404(shared_reader):
    """Paths that match no route, e.g. an encoded '/', are JSON 404s."""
    for path in ("/nope", "/resources/models/a%2Fb/c", "/resources/models"):
        reply = shared_reader.get(path)
        assert reply.status_code == 404
        assert reply.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health/"),
        ("GET", "/keys/images%2f"),
        ("GET", "/keys/images%2F"),
        ("GET", "/resources/models/a.bin%2F"),
        ("PUT", "/keys/images%2f"),
        ("POST", "/uploads%2F"),
    ],
)
def test_trailing_slash_is_json_404_not_redirect(shared_reader, method, path):
    """A trailing (or encoded trailing) '/' is a JSON 404, never a redirect to another path."""
    reply = shared_reader.request(method, path, follow_redirects=False)
    assert reply.status_code == 404
    assert reply.json() == {"detail": "Not Found"}
    assert "location" not in reply.headers


def test_wrong_method_is_json_405(shared_reader):
    """A known path with a wrong method is a JSON 405."""
    reply = shared_reader.post("/resources/models/a.bin")
    assert reply.status_code == 405
    assert reply.json() == {"detail": "Method Not Allowed"}


def test_publish_again_replaces_version_and_removes_old_blob(publisher, publish, blob_files):
    """A second publish gets a new etag; the first version's blob is removed."""
    first, _, _ = publish(publisher, "models/a.bin", b"one" * 1000)
    assert blob_files() == [first]
    second, _, _ = publish(publisher, "models/a.bin", b"two" * 1000)
    assert second != first
    assert blob_files() == [second]
    assert publisher.get(f"/blobs/{first}").status_code == 404
    assert publisher.get("/resources/models/a.bin").json()["etag"] == second


def test_publish_same_folder_other_names_are_independent(publisher, publish, blob_files):
    """Resources differing in folder or name are distinct versions with distinct blobs."""
    a, _, _ = publish(publisher, "models/a.bin", b"a")
    b, _, _ = publish(publisher, "other/a.bin", b"b")
    c, _, _ = publish(publisher, "models/b.bin", b"c")
    assert blob_files() == sorted([a, b, c])
    assert publisher.get(f"/blobs/{b}").content == b"b"


def test_publish_upload_without_body_has_empty_big_part(publisher):
    """An upload published without any PUT is an empty big part (a file below the small size)."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    body = {"upload_id": upload_id, "key": _b64(os.urandom(32)), "small": _b64(b"x" * 56)}
    etag = publisher.put("/resources/models/tiny", json=body).json()["etag"]
    info = publisher.get("/resources/models/tiny").json()
    assert info["big_size"] == 0
    blob = publisher.get(f"/blobs/{etag}")
    assert (blob.status_code, blob.content) == (200, b"")


def test_publish_consumes_the_upload(publisher):
    """An upload can be published once; afterwards its id is unknown."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    publisher.put(f"/uploads/{upload_id}", content=b"data")
    body = {"upload_id": upload_id, "key": _b64(os.urandom(32)), "small": _b64(b"s")}
    assert publisher.put("/resources/models/a", json=body).status_code == 201
    again = publisher.put("/resources/models/b", json=body)
    assert again.status_code == 404
    assert publisher.put(f"/uploads/{upload_id}", content=b"x").status_code == 404
    assert publisher.get("/resources/models/b").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"key": "KEY", "small": "c21hbGw="},
        {"upload_id": 7, "key": "KEY", "small": "c21hbGw="},
        {"upload_id": "UPLOAD", "key": _b64(b"short"), "small": "c21hbGw="},
        {"upload_id": "UPLOAD", "key": "not base64!", "small": "c21hbGw="},
        {"upload_id": "UPLOAD", "key": "KEY", "small": "c21hbGw"},
        {"upload_id": "UPLOAD", "key": "KEY", "small": ""},
        {"upload_id": "UPLOAD", "key": "KEY"},
        {"upload_id": "UPLOAD", "key": "KEY", "small": ["c21hbGw="]},
    ],
)
def test_publish_bad_body_is_422_and_changes_nothing(publisher, blob_files, body):
    """Missing fields, wrong types, bad base64, a key not 32 bytes or an empty small part: 422."""
    upload_id = publisher.post("/uploads").json()["upload_id"]
    publisher.put(f"/uploads/{upload_id}", content=b"data")
    values = {"UPLOAD": upload_id, "KEY": _b64(os.urandom(32))}
    body = {k: values.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    reply = publisher.put("/resources/models/a.bin", json=body)
    assert reply.status_code == 422
    assert "detail" in reply.json()
    assert publisher.get("/resources/models/a.bin").status_code == 404
    assert blob_files() == []


def test_publish_bad_names_is_422(publisher):
    """Publishing under an invalid folder or name is 422 before the body is looked at."""
    for path in ("/resources/models/a%20b", "/resources/a%3Ab/x", "/resources/x/" + "n" * 256):
        reply = publisher.put(path, json={})
        assert reply.status_code == 422, path


def test_publish_unknown_upload_is_404(publisher):
    """Publishing an upload id that does not exist is 404 and publishes nothing."""
    body = {"upload_id": "A" * 22, "key": _b64(os.urandom(32)), "small": _b64(b"s")}
    reply = publisher.put("/resources/models/a.bin", json=body)
    assert reply.status_code == 404
    assert publisher.get("/resources/models/a.bin").status_code == 404


def test_delete_resource_removes_it_and_its_blob(publisher, publish, blob_files):
    """DELETE makes the resource 404 and removes its blob; a second DELETE is 404."""
    etag, _, _ = publish(publisher, "models/a.bin", b"x" * 10)
    assert publisher.delete("/resources/models/a.bin").status_code == 204
    assert publisher.get("/resources/models/a.bin").status_code == 404
    assert publisher.get(f"/blobs/{etag}").status_code == 404
    assert blob_files() == []
    assert publisher.delete("/resources/models/a.bin").status_code == 404


async def test_publish_concurrent_same_name_ends_in_one_consistent_version(hub, publisher):
    """Many simultaneous publishes of one name leave one version whose blob matches it."""
    headers = {"authorization": publisher.headers["authorization"]}
    async with httpx.AsyncClient(base_url=hub.url, headers=headers, timeout=60) as client:
        bodies: dict[str, bytes] = {}
        smalls: dict[str, bytes] = {}
        for i in range(12):
            upload_id = (await client.post("/uploads")).json()["upload_id"]
            bodies[upload_id] = os.urandom(50_000 + i)
            smalls[upload_id] = os.urandom(100)
            reply = await client.put(f"/uploads/{upload_id}", content=bodies[upload_id])
            assert reply.status_code == 200

        async def publish(upload_id: str) -> tuple[str, str]:
            body = {
                "upload_id": upload_id,
                "key": _b64(os.urandom(32)),
                "small": _b64(smalls[upload_id]),
            }
            reply = await client.put("/resources/models/race.bin", json=body)
            assert reply.status_code == 201
            return reply.json()["etag"], upload_id

        results = dict(await asyncio.gather(*(publish(u) for u in bodies)))
        info = (await client.get("/resources/models/race.bin")).json()
        winner = results[info["etag"]]
        assert base64.b64decode(info["small"]) == smalls[winner]
        assert info["big_size"] == len(bodies[winner])
        assert (await client.get(info["big_url"])).content == bodies[winner]
    assert [p.name for p in (hub.data_dir / "blobs").iterdir()] == [info["etag"]]
    assert list((hub.data_dir / "uploads").iterdir()) == []


def test_keys_put_then_get_round_trips(publisher, reader):
    """A registered key comes back to a reader; re-registering replaces it (200, not 201)."""
    key = os.urandom(32)
    reply = publisher.put("/keys/images", json={"key": _b64(key)})
    assert (reply.status_code, reply.json()) == (201, {"key_id": "images"})
    assert reader.get("/keys/images").json() == {"key": _b64(key)}
    other = os.urandom(32)
    assert publisher.put("/keys/images", json={"key": _b64(other)}).status_code == 200
    assert reader.get("/keys/images").json() == {"key": _b64(other)}


def test_keys_unknown_is_404(shared_reader):
    """An unregistered key id is 404."""
    reply = shared_reader.get("/keys/nothing")
    assert reply.status_code == 404
    assert reply.json() == {"detail": "key nothing not found"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/keys/images", {"key": _b64(os.urandom(31))}),
        ("/keys/images", {"key": "%%%"}),
        ("/keys/images", {}),
        ("/keys/images", ["key"]),
        ("/keys/bad%20id", {"key": _b64(os.urandom(32))}),
    ],
)
def test_keys_put_bad_body_or_id_is_422(publisher, path, body):
    """A key that is not base64 of 32 bytes, or a bad key id, is 422 and stores nothing."""
    reply = publisher.put(path, json=body)
    assert reply.status_code == 422
    assert publisher.get("/keys/images").status_code == 404


def test_unexpected_error_is_json_500(tmp_path, hub_app):
    """A bug inside a handler is a JSON 500 without details."""
    app = hub_app(tmp_path / "hub")
    with serve(app) as url:

        async def broken(folder: str, name: str) -> None:
            raise RuntimeError(folder + name)

        app.state.store.get_resource = broken
        token = httpx.post(f"{url}/auth/login", json=READER.body).json()["token"]
        reply = httpx.get(f"{url}/resources/models/a", headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 500
    assert reply.json() == {"detail": "Internal Server Error"}
