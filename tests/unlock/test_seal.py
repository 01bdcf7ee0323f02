"""`unlockd seal` as a subprocess, against a real hub and a real Docker engine."""

from __future__ import annotations

import contextlib
import os
import pty
import socket
import subprocess
import sys

import anyio
import httpx
import pytest

from harness import PUBLISHER, READER
from unlockd.api_client import ApiClient
from unlockd.crypto_stream import Decryptor
from unlockd.docker import DockerLoader
from unlockd.errors import ForbiddenError
from unlockd.seal import seal
from unlockd.unlock import UnlockManager


def _seal(args, *, password=PUBLISHER[1], stdin=None, docker_host=None):
    env = {**os.environ, "UNLOCKD_PASSWORD": password}
    if docker_host is not None:
        env["DOCKER_HOST"] = docker_host
    return subprocess.run(
        [sys.executable, "-m", "unlockd", "seal", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def _args(hub_url, *, key_id="cli-images", email=PUBLISHER[0]):
    return ["--key-id", key_id, "--upstream", hub_url, "--email", email]


async def _key(hub_url, key_id):
    async with httpx.AsyncClient() as http:
        api = ApiClient(http, hub_url)
        await api.login(*READER)
        return await api.get_key(key_id)


def _decrypt(path, key):
    decryptor = Decryptor(key)
    return decryptor.update(path.read_bytes()) + decryptor.finalize()


def _dead_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_seal_file_writes_archive_and_registers_key(hub_url, tmp_path):
    """A tar file is encrypted to OUTPUT with empty associated data; the hub has its key."""
    plain = os.urandom(3 << 20)
    (tmp_path / "in.tar").write_bytes(plain)
    out = tmp_path / "out.enc"
    result = _seal([str(tmp_path / "in.tar"), str(out), *_args(hub_url, key_id="cli-file")])
    assert result.returncode == 0, result.stderr
    assert b"cli-file" in result.stdout
    assert _decrypt(out, await _key(hub_url, "cli-file")) == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar", "out.enc"]


async def test_seal_stdin_dash_reads_stdin(hub_url, tmp_path):
    """`-` reads the archive from stdin."""
    plain = os.urandom(100_000)
    out = tmp_path / "out.enc"
    result = _seal(["-", str(out), *_args(hub_url, key_id="cli-stdin")], stdin=plain)
    assert result.returncode == 0, result.stderr
    assert _decrypt(out, await _key(hub_url, "cli-stdin")) == plain


async def test_seal_async_iterable_source_round_trips(hub_url, tmp_path):
    """seal() takes any async byte source; nothing but the archive is written."""
    pieces = [os.urandom(300_000), b"", os.urandom(5)]

    async def source():
        for piece in pieces:
            yield piece

    out = tmp_path / "out.enc"
    size = await seal(
        source(),
        out,
        key_id="api-iterable",
        upstream=hub_url,
        email=PUBLISHER[0],
        password=PUBLISHER[1],
    )
    assert size == out.stat().st_size
    assert _decrypt(out, await _key(hub_url, "api-iterable")) == b"".join(pieces)
    assert [p.name for p in tmp_path.iterdir()] == ["out.enc"]


async def test_seal_reader_account_fails_before_reading_input(hub_url, tmp_path):
    """A reader account is refused right after login, from the login reply's role."""
    read = False

    async def source():
        nonlocal read
        read = True
        yield b"x"

    with pytest.raises(ForbiddenError, match="is not a publisher"):
        await seal(
            source(),
            tmp_path / "out.enc",
            key_id="k",
            upstream=hub_url,
            email=READER[0],
            password=READER[1],
        )
    assert read is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.docker
async def test_seal_images_from_engine_unlock_restores_them(
    hub_url, docker_host, engine, image_archive, tmp_path
):
    """--image exports from the engine; unlocking the result brings the images back."""
    tags = [engine.new_tag(), engine.new_tag()]
    engine.load(image_archive({t: {"f.txt": t.encode()} for t in tags}))
    out = tmp_path / "images.enc"
    args = [str(out), "--image", tags[0], "--image", tags[1], *_args(hub_url, key_id="cli-img")]
    result = _seal(args, docker_host=docker_host)
    assert result.returncode == 0, result.stderr
    engine.remove_all()
    assert engine.tags() == set()
    async with httpx.AsyncClient() as http:
        loader = DockerLoader(docker_host)
        async with anyio.create_task_group() as tg:
            manager = UnlockManager(
                tg, archive=out, key_id="cli-img", api=ApiClient(http, hub_url), docker=loader
            )
            await manager.start(*READER)
        await loader.close()
    assert manager.status()["state"] == "ready", manager.status()
    assert sorted(manager.status()["images"]) == sorted(tags)
    assert engine.tags() == set(tags)


@pytest.mark.docker
def test_seal_unknown_image_fails_clearly(hub_url, docker_host, tmp_path):
    """An --image the engine does not have is one clear line and no output."""
    out = tmp_path / "out.enc"
    result = _seal(
        [str(out), "--image", "unlockd-test-none/absent:v0", *_args(hub_url)],
        docker_host=docker_host,
    )
    assert result.returncode == 1
    assert b"absent:v0" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-input", b"no input"),
        ("both", b"not both"),
        ("missing-input", b"is not a file"),
        ("hub-down", b"upstream unreachable"),
        ("bad-password", b"rejected the credentials"),
        ("not-publisher", b"is not a publisher"),
        ("bad-key-id", b"invalid key id"),
        ("bad-upstream", b"--upstream: expected an http:// or https:// URL, got 'ftp://x'"),
    ],
)
def test_seal_error_one_line_exit_1_no_output(hub_url, tmp_path, case, message):
    """Each bad invocation exits 1 with one clear line on stderr and leaves no file behind."""
    src = tmp_path / "in.tar"
    src.write_bytes(b"x" * 1000)
    out = tmp_path / "out.enc"
    password = PUBLISHER[1]
    args = {
        "no-input": [str(out), *_args(hub_url)],
        "both": [str(src), str(out), "--image", "a:b", *_args(hub_url)],
        "missing-input": [str(tmp_path / "absent.tar"), str(out), *_args(hub_url)],
        "hub-down": [str(src), str(out), *_args(_dead_url())],
        "bad-password": [str(src), str(out), *_args(hub_url)],
        "not-publisher": [str(src), str(out), *_args(hub_url, email=READER[0])],
        "bad-key-id": [str(src), str(out), *_args(hub_url, key_id="../x")],
        "bad-upstream": [str(src), str(out), *_args("ftp://x")],
    }[case]
    if case == "bad-password":
        password = "wrong"
    if case == "not-publisher":
        password = READER[1]
    result = _seal(args, password=password)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar"]


def test_seal_on_terminal_draws_progress_bar(hub_url, tmp_path):
    """With stderr on a terminal, seal draws a progress bar that reaches 100%."""
    (tmp_path / "in.tar").write_bytes(os.urandom(2 << 20))
    out = tmp_path / "out.enc"
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "unlockd",
                "seal",
                str(tmp_path / "in.tar"),
                str(out),
                *_args(hub_url, key_id="cli-tty"),
            ],
            env={**os.environ, "UNLOCKD_PASSWORD": PUBLISHER[1]},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=secondary,
            timeout=60,
            check=False,
        )
        os.close(secondary)
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the terminal is drained
            while chunk := os.read(primary, 65536):
                drawn += chunk
    finally:
        os.close(primary)
    assert proc.returncode == 0
    assert b"seal" in drawn
    assert b"100%" in drawn


async def test_seal_output_directory_fails_before_the_key_changes(hub_url, tmp_path):
    """OUTPUT naming a directory fails in one line before login: the registered key stays."""
    (tmp_path / "in.tar").write_bytes(os.urandom(100_000))
    first = _seal([str(tmp_path / "in.tar"), str(tmp_path / "a.enc"), *_args(hub_url, key_id="k1")])
    assert first.returncode == 0, first.stderr
    key = await _key(hub_url, "k1")
    (tmp_path / "outdir").mkdir()
    result = _seal(
        [str(tmp_path / "in.tar"), str(tmp_path / "outdir"), *_args(hub_url, key_id="k1")]
    )
    assert result.returncode == 1
    assert b"is a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert await _key(hub_url, "k1") == key
    assert _decrypt(tmp_path / "a.enc", key) == (tmp_path / "in.tar").read_bytes()
