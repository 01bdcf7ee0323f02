"""The sidecar under SPEC §12's limits, over real sockets: issue 11's repros, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness import PUBLISHER, eventually, eventually_async
from limits_support import (
    bound_socket,
    closed_within,
    connect,
    elapsed,
    publish_blob,
    read_all,
    request,
    send_quietly,
    serve_together,
    server_connections,
    status_and_detail,
)
from servers import serve
from unlockd import limits as limits_module
from unlockd.app import create_app
from unlockd.config import Limits, Settings
from unlockd.limits import SendBudget
from unlockd.server import limit_options, run_servers, server_configs

BIG = 24 * 1024 * 1024  # more than loopback's socket buffers hold, so a client can stall


@pytest.fixture
def sidecar(tmp_path, start_hub):
    """``sidecar(limits=Limits(), budget=None)``: a hub + a sidecar under those limits; its URL."""

    @contextlib.contextmanager
    def start(limits=None, budget=None):
        limits = limits or Limits()
        with start_hub(tmp_path / "hub") as hub_url:
            settings = Settings(cache_dir=tmp_path / "cache", upstream_url=hub_url)
            with serve(create_app(settings), **limit_options(limits, budget)) as url:
                yield url

    return start


def _upload(url: str, name: str, data: bytes) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/login", json=PUBLISHER.body).status_code == 200
        reply = client.post(f"/upload/{name}", files={"data": (name, data)})
        assert reply.status_code == 200, reply.text


def test_headers_over_limit_answer_431(sidecar):
    """A request head past 64 KiB is a JSON 431 and a closed connection; others still served."""
    with sidecar() as url, connect(url) as sock:
        huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20)
        send_quietly(sock, huge)
        status, detail = status_and_detail(read_all(sock))
        assert status == 431
        assert "65536" in detail
        started = time.monotonic()
        assert httpx.get(f"{url}/health").status_code == 200
        assert elapsed(started) < 1


def test_headers_at_limit_are_served(sidecar):
    """A head just under the configured limit is an ordinary request."""
    with sidecar(Limits(max_header_bytes=2048)) as url, connect(url) as sock:
        head = request("GET", "/health", {"X-Pad": "a" * 1800})
        assert len(head) < 2048
        sock.sendall(head)
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_headers_slowloris_closed_after_timeout(sidecar):
    """Clients that send half a head (or nothing) are disconnected after the header timeout."""
    with sidecar(Limits(header_timeout=0.5)) as url:
        sockets = [connect(url) for _ in range(50)]
        try:
            for sock in sockets[:40]:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            started = time.monotonic()
            assert all(closed_within(sock, 5) for sock in sockets)
            assert elapsed(started) < 3
        finally:
            for sock in sockets:
                sock.close()


def test_headers_trickled_closed_after_timeout(sidecar):
    """A head sent a byte at a time keeps no connection open past the header timeout."""
    with sidecar(Limits(header_timeout=0.5)) as url, connect(url) as sock:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaa":
                sock.send(bytes([byte]))
                time.sleep(0.1)
        assert closed_within(sock, 5)
        assert elapsed(started) < 5


def test_connections_over_cap_answer_503(sidecar):
    """Past the connection cap a request is a JSON 503; once others leave it is served again."""
    with sidecar(Limits(max_connections=3)) as url:
        idle = [connect(url) for _ in range(3)]
        try:
            eventually(lambda: _health_status(url) == 503)
            with connect(url) as sock:
                sock.sendall(request("GET", "/health"))
                status, detail = status_and_detail(read_all(sock))
            assert status == 503
            assert "too many connections" in detail
        finally:
            for sock in idle:
                sock.close()
        eventually(lambda: _health_status(url) == 200)


def test_connections_over_cap_answered_at_once(sidecar):
    """Idle connections past the cap get their 503 at once and hold no descriptor for long."""
    with sidecar(Limits(max_connections=2, header_timeout=60)) as url:
        idle = [connect(url) for _ in range(2)]
        flood: list = []
        try:
            eventually(lambda: server_connections(url) == 2)
            flood = [connect(url) for _ in range(20)]
            for sock in flood:
                sock.settimeout(5)
                status, detail = status_and_detail(read_all(sock))
                assert status == 503
                assert "too many connections" in detail
            eventually(lambda: server_connections(url) == 2, timeout=5)
        finally:
            for sock in idle + flood:
                sock.close()


def _health_status(url: str) -> int:
    with connect(url) as sock:
        sock.sendall(request("GET", "/health"))
        return int(read_all(sock).split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"[" * 30_000 + b"]" * 30_000, 422, "deeper than 32"),
        (b"[" * 5_000 + b"]" * 5_000, 422, "deeper than 32"),
        (b'{"email": ' + b"[" * 33 + b"]" * 33 + b"}", 422, "deeper than 32"),
        (b'{"email": ' + b"7" * 5_000 + b"}", 422, "longer than 20 digits"),
        (b'{"email": 0.' + b"7" * 5_000 + b"}", 422, "longer than 20 digits"),
        (b'{"email": ' + b"1" * 21 + b"}", 422, "longer than 20 digits"),
        (b'{"email": "' + b"x" * 70_000 + b'"}', 413, "larger than 65536 bytes"),
    ],
)
def test_json_body_hostile_is_4xx(sidecar, body, status, words):
    """Deep, long-numbered or oversized JSON is a 4xx with a reason, never a 500."""
    with sidecar() as url:
        reply = httpx.post(
            f"{url}/login", content=body, headers={"content-type": "application/json"}
        )
    assert reply.status_code == status, reply.text
    assert words in reply.json()["detail"]


def test_json_brackets_in_strings_do_not_count(sidecar):
    """Brackets inside JSON strings are text, not nesting: the login goes on to the upstream."""
    with sidecar() as url:
        reply = httpx.post(f"{url}/login", json={"email": "[" * 100, "password": "{" * 100})
    assert reply.status_code == 401


def test_json_depth_limit_is_configurable(sidecar):
    """UNLOCKD_MAX_JSON_DEPTH lowers the depth: 3 levels pass at 3, fail at 2."""
    body = {"email": [[1]], "password": "p"}
    with sidecar(Limits(max_json_depth=3)) as url:
        assert httpx.post(f"{url}/login", json=body).status_code == 422  # not a string
    with sidecar(Limits(max_json_depth=2)) as url:
        reply = httpx.post(f"{url}/login", json=body)
    assert "deeper than 2" in reply.json()["detail"]


@pytest.mark.parametrize(
    "header",
    ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000],
)
def test_range_long_numbers_answer_416(sidecar, header):
    """A Range position beyond 20 digits is a 416, never a 500."""
    with sidecar() as url:
        _upload(url, "r.bin", b"r" * 1000)
        with httpx.Client(base_url=url) as client:
            assert client.post("/login", json=PUBLISHER.body).status_code == 200
            reply = client.get("/resources/models/r.bin", headers={"range": header})
    assert reply.status_code == 416, reply.text
    assert reply.headers["content-range"] == "bytes */1000"


def test_content_length_long_number_is_4xx(sidecar):
    """A Content-Length of 5,000 digits is a JSON 400 from the parser, never a 500."""
    with sidecar() as url, connect(url) as sock:
        sock.sendall(request("POST", "/login", {"Content-Length": "9" * 5000}))
        status, _ = status_and_detail(read_all(sock))
    assert status == 400


def test_download_stalled_client_dropped_after_send_timeout(sidecar):
    """A client that takes no byte for the send timeout is dropped and its budget returned."""
    budget = SendBudget(Limits().send_buffer_budget)
    with sidecar(Limits(send_timeout=1), budget) as url:
        _upload(url, "big.bin", os.urandom(BIG))
        with connect(url, rcvbuf=4096) as sock:
            sock.sendall(request("GET", "/resources/models/big.bin"))
            eventually(lambda: budget.used > 0)
            started = time.monotonic()
            eventually(lambda: budget.used == 0, timeout=10)
            assert elapsed(started) < 5
            received = read_all(sock)
    assert 0 < len(received) < BIG


def test_download_slow_client_is_not_dropped(sidecar):
    """A client that reads slowly but steadily gets every byte despite a short send timeout."""
    with sidecar(Limits(send_timeout=1)) as url:
        data = os.urandom(BIG)
        _upload(url, "slow.bin", data)
        with connect(url, rcvbuf=65536) as sock:
            sock.sendall(request("GET", "/resources/models/slow.bin"))
            chunks = []
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
                time.sleep(0.002)
    assert b"".join(chunks).endswith(data)


def test_download_stalled_clients_bounded_by_budget(sidecar):
    """Stalled clients hold no more than the budget; a reader still finishes once they go."""
    budget = SendBudget(4 << 20)
    with sidecar(Limits(send_timeout=2), budget) as url:
        data = os.urandom(BIG)
        _upload(url, "b.bin", data)
        stalled = [connect(url, rcvbuf=4096) for _ in range(8)]
        try:
            for sock in stalled:
                sock.sendall(request("GET", "/resources/models/b.bin"))
            eventually(lambda: budget.used >= budget.total - (1 << 20))
            with httpx.Client(base_url=url, timeout=30) as client:
                assert client.post("/login", json=PUBLISHER.body).status_code == 200
                assert client.get("/resources/models/b.bin").content == data
            assert budget._peak <= budget.total
        finally:
            for sock in stalled:
                sock.close()
        eventually(lambda: budget.used == 0)


def _stall(url: str, path: str, count: int) -> list:
    """``count`` clients that ask for ``path`` and take (almost) none of it."""
    stalled = [connect(url, rcvbuf=4096) for _ in range(count)]
    for sock in stalled:
        sock.sendall(request("GET", path))
    return stalled


def test_health_send_budget_spent_still_answers(sidecar):
    """/health and /status answer at once while stalled downloads hold the whole budget."""
    budget = SendBudget(256 << 10)
    with sidecar(Limits(send_timeout=60), budget) as url:
        _upload(url, "big.bin", os.urandom(BIG))
        stalled = _stall(url, "/resources/models/big.bin", 4)
        try:
            eventually(lambda: budget.used == budget.total)
            with httpx.Client(base_url=url, timeout=15) as client:
                assert client.get("/health").json() == {"status": "ok"}
                assert client.get("/status").json()["authenticated"] is True
            assert budget.used == budget.total
        finally:
            for sock in stalled:
                sock.close()
        eventually(lambda: budget.used == 0)


def test_server_configs_stalled_sidecar_leaves_hub_sends(tmp_path, hub_app):
    """Servers of one process (``unlockd dev``) have a budget each: the hub's blobs still go."""
    (hub_socket, hub_url), (sidecar_socket, url) = bound_socket(), bound_socket()
    settings = Settings(cache_dir=tmp_path / "cache", upstream_url=hub_url)
    apps = [(hub_app(tmp_path / "hub"), "127.0.0.1", 0), (create_app(settings), "127.0.0.1", 0)]
    configs = server_configs(apps, limits=Limits(send_timeout=60, send_buffer_budget=1 << 20))
    sidecar_budget = configs[1].http.budget
    with serve_together(configs, [hub_socket, sidecar_socket]):
        _upload(url, "big.bin", os.urandom(BIG))
        data = os.urandom(4 << 20)
        etag = publish_blob(hub_url, "other.bin", data)
        stalled = _stall(url, "/resources/models/big.bin", 4)
        try:
            eventually(lambda: sidecar_budget.used > sidecar_budget.total // 2, timeout=20)
            assert httpx.get(f"{hub_url}/blobs/{etag}", timeout=15).content == data
        finally:
            for sock in stalled:
                sock.close()


class _Cycle:
    """A buffer in a reference cycle, as a cancelled download's frames and traceback hold one."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(os.urandom(size))  # touched pages: they count in RSS
        self.me = self


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _burst(budget: SendBudget, size: int = 32 << 20) -> None:
    await budget.acquire(size)
    budget.release(size)


async def test_budget_idle_after_burst_returns_memory():
    """Cyclic garbage left by a burst of slow clients goes back to the OS once they are gone."""
    budget = SendBudget(256 << 20, trim_delay=0.05)
    for _ in range(4):  # freed mmap'd MiBs raise glibc's mmap threshold, as in a server
        _Cycle(1 << 20).me = None
    garbage = [_Cycle(1 << 20) for _ in range(64)]
    garbage.clear()
    held = _rss()
    await _burst(budget, 64 << 20)
    await eventually_async(lambda: _rss() < held - (48 << 20))


async def test_budget_idle_after_burst_trims_off_the_loop(monkeypatch):
    """malloc_trim, which walks the whole heap, runs in a worker thread, not on the loop."""
    threads: list[int] = []
    monkeypatch.setattr(
        limits_module, "_malloc_trim", lambda _pad: threads.append(threading.get_ident()) or 1
    )
    await _burst(SendBudget(64 << 20, trim_delay=0.01))
    await eventually_async(lambda: threads)
    assert threads[0] != threading.get_ident()


async def test_budget_bursts_in_a_row_collect_once_per_interval(monkeypatch):
    """Bursts in quick succession make one full collection per interval, not one each."""
    collections: list[float] = []
    monkeypatch.setattr(gc, "collect", lambda *_: collections.append(time.monotonic()) or 0)
    budget = SendBudget(64 << 20, trim_delay=0.01, trim_interval=1.0)
    await _burst(budget)
    await eventually_async(lambda: len(collections) == 1)
    await _burst(budget)
    await asyncio.sleep(0.3)
    assert len(collections) == 1
    await eventually_async(lambda: len(collections) == 2)
    assert collections[1] - collections[0] > 0.9


def test_run_servers_objects_alive_at_start_frozen(tmp_path, hub_app):
    """Objects alive when serving starts are frozen out of full collections (they take ~50 ms)."""
    before = gc.get_freeze_count()
    frozen: list[int] = []

    async def setup() -> None:
        frozen.append(gc.get_freeze_count())
        os.kill(os.getpid(), signal.SIGINT)

    try:
        assert run_servers([(hub_app(tmp_path / "hub"), "127.0.0.1", 0)], setup) == 0
    finally:
        gc.unfreeze()
    assert frozen[0] > before
