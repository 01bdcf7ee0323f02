"""`unlockd serve` and `unlockd dev` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from unlock.support import docker_required, engine_client, probe_docker
from unlockd.demo import DEMO_IMAGE

UNLOCKD = [sys.executable, "-m", "unlockd"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited early: {process.communicate()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail("server did not come up")


def stop(process: subprocess.Popen) -> tuple[int, str, str]:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    return process.returncode, out, err


def start(args, env_extra=None, cwd=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLOCKD_")}
    env.update(env_extra or {})
    return subprocess.Popen(
        [*UNLOCKD, *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_flags_over_env_runs_and_stops(tmp_path):
    """`unlockd serve` takes flags over UNLOCKD_* variables, serves, and exits 0 on SIGINT."""
    port = free_port()
    process = start(
        ["serve", "--port", str(port), "--cache-dir", str(tmp_path / "c")],
        {"UNLOCKD_PORT": "1", "UNLOCKD_UPSTREAM_URL": "http://127.0.0.1:9"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        status = httpx.get(f"{url}/status").json()
        assert status["model_cache_dir"] == str(tmp_path / "c")
        assert status["upstream_url"] == "http://127.0.0.1:9"
        assert httpx.get(f"{url}/ready").status_code == 503
    finally:
        returncode, _, err = stop(process)
    assert returncode == 0, err
    assert "without UNLOCKD_API_TOKEN" not in err


def test_serve_public_bind_without_token_warns(tmp_path):
    """Binding a non-loopback address without an API token logs a warning."""
    port = free_port()
    process = start(
        ["serve", "--host", "0.0.0.0", "--port", str(port), "--cache-dir", str(tmp_path)]  # noqa: S104
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        returncode, _, err = stop(process)
    assert returncode == 0
    assert "without UNLOCKD_API_TOKEN" in err


def test_serve_bad_env_exits_with_message(tmp_path):
    """A bad variable stops `unlockd serve` with a message that names it."""
    result = subprocess.run(
        [*UNLOCKD, "serve", "--cache-dir", str(tmp_path)],
        env={**os.environ, "UNLOCKD_PORT": "x"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "UNLOCKD_PORT: expected an integer, got 'x'" in result.stderr


def test_dev_stack_demo_session_works(tmp_path):
    """`unlockd dev` runs hub + sidecar with the printed demo account; the session works."""
    if port_in_use(8600) or port_in_use(8700):
        pytest.skip("ports 8600/8700 are taken")
    process = start(["dev"], cwd=tmp_path)
    url = "http://127.0.0.1:8600"
    try:
        wait_healthy(url, process)
        wait_healthy("http://127.0.0.1:8700", process)
        password = (tmp_path / ".unlockd-dev" / "demo-password").read_text().strip()
        with httpx.Client(base_url=url, timeout=30) as client:
            login = client.post("/login", json={"email": "demo@example.com", "password": password})
            assert login.status_code == 200
            data = os.urandom(300_000)
            upload = client.post("/upload/model.bin", files={"data": ("model.bin", data)})
            assert upload.status_code == 200
            assert client.post("/load/model.bin").content == data
            unlocked = _unlock_demo(client, password)
    finally:
        returncode, out, err = stop(process)
    assert returncode == 0, err
    docker_host, no_docker = probe_docker()
    if no_docker is None or docker_required():
        assert unlocked["state"] == "ready", unlocked
        assert unlocked["images"] == [DEMO_IMAGE]
        with engine_client(docker_host) as engine:
            engine.delete(f"/images/{DEMO_IMAGE}", params={"force": "1"})
    else:
        assert unlocked["state"] == "error"
        assert "Docker" in unlocked["error"]
    assert "demo@example.com" in out
    assert password in out
    assert "curl -s -C -" in out
    assert (tmp_path / ".unlockd-dev" / "cache").is_dir()
    assert (tmp_path / ".unlockd-dev" / "hub").is_dir()


def _unlock_demo(client: httpx.Client, password: str) -> dict:
    started = client.post("/unlock", json={"email": "demo@example.com", "password": password})
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + 60
    while (status := client.get("/unlock/status").json())["state"] not in {"ready", "error"}:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status
