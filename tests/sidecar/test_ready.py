"""/ready and the cache filesystem's free space (--cache-min-free), on a real small tmpfs."""

from __future__ import annotations

import os

import httpx
import pytest

from harness import tmpfs
from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs of this test's own (root only; skipped elsewhere)."""
    with tmpfs(tmp_path / "cache", "4m") as mount_point:
        yield mount_point


@pytest.mark.parametrize("min_free", ["1048576", "25%"])
def test_ready_cache_fs_below_min_free_is_503(small_fs, hub, min_free):
    """/ready is 200 with room on the cache filesystem, 503 with a reason once it is filled."""
    settings = Settings(cache_dir=small_fs, upstream_url=hub.url, cache_min_free=min_free)
    with serve(create_app(settings)) as url:
        assert httpx.get(f"{url}/ready").status_code == 200
        (small_fs / "filler").write_bytes(os.urandom(3_500_000))
        reply = httpx.get(f"{url}/ready")
        assert reply.status_code == 503
        assert reply.json()["detail"] == "not ready"
        [reason] = reply.json()["reasons"]
        assert "less than --cache-min-free" in reason
        (small_fs / "filler").unlink()
        assert httpx.get(f"{url}/ready").status_code == 200


def test_ready_min_free_env_variable_is_read(tmp_path):
    """UNLOCKD_CACHE_MIN_FREE takes a byte count or a percentage; a flag wins over it."""
    environ = {"UNLOCKD_CACHE_MIN_FREE": "12.5%", "UNLOCKD_CACHE_DIR": str(tmp_path)}
    assert str(Settings.from_environ(environ).cache_min_free) == "12.5%"
    from_flag = Settings.from_environ(environ, cache_min_free="2000000")
    assert from_flag.cache_min_free.bytes_of(10**12) == 2_000_000
    assert Settings().cache_min_free.bytes_of(1000) == 100
