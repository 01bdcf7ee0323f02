"""The hub under SPEC §12's limits, over real sockets: issue 11's repros, bounded."""

from __future__ import annotations

import contextlib
import os
import time

import httpx
import pytest

from harness import eventually
from limits_support import (
    closed_within,
    connect,
    elapsed,
    publish_blob,
    read_all,
    request,
    send_quietly,
    status_and_detail,
)
from servers import serve
from unlockd.config import Limits
from unlockd.limits import SendBudget
from unlockd.server import limit_options


@pytest.fixture
def hub_under(tmp_path, hub_app):
    """``hub_under(limits=Limits(), budget=None)``: a hub under those limits; yields its URL."""

    @contextlib.contextmanager
    def start(limits=None, budget=None):
        app = hub_app(tmp_path / "hub")
        with serve(app, **limit_options(limits or Limits(), budget)) as url:
            yield url

    return start


def _publish(url: str, data: bytes) -> str:
    return publish_blob(url, "x.bin", data)


def test_hub_headers_over_limit_answer_431(hub_under):
    """A request head past 64 KiB is a JSON 431; the hub goes on serving others at once."""
    with hub_under() as url, connect(url) as sock:
        send_quietly(sock, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (8 << 20))
        status, _ = status_and_detail(read_all(sock))
        assert status == 431
        started = time.monotonic()
        assert httpx.get(f"{url}/health").status_code == 200
        assert elapsed(started) < 1


def test_hub_half_sent_heads_closed_after_timeout(hub_under):
    """Connections that send half a head are all closed after the header timeout."""
    with hub_under(Limits(header_timeout=0.5)) as url:
        sockets = [connect(url) for _ in range(50)]
        try:
            for sock in sockets:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert all(closed_within(sock, 5) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()


def test_hub_connections_over_cap_answer_503(hub_under):
    """Past the connection cap the hub answers a JSON 503."""
    with hub_under(Limits(max_connections=2)) as url:
        idle = [connect(url) for _ in range(2)]
        try:
            with connect(url) as sock:
                sock.sendall(request("GET", "/health"))
                status, _ = status_and_detail(read_all(sock))
            assert status == 503
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "deeper than 32"),
        (b'{"email": ' + b"7" * 5_000 + b', "password": "p"}', "longer than 20 digits"),
    ],
)
def test_hub_json_hostile_is_422(hub_under, body, words):
    """Deep or long-numbered JSON at /auth/login is a 422, never a 500 (RecursionError)."""
    with hub_under() as url:
        reply = httpx.post(f"{url}/auth/login", content=body)
    assert reply.status_code == 422, reply.text
    assert words in reply.json()["detail"]


def test_hub_json_over_limit_is_413(hub_under):
    """A JSON body past UNLOCKD_HUB_MAX_JSON_BYTES is a 413 even where the route allows more."""
    with hub_under(Limits(max_json_bytes=4096)) as url:
        reply = httpx.post(f"{url}/auth/login", json={"email": "x" * 5000, "password": "p"})
    assert reply.status_code == 413


@pytest.mark.parametrize("header", ["bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000])
def test_hub_blob_range_long_numbers_answer_416(hub_under, header):
    """A Range position beyond 20 digits on /blobs is a 416, never a 500."""
    with hub_under() as url:
        etag = _publish(url, b"b" * 1000)
        reply = httpx.get(f"{url}/blobs/{etag}", headers={"range": header})
    assert reply.status_code == 416, reply.text


def test_hub_blob_stalled_client_dropped_after_send_timeout(hub_under):
    """A blob client that takes no byte for the send timeout is dropped, its budget returned."""
    budget = SendBudget(Limits().send_buffer_budget)
    size = 24 << 20
    with hub_under(Limits(send_timeout=1), budget) as url:
        etag = _publish(url, os.urandom(size))
        with connect(url, rcvbuf=4096) as sock:
            sock.sendall(request("GET", f"/blobs/{etag}"))
            eventually(lambda: budget.used > 0)
            eventually(lambda: budget.used == 0, timeout=10)
            assert 0 < len(read_all(sock)) < size


def test_hub_health_send_budget_spent_still_answers(hub_under):
    """The hub's /health answers at once while stalled blob clients hold the whole budget."""
    budget = SendBudget(256 << 10)
    with hub_under(Limits(send_timeout=60), budget) as url:
        etag = _publish(url, os.urandom(24 << 20))
        stalled = [connect(url, rcvbuf=4096) for _ in range(4)]
        try:
            for sock in stalled:
                sock.sendall(request("GET", f"/blobs/{etag}"))
            eventually(lambda: budget.used == budget.total)
            assert httpx.get(f"{url}/health", timeout=15).status_code == 200
            assert budget.used == budget.total
        finally:
            for sock in stalled:
                sock.close()
        eventually(lambda: budget.used == 0)
