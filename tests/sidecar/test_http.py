"""The sidecar's plain endpoints, error bodies, local token and metrics, over real sockets."""

from __future__ import annotations

import threading

import httpx
import pytest

from harness import eventually
from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings


def test_health_stack_up_answers_ok(shared):
    """/health answers 200 {"status": "ok"}."""
    response = httpx.get(f"{shared.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_health_upstream_down_still_ok(tmp_path):
    """/health never touches upstream: it is 200 with the upstream unreachable."""
    settings = Settings.from_environ(
        {}, upstream_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache"
    )
    with serve(create_app(settings)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["detail"] == "not ready"
        assert any("upstream" in reason for reason in body["reasons"])


def test_ready_stack_up_ok(shared):
    """/ready is 200 when the cache dir is writable and the hub answers."""
    response = httpx.get(f"{shared.url}/ready")
    assert response.status_code == 200, response.text


def test_ready_cache_unwritable_not_ready(tmp_path, make_stack):
    """/ready is 503 naming the cache dir when it cannot be written (here: not a directory)."""
    with make_stack(tmp_path) as stack:
        moved = stack.cache_dir.rename(tmp_path / "moved-away")
        stack.cache_dir.write_bytes(b"")  # works even as root, unlike permissions
        try:
            response = httpx.get(f"{stack.url}/ready")
            assert httpx.get(f"{stack.url}/health").status_code == 200
        finally:
            stack.cache_dir.unlink()
            moved.rename(stack.cache_dir)
        assert httpx.get(f"{stack.url}/ready").status_code == 200
    assert response.status_code == 503
    assert any("cache" in reason for reason in response.json()["reasons"])


def test_status_logged_in_shows_email_not_secrets(stack):
    """/status shows authenticated, email and cache dir, and never the password or token."""
    with stack.client() as client:
        before = client.get("/status").json()
        assert before["authenticated"] is False
        assert before["email"] is None
        assert before["model_cache_dir"] == str(stack.cache_dir)
        stack.login(client)
        response = client.get("/status")
    body = response.json()
    assert body["authenticated"] is True
    assert body["email"] == stack.email
    assert stack.password not in response.text
    assert "token" not in response.text.lower()


def test_login_wrong_password_unauthorized(shared):
    """Rejected credentials are 401 with a JSON detail."""
    response = httpx.post(f"{shared.url}/login", json={"email": shared.email, "password": "nope"})
    assert response.status_code == 401
    assert "detail" in response.json()
    assert "nope" not in response.text


def test_login_upstream_down_bad_gateway(tmp_path):
    """An unreachable upstream at login is 502."""
    settings = Settings.from_environ(
        {}, upstream_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache"
    )
    with serve(create_app(settings)) as url:
        response = httpx.post(f"{url}/login", json={"email": "a@b.c", "password": "pw"})
    assert response.status_code == 502
    assert "detail" in response.json()


@pytest.mark.parametrize("path", ["/load/x.bin", "/resources/models/x.bin"])
def test_download_not_logged_in_unauthorized(stack, path):
    """Without /login, downloads are 401."""
    with stack.client() as client:
        response = client.post(path) if path.startswith("/load") else client.get(path)
    assert response.status_code == 401
    assert "detail" in response.json()


def test_upload_not_logged_in_unauthorized(stack):
    """Without /login, uploads are 401 and leave nothing behind."""
    with stack.client() as client:
        response = client.post("/upload/x.bin", files={"data": ("x.bin", b"abc")})
    assert response.status_code == 401
    assert stack.hub_pending_uploads() == []


def test_load_missing_resource_not_found(shared):
    """A resource the hub does not have is 404."""
    with shared.client() as client:
        shared.login(client)
        response = client.post("/load/missing.bin")
    assert response.status_code == 404
    assert "detail" in response.json()


def test_upload_reader_role_forbidden(stack):
    """A reader account may not upload: 403, nothing left at the hub."""
    with stack.client() as client:
        stack.login(client, "reader@example.com", "reader-password")
        response = client.post("/upload/x.bin", files={"data": ("x.bin", b"abc")})
    assert response.status_code == 403
    assert stack.hub_pending_uploads() == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/load/a%2Fb", 404),
        ("GET", "/resources/models", 404),
        ("GET", "/resources/a%2Fb/c", 404),
        ("GET", "/load/x.bin", 405),
        ("POST", "/health", 405),
        ("DELETE", "/resources/models/x.bin", 405),
    ],
)
def test_unmatched_request_json_error(shared, method, path, status):
    """Unknown paths and methods get JSON 404/405 bodies."""
    response = httpx.request(method, f"{shared.url}{path}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json()


def test_unlock_without_archive_not_found(shared):
    """/unlock without an archive configured is 404 "Encrypted archive not found"."""
    response = httpx.post(
        f"{shared.url}/unlock", json={"email": shared.email, "password": shared.password}
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Encrypted archive not found"}


def test_unlock_status_idle(shared):
    """/unlock/status reports the idle state before any run."""
    body = httpx.get(f"{shared.url}/unlock/status").json()
    assert body["state"] == "idle"
    assert body["progress"] == {"bytes_done": 0, "bytes_total": 0}


@pytest.mark.parametrize("body", [b"", b"[]", b'{"email": "a"}', b'{"email": 1, "password": "x"}'])
def test_unlock_bad_body_unprocessable(shared, body):
    """/unlock needs a JSON object with email and password."""
    response = httpx.post(
        f"{shared.url}/unlock", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_token_required_everywhere_but_health(tmp_path, make_stack):
    """With an API token, every endpoint but /health is 401 without the right bearer."""
    with make_stack(tmp_path, api_token="local-secret") as stack, stack.client() as client:
        assert client.get("/health").status_code == 200
        for method, path in [
            ("GET", "/status"),
            ("GET", "/ready"),
            ("GET", "/metrics"),
            ("POST", "/login"),
            ("POST", "/load/x.bin"),
            ("GET", "/resources/models/x.bin"),
            ("HEAD", "/resources/models/x.bin"),
            ("POST", "/upload/x.bin"),
            ("POST", "/unlock"),
            ("GET", "/unlock/status"),
            ("GET", "/nope"),
        ]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "local"}]:
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer local-secret"}
        assert httpx.get(f"{stack.url}/status", headers=good).status_code == 200
        response = httpx.post(
            f"{stack.url}/login",
            json={"email": stack.email, "password": stack.password},
            headers=good,
        )
        assert response.status_code == 200


def test_metrics_count_by_route_template(stack):
    """/metrics counts requests per route template, never per raw path."""
    with stack.client() as client:
        client.get("/health")
        client.post("/load/one.bin")
        client.post("/load/two.bin")
        client.get("/no/such/path")
        text = client.get("/metrics").text
    assert 'unlockd_http_requests_total{method="GET",route="/health",status="200"} 1.0' in text
    assert 'route="/load/{filename}",status="401"} 2.0' in text
    assert 'route="unmatched",status="404"} 1.0' in text
    assert "one.bin" not in text
    assert "unlockd_cache_hits_total" in text


def test_health_while_downloads_run_answers_ok(stack):
    """/health answers 200 while eight large downloads are streaming (no timing: see bench)."""
    data = bytes(range(256)) * (40 * 4096)  # 40 MiB
    with stack.client() as client:
        stack.login(client)
        stack.upload(client, "big.bin", data)
    streaming = threading.Barrier(9)
    stop = threading.Event()
    failures: list[BaseException] = []

    def download() -> None:
        try:
            with stack.client() as client:
                first = True
                while not stop.is_set():
                    with client.stream("POST", "/load/big.bin") as response:
                        for _ in response.iter_bytes():
                            if first:
                                streaming.wait(timeout=30)
                                first = False
                            if stop.is_set():
                                break
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    threads = [threading.Thread(target=download) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        streaming.wait(timeout=30)  # every download has its first bytes and is still going
        with stack.client() as client:
            replies = [client.get("/health") for _ in range(30)]
        still_running = sum(thread.is_alive() for thread in threads)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert [(r.status_code, r.json()) for r in replies] == [(200, {"status": "ok"})] * 30
    assert still_running == 8
    assert failures == []


def test_unlock_run_reports_error_through_status(tmp_path, make_stack):
    """/unlock starts a background run; /unlock/status shows it end in error without a key."""
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"not really an archive")
    with make_stack(tmp_path, archive=archive) as stack:
        body = {"email": stack.email, "password": stack.password}
        started = httpx.post(f"{stack.url}/unlock", json=body)
        assert started.status_code == 200
        assert started.json() == {"state": "authenticating"}

        def finished() -> dict | None:
            status = httpx.get(f"{stack.url}/unlock/status").json()
            return status if status["state"] in {"ready", "error"} else None

        status = eventually(finished, timeout=20)
        assert status["state"] == "error"
        assert status["error"]
        assert stack.password not in str(status)
        metrics = httpx.get(f"{stack.url}/metrics").text
        assert 'unlockd_unlock_state{unlockd_unlock_state="error"} 1.0' in metrics


def test_load_after_upstream_token_expiry_concurrent_all_succeed(tmp_path, make_stack, clock):
    """Once the hub's token has expired, twenty concurrent loads all succeed (one re-login)."""
    with make_stack(tmp_path, hub_settings={"clock": clock}) as stack:
        with stack.client() as client:
            stack.login(client)
            stack.upload(client, "t.bin", b"token bytes")
        clock.advance(3600)  # the hub's --token-ttl default
        results: list[int] = []

        def load(client: httpx.Client) -> None:
            response = client.post("/load/t.bin")
            results.append(response.status_code if response.content == b"token bytes" else 0)

        with stack.client() as client:  # one pool, twenty connections at once
            threads = [threading.Thread(target=load, args=(client,)) for _ in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
    assert results == [200] * 20
