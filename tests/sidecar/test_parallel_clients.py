"""Parallel range downloaders and resumes against a live sidecar: exact bytes, a warm cache."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from harness import eventually

SIZE = 3 * (1 << 20) + 777


def _data() -> bytes:
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(SIZE // 32 + 1))[
        :SIZE
    ]


def _entries(stack) -> list[str]:
    return [name for name in stack.cache_files() if not name.startswith(".")]


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
def test_aria2c_eight_connections_exact_and_cache_complete(tmp_path, make_stack):
    """aria2c -x 8 -s 8 gets the exact bytes and leaves one complete entry in the cache."""
    data = _data()
    with make_stack(tmp_path, cdn_part_size=1 << 20) as stack:
        with stack.client() as client:
            stack.login(client)
            stack.upload(client, "big.bin", data)
        out = tmp_path / "out"
        subprocess.run(
            ["aria2c", "-q", "-x", "8", "-s", "8", "-k", "1M", "--allow-overwrite=true",
             "-d", str(out), "-o", "big.bin", f"{stack.url}/resources/models/big.bin"],
            check=True, timeout=120,
        )  # fmt: skip
        assert (out / "big.bin").read_bytes() == data
        eventually(lambda: len(_entries(stack)) == 1 and len(stack.cache_files()) == 1)


def test_curl_resume_completes_and_warms_cache(tmp_path, make_stack):
    """A download cut short then resumed with curl -C - is exact and leaves the entry cached."""
    data = _data()
    with make_stack(tmp_path, cdn_part_size=1 << 20) as stack:
        with stack.client() as client:
            stack.login(client)
            stack.upload(client, "big.bin", data)
        out = tmp_path / "resumed.bin"
        url = f"{stack.url}/resources/models/big.bin"
        subprocess.run(["curl", "-sS", "-r", "0-999999", "-o", str(out), url], check=True)
        subprocess.run(["curl", "-sS", "-C", "-", "-o", str(out), url], check=True)
        assert out.read_bytes() == data
        eventually(lambda: len(_entries(stack)) == 1 and len(stack.cache_files()) == 1)
