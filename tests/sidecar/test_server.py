"""`unlockd serve` and `unlockd dev` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from harness import eventually
from unlock.support import Engine, docker_required, engine_client, probe_docker

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
    port, hub_port = free_port(), free_port()
    docker_host, no_docker = probe_docker()
    # A tag of this test's own: a user's unlockd-demo:latest is not touched.
    prefix = f"unlockd-test-{uuid.uuid4().hex[:12]}"
    image = f"{prefix}/demo:v1"
    # dev keeps its own settings: variables meant for `serve` must not break the session.
    hostile = {"UNLOCKD_API_TOKEN": "not-in-the-banner", "UNLOCKD_CACHE_DIR": "/proc/nope"}
    args = ["dev", "--port", str(port), "--hub-port", str(hub_port), "--demo-image", image]
    process = start(args, hostile, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        wait_healthy(f"http://127.0.0.1:{hub_port}", process)
        password = (tmp_path / ".unlockd-dev" / "demo-password").read_text().strip()
        with httpx.Client(base_url=url, timeout=30) as client:
            login = client.post("/login", json={"email": "demo@example.com", "password": password})
            assert login.status_code == 200
            data = os.urandom(300_000)
            upload = client.post("/upload/model.bin", files={"data": ("model.bin", data)})
            assert upload.status_code == 200
            assert client.post("/load/model.bin").content == data
            # Sealed once both servers are up, maybe after the calls above.
            eventually((tmp_path / ".unlockd-dev" / "images.enc").exists)
            unlocked = _unlock_demo(client, password)
    finally:
        returncode, out, err = stop(process)
    assert returncode == 0, err
    if no_docker is None or docker_required():
        with engine_client(docker_host) as engine_http:
            engine = Engine(engine_http, prefix=prefix)
            try:
                assert unlocked["state"] == "ready", unlocked
                assert unlocked["images"] == [image]
                assert engine.tags() == {image}
            finally:
                engine.remove_all()
    else:
        assert unlocked["state"] == "error"
        assert "Docker" in unlocked["error"]
    assert "demo@example.com" in out
    assert password in out
    assert "curl -s -C -" in out
    assert f"{url}/login" in out
    assert f"images [{image}]" in out
    assert 'cd "$(mktemp -d)"' in out
    assert (tmp_path / ".unlockd-dev" / "cache").is_dir()
    assert (tmp_path / ".unlockd-dev" / "hub").is_dir()
    # The demo image is sealed from memory: no plaintext archive on disk.
    assert sorted(p.name for p in (tmp_path / ".unlockd-dev").iterdir()) == [
        "cache",
        "demo-password",
        "hub",
        "images.enc",
    ]


def _unlock_demo(client: httpx.Client, password: str) -> dict:
    started = client.post("/unlock", json={"email": "demo@example.com", "password": password})
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + 60
    while (status := client.get("/unlock/status").json())["state"] not in {"ready", "error"}:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def error_lines(stderr: str) -> list[str]:
    """Lines that report an error: uvicorn's ERROR lines and the CLI's own."""
    return [line for line in stderr.splitlines() if line.startswith(("ERROR", "unlockd "))]


def test_serve_busy_port_fails_with_one_line(tmp_path):
    """A port in use stops `unlockd serve` with exit 1 and one error line, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = start(["serve", "--port", str(port), "--cache-dir", str(tmp_path)])
        _, err = process.communicate(timeout=30)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert "address already in use" in errors[0].lower()


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--cache-dir", "/proc/nope/cache"], {}),
        ([], {"UNLOCKD_CACHE_DIR": "/proc/nope/cache"}),
    ],
)
def test_serve_uncreatable_cache_dir_fails_with_one_line(args, env):
    """A cache dir that cannot be created is one line naming the flag and the variable."""
    process = start(["serve", "--port", str(free_port()), *args], env)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert err.strip().splitlines() == [
        (
            "unlockd serve: cannot create the model cache dir (--cache-dir, UNLOCKD_CACHE_DIR) "
            "/proc/nope/cache: No such file or directory"
        )
    ]


def test_serve_bad_upstream_flag_is_named(tmp_path):
    """A bad --upstream is reported under the flag's name, not the setting's."""
    process = start(["serve", "--upstream", "ftp://x", "--cache-dir", str(tmp_path)])
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert err.strip() == (
        "unlockd serve: --upstream: expected an http:// or https:// URL, got 'ftp://x'"
    )


def test_serve_sigterm_exits_zero(tmp_path):
    """SIGTERM is a clean shutdown of `unlockd serve`: exit 0."""
    port = free_port()
    process = start(["serve", "--port", str(port), "--cache-dir", str(tmp_path)])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_serve_malformed_multipart_prints_nothing_bare(tmp_path):
    """A malformed multipart body is a 422; the parser's own warning is not printed bare."""
    port = free_port()
    process = start(["serve", "--port", str(port), "--cache-dir", str(tmp_path)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        response = httpx.post(
            f"{url}/upload/x.bin",
            content=b"--B\r\nnot a part at all",
            headers={"content-type": "multipart/form-data; boundary=XYZ"},
        )
        assert response.status_code == 422
    finally:
        returncode, _, err = stop(process)
    assert returncode == 0
    assert "Expected boundary" not in err, err


def test_dev_busy_port_fails_with_one_line(tmp_path):
    """`unlockd dev` with its hub port taken exits 1 with one error line, no traceback."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        hub_port = busy.getsockname()[1]
        process = start(["dev", "--port", str(port), "--hub-port", str(hub_port)], cwd=tmp_path)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert "address already in use" in errors[0].lower()
    assert "Try it" not in out  # no banner for a stack that is not up
    assert not port_in_use(port)


def test_dev_uncreatable_data_dir_fails_with_one_line(tmp_path):
    """`unlockd dev` in a directory it cannot write to exits 1 with one line."""
    (tmp_path / ".unlockd-dev").write_text("a file where the data dir should be")
    process = start(["dev"], cwd=tmp_path)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("unlockd dev: cannot create the dev stack's data dir")
