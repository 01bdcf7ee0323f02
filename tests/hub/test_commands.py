"""`unlockd hub` and `unlockd hub add-user` as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from harness import eventually
from unlockd.hub.database import Database


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
        _wait_healthy(url, process)
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
    # The same runner as `unlockd serve`: SIGINT is a clean shutdown.
    assert process.returncode == 0
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


def _wait_healthy(url: str, process: subprocess.Popen[str]) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            assert process.poll() is None, process.communicate()
            return False

    eventually(healthy, timeout=20)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("ERROR", "unlockd"))]


def test_hub_command_sigterm_exits_zero(tmp_path):
    """SIGTERM (as from a container runtime) is a clean shutdown: exit 0, no traceback."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "unlockd", "hub", "--port", str(port), "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_hub_command_busy_port_fails_with_one_line(tmp_path):
    """A port in use stops the hub with exit 1 and one error line, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _unlockd("hub", "--port", str(port), "--data-dir", str(tmp_path), env={})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "address already in use" in errors[0].lower()


def test_hub_command_uncreatable_data_dir_fails_with_one_line():
    """A data dir that cannot be created is one line naming the flag and variable."""
    result = _unlockd("hub", "--data-dir", "/proc/nope/hub", env={})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        (
            "unlockd hub: cannot create the hub's data dir (--data-dir, UNLOCKD_HUB_DATA_DIR) "
            "/proc/nope/hub: No such file or directory"
        )
    ]


def test_hub_command_bad_token_ttl_names_the_flag(tmp_path):
    """A bad --token-ttl is reported under the flag's name."""
    result = _unlockd("hub", "--data-dir", str(tmp_path), "--token-ttl", "0", env={})
    assert result.returncode == 1
    assert "--token-ttl: expected an integer >= 1, got 0" in result.stderr


@pytest.mark.parametrize("where", ["environment", "hub-flag"])
def test_add_user_command_data_dir_from_hub_flag_or_environment(tmp_path, where):
    """add-user without its own --data-dir uses the hub's --data-dir, else UNLOCKD_HUB_DATA_DIR."""
    data_dir = tmp_path / "hub"
    env = {"UNLOCKD_PASSWORD": "pw-123"}
    args = ["hub", "add-user", "--email", "ops@example.com"]
    if where == "environment":
        env["UNLOCKD_HUB_DATA_DIR"] = str(data_dir)
    else:
        env["UNLOCKD_HUB_DATA_DIR"] = str(tmp_path / "not-this-one")
        args = ["hub", "--data-dir", str(data_dir), "add-user", "--email", "ops@example.com"]
    result = _unlockd(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert asyncio.run(_get_user(data_dir / "hub.sqlite3", "ops@example.com")) is not None
    assert not (tmp_path / "not-this-one").exists()


async def _get_user(database, email):
    db = Database(database)
    await db.open()
    try:
        return await db.get_user(email)
    finally:
        await db.close()


@pytest.mark.parametrize("kind", ["file", "uncreatable"])
def test_add_user_command_bad_data_dir_one_line(tmp_path, kind):
    """add-user with a data dir that is a file or cannot be created fails in one line."""
    data_dir = tmp_path / "file" if kind == "file" else tmp_path / "file" / "sub"
    (tmp_path / "file").write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "unlockd", "hub", "add-user", "--data-dir", str(data_dir),
         "--email", "a@example.com"],
        env={**os.environ, "UNLOCKD_PASSWORD": "pw"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("unlockd hub: cannot create the hub's data dir")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_hub_command_corrupt_database_one_line(tmp_path):
    """A data dir whose database is not SQLite stops `unlockd hub` with one line, exit 1."""
    (tmp_path / "hub.sqlite3").write_bytes(b"this is not a database" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "unlockd", "hub", "--data-dir", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot open the hub database" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
