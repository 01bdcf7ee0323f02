"""The cache's lifecycle, pulls and offline serving, through a live sidecar and hub."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import httpx
import pytest

from harness import PUBLISHER, eventually, tmpfs
from servers import serve
from unlockd.app import create_app
from unlockd.cachedir import CacheDirectory, hold_shared
from unlockd.config import Settings

MIB = 1 << 20


def _data(size: int, seed: int = 0) -> bytes:
    blocks = (hashlib.sha256(f"{seed}-{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def _complete(stack) -> list[dict]:
    with stack.client() as client:
        entries = client.get("/cache").json()["entries"]
    return [e for e in entries if e["complete"]]


def _settled(stack) -> None:
    eventually(lambda: not any(p.startswith(".") for p in stack.cache_files()))


@pytest.fixture
def logged_in(stack):
    with stack.client() as client:
        stack.login(client)
    return stack


def test_cache_list_names_each_entry(logged_in):
    """GET /cache lists a loaded resource with its name, etag, size and last use."""
    data = _data(2 * MIB + 5)
    with logged_in.client() as client:
        etag = logged_in.upload(client, "m.bin", data)["etag"]
        assert client.post("/load/m.bin").content == data
    _settled(logged_in)
    (entry,) = _complete(logged_in)
    assert (entry["folder"], entry["filename"], entry["etag"]) == ("models", "m.bin", etag)
    assert entry["size"] == (logged_in.cache_dir / etag).stat().st_size
    assert entry["last_used"].endswith("+00:00")


def test_cache_delete_drops_entry_then_404(logged_in):
    """DELETE /cache/{folder}/{filename} removes the entry; again it is 404; bad names 422."""
    with logged_in.client() as client:
        logged_in.upload(client, "m.bin", _data(MIB))
        client.post("/load/m.bin")
        _settled(logged_in)
        assert client.delete("/cache/models/m.bin").status_code == 204
        assert _complete(logged_in) == []
        assert logged_in.cache_files() == []
        reply = client.delete("/cache/models/m.bin")
        assert reply.status_code == 404
        assert reply.json()["detail"] == "models/m.bin is not cached"
        assert client.delete("/cache/models/bad%20name").status_code == 422


def test_cache_superseded_version_removed_once_new_cached(logged_in):
    """A new version of a name replaces the cached old one once the new one is complete."""
    with logged_in.client() as client:
        logged_in.upload(client, "m.bin", _data(MIB, 1))
        client.post("/load/m.bin")
        _settled(logged_in)
        new = _data(MIB, 2)
        etag = logged_in.upload(client, "m.bin", new)["etag"]
        assert client.post("/load/m.bin").content == new
    eventually(lambda: [e["etag"] for e in _complete(logged_in)] == [etag])
    assert logged_in.cache_files() == [etag]


def test_cache_max_bytes_evicts_least_recently_used_but_never_in_use(tmp_path, make_stack):
    """Beyond --cache-max-bytes the least recently used entry goes, unless it is being read."""
    size = 2 * MIB
    with make_stack(tmp_path, cache_max_bytes=int(2.5 * size)) as stack, stack.client() as client:
        stack.login(client)
        for name in ("a.bin", "b.bin", "c.bin"):
            stack.upload(client, name, _data(size, ord(name[0])))
        client.post("/load/a.bin")
        _settled(stack)
        client.post("/load/b.bin")
        _settled(stack)
        # a.bin is now the least recently used, but a reader holds it open.
        with client.stream("GET", "/resources/models/a.bin") as held:
            client.post("/load/c.bin")
            _settled(stack)
            names = {e["filename"] for e in _complete(stack)}
            assert names == {"a.bin", "c.bin"}  # b.bin went instead
            assert b"".join(held.iter_bytes()) == _data(size, ord("a"))


def test_pull_completes_entry_every_segment_authenticated(logged_in):
    """POST /pull starts a background fetch; GET shows it complete with every byte counted."""
    data = _data(3 * MIB)
    with logged_in.client() as client:
        logged_in.upload(client, "m.bin", data)
        reply = client.post("/pull/models/m.bin")
        assert reply.status_code == 202
        assert reply.json()["state"] in {"downloading", "complete"}
        eventually(lambda: client.get("/pull/models/m.bin").json()["state"] == "complete")
        state = client.get("/pull/models/m.bin").json()
        assert state["bytes_done"] == state["bytes_total"] == len(data)
        assert [e["filename"] for e in _complete(logged_in)] == ["m.bin"]
        # Pulled again, the cached entry is read and authenticated again: nothing fetched.
        assert client.post("/pull/models/m.bin").status_code == 202
        eventually(lambda: client.get("/pull/models/m.bin").json()["state"] == "complete")
        assert client.post("/load/m.bin").content == data


def test_pull_joined_by_a_load_fetches_once(logged_in):
    """A load during a pull shares its download: the right bytes, one entry."""
    data = _data(4 * MIB)
    with logged_in.client() as client:
        logged_in.upload(client, "m.bin", data)
        client.post("/pull/models/m.bin")
        assert client.post("/load/m.bin").content == data
        eventually(lambda: client.get("/pull/models/m.bin").json()["state"] == "complete")
    assert len(_complete(logged_in)) == 1


def test_pull_corrupted_blob_ends_in_error_without_entry(logged_in):
    """A blob damaged at the origin ends the pull in error and leaves no complete entry."""
    with logged_in.client() as client:
        etag = logged_in.upload(client, "m.bin", _data(3 * MIB))["etag"]
        (blob,) = (p for p in logged_in.hub_dir.rglob(etag) if p.is_file())
        with blob.open("r+b") as f:
            f.seek(2 * MIB)
            byte = f.read(1)
            f.seek(2 * MIB)
            f.write(bytes([byte[0] ^ 1]))
        client.post("/pull/models/m.bin")
        eventually(lambda: client.get("/pull/models/m.bin").json()["state"] == "error")
        assert "authentication" in client.get("/pull/models/m.bin").json()["detail"]
    eventually(lambda: _complete(logged_in) == [])
    _settled(logged_in)


def test_pull_bad_input_and_unknown(logged_in):
    """A pull of a bad name is 422; GET of a pull never started is 404; unknown ends in error."""
    with logged_in.client() as client:
        assert client.post("/pull/models/a%2Fb").status_code == 404
        assert client.post("/pull/models/bad%20name").status_code == 422
        assert client.get("/pull/models/never.bin").status_code == 404
        client.post("/pull/models/absent.bin")
        eventually(lambda: client.get("/pull/models/absent.bin").json()["state"] == "error")
        assert "not found" in client.get("/pull/models/absent.bin").json()["detail"]


def test_offline_cached_entry_served_with_hub_stopped(tmp_path, hub_app):
    """With the hub gone, a cached resource still loads (remembered metadata); others are 502."""
    data = _data(2 * MIB)
    hub = serve(hub_app(tmp_path / "hub"))
    hub_url = hub.__enter__()
    settings = Settings.from_environ({}, upstream_url=hub_url, cache_dir=tmp_path / "cache")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.post("/login", json={"email": PUBLISHER.email, "password": PUBLISHER.password})
        client.post("/upload/m.bin", files={"data": ("m.bin", data)})
        client.post("/upload/other.bin", files={"data": ("other.bin", data)})
        client.post("/upload/tiny.json", files={"data": ("tiny.json", b"{}")})
        assert client.post("/load/m.bin").content == data
        assert client.post("/load/tiny.json").content == b"{}"
        eventually(lambda: not any(p.name.startswith(".") for p in settings.cache_dir.iterdir()))
        hub.__exit__(None, None, None)
        assert client.post("/load/m.bin").content == data
        assert (
            client.get("/resources/models/m.bin", headers={"range": "bytes=5-9"}).content
            == (data[5:10])
        )
        # All in its small part, nothing to cache: the remembered metadata is enough.
        assert client.post("/load/tiny.json").content == b"{}"
        assert client.post("/load/other.bin").status_code == 502  # never served: unknown
        assert "unlockd_offline_loads_total 3.0" in client.get("/metrics").text


def test_cache_cli_list_and_prune_leave_entries_in_use(logged_in):
    """`unlockd cache list` names the entries; `prune` removes them, except one being read."""
    with logged_in.client() as client:
        logged_in.upload(client, "a.bin", _data(MIB, 1))
        logged_in.upload(client, "b.bin", _data(MIB, 2))
        client.post("/load/a.bin")
        client.post("/load/b.bin")
    _settled(logged_in)
    cache = str(logged_in.cache_dir)
    listing = _cli("cache", "list", "--cache-dir", cache)
    assert "models/a.bin" in listing
    assert "models/b.bin" in listing
    assert "2 entries" in listing
    in_use = next(e for e in CacheDirectory(logged_in.cache_dir).entries() if e.filename == "a.bin")
    fd = os.open(logged_in.cache_dir / in_use.etag, os.O_RDONLY)
    try:
        assert hold_shared(fd)
        pruned = _cli("cache", "prune", "--cache-dir", cache, "--max-bytes", "0")
    finally:
        os.close(fd)
    assert "1 entries removed" in pruned
    assert [e["filename"] for e in _complete(logged_in)] == ["a.bin"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list", "--cache-dir", "{tmp}/no"), "no cache directory at"),
        (("prune", "--cache-dir", "{tmp}", "--max-bytes", "-1"), "--max-bytes: expected"),
    ],
)
def test_cache_cli_bad_input_fails_with_one_line_changing_nothing(tmp_path, args, message):
    """`unlockd cache` with a missing directory or a negative size fails with one clear line."""
    (tmp_path / "keep").write_bytes(b"x")
    command = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "unlockd", "cache", *command],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "keep").exists()


def _cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "unlockd", *args], capture_output=True, text=True, check=True
    )
    return result.stdout


@pytest.fixture
def small_filesystem(tmp_path):
    """A 24 MiB tmpfs to fill for real (root only; skipped elsewhere)."""
    with tmpfs(tmp_path / "small", "24m") as mount:
        yield mount


def test_cache_min_free_evicts_to_keep_space(tmp_path, make_stack, small_filesystem):
    """Entries are evicted, least recently used first, to keep --cache-min-free free."""
    size = 6 * MIB
    cache_dir = small_filesystem / "cache"
    with (
        make_stack(tmp_path, cache_dir=cache_dir, cache_min_free=str(10 * MIB)) as stack,
        stack.client() as client,
    ):
        stack.login(client)
        for name in ("a.bin", "b.bin", "c.bin"):
            stack.upload(client, name, _data(size, ord(name[0])))
            assert client.post(f"/load/{name}").content == _data(size, ord(name[0]))
            _settled(stack)
        names = [e["filename"] for e in _complete(stack)]
        assert names == ["b.bin", "c.bin"]  # a.bin went to keep 10 MiB of 24 free
        assert CacheDirectory(cache_dir).free_bytes() >= 10 * MIB


def test_cache_dir_created_private(tmp_path, make_stack):
    """A cache directory the sidecar creates is 0700, and its entries 0600."""
    with make_stack(tmp_path, cache_dir=tmp_path / "new" / "cache") as stack, stack.client() as c:
        stack.login(c)
        stack.upload(c, "m.bin", _data(MIB))
        c.post("/load/m.bin")
        _settled(stack)
        assert stack.cache_dir.stat().st_mode & 0o777 == 0o700
        (entry,) = stack.cache_dir.iterdir()
        assert entry.stat().st_mode & 0o777 == 0o600


def test_cache_entry_larger_than_the_cache_streams_uncached(tmp_path, make_stack):
    """A resource bigger than --cache-max-bytes loads from the CDN and evicts nothing for it."""
    with make_stack(tmp_path, cache_max_bytes=3 * MIB) as stack, stack.client() as client:
        stack.login(client)
        stack.upload(client, "small.bin", _data(MIB, 1))
        stack.upload(client, "big.bin", _data(4 * MIB, 2))
        client.post("/load/small.bin")
        _settled(stack)
        assert client.post("/load/big.bin").content == _data(4 * MIB, 2)
        _settled(stack)
        assert [e["filename"] for e in _complete(stack)] == ["small.bin"]
        client.post("/pull/models/big.bin")
        eventually(lambda: client.get("/pull/models/big.bin").json()["state"] == "error")
        assert "did not keep" in client.get("/pull/models/big.bin").json()["detail"]


def test_pull_not_logged_in_401(stack):
    """A pull before any login is refused up front with 401, not started to fail later."""
    with stack.client() as client:
        reply = client.post("/pull/models/m.bin")
        assert reply.status_code == 401
        assert client.get("/pull/models/m.bin").status_code == 404
