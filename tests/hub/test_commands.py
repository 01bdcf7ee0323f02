"""`unlockd hub` and `unlockd hub add-user` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def _unlockd(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unlockd", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_add_user_command_then_hub_command_serves_logins(tmp_path):
    """add-user takes the password from UNLOCKD_PASSWORD; the served hub accepts it."""
    data_dir = tmp_path / "hub"
    result = _unlockd(
        "hub",
        "add-user",
        "--data-dir",
        str(data_dir),
        "--email",
        "ops@example.com",
        "--role",
        "publisher",
        env={"UNLOCKD_PASSWORD": "s3cret-pw"},
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout

    port = _free_port()
    env = {**os.environ, "UNLOCKD_HUB_DATA_DIR": str(data_dir), "UNLOCKD_HUB_PORT": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "unlockd", "hub", "--port", str(port), "--token-ttl", "42"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "hub did not start"
            time.sleep(0.05)
        reply = httpx.post(
            f"{url}/auth/login", json={"email": "ops@example.com", "password": "s3cret-pw"}
        )
        assert reply.status_code == 200
        assert reply.json()["expires_in"] == 42
        token = reply.json()["token"]
        assert (
            httpx.post(f"{url}/uploads", headers={"authorization": f"Bearer {token}"}).status_code
            == 201
        )
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises the signal: the conventional 130 for SIGINT.
    assert process.returncode == 130
    assert "Traceback" not in output
    assert "s3cret-pw" not in output
    assert token not in output


def test_add_user_command_without_password_fails_cleanly(tmp_path):
    """Without UNLOCKD_PASSWORD and without a terminal, add-user exits 1 with a message."""
    env = {key: value for key, value in os.environ.items() if key != "UNLOCKD_PASSWORD"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlockd",
            "hub",
            "add-user",
            "--data-dir",
            str(tmp_path),
            "--email",
            "a@b.c",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "UNLOCKD_PASSWORD" in result.stderr


def test_hub_command_bad_environment_fails_naming_the_key(tmp_path):
    """A malformed UNLOCKD_HUB_* variable stops the command with its name."""
    result = _unlockd("hub", "--data-dir", str(tmp_path), env={"UNLOCKD_HUB_TOKEN_TTL": "soon"})
    assert result.returncode == 1
    assert "UNLOCKD_HUB_TOKEN_TTL" in result.stderr
